"""The model protocol shared by every VAE family.

The trainer, the evaluator, export and the runtime depend on this surface only:

    encode(x, y=None)      -> DiagonalGaussian (or VQ codes for the VQ-VAE)
    decode(z, y=None)      -> outputs in data space (images in [0, 1] for a sigmoid head)
    forward(x, y=None)     -> ModelOutput: what the loss needs
    sample(n, y=None, seed=None), reconstruct(x, y=None)
    training_loss(batch, objective, weight) -> (loss, parts) parts: dict[str, Tensor] for logging
    export_parts()         -> dict[str, ExportPart]          graphs that export writes
    config                 -> frozen dataclass that rebuilds the model (see registry.py)

A family module describes itself with a `Family` (config class, model class, presets), and
`engine.models.registry` lists the families in one explicit table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from engine import losses
from engine.distributions import DiagonalGaussian
from engine.models.export_wrappers import ExportPart, image_vae_parts


@dataclass
class ModelOutput:
    """What a forward pass hands to the loss.

    recon_logits: decoder output before the output activation, (B, *data_shape)
    posterior:    q(z|x) (None for the VQ-VAE)
    z:            the latent that was decoded
    kl:           KL per row (B,), computed in the same pass as z when available
    extras:       family-specific terms, e.g. {"vq_loss": ..., "perplexity": ...}
    """

    recon_logits: Tensor
    z: Tensor
    posterior: DiagonalGaussian | None = None
    kl: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """A model family: its frozen config class, its model class and its named presets
    (preset name -> config overrides; the first one is the family's default). `recipes` holds,
    per preset, the training flags behind its published results (e.g. batch size, EMA), which
    `python -m engine.train` uses unless the flags are given."""

    name: str
    config_cls: type
    model_cls: type[nn.Module]
    presets: dict[str, dict[str, Any]]
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def default_preset(self) -> str:
        return next(iter(self.presets))


class BaseVAE(nn.Module):
    """Common behaviour of the image VAEs. Subclasses set `family` and implement
    `_encode_params(x, y) -> (mean, logvar)` and `_decode_logits(z, y) -> logits`."""

    family: ClassVar[str] = ""
    # --objective values its training_loss honours (engine.losses.OBJECTIVES).
    objectives: ClassVar[tuple[str, ...]] = ("elbo", "tcvae", "iwae")
    has_kl: ClassVar[bool] = True  # whether --beta and its schedule weight anything

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    # --- shape contract -------------------------------------------------------------------
    @property
    def conditional(self) -> bool:
        return getattr(self.config, "num_classes", 0) > 0

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.config.latent_dim,)

    @property
    def data_shape(self) -> tuple[int, ...]:
        c = self.config
        return (c.in_channels, c.image_size, c.image_size)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _check_labels(self, y: Tensor | None, batch: int, where: str) -> Tensor | None:
        if not self.conditional:
            if y is not None:
                raise ValueError(f"{where}(): this {self.family} model is unconditional;"
                                 " got labels")
            return None
        if y is None:
            raise ValueError(
                f"{where}(): this conditional model needs labels y of shape ({batch},) with values"
                f" in [0, {self.config.num_classes}); got none"
            )
        if y.shape != (batch,) or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{where}(): expected integer labels of shape ({batch},), got {tuple(y.shape)}"
                f" {y.dtype}"
            )
        return y

    def _check_input(self, x: Tensor, where: str) -> None:
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(
                f"{where}(): expected input of shape (B, {', '.join(map(str, self.data_shape))}),"
                f" got {tuple(x.shape)}"
            )

    def _check_latent(self, z: Tensor, where: str) -> None:
        if tuple(z.shape[1:]) != self.latent_shape:
            hint = ""
            if z.dim() == 2 and z.shape[1] == 2 * self.latent_shape[0]:
                hint = ": did you pass the encoder's concatenated (mu, logvar) instead of a sample?"
            want = ", ".join(map(str, self.latent_shape))
            raise ValueError(
                f"{where}(): expected a latent of shape (B, {want}), got {tuple(z.shape)}{hint}"
            )

    # --- the protocol ---------------------------------------------------------------------
    def encode(self, x: Tensor, y: Tensor | None = None) -> DiagonalGaussian:
        self._check_input(x, "encode")
        y = self._check_labels(y, x.shape[0], "encode")
        mean, logvar = self._encode_params(x, y)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        self._check_latent(z, "decode")
        y = self._check_labels(y, z.shape[0], "decode")
        return self.output_activation(self._decode_logits(z, y))

    def output_activation(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits) if self.config.output == "sigmoid" else logits

    def forward(self, x: Tensor, y: Tensor | None = None, seed: int | None = None) -> ModelOutput:
        posterior = self.encode(x, y)
        z, kl = posterior.sample_with_kl(seed=seed)
        logits = self._decode_logits(z, self._check_labels(y, x.shape[0], "forward"))
        return ModelOutput(recon_logits=logits, z=z, posterior=posterior, kl=kl)

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, seed: int | None = None) -> Tensor:
        """n draws from p(x|z), z ~ N(0, I); returns decoder means in data space."""
        gen = torch.Generator(device=self._device())
        gen.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        z = torch.randn((n, *self.latent_shape), generator=gen, device=self._device())
        return self.decode(z, y)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Decode the posterior mean: the deterministic reconstruction."""
        return self.decode(self.encode(x, y).mean, y)

    def training_loss(self, batch: Any, objective: Any, weight: Any) -> tuple[Tensor, dict]:
        """(loss, parts) for one batch (x, y); `weight` is the scheduled KLWeight."""
        x, y = batch
        return losses.vae_objective(self, x, y if self.conditional else None, objective, weight)

    def export_parts(self) -> dict[str, ExportPart]:
        return image_vae_parts(self)

    def _encode_params(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _decode_logits(self, z: Tensor, y: Tensor | None) -> Tensor:
        raise NotImplementedError
