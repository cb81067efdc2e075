"""VQ-VAE (van den Oord et al. 2017, https://arxiv.org/abs/1711.00937).

    x (B, C, S, S) -> conv encoder (two stride-2 stages + residual blocks) -> (B, D, S/4, S/4)
    -> nearest code in a K x D codebook (kernels.vq_quantize; no N x K matrix on the GPU path)
    -> straight-through -> conv decoder -> logits (B, C, S, S)

Loss terms: ||sg(z_e) - e||^2 (codebook) + beta ||z_e - sg(e)||^2 (commitment), means over
elements. Options, as in vector-quantize-pytorch:
  ema_decay > 0      codebook follows an exponential moving average of assigned encoder outputs
                     (Razavi et al. 2019) instead of the codebook loss gradient;
  kmeans_init        the codebook is initialised by k-means on the first training batch;
  dead_code_threshold > 0   a code whose EMA usage count falls below the threshold is restarted
                     at a random encoder output of the current batch.
Code usage and perplexity exp(H(p)) of the batch's code histogram are reported each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from engine import losses
from engine.models.base import BaseVAE, Family, ModelOutput
from engine.models.blocks import ResidualBlock
from engine.models.export_wrappers import vq_parts


@dataclass(frozen=True)
class VQVAEConfig:
    """Configuration of `VQVAE`.

    in_channels, image_size: the data (image_size divisible by 4).
    hidden_dim:          channels of the conv encoder/decoder.
    num_res_blocks:      residual blocks after the downsampling stages (and before upsampling).
    num_codes (K), code_dim (D): the codebook.
    beta:                commitment weight.
    ema_decay:           0 disables EMA updates (the codebook then learns by gradient).
    kmeans_init:         k-means on the first batch; kmeans_iters iterations.
    dead_code_threshold: EMA usage count below which a code restarts; 0 disables restarts.
    output:              "sigmoid" (BCE) or "identity" (MSE).
    """

    in_channels: int = 1
    image_size: int = 28
    hidden_dim: int = 128
    num_res_blocks: int = 2
    num_codes: int = 512
    code_dim: int = 64
    beta: float = 0.25
    ema_decay: float = 0.0
    kmeans_init: bool = False
    kmeans_iters: int = 10
    dead_code_threshold: float = 0.0
    output: str = "sigmoid"

    def __post_init__(self) -> None:
        if self.image_size % 4:
            raise ValueError(f"VQ-VAE image_size must be divisible by 4, got {self.image_size}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> Tensor:
    """Lloyd's k-means on rows of x (N, D) -> centroids (K, D); empty clusters keep their seed."""
    idx = torch.randint(x.shape[0], (k,), device=x.device, generator=generator)
    centroids = x[idx].clone()
    for _ in range(iters):
        assign = kernels.vq_nearest(x, centroids)  # (N,)
        counts, sums = kernels.vq_ema_update(x, assign, k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


class VectorQuantizer(nn.Module):
    """Codebook (K, D) with gradient or EMA updates, k-means init and dead-code restart."""

    def __init__(self, c: VQVAEConfig) -> None:
        super().__init__()
        self.c = c
        init = torch.empty(c.num_codes, c.code_dim).uniform_(-1, 1) / c.num_codes
        self.codebook = nn.Parameter(init, requires_grad=c.ema_decay == 0)
        self.register_buffer("ema_count", torch.ones(c.num_codes))  # assignments per step, EMA
        self.register_buffer("ema_sum", self.codebook.detach().clone())
        self.register_buffer("initialized", torch.tensor(not c.kmeans_init))
        # A Python flag mirrors the buffer so the compiled step does not branch on a tensor.
        self._needs_init = c.kmeans_init
        self.register_load_state_dict_post_hook(VectorQuantizer._sync_init_flag)

    @staticmethod
    def _sync_init_flag(module: VectorQuantizer, incompatible_keys) -> None:
        module._needs_init = not bool(module.initialized)

    def forward(self, z_e: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """z_e (B, D, h, w) -> (z_q straight-through, codes (B, h, w), vq loss, stats)."""
        flat = z_e.permute(0, 2, 3, 1).float()  # (B, h, w, D); the quantizer runs in fp32
        if self.training and self._needs_init:
            self._kmeans_init(flat.reshape(-1, self.c.code_dim))
        quantized, codes, loss = kernels.vq_quantize(flat, self.codebook, beta=self.c.beta)
        if self.training:
            self._update_codebook(flat.reshape(-1, self.c.code_dim).detach(), codes.reshape(-1))
        stats = self.code_stats(codes)
        z_q = quantized.permute(0, 3, 1, 2).to(z_e.dtype)
        return z_q, codes, loss, stats

    def code_stats(self, codes: Tensor) -> dict[str, Tensor]:
        """Perplexity exp(-sum p log p) and fraction of codes used in this batch."""
        flat = codes.reshape(-1)
        counts = torch.zeros(self.c.num_codes, device=codes.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.float32))
        p = counts / flat.numel()
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
        return {"perplexity": entropy.exp(), "code_usage": (p > 0).float().mean()}

    @torch.no_grad()
    def _kmeans_init(self, flat: Tensor) -> None:
        centroids = kmeans(flat, self.c.num_codes, self.c.kmeans_iters)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(centroids, src=0)
        self.codebook.data.copy_(centroids)
        self.ema_sum.copy_(centroids)
        self.initialized.fill_(True)
        self._needs_init = False

    @torch.no_grad()
    def _update_codebook(self, flat: Tensor, codes: Tensor) -> None:
        counts, sums = kernels.vq_ema_update(flat, codes, self.c.num_codes)  # (K,), (K, D)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        decay = self.c.ema_decay or 0.99  # usage EMA also drives dead-code restart
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        if self.c.ema_decay > 0:
            self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
            # Laplace smoothing keeps rarely used codes from dividing by ~0.
            n = self.ema_count.sum()
            smoothed = (self.ema_count + 1e-5) / (n + self.c.num_codes * 1e-5) * n
            self.codebook.data.copy_(self.ema_sum / smoothed[:, None])
        if self.c.dead_code_threshold > 0:
            self._restart_dead_codes(flat)

    def _restart_dead_codes(self, flat: Tensor) -> None:
        dead = self.ema_count < self.c.dead_code_threshold  # (K,)
        pick = torch.randint(flat.shape[0], (self.c.num_codes,), device=flat.device)
        fresh = flat[pick]  # (K, D) random encoder outputs of this batch
        self.codebook.data.copy_(torch.where(dead[:, None], fresh, self.codebook.data))
        self.ema_sum.copy_(torch.where(dead[:, None], fresh * self.c.dead_code_threshold,
                                       self.ema_sum))
        self.ema_count.copy_(torch.where(dead, self.c.dead_code_threshold, self.ema_count))


class VQVAE(BaseVAE):
    family = "vqvae"
    objectives, has_kl = ("elbo",), False  # its own loss: recon + codebook + commitment

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__(config)
        c = config
        h, res = c.hidden_dim, [ResidualBlock(c.hidden_dim, c.hidden_dim // 2)
                                for _ in range(c.num_res_blocks)]
        self.encoder = nn.Sequential(
            nn.Conv2d(c.in_channels, h // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(h // 2, h, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=1), *res, nn.ReLU(),
            nn.Conv2d(h, c.code_dim, 1),
        )
        res_dec = [ResidualBlock(h, h // 2) for _ in range(c.num_res_blocks)]
        self.decoder = nn.Sequential(
            nn.Conv2d(c.code_dim, h, 3, padding=1), *res_dec, nn.ReLU(),
            nn.ConvTranspose2d(h, h // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(h // 2, c.in_channels, 4, stride=2, padding=1),
        )
        self.quantizer = VectorQuantizer(c)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of the continuous pre-quantization latent z_e: (D, S/4, S/4)."""
        s = self.config.image_size // 4
        return (self.config.code_dim, s, s)

    @property
    def code_shape(self) -> tuple[int, int]:
        s = self.config.image_size // 4
        return (s, s)

    def encode(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """x (B, C, S, S) -> code indices (B, S/4, S/4), int64."""
        self._check_input(x, "encode")
        self._check_labels(y, x.shape[0], "encode")
        return kernels.vq_nearest(self.encoder(x).permute(0, 2, 3, 1).float(),
                                  self.quantizer.codebook)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """codes (B, S/4, S/4) int -> images (B, C, S, S)."""
        if tuple(codes.shape[1:]) != self.code_shape or codes.dtype.is_floating_point:
            raise ValueError(
                f"decode_codes(): expected integer codes of shape (B, {self.code_shape[0]},"
                f" {self.code_shape[1]}), got {tuple(codes.shape)} {codes.dtype}"
            )
        z_q = F.embedding(codes.long(), self.quantizer.codebook).permute(0, 3, 1, 2)
        return self.output_activation(self.decoder(z_q))

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Decode a latent: integer codes (B, h, w), or a quantized z_q (B, D, h, w)."""
        if not z.dtype.is_floating_point:
            return self.decode_codes(z)
        self._check_latent(z, "decode")
        return self.output_activation(self.decoder(z))

    def forward(self, x: Tensor, y: Tensor | None = None, seed: int | None = None) -> ModelOutput:
        z_e = self.encoder(x)  # (B, D, h, w)
        z_q, codes, vq_loss, stats = self.quantizer(z_e)
        return ModelOutput(recon_logits=self.decoder(z_q), z=z_q,
                           extras={"vq_loss": vq_loss, "codes": codes, **stats})

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, seed: int | None = None) -> Tensor:
        """Codes drawn uniformly (no learned prior ships with the VQ-VAE), then decoded."""
        gen = torch.Generator(device=self._device())
        gen.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        codes = torch.randint(self.config.num_codes, (n, *self.code_shape), generator=gen,
                              device=self._device())
        return self.decode_codes(codes)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.decode_codes(self.encode(x))

    def training_loss(self, batch, objective, weight) -> tuple[Tensor, dict]:
        x, _ = batch
        return losses.vq_objective(self, x, objective)

    def export_parts(self):
        return vq_parts(self)


VQVAE_FAMILY = Family(
    "vqvae",
    VQVAEConfig,
    VQVAE,
    presets={
        "vqvae-mnist": {},
        "vqvae-mnist-ema": {"ema_decay": 0.99, "kmeans_init": True, "dead_code_threshold": 1.0},
        "vqvae-small": {"hidden_dim": 32, "num_codes": 64, "code_dim": 16, "num_res_blocks": 1},
    },
)
