"""Integrations with other libraries (each optional, imported lazily): diffusers.py swaps a
diffusers pipeline's VAE for an engine-backed one."""
