"""engine.train end to end: compile == eager, kill + resume, bad input, NaN stop, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine import losses
from engine.train import build_parser, main
from engine.training.batches import move_to
from engine.training.trainer import Trainer, build_run

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = os.environ.get("VAE_DATA_DIR", str(REPO.parent / "shared" / "datasets"))
needs_mnist = pytest.mark.skipif(not Path(DATA_DIR, "MNIST", "raw").is_dir(),
                                 reason=f"MNIST not found under {DATA_DIR}; set VAE_DATA_DIR")


def args_for(tmp_path, *extra):
    return ["--data-dir", DATA_DIR, "--out", str(tmp_path / "run"), "--no-progress", *extra]


def first_losses(argv, n_steps):
    args = build_parser().parse_args(argv)
    trainer = Trainer(build_run(args))
    loader = trainer.run.data.train
    loader.set_epoch(0)
    out = []
    for _, batch in zip(range(n_steps), loader):
        trainer.weight.beta.fill_(1.0)
        loss, _ = trainer.step_fn(move_to(batch, trainer.run.device), trainer.weight)
        out.append(loss.item())
    return out


@needs_mnist
@pytest.mark.slow
def test_compiled_step_matches_eager(tmp_path):
    # Inductor's own RNG differs from eager's; fallback_random makes compiled randn use the
    # same generator, so any difference left is in the compiled arithmetic itself.
    with torch._inductor.config.patch(fallback_random=True):
        compiled_matches_eager(tmp_path)


def compiled_matches_eager(tmp_path):
    argv = args_for(tmp_path, "--model", "mlp", "--hidden-dims", "64", "--seed", "3",
                    "--kernels", "torch")
    eager = first_losses(argv, 5)
    torch._dynamo.reset()
    compiled = first_losses([*argv, "--compile"], 5)
    assert eager[0] != eager[-1]  # the optimizer really stepped
    for e, c in zip(eager, compiled):
        assert abs(e - c) <= 1e-4 * abs(e), (eager, compiled)


@needs_mnist
def test_short_run_writes_the_run_directory(tmp_path):
    assert main(args_for(tmp_path, "--model", "mlp", "--hidden-dims", "64", "--max-steps", "30",
                         "--ema", "0.9", "--beta-schedule", "linear", "--beta-steps", "20")) == 0
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 30 and rows[-1]["val_loss"] > 0
    assert {"train_recon", "train_kl", "val_elbo", "steps_per_s", "images_per_s"} <= set(rows[-1])
    assert (run / "samples" / "epoch_001.png").stat().st_size > 100
    assert (run / "recon" / "epoch_001.png").exists()
    test = json.loads((run / "test.json").read_text())
    assert test["loss"] == pytest.approx(test["recon"] + test["kl"], rel=1e-4)
    model, c = ckpt.load_model(run / "best", ema=True)
    assert c.step == 30 and (c.path / "ema.safetensors").exists()


@needs_mnist
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(tmp_path):
    cmd = [sys.executable, "-m", "engine.train", *args_for(tmp_path, "--model", "mlp",
           "--hidden-dims", "64", "--batch-size", "16", "--epochs", "2", "--ckpt-every", "25")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = tmp_path / "run" / "last"
    deadline = time.time() + 120
    while time.time() < deadline:
        if (last / "state.json").exists() and ckpt.read(last, verify=False).step >= 100:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt.read(tmp_path / "run").step  # verifies every file's hash: never half-written
    assert 0 < killed_at < 3437  # mid-epoch 1 (3437 batches of 16 per epoch)
    resumed = subprocess.run([*cmd, "--resume", "--max-steps", str(killed_at + 50)], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {tmp_path / 'run'}" in resumed.stdout
    final = ckpt.read(tmp_path / "run")
    assert final.step == killed_at + 50
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})  # no duplicate rows
    assert not list((tmp_path / "run").glob("*.tmp"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "transformer"], "unknown model 'transformer'; valid models:"),
        (["--dataset", "cifar"], "unknown dataset 'cifar'; valid datasets: mnist, fashion-mnist"),
        (["--model", "mlp", "--preset", "big"], "unknown preset 'big' for model 'mlp'"),
    ],
)
def test_bad_names_give_one_line_errors(tmp_path, capsys, argv, message):
    assert main(args_for(tmp_path, *argv)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_dataset_offline_says_how_to_fix(tmp_path, capsys, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(*a, **k):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    monkeypatch.setenv("VAE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    argv = ["--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "could not be downloaded" in err and "VAE_DATA_DIR" in err and err.count("\n") == 1


def test_a_data_dir_that_does_not_exist_is_refused_not_created(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "dir"
    argv = ["--data-dir", str(missing), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1
    assert not missing.exists() and not (tmp_path / "no").exists()


@needs_mnist
def test_resume_with_another_model_is_refused(tmp_path, capsys):
    assert main(args_for(tmp_path, "--model", "mlp", "--hidden-dims", "32",
                         "--max-steps", "3")) == 0
    capsys.readouterr()
    assert main(args_for(tmp_path, "--model", "conv", "--resume")) == 2
    assert "cannot change --model (saved 'mlp', given 'conv')" in capsys.readouterr().err


@needs_mnist
def test_resume_from_corrupt_checkpoint_is_refused(tmp_path, capsys):
    assert main(args_for(tmp_path, "--model", "mlp", "--hidden-dims", "32",
                         "--max-steps", "3")) == 0
    for name in ("last", "best"):
        weights = tmp_path / "run" / name / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert main(args_for(tmp_path, "--resume")) == 2
    assert "corrupt" in capsys.readouterr().err


@needs_mnist
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    real, calls = losses.vae_objective, {"n": 0}

    def poisoned(model, x, y, obj, weight):
        calls["n"] += 1
        loss, parts = real(model, x, y, obj, weight)
        return (loss * float("nan") if calls["n"] > 25 else loss), parts

    monkeypatch.setattr(losses, "vae_objective", poisoned)
    argv = args_for(tmp_path, "--model", "mlp", "--hidden-dims", "32", "--max-steps", "60",
                    "--ckpt-every", "10", "--log-every", "5")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "loss became NaN/inf" in err and "last good checkpoint is kept" in err
    kept = ckpt.read(tmp_path / "run" / "last")
    assert kept.step == 20
    model, _ = ckpt.load_model(kept.path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@needs_mnist
@pytest.mark.slow
def test_torchrun_ddp_two_cpu_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + os.getpid() % 1000), "-m", "engine.train",
           *args_for(tmp_path, "--model", "mlp", "--hidden-dims", "32", "--max-steps", "12",
                     "--batch-size", "32")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = ckpt.read(tmp_path / "run" / "last")
    assert state.step == 12
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1  # rank 0 alone logs


@needs_mnist
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps_stay_finite(tmp_path, amp):
    argv = args_for(tmp_path, "--model", "mlp", "--hidden-dims", "64", "--amp", amp,
                    "--max-steps", "6", "--grad-clip", "5.0")
    assert main(argv) == 0
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 6 and 0 < row["train_loss"] < 1e4
