"""`ExtensionHarness`: what an extension's own tests use to run it for real, without importing
the app's private modules. Public and covered by the extension API's stability promise (it is
named in docs/extensions.md): new keyword arguments may be added, none removed.

    from webui.testing.harness import ExtensionHarness

    def test_my_extension(tmp_path):
        harness = ExtensionHarness(Path(__file__).parent, tmp_path)
        assert harness.status == "loaded"
        result = harness.generate(prompt="a lighthouse", extensions={"my-ext": {"args": {...}}})
        assert result.fields[0]["My key"] == "..."
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image


@dataclass
class HarnessResult:
    images: list[Image.Image]
    infotexts: list[str]
    fields: list[dict[str, str]]  # each infotext parsed (Prompt, Negative prompt, Steps, ... and yours)
    paths: list[Path]  # files written (only with save_images=True)


class ExtensionHarness:
    """A data folder with a tiny random-weight checkpoint (a few MB; the images are noise, but
    every stage runs) and a copy of the extension in `extension_dir` (its tests left out), and
    an engine over them on the CPU."""

    def __init__(self, extension_dir: Path, data_dir: Path, *, family: str = "sd1", seed: int = 1) -> None:
        from webui.app import build_engine
        from webui.config import Config
        from webui.testing.make_checkpoint import write_checkpoint

        extension_dir, self.data_dir = Path(extension_dir).resolve(), Path(data_dir)
        write_checkpoint(self.data_dir / "models" / "Stable-diffusion" / "tiny.safetensors", family, seed=seed)
        self.name = extension_dir.name
        shutil.copytree(extension_dir, self.data_dir / "extensions" / self.name,
                        ignore=shutil.ignore_patterns("test_*", "__pycache__", ".git"))
        self.engine = build_engine(Config(data_dir=self.data_dir, dtype="float32"))

    @property
    def status(self) -> str:
        """"loaded", "disabled", or "error: <why>" (the Extensions tab's words)."""
        e = self.engine.extensions.get(self.name)
        return e.status if e is not None else "not found"

    def generate(self, **fields: Any) -> HarnessResult:
        """One generation with these request fields (prompt, extensions, seed, ...) over small,
        fast defaults: 2 steps, 64x64, seed 1, Euler, nothing saved unless asked."""
        from webui.infotext import parse_infotext
        from webui.pipeline.request import GenerationRequest

        request = GenerationRequest(**{"steps": 2, "width": 64, "height": 64, "seed": 1, "sampler_name": "Euler",
                                       "save_images": False, **fields})
        self.engine.check(request)
        result = self.engine.runner.generate(request)
        return HarnessResult(result.images, result.infotexts, [parse_infotext(t) for t in result.infotexts],
                             result.paths)
