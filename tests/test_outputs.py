"""One output writer for every saved image: the Extras stage (single and folder) and img2img
folder batches honour the Settings (folder, format, pattern) and call `image_saved`, like txt2img."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from tests.test_extensions import engine_for, write_extension
from webui import extras
from webui.infotext import parse_infotext


def saved_hook(data_dir: Path) -> Path:
    log = data_dir / "saved.log"
    write_extension(data_dir, "saved-log", f'''
        from webui.extensions.api import hookimpl

        @hookimpl
        def image_saved(saved):
            with open({str(log)!r}, "a") as f:
                f.write(saved.path.name + "\\n")
    ''')
    return log


def test_extras_follow_the_settings_and_call_image_saved(data_dir: Path) -> None:
    log = saved_hook(data_dir)
    engine = engine_for(data_dir)
    engine.settings.update({"samples_format": "jpeg", "outdir_extras_samples": "upscaled", "filename_pattern": "x"})
    image = Image.new("RGB", (16, 12), (200, 40, 40))
    image.info["parameters"] = "a boat\nSteps: 2, Sampler: Euler, Seed: 1"
    result = extras.run(engine, [image], extras.Upscale("Lanczos", scale=2), save=True)
    (path,) = result.paths
    assert path.parent.parent == data_dir / "upscaled" and path.name.endswith("-x.jpg")
    with Image.open(path) as saved:
        assert saved.format == "JPEG" and saved.size == (32, 24)
    assert result.infotexts[0].startswith("a boat\n") and "Postprocess upscale to: 32x24" in result.infotexts[0]
    assert log.read_text().split() == [path.name]
    # a folder batch keeps the source names, in the Settings' format, and calls the hook too
    src, dst = data_dir / "in", data_dir / "out"
    src.mkdir()
    image.save(src / "one.png")
    written = extras.run_folder(engine, src, dst, extras.Upscale("Nearest", scale=2))
    assert [p.name for p in written] == ["one.jpg"] and log.read_text().split()[-1] == "one.jpg"


def test_img2img_folder_batch_goes_through_the_writer(data_dir: Path) -> None:
    from webui.pipeline.batch import FolderBatch, img2img_folder
    from webui.pipeline.request import GenerationRequest

    log = saved_hook(data_dir)
    engine = engine_for(data_dir)
    engine.settings.update({"samples_format": "webp"})
    src, dst = data_dir / "in", data_dir / "out"
    src.mkdir()
    Image.new("RGB", (64, 64), (10, 90, 200)).save(src / "sky.png")
    request = GenerationRequest(prompt="a sky", steps=2, width=64, height=64, seed=3, sampler_name="Euler",
                                init_images=(Image.new("RGB", (8, 8)),))
    result = img2img_folder(engine.runner, request, FolderBatch(src, dst, None))
    assert [p.name for p in result.paths] == ["sky.webp"]
    with Image.open(result.paths[0]) as out:
        assert out.format == "WEBP"
        assert parse_infotext(result.infotexts[0])["Seed"] == "3"
    assert log.read_text().split() == ["sky.webp"]
