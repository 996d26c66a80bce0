"""Upscalers for the Extras tab and hires fix: Lanczos / Nearest resampling and model files from
`models/ESRGAN/`, `RealESRGAN/`, `SwinIR/`, `DAT/`, `HAT/`, `ScuNET/` and `upscale_models/`.

    registry = UpscalerRegistry(config.models_path)
    registry.names()                      # ["None", "Lanczos", "Nearest", "4x-UltraSharp", ...]
    big = registry.upscale(image, "4x-UltraSharp", scale=2.5)           # or size=(w, h)
    registry.upscale_folder(src_dir, dst_dir, "Lanczos", save=writer.save_as, size=(1024, 1024))  # webui.outputs

Model files load through `spandrel` (several dozen architectures, recognised from the state
dict). `import spandrel` imports torchvision, whose compiled ops must match the installed torch
build (PyPI's torchvision 0.28.0 fails at import with a CPU build of torch 2.13: "operator
torchvision::nms does not exist"); where it cannot be imported, the RRDBNet (ESRGAN /
Real-ESRGAN) and SRVGGNetCompact networks written here with torch alone load those files, and
`registry.spandrel.problem` says why (the Extras tab shows it).
"""

from webui.upscale.arch import Network, build_network
from webui.upscale.registry import MAX_PASSES, MAX_SIDE, UpscalerInfo, UpscalerRegistry, target_size
from webui.upscale.tiles import Cancelled

__all__ = [
    "MAX_PASSES", "MAX_SIDE", "Cancelled", "Network", "UpscalerInfo", "UpscalerRegistry", "build_network",
    "target_size",
]
