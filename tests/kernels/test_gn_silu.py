"""kernels.group_norm_silu: fused GroupNorm + SiLU against float64 autograd of the reference.

Inputs have a non-zero mean and a non-unit scale per channel, gamma and beta are random, and the
upstream gradient is random. Shapes are small: every program costs about a millisecond in the
Triton interpreter.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import kernels
from kernels import _groups, gn_silu
from tests.conftest import assert_close_to_reference
from tests.kernels.conftest import DEVICE, randn

pytestmark = pytest.mark.triton

HALF_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shape, groups, channels_last): one group; C == G; odd H, W (63 pixels, not a multiple of the
# tile); batch 3; (N, C, L) and (N, C, D, H, W) inputs.
SHAPES = [
    ((1, 4, 5, 7), 1, False),
    ((3, 6, 3, 5), 6, True),
    ((2, 8, 7, 9), 4, False),
    ((2, 8, 7, 9), 4, True),
    ((1, 12, 5), 3, False),
    ((2, 4, 2, 3, 3), 2, True),
]
IDS = [f"{'x'.join(map(str, s))}-G{g}-{'cl' if cl else 'nchw'}" for s, g, cl in SHAPES]
SPLIT_TUNING = _groups.Tuning(tile=64, min_chunk=64)  # tiles of 64 elements, chunks of >= 64


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """Same values, channels innermost in memory (NHWC / NDHWC / NLC)."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool,
                offset: float = 2.0) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """x with a per-channel mean around `offset` and scales in [0.5, 3.5]; random gamma, beta."""
    c = shape[1]
    per_channel = (c,) + (1,) * (len(shape) - 2)
    x64 = randn(*shape, dtype=torch.float64) * (0.5 + 3 * torch.rand(per_channel, device=DEVICE))
    x64 = x64 + offset + randn(*per_channel, dtype=torch.float64)
    x = x64.to(dtype)
    x = to_channels_last(x) if channels_last else x
    return x, randn(c, dtype=dtype), randn(c, dtype=dtype)


def grads_of(fn: Any, inputs: tuple[torch.Tensor, ...], groups: int, dy: torch.Tensor,
             dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """(y, dx, dgamma, dbeta) of fn on copies of the inputs cast to `dtype` (default: theirs)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    y = fn(leaves[0], groups, leaves[1], leaves[2])
    return (y, *torch.autograd.grad(y, leaves, dy.to(y.dtype)))


def check_against_reference(inputs: tuple[torch.Tensor, ...], groups: int,
                            against_eager: bool = True) -> None:  # fmt: skip
    """Output and gradients within 2x eager's error (same dtype) + the dtype floor; within the
    floor alone if not `against_eager`."""
    x = inputs[0]
    dy = randn(*x.shape, dtype=torch.float64)
    actual = grads_of(kernels.group_norm_silu, inputs, groups, dy)
    expected = grads_of(kernels.group_norm_silu_ref, inputs, groups, dy, torch.float64)
    eager = grads_of(kernels.group_norm_silu_ref, inputs, groups, dy)
    for name, a, e, eag in zip(("y", "dx", "dgamma", "dbeta"), actual, expected, eager):
        assert a.dtype == x.dtype, name
        assert_close_to_reference(a, e, eag if against_eager else None)
    assert actual[0].stride() == x.stride() and actual[1].stride() == x.stride()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize(("shape", "groups", "channels_last"), SHAPES, ids=IDS)
def test_forward_matches_reference(shape: tuple[int, ...], groups: int, channels_last: bool,
                                   dtype: torch.dtype) -> None:  # fmt: skip
    x, weight, bias = make_inputs(shape, dtype, channels_last)
    y = kernels.group_norm_silu(x, groups, weight, bias, eps=1e-5)
    expected = kernels.group_norm_silu_ref(x.double(), groups, weight.double(), bias.double())
    eager = kernels.group_norm_silu_ref(x, groups, weight, bias)
    assert y.shape == x.shape and y.dtype == dtype and y.stride() == x.stride()
    assert_close_to_reference(y, expected, eager)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_backward_matches_reference(channels_last: bool, dtype: torch.dtype) -> None:
    check_against_reference(make_inputs((3, 6, 5, 7), dtype, channels_last), groups=2)


SPLIT_CASES = [(torch.float32, False), (torch.float32, True), (torch.float16, True)]


@pytest.mark.parametrize(("dtype", "channels_last"), SPLIT_CASES)
def test_split_path_matches_reference(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                      channels_last: bool) -> None:  # fmt: skip
    monkeypatch.setattr(_groups, "TUNING", SPLIT_TUNING)
    shape, groups = (1, 6, 17, 13), 3  # 221 pixels: uneven chunks
    plan = _groups.launch_params(groups, 2, 17 * 13, torch.device(DEVICE))
    assert plan.splits > 2 and plan.chunk % plan.block_hw == 0
    check_against_reference(make_inputs(shape, dtype, channels_last), groups)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_large_mean_small_spread(monkeypatch: pytest.MonkeyPatch, split: bool) -> None:
    """Mean 300, spread ~1, float32: E[x^2] - E[x]^2 would lose most digits, and even a mean
    rounded to fp32 (eager's) costs ~1e-5 per element; the kernels' pivot-shifted statistics
    and (hi, lo) mean must stay within the float32 floor alone."""
    if split:
        monkeypatch.setattr(_groups, "TUNING", SPLIT_TUNING)
    inputs = make_inputs((2, 4, 9, 11), torch.float32, False, offset=300.0)
    check_against_reference(inputs, groups=2, against_eager=False)


def test_constant_groups() -> None:
    """Zero variance: rstd = 1 / sqrt(eps), xhat = 0, y = silu(beta)."""
    x, weight, bias = make_inputs((2, 6, 3, 4), torch.float32, True)
    x = (x[:, :, :1, :1] * 0 + randn(2, 6, 1, 1)).expand_as(x).contiguous()
    check_against_reference((x, weight, bias), groups=6)


def test_launcher_splits_few_big_groups() -> None:
    """SD decoder at batch 1 (32 groups of 16 x 128 x 128) splits; batch 16 does not."""
    device = torch.device("cpu")  # 132 SMs assumed: an H100 / H200
    plan = _groups.launch_params(32, 16, 128 * 128, device)
    assert 32 * plan.splits >= _groups.TUNING.cpu_sms
    assert (plan.splits - 1) * plan.chunk < 128 * 128 <= plan.splits * plan.chunk
    assert 16 * plan.chunk >= _groups.TUNING.min_chunk
    assert _groups.launch_params(16 * 32, 16, 128 * 128, device).splits == 1
    assert _groups.launch_params(32, 16, 8 * 8, device).splits == 1  # small maps stay whole


@pytest.mark.parametrize("with_weight", [False, True])
def test_weight_and_bias_none(with_weight: bool) -> None:
    x, weight, _ = make_inputs((2, 6, 4, 5), torch.float32, False)
    weight = weight if with_weight else None
    y = kernels.group_norm_silu(x, 3, weight, None)
    w64 = None if weight is None else weight.double()
    assert_close_to_reference(y, kernels.group_norm_silu_ref(x.double(), 3, w64, None))
    if with_weight:
        x.requires_grad_()
        weight.requires_grad_()
        dx, dw = torch.autograd.grad(kernels.group_norm_silu(x, 3, weight).sum(), (x, weight))
        x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        ex, ew = torch.autograd.grad(kernels.group_norm_silu_ref(x64, 3, w64).sum(), (x64, w64))
        assert_close_to_reference(dx, ex)
        assert_close_to_reference(dw, ew)


def test_noncontiguous_inputs_are_handled() -> None:
    base, weight, bias = make_inputs((4, 6, 9, 10), torch.float32, False)
    sliced = base[::2, :, 1:8, ::3]  # neither contiguous nor channels-last: copied
    y = kernels.group_norm_silu(sliced, 2, weight, bias)
    expected = kernels.group_norm_silu_ref(sliced.double(), 2, weight.double(), bias.double())
    assert_close_to_reference(y, expected)
    nhwc = randn(2, 5, 7, 6).permute(0, 3, 1, 2)  # a channels-last view: read in place
    y = kernels.group_norm_silu(nhwc, 3, weight, bias)
    assert y.stride() == nhwc.stride()
    assert_close_to_reference(y, kernels.group_norm_silu_ref(nhwc.double(), 3, weight.double(),
                                                             bias.double()))  # fmt: skip


def test_empty_batch() -> None:
    x = torch.empty(0, 4, 3, 3, device=DEVICE)
    assert kernels.group_norm_silu(x, 2).shape == (0, 4, 3, 3)


def test_backends_agree_and_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    x, weight, bias = make_inputs((2, 6, 5, 5), torch.float32, True)
    calls: list[int] = []
    reference = gn_silu.group_norm_silu_ref
    monkeypatch.setattr(gn_silu, "group_norm_silu_ref", lambda *a: calls.append(1) or reference(*a))
    with kernels.use_backend("triton"):
        triton = kernels.group_norm_silu(x, 3, weight, bias)
    assert calls == []
    with kernels.use_backend("torch"):
        torch_out = kernels.group_norm_silu(x, 3, weight, bias)
    assert calls == [1]
    torch.testing.assert_close(triton, torch_out, rtol=1e-5, atol=1e-5)


def test_float64_falls_back_under_auto_and_raises_under_triton() -> None:
    x = randn(2, 4, 3, 3, dtype=torch.float64)
    with kernels.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        kernels.group_norm_silu(x, 2)
    with kernels.use_backend("auto"):
        y = kernels.group_norm_silu(x, 2)
    torch.testing.assert_close(y, kernels.group_norm_silu_ref(x, 2))


BAD_INPUTS = [
    (lambda: (randn(8), 2, None, None, 1e-5), ValueError, r"\(N, C, \*spatial\)"),
    (lambda: (randn(2, 6, 3), 4, None, None, 1e-5), ValueError, "C divisible by num_groups"),
    (lambda: (randn(2, 6, 3), 0, None, None, 1e-5), ValueError, "num_groups as an int >= 1"),
    (lambda: (randn(2, 6, 3), True, None, None, 1e-5), ValueError, "num_groups as an int"),
    (lambda: (randn(2, 6, 3), 2, randn(5), None, 1e-5), ValueError, r"weight of shape \(C,\)"),
    (lambda: (randn(2, 6, 3), 2, None, randn(6, dtype=torch.float16), 1e-5), TypeError,
     "bias of x's dtype"),
    (lambda: (randn(2, 6, 3), 2, torch.ones(6, device="meta"), None, 1e-5), ValueError,
     "weight is on meta"),
    (lambda: (randn(2, 6, 3), 2, None, None, -1.0), ValueError, "eps as a finite float"),
    (lambda: (torch.ones(2, 6, 3, dtype=torch.int64), 2, None, None, 1e-5), TypeError, "dtype"),
    (lambda: ([[1.0]], 1, None, None, 1e-5), TypeError, "torch.Tensor"),
]  # fmt: skip


@pytest.mark.parametrize(("make_args", "error", "match"), BAD_INPUTS)
def test_bad_inputs_raise_one_line_errors(make_args: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match) as info:
        kernels.group_norm_silu(*make_args())
    assert "\n" not in str(info.value)


def _train_step(fn: Any, x: torch.Tensor, norm: torch.nn.GroupNorm) -> list[torch.Tensor]:
    norm.zero_grad()
    x = x.detach().requires_grad_()
    loss = fn(x, norm).pow(2).mean()
    loss.backward()
    return [loss.detach(), x.grad, norm.weight.grad, norm.bias.grad]


def _block(x: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    return kernels.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compiled_step_equals_eager(backend: str) -> None:
    torch._dynamo.reset()
    norm = torch.nn.GroupNorm(2, 6).to(DEVICE)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = to_channels_last(randn(2, 6, 5, 7) * 2 + 1)
    with kernels.use_backend(backend):
        eager = _train_step(_block, x, norm)
        compiled = _train_step(torch.compile(_block, fullgraph=True), x, norm)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


class _ConvBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 8)
        torch.nn.init.normal_(self.norm.weight)
        torch.nn.init.normal_(self.norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _block(self.conv(x), self.norm)


@pytest.mark.skipif(DEVICE == "cuda", reason="exports the CPU graph; the rule is device-free")
def test_export_uses_the_reference_and_onnx_matches() -> None:
    ort = pytest.importorskip("onnxruntime")  # optional dependency, imported lazily
    model, x = _ConvBlock().eval(), randn(2, 3, 6, 5)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.group_norm.default" in targets and not any("vae_engine" in t for t in targets)
    onnx_program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        expected = kernels.group_norm_silu_ref(model64.conv(x.double()), 4, model64.norm.weight,
                                               model64.norm.bias)  # fmt: skip
    assert_close_to_reference(torch.from_numpy(out), expected)
