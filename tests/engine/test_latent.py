"""engine.analysis.latent (grids, traversals, interpolation) and the latent subcommands of
engine.sample."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import checkpoint as ckpt
from engine.analysis import latent
from engine.models.registry import build_model
from engine.sample import main as sample_main

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = os.environ.get("VAE_DATA_DIR", str(REPO.parent / "shared" / "datasets"))
needs_mnist = pytest.mark.skipif(not Path(DATA_DIR, "MNIST", "raw").is_dir(),
                                 reason=f"MNIST not found under {DATA_DIR}; set VAE_DATA_DIR")
TRAIN_CFG = {"dataset": "mnist", "binarize": True, "data_dir": DATA_DIR, "loss": "bce"}


def save_run(tmp_path: Path, family: str, **overrides) -> Path:
    model = build_model(family, **overrides)
    return ckpt.save(tmp_path / family / "last", model, train_config=TRAIN_CFG).parent


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_run(tmp_path_factory.mktemp("runs"), "mlp", hidden_dims=(32,), latent_dim=4)


@pytest.fixture
def mlp():
    return build_model("mlp", hidden_dims=(32,), latent_dim=4).eval()


# --- pure functions ---------------------------------------------------------------------------
def test_latent_grid_sweeps_two_dims_others_at_base():
    base = torch.randn(5)
    z = latent.latent_grid(5, dims=(3, 1), n=4, lo=-2.0, hi=2.0, base=base)
    assert z.shape == (16, 5)
    grid = z.view(4, 4, 5)
    values = torch.linspace(-2, 2, 4)
    assert torch.equal(grid[0, :, 3], values)  # columns: dim i left to right
    assert torch.equal(grid[:, 0, 1], values.flip(0))  # rows: dim j top (hi) to bottom (lo)
    for d in (0, 2, 4):
        assert torch.equal(z[:, d], base[d].expand(16))


def test_traversal_changes_only_the_swept_dim():
    base = torch.randn(6)
    dims, steps = [0, 4, 5], 7
    z = latent.traversal(base, dims, k=2.5, steps=steps).view(len(dims), steps, 6)
    for row, d in enumerate(dims):
        changed = (z[row] != base).any(0).nonzero().flatten().tolist()
        assert changed == [d]
        assert torch.allclose(z[row, :, d], torch.linspace(-2.5, 2.5, steps))


@pytest.mark.parametrize("method", ["lerp", "slerp"])
def test_interpolation_has_exact_endpoints(method):
    a, b = torch.randn(8), torch.randn(8)
    path = latent.interpolate(a, b, 6, method)
    assert path.shape == (6, 8)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    assert not torch.allclose(path[2], a) and not torch.allclose(path[2], b)


def test_slerp_keeps_norm_between_equal_norm_endpoints_and_handles_parallel():
    a = torch.randn(16, dtype=torch.float64)
    b = torch.randn(16, dtype=torch.float64)
    b = b * a.norm() / b.norm()
    path = latent.slerp(a, b, 9)
    assert torch.allclose(path.norm(dim=1), a.norm().expand(9), rtol=1e-9)
    parallel = latent.slerp(a, 2 * a, 3)  # sin(omega) = 0: falls back to lerp
    assert torch.allclose(parallel[1], 1.5 * a)


def test_class_rows_share_z_across_classes():
    z, y = latent.class_rows(num_classes=3, per_class=4, latent_dim=2, seed=1)
    assert z.shape == (12, 2) and y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(z[:4], z[4:8]) and torch.equal(z[:4], z[8:])


@pytest.mark.parametrize("call, match", [
    (lambda: latent.latent_grid(4, (0, 4)), "out of range"),
    (lambda: latent.latent_grid(4, (1, 1)), "must differ"),
    (lambda: latent.latent_grid(4, (0, 1), n=1), "n >= 2"),
    (lambda: latent.traversal(torch.zeros(3), [0], steps=1), "steps >= 2"),
    (lambda: latent.interpolate(torch.zeros(3), torch.ones(3), 1), "steps >= 2"),
    (lambda: latent.interpolate(torch.zeros(3), torch.ones(3), 4, "cubic"), "unknown"),
    (lambda: latent.interpolate(torch.zeros(3), torch.ones(4), 4), "shape"),
])
def test_pure_functions_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- decoded images -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lerp", "slerp"])
def test_interpolation_endpoints_decode_to_reconstructions(mlp, method):
    x_a, x_b = torch.rand(1, 1, 28, 28), torch.rand(1, 1, 28, 28)
    images = latent.interpolate_images(mlp, x_a, x_b, steps=5, method=method)
    assert images.shape == (5, 1, 28, 28)
    torch.testing.assert_close(images[0], mlp.reconstruct(x_a)[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(images[-1], mlp.reconstruct(x_b)[0], rtol=0, atol=1e-6)


def test_traverse_images_decode_the_traversal(mlp):
    x = torch.rand(1, 1, 28, 28)
    images = latent.traverse_images(mlp, x, dims=[1, 3], k=2.0, steps=3)
    z = latent.traversal(mlp.encode(x).mean[0].detach(), [1, 3], 2.0, 3)
    torch.testing.assert_close(images, mlp.decode(z).detach(), rtol=0, atol=1e-6)
    assert not torch.allclose(images[0], images[2])  # the sweep changes the decoded image


def test_conditional_and_vq_are_rejected_where_meaningless(mlp):
    with pytest.raises(ValueError, match="conditional model"):
        latent.conditional_images(mlp)
    vq = build_model("vqvae", preset="vqvae-small").eval()
    with pytest.raises(ValueError, match="flat Gaussian latent"):
        latent.grid_images(vq)
    cvae = build_model("cvae-mlp", hidden_dims=(16,), latent_dim=3).eval()
    assert latent.conditional_images(cvae, per_class=2).shape == (20, 1, 28, 28)


# --- the command line ---------------------------------------------------------------------------
def run_cli(argv, capsys) -> tuple[int, str]:
    code = sample_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_grid_and_conditional_write_png_and_tensors(mlp_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, err = run_cli(["grid", mlp_run, "--dims", 1, 2, "--n", 5, "--out", out,
                         "--save-tensors"], capsys)
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_file(str(out.with_suffix(".safetensors")))["images"].shape == (25, 1, 28, 28)
    cvae = save_run(tmp_path, "cvae-mlp", hidden_dims=(16,), latent_dim=3)
    code, err = run_cli(["conditional", cvae, "--per-class", 3, "--out", tmp_path / "c.png"],
                        capsys)
    assert code == 0 and (tmp_path / "c.png").stat().st_size > 0, err


@needs_mnist
@pytest.mark.parametrize("argv, n_images", [
    (["traverse", "--index", 3, "--steps", 5, "--dims", 0, 2], 10),
    (["interpolate", "--indices", 0, 7, "--steps", 6, "--method", "slerp"], 6),
    (["reconstruct", "--n", 4], 8),
])
def test_data_subcommands_write_png_and_tensors(mlp_run, tmp_path, capsys, argv, n_images):
    out = tmp_path / f"{argv[0]}.png"
    code, err = run_cli([argv[0], mlp_run, *argv[1:], "--data-dir", DATA_DIR, "--out", out,
                         "--save-tensors"], capsys)
    assert code == 0, err
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert load_file(str(out.with_suffix(".safetensors")))["images"].shape[0] == n_images


BAD = [
    (["grid", "{missing}"], "no artifact"),
    (["grid", "{run}", "--dims", 0, 4], "out of range"),
    (["grid", "{run}", "--dims", 2, 2], "must differ"),
    (["grid", "{run}", "--n", 1], "n >= 2"),
    (["grid", "{run}", "--label", 3], "unconditional"),
    (["traverse", "{run}", "--steps", 1], "--steps >= 2"),
    (["traverse", "{run}", "--dims", 9], "out of range"),
    (["interpolate", "{run}", "--steps", 1], "--steps must be >= 2"),
    (["interpolate", "{run}", "--method", "cubic"], "lerp, slerp"),
    (["reconstruct", "{run}", "--n", 0], "--n must be >= 1"),
    (["conditional", "{run}"], "needs a conditional model"),
    (["conditional", "{missing}"], "no artifact"),
    (["grid", "{vq}"], "flat Gaussian latent"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[f"{a[0]}-{m}" for a, m in BAD])
def test_subcommands_reject_bad_arguments(mlp_run, tmp_path, capsys, argv, message):
    vq = mlp_run.parent / "vqvae"
    if not vq.exists():
        save_run(mlp_run.parent, "vqvae", preset="vqvae-small")
    subst = {"{run}": str(mlp_run), "{missing}": str(tmp_path / "nope"), "{vq}": str(vq)}
    code, err = run_cli([subst.get(str(a), a) for a in argv], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


@needs_mnist
def test_image_index_out_of_range_is_rejected(mlp_run, tmp_path, capsys):
    code, err = run_cli(["traverse", mlp_run, "--index", 10_000, "--data-dir", DATA_DIR,
                         "--out", tmp_path / "t.png"], capsys)
    assert code == 2 and "out of range" in err and "10000 images" in err


@pytest.mark.slow
def test_grid_and_interpolate_on_an_onnx_export(mlp_run, tmp_path, capsys):
    """Exported artifacts run through the Sampler (engine.analysis.latent.RuntimeModel)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from export.onnx import main as onnx_main

    export_dir = tmp_path / "export"
    assert onnx_main([str(mlp_run), "--out", str(export_dir)]) == 0
    out = tmp_path / "grid.png"
    code, err = run_cli(["grid", export_dir, "--n", 4, "--out", out, "--save-tensors"], capsys)
    assert code == 0, err
    exported = load_file(str(out.with_suffix(".safetensors")))["images"]
    model, _ = ckpt.load_model(mlp_run)
    torch.testing.assert_close(exported, latent.grid_images(model, n=4), rtol=0, atol=1e-4)
    code, err = run_cli(["grid", export_dir / "decoder.onnx", "--dims", 0, 9], capsys)
    assert code == 2 and "out of range" in err
