"""What the latent-diffusion VAEs (AutoencoderKL, AutoencoderTiny) share: the shape contract
with dynamic height and width, the precision guard, the latent normalization and the export
views.

Conventions (those of diffusers, so latents move between the two unchanged):

    images      (B, 3, H, W) in [-1, 1], H and W multiples of `downsample_factor` (8)
    z           (B, C, H/8, W/8): what `decode` takes, i.e. diffusers' `vae.decode(z).sample`
    diffusion   (z - shift_factor) * scaling_factor: what a diffusion model produces and
                consumes (`normalize_latents`); `denormalize_latents` inverts it

A latent-diffusion VAE has no prior worth sampling: its latents come from a diffusion model,
and N(0, I) draws decode to noise-like textures, so `sample()` raises instead of pretending.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from engine.distributions import DiagonalGaussian
from engine.models.base import BaseVAE, ModelOutput
from engine.models.export_wrappers import BATCH, ExportPart
from engine.models.latent_diffusion.precision import HALF_DTYPES, rerun_nonfinite_rows
from engine.models.tiling import tiled_decode, tiled_encode

LATENT_AXES = {**BATCH, 2: "latent_height", 3: "latent_width"}
# Image axes are `downsample_factor` times the latent axes (exported as derived dims, so the
# graph never sees a size that does not divide).
IMAGE_AXES = {**BATCH, 2: "latent_height*{f}", 3: "latent_width*{f}"}
EXAMPLE_LATENT = ((8, 8), (6, 10))  # (h, w) of the export example, then a second parity size
PARITY_BATCHES = (1, 3)  # a full SD decoder at batch 256 would take minutes on a CPU


class LatentDiffusionVAE(BaseVAE):
    """Base of the latent-diffusion VAEs. Subclasses implement `_encode_outputs(x)` (the
    encoder's raw outputs, a tuple), `_posterior(outputs)` and `_decode_logits(z, y)`."""

    objectives: ClassVar[tuple[str, ...]] = ()  # served, not trained (training_loss says why)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._warned_rerun = False

    # --- shape contract: channels fixed, height and width dynamic -----------------------------
    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        raise NotImplementedError

    @property
    def latent_shape(self) -> tuple[int | None, ...]:
        """(C, None, None): None marks the dynamic height and width."""
        return (self.config.latent_channels, None, None)

    @property
    def data_shape(self) -> tuple[int | None, ...]:
        return (self.config.in_channels, None, None)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _check_input(self, x: Tensor, where: str) -> None:
        c, f = self.config.in_channels, self.downsample_factor
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != c \
                or not x.is_floating_point():
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{where}(): expected float images of shape (B, {c}, H, W) in"
                             f" [-1, 1], got {got}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"{where}(): image height and width must be multiples of {f}, got"
                             f" {tuple(x.shape[2:])}; crop or pad the images (e.g. to"
                             f" {x.shape[2] // f * f}x{x.shape[3] // f * f})")

    def _check_latent(self, z: Tensor, where: str) -> None:
        c = self.config.latent_channels
        if isinstance(z, Tensor) and z.dim() == 4 and z.shape[1] == c and z.is_floating_point():
            return
        got = f"{tuple(z.shape)} {z.dtype}" if isinstance(z, Tensor) else type(z).__name__
        hint = ""
        if isinstance(z, Tensor) and z.dim() == 4 and z.shape[1] == 2 * c:
            hint = ": did you pass the concatenated (mean, logvar) instead of a latent?"
        elif isinstance(z, Tensor) and z.dim() == 4:
            hint = (f": this VAE has {c} latent channels (SD 1.x/SDXL latents have 4, SD3/FLUX"
                    " 16); load the VAE that matches the diffusion model")
        elif isinstance(z, Tensor) and z.dim() == 3:
            hint = ": add the batch axis, z[None]"
        raise ValueError(f"{where}(): expected float latents of shape (B, {c}, h, w), got"
                         f" {got}{hint}")

    # --- latent normalization ------------------------------------------------------------------
    def normalize_latents(self, z: Tensor) -> Tensor:
        """VAE latent -> the diffusion model's space: (z - shift_factor) * scaling_factor."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def denormalize_latents(self, latents: Tensor) -> Tensor:
        """The diffusion model's latents -> what `decode` takes: z / scaling + shift."""
        return latents / self.config.scaling_factor + self.config.shift_factor

    # --- the protocol --------------------------------------------------------------------------
    def encode(self, x: Tensor, y: Tensor | None = None) -> DiagonalGaussian:
        """images (B, 3, H, W) in [-1, 1] -> q(z|x) over latents (B, C, H/f, W/f)."""
        self._check_input(x, "encode")
        self._check_labels(y, x.shape[0], "encode")
        return self._posterior(self._guarded(self._encode_outputs, x))

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """latents (B, C, h, w) (already divided by scaling_factor) -> images in [-1, 1],
        (B, 3, f h, f w), in the model's dtype."""
        self._check_latent(z, "decode")
        self._check_labels(y, z.shape[0], "decode")
        return self._guarded(lambda t: (self._decode_logits(t, None),), z)[0]

    def tiled_decode(self, z: Tensor, tile_size: int = 32, overlap: int | None = None,
                     offload: str = "auto") -> Tensor:
        """decode(z) tile by tile, equal to it up to float rounding, with memory bounded by the
        tile (engine.models.tiling; tile_size in latent pixels, offload "auto"/"none"/"host").
        The fp16/bf16 overflow rerun applies as in decode."""
        self._check_latent(z, "tiled_decode")
        return self._guarded(lambda t: (tiled_decode(self, t, tile_size, overlap, offload),), z)[0]

    def tiled_encode(self, x: Tensor, tile_size: int = 256, overlap: int | None = None,
                     offload: str = "auto") -> DiagonalGaussian:
        """encode(x) tile by tile, equal to it up to float rounding (tile_size in image px)."""
        self._check_input(x, "tiled_encode")

        def run(t: Tensor) -> tuple[Tensor, ...]:
            out = tiled_encode(self, t, tile_size, overlap, offload)
            return (out.mean, out.logvar) if isinstance(out, DiagonalGaussian) else (out,)

        return self._posterior(self._guarded(run, x))

    def _guarded(self, run: Any, x: Tensor) -> tuple[Tensor, ...]:
        """run(x) in the model's dtype; in fp16/bf16, rows with NaN/inf are redone in fp32."""
        outputs, redone = rerun_nonfinite_rows(run, self, x.to(self.dtype))
        if redone and not self._warned_rerun:
            self._warned_rerun = True
            warnings.warn(f"{type(self).__name__}: {self.dtype} overflowed (NaN/inf) in"
                          f" {redone} of {x.shape[0]} rows; those rows were rerun in float32."
                          " Load the VAE in float32 or bfloat16 (or an fp16-fixed VAE) to avoid"
                          " the rerun; this warning is shown once per model", stacklevel=3)
        return outputs

    def output_activation(self, logits: Tensor) -> Tensor:
        return logits

    def forward(self, x: Tensor, y: Tensor | None = None, seed: int | None = None) -> ModelOutput:
        posterior = self.encode(x, y)
        z = posterior.sample(seed=seed)
        return ModelOutput(recon_logits=self.decode(z), z=z, posterior=posterior)

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, seed: int | None = None) -> Tensor:
        raise ValueError(
            f"{type(self).__name__}.sample(): a latent-diffusion VAE has no prior to sample"
            " from (N(0, I) latents decode to noise); its latents come from a diffusion model:"
            " decode those with decode(z), or reconstruct images with reconstruct(x)")

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.decode(self.encode(x, y).mode())

    def training_loss(self, batch: Any, objective: Any, weight: Any) -> tuple[Tensor, dict]:
        raise NotImplementedError(
            f"{type(self).__name__} is served, not trained, by this engine: fine-tuning a"
            " latent-diffusion VAE needs perceptual and adversarial losses that it does not have")

    def export_parts(self) -> dict[str, ExportPart]:
        return latent_diffusion_parts(self)

    # --- subclass hooks ------------------------------------------------------------------------
    def _encode_outputs(self, x: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _posterior(self, outputs: tuple[Tensor, ...]) -> DiagonalGaussian:
        raise NotImplementedError

    @property
    def encoder_output_names(self) -> tuple[str, ...]:
        raise NotImplementedError


# --- export views ------------------------------------------------------------------------------
def _eager_half(model: LatentDiffusionVAE) -> bool:
    """A half-precision model run eagerly (not traced): the fp32 rerun guard applies."""
    return model.dtype in HALF_DTYPES and not torch.compiler.is_exporting()


class LatentDecoderView(nn.Module):
    """z (B, C, h, w) -> images (B, 3, f h, f w) in [-1, 1], float32 in and out (the model's
    dtype inside). Exported graphs hold the network alone; run eagerly in fp16/bf16, rows that
    overflow are redone in fp32 (base.LatentDiffusionVAE.decode)."""

    def __init__(self, model: LatentDiffusionVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: Tensor) -> Tensor:
        if _eager_half(self.model):
            return self.model.decode(z).float()
        return self.model._decode_logits(z.to(self.model.dtype), None).float()


class LatentEncoderView(nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> the encoder's outputs: (mean, logvar) for
    AutoencoderKL, (latents,) for AutoencoderTiny, float32. The noise of sampling stays
    outside."""

    def __init__(self, model: LatentDiffusionVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if _eager_half(self.model):
            outputs = self.model._guarded(self.model._encode_outputs, x)
        else:
            outputs = self.model._encode_outputs(x.to(self.model.dtype))
        return tuple(t.float() for t in outputs)


def _axes(template: dict[int, str], factor: int) -> dict[int, str]:
    names = {i: name.format(f=factor) for i, name in template.items()}
    return {i: name.removesuffix("*1") for i, name in names.items()}  # one level: same axis


def latent_diffusion_parts(model: LatentDiffusionVAE, batch: int = 2) -> dict[str, ExportPart]:
    """Decoder and encoder parts with dynamic batch, height and width; parity runs at the
    example size and at a second, non-square one (EXAMPLE_LATENT)."""
    c, f = model.config.latent_channels, model.downsample_factor
    device = next(model.parameters()).device

    def z_at(h: int, w: int) -> Tensor:
        return torch.randn(batch, c, h, w, device=device)

    def x_at(h: int, w: int) -> Tensor:
        return torch.rand(batch, model.config.in_channels, f * h, f * w, device=device) * 2 - 1

    (h0, w0), (h1, w1) = EXAMPLE_LATENT
    image_axes = _axes(IMAGE_AXES, f)
    return {
        "decoder": ExportPart(LatentDecoderView(model), (z_at(h0, w0),), ("z",), ("images",),
                              {"z": LATENT_AXES}, "latent z (unscaled) -> images in [-1, 1]",
                              parity_batches=PARITY_BATCHES, parity_examples=((z_at(h1, w1),),)),
        "encoder": ExportPart(LatentEncoderView(model), (x_at(h0, w0),), ("images",),
                              model.encoder_output_names, {"images": image_axes},
                              "images in [-1, 1] -> " + ", ".join(model.encoder_output_names),
                              parity_batches=PARITY_BATCHES, parity_examples=((x_at(h1, w1),),)),
    }
