"""Write a random-weight TAESD decoder in the released key layout (`1.weight`, `3.conv.0.weight`, ...)
for tests: `.safetensors` or `.pth` (a plain tensor dict) depending on the file suffix."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from webui.pipeline.taesd import TAESDDecoder


def write_taesd(path: Path, seed: int = 0) -> Path:
    """Save a seeded random TAESDDecoder state dict to `path` and return the path."""
    path = Path(path)
    with torch.random.fork_rng(devices=[]):  # initialisers draw from the global generator; leave it as it was
        torch.manual_seed(seed)
        sd = {k: v.detach().clone().contiguous() for k, v in TAESDDecoder().state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path
