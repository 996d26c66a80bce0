"""Device and precision choice, attention backends, memory modes (medvram / lowvram, VAE tiling)
and the bulk tensor conversion checkpoint loading uses."""
