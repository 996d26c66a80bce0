"""Upscalers through spandrel: architectures beyond the built-in two, saved in their published key
layouts at tiny widths, detected, run tiled, and compared with spandrel's own untiled call; the
messages for files spandrel does not know; the fallback where spandrel cannot be imported.

This machine has no torchvision built for its CPU torch, so `import spandrel` fails here. The
spandrel tests run under `webui.testing.torchvision_stand_in`, a STAND-IN torchvision exposing
only the two names spandrel imports (calling them raises); spandrel's detection and the models
themselves are the real ones. Where a working torchvision is installed, it is used instead."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.test_upscalers import noise_image, realesrgan_sd, srvgg_sd, to_esrgan_layout
from webui.models.errors import ModelError
from webui.testing.torchvision_stand_in import torchvision_stand_in
from webui.upscale import UpscalerRegistry


@pytest.fixture(scope="module")
def spandrel() -> Iterator[Any]:
    with torchvision_stand_in():
        import spandrel

        yield spandrel


def _arches(spandrel: Any) -> dict[str, tuple[str, str, dict[str, torch.Tensor], int]]:
    """name -> (folder, architecture spandrel reports, state dict in the published layout, scale)."""
    from spandrel.architectures.HAT import HAT
    from spandrel.architectures.SPAN import SPAN
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(0)
    return {
        "tiny-swinir-x2": ("SwinIR", "SwinIR", SwinIR(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4,
                                                      upscale=2, upsampler="pixelshuffle", mlp_ratio=2.0).state_dict(), 2),
        "tiny-hat-x2": ("HAT", "HAT", HAT(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=2,
                                          mlp_ratio=2.0, compress_ratio=3, squeeze_factor=4).state_dict(), 2),
        "tiny-span-x2": ("upscale_models", "SPAN", SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2).state_dict(), 2),
        # spandrel's ESRGAN takes 32 growth channels, as every published one has
        "tiny-realesrgan-x4": ("RealESRGAN", "ESRGAN", realesrgan_sd(1, feat=16, grow=32), 4),
        "tiny-esrgan-old-x4": ("ESRGAN", "ESRGAN", to_esrgan_layout(realesrgan_sd(1, feat=16, grow=32)), 4),
        "tiny-compact-x4": ("ESRGAN", "RealESRGAN Compact", srvgg_sd(3, feat=16), 4),
    }


@pytest.fixture(scope="module")
def models(spandrel: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spandrel") / "models"
    for name, (folder, _arch, sd, _scale) in _arches(spandrel).items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        if name.endswith("old-x4"):
            torch.save(sd, root / folder / f"{name}.pth")
        else:
            save_file({k: v.contiguous() for k, v in sd.items()}, root / folder / f"{name}.safetensors")
    return root


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def _untiled(spandrel: Any, sd: dict[str, torch.Tensor], image: Image.Image) -> np.ndarray:
    with torch.inference_mode():
        out = spandrel.ModelLoader().load_from_state_dict(dict(sd))(_tensor(image))
    return out[0].permute(1, 2, 0).mul(255).round().clamp(0, 255).numpy()


@pytest.mark.parametrize("name", ["tiny-swinir-x2", "tiny-hat-x2", "tiny-span-x2", "tiny-realesrgan-x4",
                                  "tiny-esrgan-old-x4", "tiny-compact-x4"])
def test_detected_and_equal_to_spandrels_untiled_call(spandrel: Any, models: Path, name: str) -> None:
    """Listed from its folder, recognised with its scale, and our result -- whole, and in 24 px
    tiles blended over 8 px -- against spandrel's untiled call: whole within 1 level of 255
    (rounding), tiled within a mean of 1.5 levels (measured 0.44-1.05: near the seams each tile
    sees less of the image than the whole call does)."""
    _folder, arch, sd, scale = _arches(spandrel)[name]
    registry = UpscalerRegistry(models)
    assert name in registry.names()
    net = registry.load(name)
    assert (net.arch, net.scale) == (arch, scale)
    image = noise_image(40, 28, seed=4)
    theirs = _untiled(spandrel, sd, image)
    whole = registry.upscale(image, name, tile=0)
    tiled = registry.upscale(image, name, tile=24, tile_overlap=8)
    assert whole.size == tiled.size == (40 * scale, 28 * scale)
    assert np.abs(np.asarray(whole, dtype=np.float32) - theirs).max() <= 1
    assert np.abs(np.asarray(tiled, dtype=np.float32) - theirs).mean() <= 1.5


def test_precision_follows_what_the_architecture_supports(spandrel: Any, models: Path) -> None:
    registry = UpscalerRegistry(models)
    swinir = registry.load("tiny-swinir-x2", dtype=torch.float16)  # SwinIR does not support float16
    assert not swinir.half and next(swinir.module.parameters()).dtype == torch.float32
    span = registry.load("tiny-span-x2", dtype=torch.bfloat16)
    assert next(span.module.parameters()).dtype == torch.bfloat16
    out = registry.upscale(noise_image(20, 20), "tiny-span-x2", dtype=torch.bfloat16)
    assert out.size == (40, 40)


def test_files_spandrel_does_not_know_are_named(spandrel: Any, tmp_path: Path) -> None:
    folder = tmp_path / "upscale_models"
    folder.mkdir()
    save_file({"encoder.weight": torch.zeros(2, 2)}, folder / "other.safetensors")
    (folder / "junk.pth").write_bytes(b"not a pickle at all")
    registry = UpscalerRegistry(tmp_path)
    with pytest.raises(ModelError, match=r"^other\.safetensors: not a model spandrel 0\.4\.\d+ knows .*encoder\.weight"):
        registry.upscale(noise_image(8, 8), "other")
    with pytest.raises(ModelError, match=r"^junk\.pth: "):
        registry.upscale(noise_image(8, 8), "junk")
    assert registry.spandrel.problem is None


def test_hires_fix_uses_a_spandrel_architecture(spandrel: Any, models: Path, checkpoint_store: Path) -> None:
    import shutil

    from webui.app import build_engine
    from webui.config import Config
    from webui.pipeline.request import GenerationRequest

    data = models.parent
    (models / "Stable-diffusion").mkdir(exist_ok=True)
    shutil.copy(checkpoint_store / "sd1.safetensors", models / "Stable-diffusion" / "sd1.safetensors")
    engine = build_engine(Config(data_dir=data, dtype="float32"))
    result = engine.runner.generate(GenerationRequest(prompt="x", steps=2, width=64, height=64, seed=1,
                                                      sampler_name="Euler", enable_hr=True, hr_scale=1.5,
                                                      hr_upscaler="tiny-swinir-x2", save_images=False))
    assert result.images[0].size == (96, 96)
    assert "Hires upscaler: tiny-swinir-x2" in result.infotexts[0]
