"""The first-stage VAEs of latent diffusion: AutoencoderKL (SD 1.x/2.x, SDXL, SD3, FLUX) and
AutoencoderTiny (TAESD, TAESDXL, TAEF1), with diffusers' state-dict layout.

    autoencoder_kl.py   the AutoencoderKL architecture and its presets (sd15, sdxl, sd3, flux)
    taesd.py            the AutoencoderTiny architecture and its presets (taesd, taesdxl, taef1)
    blocks.py           ResNet, down/up-sampling and attention blocks, `norm_silu`
    base.py             the shared protocol: dynamic H and W, precision guard, export views
    precision.py        dtype policy (force_upcast) and the fp32 rerun of overflowing rows
    layouts.py          key layouts: original LDM/SGM and TAESD <-> diffusers
    configs.py          configs from diffusers' config.json, or from shapes plus a preset
    pretrained.py       `from_pretrained(path)`: diffusers folders, LDM single files, TAESD pairs

Load weights with `engine.models.from_pretrained`; see docs/latent_diffusion.md.
"""
