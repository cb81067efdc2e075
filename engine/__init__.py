"""vae-engine: train and serve variational autoencoders."""

__version__ = "0.1.0"
