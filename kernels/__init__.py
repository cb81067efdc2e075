"""Fused kernels for vae-engine: reparameterization, KL divergence, vector quantization and
GroupNorm + SiLU.

Every op has a pure-PyTorch reference `<op>_ref`; the backend is chosen in `kernels.dispatch`.
"""

from kernels.dispatch import get_backend, set_backend, use_backend
from kernels.gn_silu import group_norm_silu, group_norm_silu_ref
from kernels.kl import kl_divergence, kl_divergence_ref
from kernels.reparam import reparameterize, reparameterize_ref
from kernels.reparam_kl import reparameterize_kl, reparameterize_kl_ref
from kernels.vq import vq_nearest, vq_nearest_ref, vq_quantize, vq_quantize_ref
from kernels.vq_ema import vq_ema_update, vq_ema_update_ref

__all__ = [
    "get_backend",
    "group_norm_silu",
    "group_norm_silu_ref",
    "kl_divergence",
    "kl_divergence_ref",
    "reparameterize",
    "reparameterize_kl",
    "reparameterize_kl_ref",
    "reparameterize_ref",
    "set_backend",
    "use_backend",
    "vq_ema_update",
    "vq_ema_update_ref",
    "vq_nearest",
    "vq_nearest_ref",
    "vq_quantize",
    "vq_quantize_ref",
]
