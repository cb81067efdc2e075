"""Runtime faults (issue 16): every bad input or mislabelled artifact ends in one line from the
engine (InputError / SamplerError), never a torch or ONNX Runtime traceback, a silently wrong
result, or a decode that runs the machine out of memory.

Artifacts: one tiny MLP VAE and one conditional MLP VAE, checkpointed and exported to ONNX once
for the module; the eager reference is the checkpoint's own PyTorch decoder.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from engine.checkpoint import load_model, sha256
from engine.models.latent_diffusion.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from engine.models.registry import config_to_dict
from engine.runtime import InputError, ModelSpec, Sampler, SamplerError, checks
from engine.sample import main as sample_main
from export import onnx as onnx_export
from tests.export.conftest import make_checkpoint
from tests.faults.conftest import assert_clean_failure, assert_intact, snapshot

BACKENDS = ("eager", "onnxruntime")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """family -> run dir with last/ and export/ (decoder.onnx, encoder.onnx)."""
    root = tmp_path_factory.mktemp("runtime-faults")
    out = {}
    for family in ("mlp", "cvae-mlp"):
        run = make_checkpoint(root / family, family, seed=int(torch.randint(1000, ())))
        assert onnx_export.main([str(run), "--parity-batches", "1"]) == 0
        out[family] = run
    return out


def load(runs, family: str, backend: str) -> Sampler:
    run = runs[family]
    return Sampler.load(run if backend == "eager" else run / "export" / "decoder.onnx",
                        backend=backend, device="cpu")


def eager_decoder(runs, family: str):
    model, _ = load_model(runs[family], device="cpu")
    return model.export_parts()["decoder"].module.eval()


# --- 1. zero rows ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["mlp", "cvae-mlp"])
def test_zero_rows_decode_and_encode_to_zero_rows_like_eager(runs, backend, family):
    """Before: a torch RuntimeError (expand) on every backend. Now: (0, *out) like eager."""
    s = load(runs, family, backend)
    labels = torch.zeros(0, dtype=torch.long) if s.spec.conditional else None
    z = torch.randn(0, *s.spec.latent_shape)
    with torch.no_grad():
        ref = eager_decoder(runs, family)(*(z,) + ((labels,) if labels is not None else ()))
    out = s.decode(z, labels=labels)
    assert out.shape == ref.shape == (0, *s.spec.output_shape) and out.dtype == ref.dtype
    mu, logvar = s.encode(torch.rand(0, *s.spec.output_shape), labels=labels)
    assert mu.shape == logvar.shape == (0, *s.spec.latent_shape)
    with pytest.raises(InputError, match=r"n must be >= 1, got 0"):
        s.sample(0, labels=0 if s.spec.conditional else None)


# --- 2. the wrong part ---------------------------------------------------------------------------
def test_an_encoder_artifact_is_refused_where_a_decoder_is_expected(runs):
    """Before: loaded, then every decode died in ONNX Runtime (Invalid rank for input)."""
    path = runs["mlp"] / "export" / "encoder.onnx"
    with pytest.raises(SamplerError, match=r"holds the model's encoder \(its metadata says part="
                                           r"'encoder'\), not the decoder: load .*decoder\.onnx"):
        Sampler.load(path)


def test_a_decoder_listed_as_the_encoder_is_refused(runs, tmp_path):
    """Before: encode() died in ONNX Runtime (Invalid rank for input: z)."""
    export = tmp_path / "export"
    shutil.copytree(runs["mlp"] / "export", export)
    shutil.copy(export / "decoder.onnx", export / "encoder.onnx")
    manifest = json.loads((export / "manifest.json").read_text())
    entry = manifest["artifacts"]["encoder.onnx"]
    entry["sha256"], entry["bytes"] = sha256(export / "encoder.onnx"), \
        (export / "encoder.onnx").stat().st_size
    (export / "manifest.json").write_text(json.dumps(manifest))
    s = Sampler.load(export / "decoder.onnx")
    with pytest.raises(SamplerError, match=r"holds the model's decoder .* not the encoder"):
        s.encode(torch.rand(2, 1, 28, 28))


# --- 3. metadata that contradicts the graph -------------------------------------------------------
CONTRADICTIONS = [("latent_shape", "9", "'z' has shape"), ("latent_shape", "8,1", "'z' has shape"),
                  ("output_shape", "1,28,27", "'images' has shape"),
                  ("input_names", "w", "inputs are 'z'"), ("output_names", "x", "outputs are"),
                  ("latent_dtype", "int64", "'z' is float32")]


@pytest.mark.parametrize(("key", "value", "graph"), CONTRADICTIONS)
def test_metadata_that_contradicts_the_graph_is_refused_at_load(runs, tmp_path, key, value, graph):
    """Before: loaded; decode then failed in ONNX Runtime or checked against the wrong shape."""
    import onnx

    model = onnx.load(str(runs["mlp"] / "export" / "decoder.onnx"))
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
    path = tmp_path / "decoder.onnx"  # no manifest beside it: only the graph can contradict
    onnx.save(model, str(path))
    with pytest.raises(SamplerError, match=rf"metadata {key}='{value}' but the graph's .*{graph}"):
        Sampler.load(path, device="cpu")


def test_tensorrt_bindings_are_checked_like_the_onnx_graph():
    """TensorRT reports dynamic dims as -1; the same check applies to its bindings."""
    spec = ModelSpec.from_metadata({"latent_shape": "8", "output_shape": "1,28,28",
                                    "input_names": "z"}, "x.engine")
    meta = {"latent_shape": "8", "output_shape": "1,28,28", "input_names": "z",
            "output_names": "images", "latent_dtype": "float32"}
    ins = checks.binding_signature(["z"], [(-1, 8)], [torch.float32])
    outs = checks.binding_signature(["images"], [(-1, 1, 28, 28)], [torch.float32])
    checks.check_graph(spec, meta, "decoder", ins, outs, "x.engine")
    bad = checks.binding_signature(["images"], [(-1, 3, 28, 28)], [torch.float32])
    with pytest.raises(SamplerError, match=r"output_shape='1,28,28' but .* \(\?, 3, 28, 28\)"):
        checks.check_graph(spec, meta, "decoder", ins, bad, "x.engine")


# --- 4. memory ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batch_too_large_for_memory_is_refused_up_front(runs, backend, monkeypatch):
    """Before: decode/sample allocated until the OS killed the process. The rows are an
    expanded view, so the test itself allocates nothing."""
    s = load(runs, "mlp", backend)
    have = int(torch.randint(10, 50, ())) << 20
    monkeypatch.setattr(checks, "available_bytes", lambda device: have)
    rows = max(have, checks.CHECK_FROM_BYTES) // (784 * 4) + 1000  # outputs alone exceed it
    z = torch.randn(1, 8).expand(rows, 8)
    with pytest.raises(InputError, match=rf"decoding {rows} rows .* needs at least .* and cpu has"
                                         r" .* available: decode fewer rows"):
        s.decode(z)
    with pytest.raises(InputError, match=rf"sample\(\): {rows} samples \(64 rows decoded at a"
                                         r" time\) needs .*: ask for fewer samples per call"):
        s.sample(rows, batch_size=64)
    assert s.decode(z[:3]).shape == (3, 1, 28, 28)  # small batches never ask
    x = torch.rand(1, 1, 28, 28).expand(rows, 1, 28, 28)  # ONNX Runtime copied it, then failed
    with pytest.raises(InputError, match=rf"encode\(\): encoding {rows} images of \(1, 28, 28\)"
                                         r" at once needs at least .*: encode fewer images"):
        s.encode(x)
    mu, _ = s.encode(x[:2])
    torch.testing.assert_close(mu, eager_encoder(runs, "mlp")(x[:2])[0], rtol=1e-4, atol=1e-5)


def eager_encoder(runs, family: str):
    model, _ = load_model(runs[family], device="cpu")
    return model.export_parts()["encoder"].module.eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_devices_and_threads_are_checked_at_load(runs, backend):
    """Before: device="cuda" without a GPU ended in torch's driver RuntimeError (eager), "gpu"
    in torch's device-string RuntimeError, and threads=2.5 in an ONNX Runtime TypeError."""
    run = runs["mlp"] if backend == "eager" else runs["mlp"] / "export"
    with pytest.raises(InputError, match="'gpu' is not a device: expected cpu, cuda or cuda:N"):
        Sampler.load(run, backend=backend, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises((InputError, SamplerError), match="(no CUDA GPU|no GPU) is visible"):
            Sampler.load(run, backend=backend, device="cuda")
    if backend == "onnxruntime":
        for bad in (2.5, 0, -1, "2"):
            with pytest.raises(InputError, match="threads must be"):
                Sampler.load(run, backend=backend, threads=bad)


def _kl_model(channels: tuple[int, ...]) -> AutoencoderKL:
    torch.manual_seed(0)
    config = AutoencoderKLConfig(block_out_channels=channels, layers_per_block=1,
                                 norm_num_groups=8, latent_channels=4)
    return AutoencoderKL(config).eval()


def _ld_spec(model: AutoencoderKL) -> ModelSpec:
    f = model.downsample_factor
    return ModelSpec("autoencoder-kl", "gaussian", (4, 8, 8), torch.float32, (3, 8 * f, 8 * f),
                     False, 0, 0, ("z",), ("images",), config_to_dict(model.config),
                     spatial_factor=f, has_prior=False)


def test_the_latent_diffusion_estimate_is_a_lower_bound_on_real_activations():
    """The activation term is two full-resolution maps; the largest map a real decoder makes
    (forward hooks on a small AutoencoderKL) is at least half of it and at most all of it."""
    channels = (8, int(torch.randint(2, 5, ())) * 8, 16)
    model = _kl_model(channels)
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.nbytes))
             for m in model.modules() if not list(m.children())]
    h, w = (int(v) for v in torch.randint(2, 6, (2,)))
    with torch.no_grad():
        model.decode(torch.randn(1, 4, h, w))
    for hook in hooks:
        hook.remove()
    _, act = checks.decode_bytes(_ld_spec(model), (4, h, w), 1)
    assert max(sizes) <= act <= 2 * max(sizes)


def test_a_high_resolution_latent_diffusion_decode_is_refused_with_the_fix(monkeypatch):
    """SD 1.x sizes, (1, 4, 512, 512) latents: tens of GB of activations, refused with --tile."""
    spec = ModelSpec("autoencoder-kl", "gaussian", (4, 64, 64), torch.float32, (3, 512, 512),
                     False, 0, 0, ("z",), ("images",), {"block_out_channels": [128, 256, 512, 512]},
                     spatial_factor=8, has_prior=False)
    out, act = checks.decode_bytes(spec, (4, 512, 512), 1)
    assert out == 3 * 4096 * 4096 * 4 and act == 2 * 256 * 4096 * 4096 * 4  # 34 GB
    monkeypatch.setattr(checks, "available_bytes", lambda device: 16 << 30)
    with pytest.raises(InputError, match=r"needs at least 34\.56 GB .* or tile it .*--tile"):
        checks.require_memory(spec, (4, 512, 512), 1, torch.device("cpu"), "decode()")


# --- 5, 6. meta tensors, non-integer counts -------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_tensors_are_one_line_errors(runs, backend):
    """Before: NotImplementedError / RuntimeError from torch (Cannot copy out of meta tensor)."""
    s = load(runs, "cvae-mlp", backend)
    y = torch.zeros(2, dtype=torch.long)
    cases = [lambda: s.decode(torch.randn(2, 8, device="meta"), labels=y),
             lambda: s.encode(torch.rand(2, 1, 28, 28, device="meta"), labels=y),
             lambda: s.decode(torch.randn(2, 8), labels=y.to("meta"))]
    for case in cases:
        with pytest.raises(InputError, match="meta device"):
            case()


@pytest.mark.parametrize("value", [2.5, "3", True, np.float32(2), torch.tensor(2.0),
                                   torch.tensor([2, 3]), None])
@pytest.mark.parametrize("arg", ["n", "batch_size", "seed"])
def test_non_integer_counts_and_seeds_are_refused(runs, arg, value):
    """Before: torch TypeErrors (randn() received an invalid combination...), RuntimeErrors
    (manual_seed expected a long) or a silent batch size of True == 1."""
    if value is None and arg != "n":
        return  # None is the default of batch_size and seed
    s = load(runs, "mlp", "onnxruntime")
    kwargs = {"n": 3, "batch_size": 2, "seed": 0, arg: value}
    with pytest.raises(InputError, match=f"{arg} must be an integer, got"):
        s.sample(kwargs.pop("n"), **kwargs)


def test_integer_scalars_of_any_kind_are_accepted(runs):
    s = load(runs, "mlp", "onnxruntime")
    ref = s.sample(5, batch_size=2, seed=7)
    assert torch.equal(s.sample(np.int64(5), batch_size=torch.tensor(2), seed=np.int32(7)), ref)
    with pytest.raises(InputError, match=r"seed must lie in \[-9223372036854775808, "):
        s.sample(2, seed=2**70)


# --- 7. finite latents, non-finite outputs ------------------------------------------------------
def _overflowing_batch(s: Sampler, batch: int) -> tuple[torch.Tensor, int]:
    """(z, row): ordinary latents with one row of entries +-3e38 whose decode by the backend
    itself (unchecked `run`) is not finite. Whether inf - inf arises depends on the order of the
    sums (gemv vs gemm, ORT vs torch), so the row is chosen on the batch as it will run."""
    for _ in range(256):
        z, row = torch.randn(batch, 8), int(torch.randint(batch, ()))
        z[row] = torch.sign(torch.randn(8)) * 3e38
        raw = s.backend.run([z])[0]
        if (~torch.isfinite(raw)).flatten(1).any(1).nonzero().flatten().tolist() == [row]:
            return z, row
    raise AssertionError("no sign pattern overflows this decoder")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 4])
def test_finite_latents_that_overflow_the_decoder_are_refused_by_row(runs, backend, batch):
    """Before: NaN pixels returned without a word (both backends, hot path included)."""
    s = load(runs, "mlp", backend)
    z, row = _overflowing_batch(s, batch)
    with pytest.raises(InputError, match=rf"outputs of 1 of {batch} rows are NaN or inf"
                                         rf" although their inputs are finite: row {row}"
                                         r" \(max \|z\| 3e\+38\)"):
        s.decode(z)
    z[row] = torch.randn(8) * 5  # an ordinary row decodes
    assert torch.isfinite(s.decode(z)).all()


# --- 8. kin: labels and extra inputs ------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_of_every_kind_are_checked(runs, backend):
    """Before: an int label out of range ran silently on ONNX Runtime (wrong images) and raised
    a torch RuntimeError on eager; True was class 1; np.int64(3) was refused."""
    s = load(runs, "cvae-mlp", backend)
    z = torch.randn(3, 8)
    for bad in (10, -1, 99):
        with pytest.raises(InputError, match=rf"must lie in \[0, 10\), got {bad}"):
            s.decode(z, labels=bad)
    for bad in (True, "a", 2.0, torch.zeros(3, dtype=torch.complex64)):
        with pytest.raises(InputError, match="labels"):
            s.decode(z, labels=bad)
    assert torch.equal(s.decode(z, labels=np.int64(3)), s.decode(z, labels=3))
    assert torch.equal(s.decode(z, labels=torch.tensor(3)), s.decode(z, labels=[3, 3, 3]))


def test_extra_inputs_are_checked_against_the_graph():
    """A crystal-like decoder (z (B, atoms, 8), mask (B, atoms) bool): wrong rank, atom count or
    dtype is one line instead of an ONNX Runtime InvalidArgument."""
    sigs = [("z", ("batch", "atoms", 8), "float32"), ("mask", ("batch", "atoms"), "bool")]
    z = torch.randn(2, 5, 8)
    assert checks.extra_input("mask", torch.ones(2, 5, dtype=torch.bool), z, sigs).shape == (2, 5)
    for bad in (torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 5), torch.ones(2, 5, 1) > 0):
        with pytest.raises(InputError, match=r"input 'mask' must be \(B, 5\) bool, got"):
            checks.extra_input("mask", bad, z, sigs)
    with pytest.raises(InputError, match="must be a tensor, got str"):
        checks.extra_input("mask", "x", z, sigs)


# --- the command line ---------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [["--n", "0"], ["--n", "2", "--nrow", "-1"],
                                   ["--n", "2", "--nrow", "0"], ["--n", "3", "--batch-size", "0"],
                                   ["--n", "2", "--seed", str(2**70)]])
def test_sample_cli_flags_are_one_line_errors(runs, tmp_path, capsys, flags):
    """Before: --nrow -1 a torchvision traceback, --seed 2**70 'Overflow when unpacking long
    long'. Nothing is written and nothing that existed changes."""
    root = runs["mlp"]
    before = snapshot(root)
    code = sample_main([str(root / "export"), *flags, "--out", str(tmp_path / "g.png")])
    assert_clean_failure(code, capsys.readouterr().err)
    assert_intact(root, before)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flags", [["--batch-size", "-1"], ["--batch-size", "0"], ["--tile", "0"],
                                   ["--tile-overlap", "-1"]])
def test_sample_decode_cli_flags_are_one_line_errors(tmp_path, capsys, flags):
    """Before: --batch-size -1 wrote no images and exited 0; --tile 0 ran untiled."""
    code = sample_main(["decode", str(tmp_path / "z.npy"), "--vae", str(tmp_path), *flags,
                        "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert_clean_failure(code, err)
    assert flags[0] in err and not (tmp_path / "out").exists()
