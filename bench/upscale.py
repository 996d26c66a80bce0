"""Upscaling: our Extras path (registry, tiling, conversions) against spandrel's own untiled call on
the same full-size network, measured in the same run, rounds alternating.

Networks at their published full size with random weights (speed does not depend on the values):
RRDBNet x4 as RealESRGAN_x4plus / 4x-UltraSharp (64 features, 23 blocks, 32 growth channels) and
SwinIR x4 as the classical SR model (embed 180, 6x6 blocks, window 8). float32 on the CPU.

Where no torchvision built for this torch exists (this project's CI machine), spandrel is imported
under the torchvision STAND-IN of webui.testing (the two names spandrel imports; the architectures
measured here never call them): the script says which.

    python bench/upscale.py                          # RRDBNet at 256² -> 1024², SwinIR at 64² -> 256²
    python bench/upscale.py --rrdb-size 512 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def log(msg: str = "") -> None:
    print(msg, flush=True)


def networks(spandrel_size: dict[str, int]) -> dict[str, tuple[torch.nn.Module, int]]:
    from spandrel.architectures.ESRGAN import ESRGAN as RRDBNet
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(0)
    return {
        "rrdb-x4": (RRDBNet(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4), spandrel_size["rrdb-x4"]),
        "swinir-x4": (SwinIR(img_size=64, embed_dim=180, depths=[6] * 6, num_heads=[6] * 6, window_size=8,
                             upscale=4, upsampler="pixelshuffle", mlp_ratio=2.0), spandrel_size["swinir-x4"]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rrdb-size", type=int, default=256, help="input side for RRDBNet (default 256)")
    ap.add_argument("--swinir-size", type=int, default=64, help="input side for SwinIR (default 64)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    from webui.testing.torchvision_stand_in import torchvision_stand_in
    from webui.upscale import UpscalerRegistry

    log(f"upscale: python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} cpu(s), "
        f"{torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.2f} (run it alone)")
    with torchvision_stand_in() as stand_in, tempfile.TemporaryDirectory(prefix="webui-bench-upscale-") as tmp:
        import spandrel
        from safetensors.torch import save_file

        log("spandrel " + spandrel.__version__ + (" under the torchvision STAND-IN (no matching torchvision here)"
                                                  if stand_in else " with the installed torchvision"))
        folder = Path(tmp) / "ESRGAN"
        folder.mkdir()
        nets = networks({"rrdb-x4": a.rrdb_size, "swinir-x4": a.swinir_size})
        for name, (module, _) in nets.items():
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, folder / f"{name}.safetensors")
        registry = UpscalerRegistry(Path(tmp))
        summary = []
        for name, (module, side) in nets.items():
            image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8))
            descriptor = spandrel.ModelLoader().load_from_state_dict(module.state_dict())
            descriptor.model.eval()

            def ours(name: str = name, image: Image.Image = image) -> Image.Image:
                return registry.upscale(image, name)  # the Extras defaults: 512 px tiles, 32 px overlap

            def theirs(descriptor=descriptor, image: Image.Image = image) -> Image.Image:
                x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
                with torch.inference_mode():
                    y = descriptor(x)
                return Image.fromarray(y[0].permute(1, 2, 0).mul(255).round().clamp(0, 255).byte().numpy())

            runs = {"ours": ours, "spandrel": theirs}
            for fn in runs.values():
                fn()  # warm-up (and the model load, for ours)
            times: dict[str, list[float]] = {k: [] for k in runs}
            for r in range(a.rounds):
                for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                    t0 = time.perf_counter()
                    out = runs[key]()
                    times[key].append(time.perf_counter() - t0)
            ratio = statistics.median(times["ours"]) / statistics.median(times["spandrel"])
            log(f"\n== {name}: {side}² -> {out.width}x{out.height}, {a.rounds} rounds ==")
            for key, values in times.items():
                log(f"{key:<9} median {statistics.median(values):.2f} s  ({', '.join(f'{v:.2f}' for v in values)})")
            log(f"ours / spandrel untiled: {ratio:.3f}")
            summary.append((f"{name} {side}² -> {out.width}²", ratio))
    log("\n== summary ==")
    for label, ratio in summary:
        log(f"{label:<28} ours / spandrel {ratio:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
