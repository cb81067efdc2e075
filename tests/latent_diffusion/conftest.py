"""Small latent-diffusion VAEs built by diffusers itself (the oracle), with jittered weights.

diffusers' default init leaves GroupNorm at (1, 0) and is the same for every seed's structure;
`jitter` moves every parameter off it so that a wrong wiring cannot hide behind an identity
norm or a zero bias. The full SD-size architecture belongs to benchmarks/ only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is the oracle of these tests")

# Small AutoencoderKL configurations (diffusers' keyword names), covering: SD-like 4 channels
# with quant convs; FLUX/SD3-like 16 channels without them, 3 levels, 2 layers per block;
# no mid-block attention with 16 groups.
KL_CONFIGS = {
    "sd-like": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                    latent_channels=4, scaling_factor=0.18215),
    "flux-like": dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=16,
                      latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                      scaling_factor=0.3611, shift_factor=0.1159),
    "no-attention": dict(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=16,
                         latent_channels=4, mid_block_add_attention=False),
}
TINY_CONFIG = dict(encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(16, 16, 16),
                   num_encoder_blocks=(1, 2, 1), num_decoder_blocks=(1, 2, 1), latent_channels=4)


@torch.no_grad()
def jitter(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Add N(0, scale^2) to every parameter (norm weights too): weights off the default init."""
    for p in module.parameters():
        p.add_(torch.randn_like(p) * scale)
    return module.eval()


def diffusers_kl(**kwargs) -> torch.nn.Module:
    levels = len(kwargs["block_out_channels"])
    return jitter(diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                          up_block_types=("UpDecoderBlock2D",) * levels,
                                          **kwargs))


def diffusers_tiny(**kwargs) -> torch.nn.Module:
    return jitter(diffusers.AutoencoderTiny(**{**TINY_CONFIG, **kwargs}))


def images(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.rand(batch, 3, height, width) * 2 - 1


@pytest.fixture(params=sorted(KL_CONFIGS))
def kl_pair(request) -> tuple[str, torch.nn.Module]:
    return request.param, diffusers_kl(**KL_CONFIGS[request.param])


@pytest.fixture
def kl_folder(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """An SD-like diffusers AutoencoderKL and the folder its save_pretrained wrote."""
    vae = diffusers_kl(**KL_CONFIGS["sd-like"])
    vae.save_pretrained(tmp_path / "vae")
    return vae, tmp_path / "vae"


@pytest.fixture
def build_kl():
    """build_kl(name_or_kwargs) -> a jittered diffusers AutoencoderKL."""
    return lambda spec: diffusers_kl(**(KL_CONFIGS[spec] if isinstance(spec, str) else spec))


@pytest.fixture
def build_tiny():
    return diffusers_tiny


@pytest.fixture
def rand_images():
    return images
