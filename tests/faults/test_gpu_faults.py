"""Faults on a GPU (issue 16): NaN/inf outputs are refused there too, a batch past the GPU's
memory is refused before any allocation, a real CUDA out-of-memory error is one line and the
runtime recovers, a GPU index that is not here is one line, and a GPU run survives an
out-of-memory crash and resumes on the CPU.

The first part tests the logic on the CPU (the finite check of device outputs, the mapping of
torch.OutOfMemoryError); the tests marked `cuda` run it on a real GPU and skip elsewhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine import checkpoint as ckpt
from engine.checkpoint import load_model
from engine.runtime import InputError, Sampler, checks
from engine.runtime.backends import EagerBackend
from engine.runtime.types import device_outputs_finite, refuse_nonfinite_rows
from engine.sample import main as sample_main
from engine.train import main as train_main
from tests.export.conftest import make_checkpoint
from tests.faults.conftest import DATA_DIR, assert_clean_failure, needs_mnist, snapshot
from tests.faults.test_runtime_faults import _kl_model, _ld_spec

cuda = pytest.mark.cuda


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gpu-faults") / "mlp", "mlp",
                           seed=int(torch.randint(1000, ())))


def _torch_oom_message() -> str:
    """torch's CUDA OutOfMemoryError text (as of 2.11-2.14), with fresh sizes."""
    asked, free = torch.rand(2).tolist()
    return (f"CUDA out of memory. Tried to allocate {1 + 30 * asked:.2f} GiB. GPU 0 has a total"
            f" capacity of 139.81 GiB of which {500 * free:.2f} MiB is free. Including non-"
            "PyTorch memory, this process has 139.30 GiB memory in use. Of the allocated memory"
            " 138.1 GiB is allocated by PyTorch, and 200.00 MiB is reserved by PyTorch but"
            " unallocated. If reserved but unallocated memory is large try setting"
            " PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")


# --- the logic, on the CPU ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_device_finite_check_agrees_with_isfinite(dtype):
    """One float64 sum per output decides exactly, huge finite values (whose float32 sum
    overflows) included; the reference is torch.isfinite elementwise."""
    big = torch.finfo(dtype).max
    for _ in range(50):
        outs = [torch.randn(int(torch.randint(1, 5, ())), int(torch.randint(1, 300, ())))
                .to(dtype) for _ in range(int(torch.randint(1, 4, ())))]
        for o in outs:
            for _ in range(int(torch.randint(0, 3, ()))):  # plant finite giants, NaN or inf
                value = [big, -big, math.nan, math.inf, -math.inf][int(torch.randint(5, ()))]
                o.view(-1)[int(torch.randint(o.numel(), ()))] = value
        want = all(bool(torch.isfinite(o).all()) for o in outs)
        assert device_outputs_finite(outs) is want
    assert device_outputs_finite([torch.zeros(3, dtype=torch.long)])  # integer outputs pass


def test_refusing_nonfinite_rows_names_bad_inputs_first_then_overflowing_rows():
    n = int(torch.randint(2, 9, ()))
    row = int(torch.randint(n, ()))
    z, out = torch.randn(n, 8), torch.randn(n, 1, 4, 4)
    out[row, 0, 1, 2] = math.nan
    with pytest.raises(InputError, match=rf"the outputs of 1 of {n} rows are NaN or inf although"
                                         rf" their inputs are finite: row {row} \(max \|z\|"):
        refuse_nonfinite_rows(z, [out], "decode()")
    z[row, 3] = math.inf
    with pytest.raises(InputError, match=rf"decode\(\): the latent holds NaN or inf in 1 of {n}"
                                         rf" rows \(first: row {row}\)"):
        refuse_nonfinite_rows(z, [out], "decode()")
    with pytest.raises(InputError, match=r"encode\(\): the images holds NaN or inf"):
        refuse_nonfinite_rows(z, [out], "encode()", "x")
    with pytest.raises(InputError, match=r"an output without a row per input holds NaN or inf"):
        refuse_nonfinite_rows(torch.randn(n, 8), [torch.tensor([1.0, math.inf])], "decode()")


def test_an_out_of_memory_error_in_the_runtime_is_one_line_and_names_the_fix(run, monkeypatch):
    """Past the lower-bound memory check, a backend can still run out (weights, workspaces,
    allocator slack): torch's several-sentence OutOfMemoryError becomes one InputError."""
    message = _torch_oom_message()
    def boom(*args):
        raise torch.OutOfMemoryError(message)
    monkeypatch.setattr(EagerBackend, "run", lambda self, inputs: boom())
    monkeypatch.setattr(EagerBackend, "run1", lambda self, z: boom())
    s = Sampler.load(run, backend="eager", device="cpu")
    asked = message.split("allocate ")[1].split(". ")[0]
    free = message.split("of which ")[1].split(" is free")[0]
    for call, what in ((lambda: s.decode(torch.randn(1, 8)), "decode"),
                       (lambda: s.decode(torch.randn(3, 8)), "decode"),
                       (lambda: s.sample(5, batch_size=2), "sample"),
                       (lambda: s.encode(torch.rand(2, 1, 28, 28)), "encode")):
        with pytest.raises(InputError) as info:
            call()
        text = str(info.value)
        assert text.startswith(f"{what}(): the device ran out of memory (asked for {asked},"
                               f" {free} free): ") and "\n" not in text
        assert ("encode fewer images" if what == "encode" else "decode fewer rows") in text


def test_train_maps_an_out_of_memory_error_to_one_line(tmp_path, capsys, monkeypatch):
    message = _torch_oom_message()
    def fit(self):
        raise torch.OutOfMemoryError(message)
    monkeypatch.setattr("engine.train.Trainer.fit", fit)
    code = train_main(["--out", str(tmp_path / "run"), "--data-dir", DATA_DIR, "--no-progress",
                       "--max-steps", "1"])
    err = capsys.readouterr().err
    assert_clean_failure(code, err)
    assert "ran out of memory (asked for" in err and "--batch-size" in err and "--resume" in err


# --- on a GPU -------------------------------------------------------------------------------------
def _eager_decode(run, z: torch.Tensor) -> torch.Tensor:
    model, _ = load_model(run, device="cpu")
    with torch.no_grad():
        return model.export_parts()["decoder"].module.eval()(z.cpu())


def _overflowing(s: Sampler, batch: int) -> tuple[torch.Tensor, int]:
    """(z on the GPU, row): one row of entries +-3e38 whose unchecked decode is not finite."""
    for _ in range(256):
        z, row = torch.randn(batch, 8, device="cuda"), int(torch.randint(batch, ()))
        z[row] = torch.sign(torch.randn(8, device="cuda")) * 3e38
        raw = s.backend.run([z])[0]
        if (~torch.isfinite(raw)).flatten(1).any(1).nonzero().flatten().tolist() == [row]:
            return z, row
    raise AssertionError("no sign pattern overflows this decoder")


@cuda
@pytest.mark.parametrize(("backend", "batch"), [("eager", 1), ("eager", 5), ("compile", 1)])
def test_nonfinite_latents_and_outputs_are_refused_on_the_gpu(run, backend, batch):
    """Before: on CUDA neither inputs nor outputs were checked: NaN pixels came back silently
    (the hot path at batch 1 included)."""
    s = Sampler.load(run, backend=backend, device="cuda")
    z, row = _overflowing(s, batch)
    with pytest.raises(InputError, match=rf"outputs of 1 of {batch} rows are NaN or inf"
                                         rf" although their inputs are finite: row {row}"
                                         r" \(max \|z\| 3e\+38"):
        s.decode(z)
    nan = torch.randn(batch, 8)
    nan[row, int(torch.randint(8, ()))] = math.nan
    for where in ("cuda", "cpu"):  # a CPU latent travels to the GPU, then is refused by row
        with pytest.raises(InputError, match=rf"the latent holds NaN or inf in 1 of {batch} rows"
                                             rf" \(first: row {row}\)"):
            s.decode(nan.to(where))
    good = torch.randn(batch, 8, device="cuda")
    torch.testing.assert_close(s.decode(good).cpu(), _eager_decode(run, good), rtol=1e-4,
                               atol=1e-5)
    unchecked = Sampler(s.backend, s.artifact, check_finite=False)  # the backend, compiled
    assert not torch.isfinite(unchecked.decode(z)).all()  # the documented opt-out
    x = torch.rand(batch, 1, 28, 28, device="cuda")
    x[row, 0, 3, 4] = math.inf
    with pytest.raises(InputError, match=rf"encode\(\): the images holds NaN or inf in 1 of"
                                         rf" {batch} rows \(first: row {row}\)"):
        s.encode(x)


@cuda
def test_a_batch_past_the_gpus_memory_is_refused_before_any_allocation(run):
    s = Sampler.load(run, backend="eager", device="cuda")
    have = checks.available_bytes(torch.device("cuda"))
    rows = have // (784 * 4) + int(torch.randint(1000, 10**6, ()))  # the outputs alone exceed it
    z = torch.randn(1, 8, device="cuda").expand(rows, 8)  # a view: allocates nothing
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with pytest.raises(InputError, match=rf"decoding {rows} rows .* and cuda has [\d.]+ GB"
                                         r" available: decode fewer rows"):
        s.decode(z)
    with pytest.raises(InputError, match=rf"sample\(\): {rows} samples .* and cuda has"):
        s.sample(rows, batch_size=4096)
    assert torch.cuda.max_memory_allocated() == base


@cuda
def test_a_real_gpu_out_of_memory_is_one_line_and_the_sampler_recovers(run):
    """The lower bound passes (the driver reports the whole card free), the allocator is capped
    just above what is in use, so the decode's own allocations fail for real."""
    s = Sampler.load(run, backend="eager", device="cuda")
    z = torch.randn(int(torch.randint(300_000, 500_000, ())), 8, device="cuda")  # ~1.2 GB out
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + (64 << 20)) / total)
    try:
        with pytest.raises(InputError, match=r"^decode\(\): the device ran out of memory \(asked"
                                             r" for [\d.]+ [KMG]iB.*\): decode fewer rows"):
            s.decode(z)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert torch.isfinite(s.decode(z[:1000])).all()  # the sampler still works


@cuda
def test_the_latent_diffusion_estimate_is_a_lower_bound_on_the_gpus_peak():
    """The refusal is never wrong: the peak the CUDA allocator records while a small
    AutoencoderKL decodes is at least the estimate (outputs + activations)."""
    model = _kl_model((8, int(torch.randint(2, 5, ())) * 8, 16)).cuda()
    h, w = (int(v) for v in torch.randint(8, 40, (2,)))
    z = torch.randn(1, 4, h, w, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        model.decode(z)
    torch.cuda.synchronize()
    out, act = checks.decode_bytes(_ld_spec(model), (4, h, w), 1)
    assert out + act <= torch.cuda.max_memory_allocated() - base


@cuda
def test_a_gpu_index_that_is_not_here_is_one_line(run, tmp_path, capsys):
    """Before: Sampler.load(device="cuda:N") past the GPUs here failed in torch (invalid device
    ordinal) at the first tensor moved."""
    bad = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(InputError, match=rf"device {bad}: only \d+ GPU\(s\) here"):
        Sampler.load(run, backend="eager", device=bad)
    for main, argv in ((train_main, ["--out", str(tmp_path / "new"), "--device", bad]),
                       (sample_main, [str(run), "--device", bad, "--out",
                                      str(tmp_path / "s.png")])):
        assert_clean_failure(main(argv), capsys.readouterr().err)
    assert not (tmp_path / "new").exists() and not (tmp_path / "s.png").exists()


def _train(tmp_path, *extra: str) -> int:
    return train_main(["--data-dir", DATA_DIR, "--out", str(tmp_path / "run"), "--no-progress",
                       "--model", "mlp", "--hidden-dims", "32", "--latent-dim", "4",
                       "--batch-size", "64", "--eval-batch-size", "5000", *extra])


@cuda
@needs_mnist
def test_a_gpu_run_survives_an_out_of_memory_and_resumes_on_the_cpu(tmp_path, capsys):
    assert _train(tmp_path, "--device", "cuda", "--max-steps", "20") == 0
    run = tmp_path / "run"
    checkpoints = {k: v for k, v in snapshot(run).items() if k.startswith(("last", "best"))}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_reserved() / total)  # no more
    try:
        code = _train(tmp_path, "--device", "cuda", "--resume", "--max-steps", "40")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    err = capsys.readouterr().err
    assert_clean_failure(code, err)
    assert "ran out of memory" in err and "--resume" in err
    after = snapshot(run)
    assert {k: after.get(k) for k in checkpoints} == checkpoints  # the saved run is intact
    assert _train(tmp_path, "--device", "cpu", "--resume", "--max-steps", "40") == 0
    assert ckpt.read(run).step == 40
