"""Reference VAE models. Build them through the registry:

    from engine.models import build_model
    model = build_model("conv", preset="conv-fmnist-2d")
    vae = from_pretrained("sdxl/vae")     # a latent-diffusion VAE (engine.models.latent_diffusion)
"""

from engine.distributions import DiagonalGaussian
from engine.models.base import BaseVAE, Family, ModelOutput
from engine.models.export_wrappers import ExportPart
from engine.models.latent_diffusion.pretrained import from_pretrained
from engine.models.registry import (
    FAMILIES,
    PRESETS,
    build_model,
    config_from_dict,
    config_to_dict,
    get_family,
    make_config,
    model_from_config,
)

__all__ = [
    "BaseVAE", "DiagonalGaussian", "ExportPart", "Family", "ModelOutput", "FAMILIES", "PRESETS",
    "build_model", "config_from_dict", "config_to_dict", "from_pretrained", "get_family",
    "make_config", "model_from_config",
]
