"""Training-step throughput per model family: eager vs --compile (whole step compiled).

    pytest benchmarks/test_train_step.py --benchmark-only --benchmark-json=out.json
    python benchmarks/report.py out.json        # medians and ratios against eager
"""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch

from benchmarks.conftest import synchronized
from engine.losses import KLWeight, Objective
from engine.models import build_model
from engine.training.trainer import LossModule, lr_lambda, make_step

CASES = {  # subject -> (family, overrides, batch size)
    "mlp": ("mlp", {}, 128),
    "conv": ("conv", {"hidden_dims": (32, 64, 128)}, 64),
    "cvae-mlp": ("cvae-mlp", {}, 128),
    "vqvae": ("vqvae", {"hidden_dim": 64, "num_codes": 256}, 32),
}


def step_args(compile_: bool) -> Namespace:
    return Namespace(amp="off", grad_clip=None, compile=compile_, compile_mode=None,
                     warmup_steps=0, lr_schedule="constant")


@pytest.mark.parametrize("provider", ["eager", "compile"])
@pytest.mark.parametrize("subject", list(CASES))
def test_train_step(benchmark, record, bench_device, subject, provider):
    family, overrides, batch = CASES[subject]
    torch.manual_seed(0)
    model = build_model(family, **overrides).to(bench_device)
    x = torch.bernoulli(torch.rand(batch, *model.data_shape, device=bench_device))
    y = torch.randint(10, (batch,), device=bench_device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(step_args(False), 10**6))
    step, _ = make_step(LossModule(model, Objective()), optimizer, scheduler,
                        step_args(provider == "compile"), bench_device)
    weight = KLWeight(torch.ones((), device=bench_device), torch.zeros((), device=bench_device))
    run = synchronized(lambda: step((x, y), weight), bench_device)
    for _ in range(3):  # compile and warm up outside the timed region
        run()
    benchmark.group = f"train-step-{subject}-fp32"
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    median = benchmark.stats.stats.median
    record(batch_size=batch, images_per_s=batch / median, provider=provider)
