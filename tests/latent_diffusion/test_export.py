"""Latent-diffusion VAEs through export.onnx / export.aoti and engine.runtime.Sampler: pretrained
paths in, dynamic batch/height/width, parity at two resolutions, scaling in the manifest."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.models import from_pretrained
from engine.models.latent_diffusion import layouts
from engine.runtime import Sampler, SamplerError
from export import aoti, onnx

ATOL = 1e-4  # fp32 graphs against fp32 eager (ONNX Runtime / Inductor reorder sums)


@pytest.fixture(scope="module")
def ldm_file(tmp_path_factory):
    """An SD3/FLUX-shaped LDM single file (16 latent channels, no quant convs, 32 groups)."""
    import diffusers

    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16,
                                  norm_num_groups=32, use_quant_conv=False,
                                  use_post_quant_conv=False).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("ldm") / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in layouts.diffusers_to_ldm(vae.state_dict()).items()},
              str(path))
    return path


def test_onnx_export_of_a_single_file_and_runtime(ldm_file, tmp_path, capsys):
    out = tmp_path / "export"
    assert onnx.main([str(ldm_file), "--config", "sd3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "batch 3 6x10" in printed and "batch 3 12x20" in printed  # two resolutions
    data = json.loads((out / "manifest.json").read_text())
    ld = data["model"]["latent_diffusion"]
    assert (ld["scaling_factor"], ld["shift_factor"], ld["spatial_factor"]) == (1.5305, 0.0609, 2)
    assert data["artifacts"]["decoder.onnx"]["parity"]["shapes"] == [[[16, 8, 8]], [[16, 6, 10]]]
    model = from_pretrained(ldm_file, config="sd3")
    sampler = Sampler.load(out)
    assert sampler.info.backend == "onnxruntime" and sampler.spec.scaling_factor == 1.5305
    z, x = torch.randn(2, 16, 7, 3), torch.rand(1, 3, 10, 18) * 2 - 1  # a third resolution
    with torch.no_grad():
        ref_images, ref_post = model.decode(z), model.encode(x)
    torch.testing.assert_close(sampler.decode(z), ref_images, atol=ATOL, rtol=0)
    mean, logvar = sampler.encode(x)
    torch.testing.assert_close(mean, ref_post.mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(logvar, ref_post.logvar, atol=ATOL, rtol=0)
    with pytest.raises(SamplerError, match="no prior"):
        sampler.sample(2)
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        sampler.decode(torch.randn(2, 4, 7, 3))
    with pytest.raises(ValueError, match="multiples of 2"):
        sampler.encode(torch.rand(1, 3, 9, 18))


def test_aoti_export_of_a_taesd_pair_and_runtime(build_tiny, tmp_path):
    vae = build_tiny(num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1))
    for part in ("encoder", "decoder"):
        save_file({k: v.contiguous() for k, v in
                   layouts.diffusers_to_taesd(vae.state_dict(), part).items()},
                  str(tmp_path / f"taesd_{part}.safetensors"))
    written = aoti.export_aoti(tmp_path, out=tmp_path / "aoti", parts="decoder")
    sampler = Sampler.load(written["decoder"])
    assert sampler.spec.spatial_factor == 4 and not sampler.spec.has_prior
    for h, w in ((3, 5), (6, 2)):
        z = torch.randn(2, 4, h, w)
        with torch.no_grad():
            ref = vae.decode(z).sample
        torch.testing.assert_close(sampler.decode(z), ref, atol=ATOL, rtol=0)


def test_sampler_loads_pretrained_paths_eagerly(ldm_file, tmp_path):
    sampler = Sampler.load(ldm_file, config="flux")
    assert sampler.info.backend == "eager" and sampler.spec.shift_factor == 0.1159
    z = torch.randn(1, 16, 4, 5)
    with torch.no_grad():
        ref = from_pretrained(ldm_file).decode(z)
    torch.testing.assert_close(sampler.decode(z), ref, atol=0, rtol=0)
    with pytest.raises(SamplerError, match="eager or compile"):
        Sampler.load(ldm_file, backend="onnxruntime")
    (tmp_path / "vae.pt").write_bytes(b"\x80")
    with pytest.raises(SamplerError, match="never unpickles"):
        Sampler.load(tmp_path / "vae.pt")
