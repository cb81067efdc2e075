"""tiled_decode / tiled_encode: exact tiled inference for latent-diffusion autoencoders.

    from engine.models.tiling import tiled_decode, tiled_encode
    image = tiled_decode(vae, z, tile_size=32)             # == vae.decode(z).sample
    posterior = tiled_encode(vae, image, tile_size=256)    # == vae.encode(image).latent_dist

See the package docstring and docs/tiling.md for the method and why it is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.distributions import DiagonalGaussian
from engine.models.tiling.layers import ConvLayer, Layer, run_layers
from engine.models.tiling.memory import OFFLOAD_MODES
from engine.models.tiling.stages import Context, Feature
from engine.models.tiling.trees import (
    kl_decoder_layers,
    kl_encoder_layers,
    model_kind,
    tiny_decoder_layers,
    tiny_encoder_layers,
)

LOGVAR_RANGE = (-30.0, 20.0)  # the clamp of the posterior's log-variance, as in diffusers


def _check_options(fn: str, tile_size: int, overlap: int | None, offload: str) -> None:
    if isinstance(tile_size, bool) or not isinstance(tile_size, int):
        raise TypeError(f"{fn}(): tile_size must be an int, got {type(tile_size).__name__}")
    if tile_size <= 0:
        raise ValueError(f"{fn}(): tile_size must be a positive number of pixels, got {tile_size}")
    if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, int)
                                or overlap < 0):
        raise ValueError(f"{fn}(): overlap must be None or an int >= 0, got {overlap!r}")
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"{fn}(): offload must be one of {OFFLOAD_MODES}, got {offload!r}")


def _check_input(fn: str, x: Tensor, first: Layer, what: str, param: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}(): expected {what} as a torch.Tensor, got {type(x).__name__}")
    channels = first.conv.in_channels if isinstance(first, ConvLayer) else None
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{fn}(): expected {what} of shape (B, {channels}, H, W), got "
                         f"{tuple(x.shape)}: is this the model's {what}?")
    if x.numel() == 0:
        raise ValueError(f"{fn}(): {what} is empty: {tuple(x.shape)}")
    if x.dtype != param.dtype:
        raise ValueError(f"{fn}(): {what} is {x.dtype} but the model's weights are "
                         f"{param.dtype}: cast one to the other")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{fn}(): {what} holds NaN or Inf values")


def _run(fn: str, model: nn.Module, layers: list[Layer], x: Tensor, what: str, tile_size: int,
         overlap: int | None, offload: str) -> Tensor:
    """Validate, run the layers over x on the model's device, return on x's device."""
    _check_options(fn, tile_size, overlap, offload)
    param = next(model.parameters())
    _check_input(fn, x, layers[0], what, param)
    ctx = Context(param.device, offload)
    with torch.no_grad():
        out = run_layers(ctx, Feature(x, parked=x.device != param.device), layers, tile_size)
    return out.data.to(x.device)


def tiled_decode(model: nn.Module, z: Tensor, tile_size: int = 32, overlap: int | None = None,
                 offload: str = "auto") -> Tensor:
    """Decode latents z: (B, C_latent, h, w) to images (B, C_out, H, W), tile by tile.

    Equals the model's untiled decode (`vae.decode(z).sample`) up to float rounding: every
    conv reads its halo from the neighbouring tiles, every GroupNorm uses the whole map's
    statistics, and the mid-block attention attends over the whole latent.

    model:     an AutoencoderKL or AutoencoderTiny module tree (ours or diffusers'), eval mode
    tile_size: tile side in latent pixels; the tiles grow with the map (x2 per upsampler)
    overlap:   accepted for call compatibility with blending tilers and otherwise unused: the
               halo of each layer is what its kernel reads, and no tiles are blended
    offload:   "auto", "none" or "host": where the full activation maps live (memory.py)
    Returns the images on z's device. Runs on the device of the model's weights; z may sit on
    the host.
    """
    layers = (kl_decoder_layers if model_kind(model) == "kl" else tiny_decoder_layers)(model)
    return _run("tiled_decode", model, layers, z, "latent", tile_size, overlap, offload)


def tiled_encode(model: nn.Module, x: Tensor, tile_size: int = 256, overlap: int | None = None,
                 offload: str = "auto") -> DiagonalGaussian | Tensor:
    """Encode images x: (B, C_in, H, W) tile by tile, exactly as the untiled encoder.

    AutoencoderKL: the posterior DiagonalGaussian(mean, logvar), each (B, C_latent, h, w), with
    logvar clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does (equal to
    `vae.encode(x).latent_dist.mean` / `.logvar`). AutoencoderTiny: the latents tensor.
    tile_size is in image pixels (tiles shrink x2 per downsampler, to no less than 1); overlap
    and offload are as in tiled_decode.
    """
    kind = model_kind(model)
    layers = (kl_encoder_layers if kind == "kl" else tiny_encoder_layers)(model)
    out = _run("tiled_encode", model, layers, x, "images", tile_size, overlap, offload)
    if kind == "tiny":
        return out
    mean, logvar = out.chunk(2, dim=1)
    return DiagonalGaussian(mean, logvar.clamp(*LOGVAR_RANGE))
