"""`python -m engine.sample decode|encode` with a latent-diffusion VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine import sample
from engine.models import from_pretrained
from engine.models.latent_diffusion.taesd import AutoencoderTiny


@pytest.fixture
def tiny_folder(build_tiny, tmp_path):
    vae = build_tiny(latent_channels=16)
    vae.register_to_config(scaling_factor=0.5, shift_factor=0.25)
    vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def _pngs(tmp_path, n: int, size: tuple[int, int]) -> list[str]:
    paths = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"in{i}.png")
        paths.append(str(tmp_path / f"in{i}.png"))
    return paths


def test_encode_then_decode_scaled_round_trip(tiny_folder, tmp_path):
    inputs = _pngs(tmp_path, 2, (16, 24))
    out = tmp_path / "lat.safetensors"
    assert sample.main(["encode", *inputs, "--vae", str(tiny_folder), "--out", str(out)]) == 0
    latents = load_file(str(out))["latents"]
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["scaled"] == "true"
    model = from_pretrained(tiny_folder)
    x = torch.from_numpy(np.array(Image.open(inputs[1]), dtype=np.float32))
    x = (x.permute(2, 0, 1) / 127.5 - 1)[None]
    with torch.no_grad():
        z = model.encode(x).mean
    torch.testing.assert_close(latents[1:], (z - 0.25) * 0.5)  # (z - shift) * scaling
    assert sample.main(["decode", str(out), "--vae", str(tiny_folder), "--out",
                        str(tmp_path / "png")]) == 2  # scaled latents without --scaled
    assert sample.main(["decode", str(out), "--vae", str(tiny_folder), "--scaled", "--out",
                        str(tmp_path / "png"), "--batch-size", "2"]) == 0
    written = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in written] == ["000000.png", "000001.png"]
    with torch.no_grad():
        expected = ((model.decode(z)[0].clamp(-1, 1) + 1) * 127.5).round()
    got = torch.from_numpy(np.array(Image.open(written[1]))).permute(2, 0, 1).float()
    assert (got - expected).abs().max() <= 1  # 8-bit rounding


def test_decode_reads_npy_and_refuses_pickles(tiny_folder, tmp_path, capsys):
    np.save(tmp_path / "z.npy", np.random.default_rng(0).standard_normal((2, 16, 3, 4))
            .astype(np.float32))
    assert sample.main(["decode", str(tmp_path / "z.npy"), "--vae", str(tiny_folder), "--out",
                        str(tmp_path / "npy")]) == 0
    assert len(list((tmp_path / "npy").glob("*.png"))) == 2
    with Image.open(tmp_path / "npy" / "000000.png") as im:
        assert im.size == (16, 12)  # (W, H) = 4 x (4, 3): three stages
    (tmp_path / "z.pt").write_bytes(b"\x80\x04")
    assert sample.main(["decode", str(tmp_path / "z.pt"), "--vae", str(tiny_folder)]) == 2
    assert "never unpickles" in capsys.readouterr().err


def test_tile_option_calls_the_models_tiled_decode(tiny_folder, tmp_path, monkeypatch, capsys):
    save_file({"latents": torch.randn(1, 16, 4, 4)}, str(tmp_path / "z.safetensors"))
    args = ["decode", str(tmp_path / "z.safetensors"), "--vae", str(tiny_folder), "--tile", "2",
            "--tile-overlap", "1", "--out", str(tmp_path / "tiled")]
    if not hasattr(AutoencoderTiny, "tiled_decode"):
        assert sample.main(args) == 2 and "tiled_decode" in capsys.readouterr().err
    calls = []

    def tiled_decode(self, z, tile_size, overlap):
        calls.append((tuple(z.shape), tile_size, overlap))
        return self.decode(z)

    monkeypatch.setattr(AutoencoderTiny, "tiled_decode", tiled_decode, raising=False)
    assert sample.main(args) == 0 and calls == [((1, 16, 4, 4), 2, 1)]
