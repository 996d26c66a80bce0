"""Samplers (k-diffusion style functions over a denoiser) and noise schedules."""
