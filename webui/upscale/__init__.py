"""Upscalers for the Extras tab and hires fix: Lanczos / Nearest resampling and ESRGAN-family
model files (RRDBNet in the ESRGAN and Real-ESRGAN layouts, SRVGGNetCompact) from
`models/ESRGAN/` and `models/RealESRGAN/`.

    registry = UpscalerRegistry(config.models_path)
    registry.names()                      # ["None", "Lanczos", "Nearest", "4x-UltraSharp", ...]
    big = registry.upscale(image, "4x-UltraSharp", scale=2.5)           # or size=(w, h)
    registry.upscale_folder(src_dir, dst_dir, "Lanczos", save=writer.save_as, size=(1024, 1024))  # webui.outputs

The networks are implemented here, with torch alone. The `spandrel` library would cover more
architectures, but it imports torchvision for every architecture at `import spandrel`, and
torchvision's compiled ops must match the installed torch build exactly: PyPI's torchvision
wheel for torch 2.13 (0.28.0) is linked against the CUDA torch libraries, so with a CPU torch
`import torchvision` fails ("operator torchvision::nms does not exist"), and a plain
`pip install spandrel` resolves to the newest torchvision, which replaces torch itself.
"""

from webui.upscale.arch import Network, build_network
from webui.upscale.registry import MAX_PASSES, MAX_SIDE, UpscalerInfo, UpscalerRegistry, target_size
from webui.upscale.tiles import Cancelled

__all__ = [
    "MAX_PASSES", "MAX_SIDE", "Cancelled", "Network", "UpscalerInfo", "UpscalerRegistry", "build_network",
    "target_size",
]
