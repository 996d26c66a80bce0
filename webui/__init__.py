"""A local web UI for Stable Diffusion."""

__version__ = "0.1.0"
