"""`tiled_decode` / `tiled_encode` on our own AutoencoderKL and TAESD (loaded from diffusers'
save_pretrained): equal to our untiled decode/encode and to diffusers' untiled outputs."""

from __future__ import annotations

import pytest
import torch

from engine.models import from_pretrained

from .conftest import KL_CONFIGS, diffusers_kl, diffusers_tiny


def _ours(vae, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    return from_pretrained(tmp_path / "vae")


@pytest.mark.parametrize("name", sorted(KL_CONFIGS))
def test_kl_tiled_methods_equal_untiled(name, tmp_path):
    vae = diffusers_kl(**KL_CONFIGS[name])
    ours = _ours(vae, tmp_path)
    z = torch.randn(2, ours.latent_channels, 11, 7)
    with torch.no_grad():
        untiled, reference = ours.decode(z), vae.decode(z).sample
        tiled = ours.tiled_decode(z, tile_size=4)
    scale = reference.abs().max()
    torch.testing.assert_close(tiled, untiled, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(tiled, reference, atol=1e-4 * scale, rtol=0)
    x = torch.rand(1, 3, 40, 24) * 2 - 1
    with torch.no_grad():
        post, ref = ours.tiled_encode(x, tile_size=16), vae.encode(x).latent_dist
    torch.testing.assert_close(post.mean, ref.mean, atol=1e-4 * ref.mean.abs().max(), rtol=0)
    torch.testing.assert_close(post.logvar, ref.logvar, atol=1e-4 * ref.logvar.abs().max(),
                               rtol=0)


def test_tiny_tiled_methods_equal_untiled(tmp_path):
    vae = diffusers_tiny()
    ours = _ours(vae, tmp_path)
    z = torch.randn(1, 4, 9, 6)
    x = torch.rand(1, 3, 48, 40) * 2 - 1
    with torch.no_grad():
        tiled, untiled = ours.tiled_decode(z, tile_size=3), ours.decode(z)
        latents, whole = ours.tiled_encode(x, tile_size=16).mean, ours.encode(x).mean
    torch.testing.assert_close(tiled, untiled, atol=1e-5, rtol=0)
    torch.testing.assert_close(latents, whole, atol=1e-5, rtol=0)


def test_tiled_decode_checks_the_latent(tmp_path):
    ours = _ours(diffusers_kl(**KL_CONFIGS["sd-like"]), tmp_path)
    with pytest.raises(ValueError, match="tiled_decode"):
        ours.tiled_decode(torch.randn(1, ours.latent_channels + 1, 8, 8))
