"""torch.library registration: opcheck on every op, and a compiled training step equal to eager.

On the CPU the custom_op variants (`vae_engine::<op>_interp`) are checked, on a GPU the
triton_op variants (`vae_engine::<op>`).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import kernels
from kernels import gn_silu, gn_silu_bwd, kl, reparam, reparam_kl, vq, vq_ema
from kernels._common import OpPair
from tests.kernels.conftest import DEVICE, randn

pytestmark = pytest.mark.triton


def _seed() -> torch.Tensor:
    return torch.tensor([123, 4], dtype=torch.int64, device=DEVICE)


def _grad(*shape: int) -> torch.Tensor:
    return randn(*shape).requires_grad_()


def _nhwc(*shape: int) -> torch.Tensor:
    return randn(*shape).to(memory_format=torch.channels_last)


def _gn_stats() -> tuple[torch.Tensor, torch.Tensor]:
    return randn(2, 2, 3), torch.rand(2, 3, device=DEVICE) + 0.5  # mean (hi, lo), rstd


# op, a function building fresh sample arguments
CASES: list[tuple[OpPair, Any]] = [
    (reparam._FWD, lambda: (_grad(5, 7), _grad(5, 7), _seed())),
    (reparam._BWD, lambda: (randn(5, 7), randn(5, 7), _seed())),
    (kl._FWD, lambda: (_grad(5, 7), _grad(5, 7))),
    (kl._BWD, lambda: (randn(5), randn(5, 7), randn(5, 7))),
    (reparam_kl._FWD, lambda: (_grad(5, 7), _grad(5, 7), _seed())),
    (reparam_kl._BWD, lambda: (randn(5, 7), randn(5), randn(5, 7), randn(5, 7), _seed())),
    (vq._NEAREST, lambda: (randn(9, 3), randn(4, 3))),
    (vq._FWD, lambda: (_grad(9, 3), _grad(4, 3), 0.25)),
    (vq._BWD, lambda: (randn(9, 3), randn(), randn(9, 3), randn(4, 3),
                       torch.randint(0, 4, (9,), device=DEVICE), 0.25, True)),  # fmt: skip
    (vq_ema._FWD, lambda: (randn(9, 3), torch.randint(0, 4, (9,), device=DEVICE), 4)),
    (gn_silu._FWD, lambda: (_nhwc(2, 6, 3, 5).requires_grad_(), _grad(6), None, 3, 1e-5)),
    (gn_silu_bwd._BWD, lambda: (randn(2, 6, 7), randn(2, 6, 7), randn(6), randn(6),
                                *_gn_stats(), 3)),  # fmt: skip
]


@pytest.mark.parametrize(("op", "make_args"), CASES, ids=[c[0].name for c in CASES])
def test_opcheck(op: OpPair, make_args: Any) -> None:
    variant = op.pick()  # custom_op under the interpreter, triton_op on a GPU
    assert variant is (op.interp if DEVICE == "cpu" else op.gpu)
    torch.library.opcheck(variant, make_args())  # raises on any failed check


class TinyVAE(torch.nn.Module):
    """Encoder -> (mu, logvar) -> z, KL -> VQ -> decoder: every differentiable op once."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Linear(6, 8)
        self.dec = torch.nn.Linear(4, 6)
        self.codebook = torch.nn.Parameter(torch.randn(5, 4))

    def forward(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        mu, logvar = self.enc(x).chunk(2, dim=-1)  # (B, 4) each
        z, kl_rows = kernels.reparameterize_kl(mu, logvar, seed=seed)
        z2 = kernels.reparameterize(mu, logvar, seed=seed)
        q, _, vq_loss = kernels.vq_quantize(z, self.codebook, beta=0.25)
        recon = (self.dec(q) - x).pow(2).mean()
        kl_term = kernels.kl_divergence(mu, logvar, "batchmean") + kl_rows.mean()
        return recon + kl_term + vq_loss + 1e-2 * z2.pow(2).mean()


def _step(model: TinyVAE, x: torch.Tensor, seed: int, fn: Any) -> list[torch.Tensor]:
    model.zero_grad()
    loss = fn(x, seed)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compiled_step_equals_eager(backend: str) -> None:
    torch._dynamo.reset()
    model = TinyVAE().to(DEVICE)
    x = randn(9, 6)
    with kernels.use_backend(backend):
        eager = _step(model, x, 1234, model)
        compiled = _step(model, x, 1234, torch.compile(model, fullgraph=True))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    assert eager[-1].abs().sum() > 0  # the codebook received a gradient


def test_opcheck_seeded_randn() -> None:
    op = torch.ops.vae_engine.seeded_randn.default
    torch.library.opcheck(op, ([3, 4], torch.float32, torch.device(DEVICE), 7))
    assert torch.equal(op([3, 4], torch.float32, torch.device(DEVICE), 7),
                       op([3, 4], torch.float32, torch.device(DEVICE), 7))  # fmt: skip
