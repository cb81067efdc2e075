"""Crystal-structure VAE in the style of Chemeleon2 (Park et al. 2025,
https://arxiv.org/abs/2511.07158), whose VAE follows the All-atom Diffusion Transformer
(Joshi et al. 2025, https://arxiv.org/abs/2503.03965): a pre-norm transformer over the atoms
of one cell encodes to a per-atom diagonal Gaussian latent, and a transformer decodes it.

    encoder: h_i = E_type[Z_i] + W_f fourier(f_i) + W_l lattice_norm      (B, N, d_model)
             h = Transformer(h, key padding mask) -> (mu, logvar)          (B, N, latent_dim)
    decoder: h = W_z z + E_count[num_atoms] -> Transformer(h, mask)        (B, N, d_model)
             atom logits  (B, N, num_atom_types)     class c <-> Z = c + 1
             coords       (B, N, 3, 2) = (cos, sin) of 2 pi f; f = atan2(sin, cos) / 2 pi mod 1
             lattice      (B, 6) normalised (scaled lengths, angles) from the masked mean of h

fourier(f) = [sin(2 pi k f), cos(2 pi k f)] for k = 1..K and each axis: periodic in f, so
f and f + 1 encode identically. Lattice normalisation: x_norm = (x - lattice_mean) / lattice_std
with x = (a, b, c) / N^(1/3) and (alpha, beta, gamma) in degrees; the statistics and the
atom-count histogram come from the training data (`build_crystal_data(...).info`) and live in
the config, so a checkpoint alone can sample.

Losses (weights from the config; Chemeleon2's mp20 defaults atom 1, lengths 1, angles 10,
coords 10, KL 1e-5), every term a MEAN:
    atom_types   cross-entropy, mean over real atoms
    lengths      squared error of normalised scaled lengths, mean over crystals and 3 axes
    angles       squared error of normalised angles, mean over crystals and 3 angles
    frac_coords  |(cos, sin)_pred - (cos 2 pi f, sin 2 pi f)|^2, mean over real atoms and axes
                 (invariant to f -> f + integer)
    kl           KL(q(z_i|x) || N(0, I)) summed over latent dims, mean over real atoms;
                 total weight = w_kl * beta (beta from the trainer's schedule, 1 by default)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from engine.crystal.structures import batch_to_structures, write_cifs
from engine.data.crystals import CrystalBatch
from engine.distributions import DiagonalGaussian
from engine.models.base import Family, ModelOutput
from engine.models.export_wrappers import ExportPart

TWO_PI = 2 * math.pi


@dataclass(frozen=True)
class CrystalVAEConfig:
    """Configuration of `CrystalVAE`.

    d_model:           transformer width.
    num_heads:         attention heads (d_model % num_heads == 0).
    num_layers:        transformer layers of the encoder and, separately, of the decoder.
    ffn_mult:          feed-forward width = ffn_mult * d_model.
    latent_dim:        size of the per-atom latent z_i.
    max_atoms:         largest cell the model samples / the padded size of the data.
    num_atom_types:    atom classes; class c is atomic number Z = c + 1 (100 covers Z <= 100).
    fourier_k:         frequencies k = 1..K of the periodic coordinate encoding.
    dropout:           dropout in attention and feed-forward (0 in Chemeleon2).
    w_atom_types, w_lengths, w_angles, w_frac_coords, w_kl: loss weights (see module docstring).
    num_atoms_hist:    P(num_atoms = n) for n = 0..max_atoms, from the training set; empty means
                       uniform over 1..max_atoms. Used by `sample`.
    lattice_mean, lattice_std: statistics of (a, b, c) / N^(1/3) and (alpha, beta, gamma).
    """

    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 3
    ffn_mult: int = 4
    latent_dim: int = 8
    max_atoms: int = 20
    num_atom_types: int = 100
    fourier_k: int = 8
    dropout: float = 0.0
    w_atom_types: float = 1.0
    w_lengths: float = 1.0
    w_angles: float = 10.0
    w_frac_coords: float = 10.0
    w_kl: float = 1e-5
    num_atoms_hist: tuple[float, ...] = ()
    lattice_mean: tuple[float, ...] = (2.5, 2.5, 2.5, 90.0, 90.0, 90.0)
    lattice_std: tuple[float, ...] = (0.5, 0.5, 0.5, 15.0, 15.0, 15.0)

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by num_heads="
                             f"{self.num_heads}")
        if len(self.lattice_mean) != 6 or len(self.lattice_std) != 6:
            raise ValueError("lattice_mean and lattice_std need 6 values (3 scaled lengths, 3 "
                             f"angles); got {len(self.lattice_mean)} and {len(self.lattice_std)}")
        if self.num_atoms_hist and len(self.num_atoms_hist) != self.max_atoms + 1:
            raise ValueError(f"num_atoms_hist needs max_atoms + 1 = {self.max_atoms + 1} "
                             f"entries (counts 0..max_atoms), got {len(self.num_atoms_hist)}")
        if min(self.lattice_std) <= 0:
            raise ValueError(f"lattice_std must be positive, got {self.lattice_std}")


class CrystalHeads(NamedTuple):
    """Decoder outputs, padded: atom_logits (B, N, C), coord_vec (B, N, 3, 2) unnormalised
    (cos, sin), frac_coords (B, N, 3) in [0, 1), lattice_norm (B, 6), lengths (B, 3) angstrom,
    angles (B, 3) degrees."""

    atom_logits: Tensor
    coord_vec: Tensor
    frac_coords: Tensor
    lattice_norm: Tensor
    lengths: Tensor
    angles: Tensor


class Block(nn.Module):
    """Pre-norm transformer block; attention through scaled_dot_product_attention."""

    def __init__(self, d: int, heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Linear(ffn_mult * d, d),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """x (B, N, d); attn_mask (B, 1, 1, N) bool, True where a key is a real atom."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4)  # 3 x (B, H, N, d_head)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.ffn(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, c: CrystalVAEConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(c.d_model, c.num_heads, c.ffn_mult, c.dropout)
                                    for _ in range(c.num_layers))
        self.norm = nn.LayerNorm(c.d_model)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, N)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.norm(x)


def fourier_features(frac: Tensor, k: int) -> Tensor:
    """(..., 3) fractional coordinates -> (..., 6k) [sin, cos](2 pi k f); periodic with period 1."""
    freqs = torch.arange(1, k + 1, device=frac.device, dtype=frac.dtype)  # (K,)
    angle = TWO_PI * frac[..., None] * freqs  # (..., 3, K)
    return torch.cat([angle.sin(), angle.cos()], dim=-1).flatten(-2)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x (B, N, ...) over the True entries of mask (B, N), all trailing dims included."""
    m = mask.to(x.dtype).view(*mask.shape, *([1] * (x.dim() - mask.dim())))
    return (x * m).sum() / (m.sum() * x[0, 0].numel()).clamp(min=1)


def periodic_coord_loss(coord_vec: Tensor, frac: Tensor, mask: Tensor) -> Tensor:
    """Mean over real atoms and axes of |coord_vec - (cos 2 pi f, sin 2 pi f)|^2."""
    target = torch.stack([torch.cos(TWO_PI * frac), torch.sin(TWO_PI * frac)], dim=-1)
    return masked_mean((coord_vec - target).pow(2).sum(-1), mask)


def wrapped_distance(a: Tensor, b: Tensor) -> Tensor:
    """|a - b| on the unit circle of fractional coordinates, in [0, 0.5]."""
    d = torch.remainder(a - b, 1.0)
    return torch.minimum(d, 1.0 - d)


class CrystalVAE(nn.Module):
    family = "crystal"
    objectives, has_kl = ("elbo",), True  # its own weighted loss; --beta scales w_kl

    def __init__(self, config: CrystalVAEConfig) -> None:
        super().__init__()
        self.config = c = config
        d = c.d_model
        self.type_embed = nn.Embedding(c.num_atom_types + 1, d)  # index = Z, 0 = padding
        self.coord_embed = nn.Linear(6 * c.fourier_k, d)
        self.lattice_embed = nn.Linear(6, d)
        self.encoder = Transformer(c)
        self.to_params = nn.Linear(d, 2 * c.latent_dim)
        self.z_embed = nn.Linear(c.latent_dim, d)
        self.count_embed = nn.Embedding(c.max_atoms + 1, d)
        self.decoder = Transformer(c)
        self.type_head = nn.Linear(d, c.num_atom_types)
        self.coord_head = nn.Linear(d, 6)
        self.lattice_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 6))
        self.register_buffer("lattice_mean", torch.tensor(c.lattice_mean), persistent=False)
        self.register_buffer("lattice_std", torch.tensor(c.lattice_std), persistent=False)
        hist = torch.tensor(c.num_atoms_hist) if c.num_atoms_hist else torch.cat(
            [torch.zeros(1), torch.ones(c.max_atoms)])
        self.register_buffer("num_atoms_hist", hist / hist.sum(), persistent=False)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.config.max_atoms, self.config.latent_dim)

    def _device(self) -> torch.device:
        return self.type_embed.weight.device

    # --- lattice normalisation ----------------------------------------------------------------
    def normalize_lattice(self, lengths: Tensor, angles: Tensor, num_atoms: Tensor) -> Tensor:
        """(B, 3) lengths, (B, 3) angles, (B,) counts -> (B, 6) normalised."""
        scaled = lengths / num_atoms.to(lengths.dtype).clamp(min=1)[:, None] ** (1 / 3)
        return (torch.cat([scaled, angles], dim=1) - self.lattice_mean) / self.lattice_std

    def denormalize_lattice(self, norm: Tensor, num_atoms: Tensor) -> tuple[Tensor, Tensor]:
        x = norm * self.lattice_std + self.lattice_mean
        lengths = x[:, :3] * num_atoms.to(x.dtype).clamp(min=1)[:, None] ** (1 / 3)
        return lengths, x[:, 3:]

    # --- encoder / decoder on plain padded tensors (what export sees) -------------------------
    def _encode_params(self, types: Tensor, frac: Tensor, lengths: Tensor, angles: Tensor,
                       mask: Tensor) -> tuple[Tensor, Tensor]:
        """types (B, N) Z, frac (B, N, 3), lengths/angles (B, 3), mask (B, N) bool
        -> mean, logvar (B, N, latent_dim)."""
        lat = self.normalize_lattice(lengths, angles, mask.sum(1))
        h = (self.type_embed(types.clamp(0, self.config.num_atom_types))
             + self.coord_embed(fourier_features(frac, self.config.fourier_k))
             + self.lattice_embed(lat)[:, None, :])  # (B, N, d)
        mean, logvar = self.to_params(self.encoder(h, mask)).chunk(2, dim=-1)
        return mean, logvar

    def _decode_heads(self, z: Tensor, mask: Tensor) -> CrystalHeads:
        """z (B, N, latent_dim), mask (B, N) bool -> CrystalHeads."""
        count = mask.sum(1)  # (B,)
        h = self.z_embed(z) + self.count_embed(count.clamp(max=self.config.max_atoms))[:, None]
        h = self.decoder(h, mask)  # (B, N, d)
        coord_vec = self.coord_head(h).view(*h.shape[:2], 3, 2)  # (B, N, 3, (cos, sin))
        frac = torch.remainder(torch.atan2(coord_vec[..., 1], coord_vec[..., 0]) / TWO_PI, 1.0)
        m = mask.to(h.dtype)[..., None]
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)  # (B, d)
        lattice_norm = self.lattice_head(pooled)  # (B, 6)
        lengths, angles = self.denormalize_lattice(lattice_norm, count)
        return CrystalHeads(self.type_head(h), coord_vec, frac, lattice_norm, lengths, angles)

    # --- the protocol -----------------------------------------------------------------------
    def _check_mask(self, mask: Tensor, where: str) -> None:
        if mask.dim() != 2 or mask.dtype != torch.bool:
            raise ValueError(f"{where}(): expected a bool mask of shape (B, N), got "
                             f"{tuple(mask.shape)} {mask.dtype}")

    def encode(self, batch) -> DiagonalGaussian:
        """CrystalBatch -> q(z|x) with mean, logvar of shape (B, N, latent_dim) (padded)."""
        self._check_mask(batch.mask, "encode")
        return DiagonalGaussian(*self._encode_params(batch.dense_types, batch.dense_frac,
                                                     batch.lengths, batch.angles, batch.mask))

    def decode(self, z: Tensor, mask: Tensor) -> CrystalHeads:
        """z (B, N, latent_dim) and mask (B, N) bool -> CrystalHeads."""
        self._check_mask(mask, "decode")
        if z.dim() != 3 or z.shape[:2] != mask.shape or z.shape[2] != self.config.latent_dim:
            hint = (": did you pass (mu, logvar) concatenated instead of a sample?"
                    if z.dim() == 3 and z.shape[2] == 2 * self.config.latent_dim else "")
            raise ValueError(f"decode(): expected z of shape (B, N, {self.config.latent_dim}) "
                             f"with (B, N) = mask.shape {tuple(mask.shape)}, got "
                             f"{tuple(z.shape)}{hint}")
        return self._decode_heads(z, mask)

    def forward(self, batch, seed: int | None = None) -> ModelOutput:
        mean, logvar = self._encode_params(batch.dense_types, batch.dense_frac, batch.lengths,
                                           batch.angles, batch.mask)
        b, n, d = mean.shape
        z, kl = kernels.reparameterize_kl(mean.reshape(b * n, d), logvar.reshape(b * n, d),
                                          seed=seed)  # (B N, d), (B N,)
        z, kl = z.view(b, n, d), kl.view(b, n)
        heads = self._decode_heads(z, batch.mask)
        return ModelOutput(recon_logits=heads.atom_logits, z=z,
                           posterior=DiagonalGaussian(mean, logvar), kl=kl,
                           extras=heads._asdict())

    def loss_parts(self, batch, out: ModelOutput) -> dict[str, Tensor]:
        """Unweighted loss terms (see the module docstring for reductions)."""
        mask, e = batch.mask, out.extras
        target = (batch.dense_types - 1).clamp(min=0)  # class = Z - 1
        ce = F.cross_entropy(out.recon_logits.flatten(0, 1), target.flatten(),
                             reduction="none").view_as(target)
        lat_err = (e["lattice_norm"] - self.normalize_lattice(
            batch.lengths, batch.angles, batch.num_atoms)).pow(2)  # (B, 6)
        acc = (out.recon_logits.argmax(-1) == target).to(lat_err.dtype)
        return {"atom_types": masked_mean(ce, mask), "lengths": lat_err[:, :3].mean(),
                "angles": lat_err[:, 3:].mean(),
                "frac_coords": periodic_coord_loss(e["coord_vec"], batch.dense_frac, mask),
                "kl": masked_mean(out.kl, mask), "atom_acc": masked_mean(acc, mask),
                "coord_mae": masked_mean(wrapped_distance(e["frac_coords"], batch.dense_frac),
                                         mask)}

    def training_loss(self, batch, objective=None, weight=None) -> tuple[Tensor, dict]:
        """(weighted loss, detached parts). `weight.beta` (KLWeight) multiplies w_kl."""
        c = self.config
        parts = self.loss_parts(batch, self(batch))
        beta = weight.beta if weight is not None else torch.ones((), device=self._device())
        loss = (c.w_atom_types * parts["atom_types"] + c.w_lengths * parts["lengths"]
                + c.w_angles * parts["angles"] + c.w_frac_coords * parts["frac_coords"]
                + c.w_kl * beta * parts["kl"])
        recon = loss - c.w_kl * beta * parts["kl"]
        out = {k: v.detach() for k, v in parts.items()}
        out.update(recon=recon.detach(), beta=torch.as_tensor(beta).detach())
        return loss, out

    def heads_to_batch(self, heads: CrystalHeads, mask: Tensor):
        types = heads.atom_logits.argmax(-1) + 1
        return CrystalBatch.from_dense(types, heads.frac_coords, heads.lengths, heads.angles, mask)

    @torch.no_grad()
    def reconstruct(self, batch):
        """Decode the posterior mean: the deterministic reconstruction, as a CrystalBatch."""
        return self.heads_to_batch(self.decode(self.encode(batch).mean, batch.mask), batch.mask)

    @torch.no_grad()
    def sample(self, n: int, y=None, seed: int | None = None):
        """n crystals from the prior: atom counts ~ training histogram, z ~ N(0, I)."""
        gen = torch.Generator(device=self._device())
        gen.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        counts = torch.multinomial(self.num_atoms_hist, n, replacement=True, generator=gen)
        mask = torch.arange(self.config.max_atoms, device=self._device()) < counts[:, None]
        z = torch.randn((n, *self.latent_shape), generator=gen, device=self._device())
        return self.heads_to_batch(self.decode(z, mask), mask)

    def export_parts(self) -> dict[str, ExportPart]:
        return crystal_export_parts(self)

    def epoch_artifacts(self, batch, out_dir, epoch: int, count: int = 4) -> None:
        """Write `count` inputs and their reconstructions as CIFs under out_dir/recon/epoch_NNN/
        and `count` prior samples under out_dir/samples/epoch_NNN/ (seed = epoch)."""
        was_training = self.training
        self.eval()
        try:
            small = _take(batch, count).to(self._device())
            name = f"epoch_{epoch:03d}"
            recon, samples = Path(out_dir) / "recon" / name, Path(out_dir) / "samples" / name
            write_cifs(batch_to_structures(small), recon, "input")
            write_cifs(batch_to_structures(self.reconstruct(small)), recon, "recon")
            write_cifs(batch_to_structures(self.sample(count, seed=epoch)), samples, "sample")
        finally:
            self.train(was_training)


def _take(batch, count: int):
    k = min(count, batch.num_crystals)
    return CrystalBatch.from_dense(batch.dense_types[:k], batch.dense_frac[:k],
                                   batch.lengths[:k], batch.angles[:k], batch.mask[:k])


class CrystalEncoderView(nn.Module):
    """(atom_types (B, N) int64 Z, frac_coords (B, N, 3), lengths (B, 3), angles (B, 3),
    mask (B, N) bool) -> (mu, logvar), each (B, N, latent_dim)."""

    def __init__(self, model: CrystalVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, atom_types, frac_coords, lengths, angles, mask):
        return self.model._encode_params(atom_types, frac_coords, lengths, angles, mask)


class CrystalDecoderView(nn.Module):
    """(z (B, N, latent_dim), mask (B, N) bool) -> (atom_logits (B, N, C), frac_coords (B, N, 3),
    lengths (B, 3), angles (B, 3)). Z = argmax(atom_logits) + 1."""

    def __init__(self, model: CrystalVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, z, mask):
        h = self.model._decode_heads(z, mask)
        return h.atom_logits, h.frac_coords, h.lengths, h.angles


def crystal_export_parts(model: CrystalVAE, batch: int = 2) -> dict[str, ExportPart]:
    c = model.config
    n = c.max_atoms
    counts = torch.randint(1, n + 1, (batch,))
    mask = torch.arange(n) < counts[:, None]
    axes = {0: "batch", 1: "atoms"}
    z = torch.randn(batch, n, c.latent_dim)
    types = torch.where(mask, torch.randint(1, c.num_atom_types + 1, (batch, n)), 0)
    frac, lengths = torch.rand(batch, n, 3), 3 + 3 * torch.rand(batch, 3)
    angles = 60 + 60 * torch.rand(batch, 3)
    return {
        "decoder": ExportPart(CrystalDecoderView(model), (z, mask), ("z", "mask"),
                              ("atom_logits", "frac_coords", "lengths", "angles"),
                              {"z": axes, "mask": axes},
                              "per-atom latent z + atom mask -> crystal heads"),
        "encoder": ExportPart(CrystalEncoderView(model), (types, frac, lengths, angles, mask),
                              ("atom_types", "frac_coords", "lengths", "angles", "mask"),
                              ("mu", "logvar"),
                              {"atom_types": axes, "frac_coords": axes, "lengths": {0: "batch"},
                               "angles": {0: "batch"}, "mask": axes},
                              "padded crystal -> per-atom posterior mean and log-variance"),
    }


CRYSTAL_FAMILY = Family(
    "crystal",
    CrystalVAEConfig,
    CrystalVAE,
    presets={
        "crystal-small": {},
        "chemeleon2": {"d_model": 512, "num_heads": 8, "num_layers": 8, "latent_dim": 8},
    },
)
