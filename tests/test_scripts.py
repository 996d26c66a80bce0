"""The Script dropdown's scripts (webui.scripts): X/Y/Z plot, prompt matrix, prompts from file,
SD upscale, loopback -- each run for real on the tiny checkpoint, every cell compared with the
single generation it stands for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_extensions import write_extension
from webui.app import Engine, build_engine
from webui.config import Config
from webui.infotext import parse_infotext
from webui.models.errors import ModelError
from webui.pipeline.progress import CancelToken, Progress
from webui.pipeline.request import GenerationRequest
from webui.scripts.values import parse_values


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red cube", steps=2, width=64, height=64, seed=5, sampler_name="Euler", save_images=False)
    base.update(kw)
    return GenerationRequest(**base)


def px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture
def engine(data_dir: Path) -> Engine:
    return build_engine(Config(data_dir=data_dir, dtype="float32"))


# --- A1111's value syntax ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "kind", "expected"), [
    ("1, 2, 3", int, [1, 2, 3]),
    ("1-5", int, [1, 2, 3, 4, 5]),
    ("1-5 (+2)", int, [1, 3, 5]),
    ("10-5 (-3)", int, [10, 7]),
    ("1-10 [5]", int, [1, 3, 5, 7, 10]),
    ("0.0-1.0 (+0.25)", float, [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("1-2 [3]", float, [1.0, 1.5, 2.0]),
    ("-1, 7", int, [-1, 7]),
    ("1-3, 10", int, [1, 2, 3, 10]),
    ('Euler a, "DPM++ 2M, Karras", LMS', str, ["Euler a", "DPM++ 2M, Karras", "LMS"]),
])
def test_value_syntax(text: str, kind: type, expected: list) -> None:
    assert parse_values(text, kind) == expected


@pytest.mark.parametrize(("text", "kind", "message"), [
    ("1, two", int, "'two' is not a number"),
    ("7.5", int, "not a whole number"),
    ("1-5 (+0)", int, "never reaches"),
    ("1-5 (-1)", int, "never reaches"),
    ("1-100000", int, "at most 1000"),
])
def test_bad_values_are_named(text: str, kind: type, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_values(text, kind)


# --- X/Y/Z plot --------------------------------------------------------------------------------


def xyz(**args) -> dict:
    return {"script_name": "X/Y/Z plot", "script_args": args}


def test_xyz_grid_cells_are_the_single_generations(engine: Engine, data_dir: Path) -> None:
    """Steps across, CFG down: a 3x2 grid in X-fastest order; each cell the very image of a plain
    generation with that cell's values; a label band on top and left; the grid saved to
    txt2img-grids with an infotext naming the script and its axes; sub-images on request."""
    result = engine.run(req(save_images=True, **xyz(x_type="Steps", x_values="1-3", y_type="CFG Scale",
                                                    y_values="4, 9", include_lone_images=True)))
    grid, cells = result.images[0], result.images[1:]
    assert len(cells) == 6
    assert grid.width > 3 * 64 and grid.height > 2 * 64  # the labels take room on top and left
    left, top = grid.width - 3 * 64, grid.height - 2 * 64
    for i, (steps, cfg) in enumerate([(s, c) for c in (4, 9) for s in (1, 2, 3)]):
        single = engine.runner.generate(req(steps=steps, cfg_scale=cfg)).images[0]
        assert np.array_equal(px(cells[i]), px(single)), (steps, cfg)
        r, c = divmod(i, 3)
        assert np.array_equal(px(grid.crop((left + c * 64, top + r * 64, left + c * 64 + 64, top + r * 64 + 64))),
                              px(single))
        assert parse_infotext(result.infotexts[1 + i])["Steps"] == str(steps)
    label_band = px(grid.crop((left, 0, grid.width, top)))
    assert (label_band < 128).any()  # text drawn
    info = parse_infotext(result.infotexts[0])
    assert info["Script"] == "X/Y/Z plot" and info["X Type"] == "Steps" and info["X Values"] == "1-3"
    assert info["Y Type"] == "CFG Scale" and info["Y Values"] == "4, 9"
    grid_file = result.paths[0]
    assert grid_file.parent.parent.name == "txt2img-grids"
    assert parse_infotext(Image.open(grid_file).info["parameters"])["X Type"] == "Steps"
    assert len([p for p in result.paths if p.parent.parent.name == "txt2img-images"]) == 6


def test_xyz_by_a1111_index_z_axis_and_sub_grids(engine: Engine) -> None:
    """A1111's positional script_args pick axes by index in its list for the tab (txt2img: 4 is
    Steps, 1 Seed, 9 Sampler); a Z axis puts one grid per value side by side."""
    args = [4, "1, 2", [], 9, "Euler, Heun", [], 1, "5, 6", [], False, False, True, False, False, False, False, 0,
            False]
    result = engine.run(req(script_name="x/y/z plot", script_args=args))
    assert len(result.images) == 3  # the Z grid, then its two sub-grids
    assert result.images[0].size == (2 * 128, 128)  # no legend: cells only
    assert result.images[1].size == (128, 128)
    heun = engine.runner.generate(req(steps=2, sampler_name="Heun", seed=6)).images[0]
    assert np.array_equal(px(result.images[0].crop((128 + 64, 64, 256, 128))), px(heun))


def test_xyz_seeds_fixed_varied_or_kept_random(engine: Engine) -> None:
    fixed = engine.run(req(seed=-1, **xyz(x_type="Steps", x_values="1, 2", include_lone_images=True)))
    assert fixed.seeds[1] == fixed.seeds[2]  # one random seed for the whole plot
    varied = engine.run(req(seed=100, **xyz(x_type="Steps", x_values="1, 2", vary_seeds_x=True,
                                            include_lone_images=True)))
    assert varied.seeds[1:] == [100, 101]
    kept = engine.run(req(**xyz(x_type="Seed", x_values="-1, 7", no_fixed_seeds=True, include_lone_images=True)))
    assert kept.seeds[2] == 7 and "Fixed X Values" not in parse_infotext(kept.infotexts[0])
    fixed_axis = engine.run(req(**xyz(x_type="Seed", x_values="-1, 7")))
    info = parse_infotext(fixed_axis.infotexts[0])
    assert info["Fixed X Values"].endswith(", 7") and info["Fixed X Values"] != "-1, 7"


def test_prompt_search_replace_and_order(engine: Engine) -> None:
    sr = engine.run(req(prompt="a red cube", **xyz(x_type="Prompt S/R", x_values="red, blue, green",
                                                   include_lone_images=True)))
    assert [parse_infotext(t)["Prompt"] for t in sr.infotexts[1:]] == ["a red cube", "a blue cube", "a green cube"]
    order = engine.run(req(prompt="cat, hat, night", **xyz(x_type="Prompt order", x_values="cat, night",
                                                          include_lone_images=True)))
    assert [parse_infotext(t)["Prompt"] for t in order.infotexts[1:]] == ["cat, hat, night", "night, hat, cat"]
    with pytest.raises(ValueError, match="Prompt S/R: 'purple' is not in the prompt"):
        engine.check(req(**xyz(x_type="Prompt S/R", x_values="purple, red")))


@pytest.mark.parametrize(("args", "message"), [
    ({"x_type": "Sampler", "x_values": "Euler, Nope"}, "image 2 of 2: sampler_name: unknown sampler 'Nope'"),
    ({"x_type": "Checkpoint name", "x_values": "sd1, missing"}, "image 2 of 2: checkpoint: .*missing"),
    ({"x_type": "Steps", "x_values": "1, 500"}, "image 2 of 2: steps"),
    ({"x_type": "VAE", "x_values": "a"}, "X axis 'VAE' is not supported here"),
    ({"x_type": "Nope"}, "no axis 'Nope'"),
    ({"x_type": 99}, "not an axis index"),
    ({"x_type": "Steps", "x_values": ""}, "none given"),
    ({"x_type": "Size", "x_values": "64x64, big"}, "Size: 'big' is not WIDTHxHEIGHT"),
    ({"colour": 1}, "unknown argument 'colour'"),
])
def test_a_bad_cell_is_reported_before_any_image(engine: Engine, data_dir: Path, args: dict, message: str) -> None:
    with pytest.raises((ValueError, ModelError), match=message):
        engine.check(req(save_images=True, **xyz(**args)))
    assert not (data_dir / "outputs").exists()


def test_an_extension_adds_an_axis(data_dir: Path) -> None:
    write_extension(data_dir, "tint", '''
        from pydantic import BaseModel

        class Args(BaseModel):
            amount: int = 0

        @hookimpl
        def ui_contribution():
            return UiSection(title="Tint", build=lambda: {}, args_model=Args)

        @hookimpl
        def xyz_axes():
            def apply(fields, value):
                fields["extensions"] = {**fields["extensions"], "tint": {"amount": value}}
            return [XyzAxis("Tint amount", int, apply)]

        @hookimpl
        def postprocess_image(stage):
            if stage.args.amount:
                stage.image = stage.image.point(lambda v: min(255, v + stage.args.amount))
                stage.infotext["Tint"] = stage.args.amount
    ''')
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    result = engine.run(req(**xyz(x_type="Tint amount", x_values="0, 40", include_lone_images=True)))
    assert "Tint" not in parse_infotext(result.infotexts[1]) and parse_infotext(result.infotexts[2])["Tint"] == "40"
    assert (px(result.images[2]) >= px(result.images[1])).all() and (px(result.images[2]) > px(result.images[1])).any()


def test_progress_counts_the_whole_script_and_interrupt_stops_it(engine: Engine) -> None:
    seen: list[Progress] = []
    engine.run(req(**xyz(x_type="Steps", x_values="2, 3")), progress=seen.append)
    assert [(p.step, p.total_steps) for p in seen] == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert [p.batch for p in seen] == [0, 0, 1, 1, 1] and {p.batches for p in seen} == {2}
    token = CancelToken()

    def stop(p: Progress) -> None:
        if p.step == 3:
            token.interrupt()

    result = engine.run(req(**xyz(x_type="Steps", x_values="2, 3, 4")), progress=stop, cancel=token)
    assert result.interrupted and len(result.images) == 2  # the two cells made, no grid


# --- prompt matrix, prompts from file ----------------------------------------------------------


def test_prompt_matrix_makes_every_combination(engine: Engine) -> None:
    result = engine.run(req(prompt="a cube | red | at night", script_name="Prompt matrix"))
    prompts = [parse_infotext(t)["Prompt"] for t in result.infotexts[1:]]
    assert prompts == ["a cube", "a cube, red", "a cube, at night", "a cube, red, at night"]
    assert len({s for s in result.seeds}) == 1
    assert result.images[0].width > 2 * 64 and result.images[0].height > 2 * 64
    start = engine.run(req(prompt="cube | red", script_name="Prompt matrix",
                           script_args=[True, True, "positive", "space", 0]))
    assert [parse_infotext(t)["Prompt"] for t in start.infotexts[1:]] == ["cube", "red cube"]
    assert start.seeds[1:] == [5, 6]
    with pytest.raises(ValueError, match="needs parts separated by \\|"):
        engine.check(req(script_name="Prompt matrix"))


def test_prompts_from_file_lines_and_options(engine: Engine) -> None:
    text = 'a red cube\n\n--prompt "a blue ball" --steps 3 --seed 9 --sampler_name "Heun"\nnight'
    result = engine.run(req(prompt="photo", script_name="Prompts from file or textbox",
                            script_args=[True, False, "end", text]))
    infos = [parse_infotext(t) for t in result.infotexts]
    assert [i["Prompt"] for i in infos] == ["photo a red cube", "a blue ball", "photo night"]
    assert infos[1]["Steps"] == "3" and infos[1]["Sampler"] == "Heun" and result.seeds == [5, 9, 7]
    single = engine.runner.generate(req(prompt="a blue ball", steps=3, seed=9, sampler_name="Heun")).images[0]
    assert np.array_equal(px(result.images[1]), px(single))
    for line, message in [("--steps ten", "line 1: --steps: 'ten' is not a int"),
                          ("--outpath_samples /etc", "line 1: --outpath_samples is not accepted"),
                          ("--colour red", "line 1: unknown option --colour"),
                          ("--steps 999", "line 1: steps: Input should be less than or equal to 150")]:
        with pytest.raises(ValueError, match=message):
            engine.check(req(script_name="Prompts from file or textbox", script_args={"prompt_txt": line}))


# --- img2img scripts ---------------------------------------------------------------------------


def gradient(w: int = 64, h: int = 64) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0)
    return Image.fromarray(np.concatenate([x, x[::-1], np.full_like(x, 90)], axis=2).astype(np.uint8))


def test_sd_upscale_with_one_tile_is_img2img_on_the_upscaled_image(engine: Engine) -> None:
    init = gradient(32, 32)
    result = engine.run(req(init_images=(init,), denoising_strength=0.5, script_name="SD upscale",
                            script_args=[None, 8, "Lanczos", 2.0]))
    assert result.images[0].size == (64, 64)
    big = init.resize((64, 64), Image.Resampling.LANCZOS)
    plain = engine.runner.generate(req(init_images=(big,), denoising_strength=0.5)).images[0]
    assert np.array_equal(px(result.images[0]), px(plain))
    assert parse_infotext(result.infotexts[0])["Script"] == "SD upscale"


def test_sd_upscale_tiles_blend_without_seams() -> None:
    from webui.scripts.sd_upscale import blend, tiles

    origins = tiles(160, 96, 64, 64, 16)
    assert origins[0] == (0, 0) and origins[-1] == (96, 32) and len(origins) == 3 * 2
    flat = [Image.new("RGB", (64, 64), (120, 60, 200)) for _ in origins]
    assert (px(blend(flat, origins, (160, 96), 16)) == [120, 60, 200]).all()
    source = gradient(160, 96)  # tiles cut from one image come back as that image
    pieces = [source.crop((x, y, x + 64, y + 64)) for x, y in origins]
    assert np.abs(px(blend(pieces, origins, (160, 96), 16)) - px(source)).max() <= 1


def test_sd_upscale_runs_every_tile(engine: Engine) -> None:
    seen: list[Progress] = []
    result = engine.run(req(init_images=(gradient(48, 48),), width=64, height=64, denoising_strength=0.5,
                            script_name="SD upscale", script_args={"overlap": 16, "scale_factor": 2.0}),
                        progress=seen.append)
    assert result.images[0].size == (96, 96)
    assert {p.batches for p in seen} == {4}  # 2x2 tiles of 64 over 96


def test_loopback_feeds_each_result_back(engine: Engine) -> None:
    init = gradient()
    result = engine.run(req(init_images=(init,), denoising_strength=0.6, script_name="Loopback",
                            script_args=[3, 0.3, "Linear"]))
    assert len(result.images) == 3
    strengths = [parse_infotext(t)["Denoising strength"] for t in result.infotexts]
    assert strengths == ["0.6", "0.45", "0.3"]
    second = engine.runner.generate(req(init_images=(result.images[0],), denoising_strength=0.45,
                                        seed=6)).images[0]
    assert np.array_equal(px(result.images[1]), px(second))


def test_img2img_scripts_are_not_on_txt2img(engine: Engine) -> None:
    with pytest.raises(ValueError, match="no script 'sd upscale' on txt2img.*x/y/z plot"):
        engine.check(req(script_name="sd upscale"))


# --- batch grids -------------------------------------------------------------------------------


def test_a_batch_gets_a_grid_as_the_settings_say(engine: Engine, data_dir: Path) -> None:
    """Several images: the grid first (return_grid) and saved to txt2img-grids (grid_save), laid
    out by n_rows; one image, or both settings off: no grid."""
    result = engine.run(req(batch_size=2, n_iter=2, save_images=True))
    assert len(result.images) == 5 and result.grids == 1 and result.images[0].size == (128, 128)
    assert result.paths[0].parent.parent.name == "txt2img-grids" and len(result.paths) == 5
    assert np.array_equal(px(result.images[0].crop((64, 64, 128, 128))), px(result.images[4]))
    engine.settings.update({"n_rows": 1, "grid_format": "jpeg"})
    one_row = engine.run(req(batch_size=3, save_images=True))
    assert one_row.images[0].size == (192, 64) and one_row.paths[0].suffix == ".jpg"
    assert len(engine.run(req()).images) == 1
    engine.settings.update({"return_grid": False, "grid_save": False})
    plain = engine.run(req(batch_size=2, save_images=True))
    assert len(plain.images) == 2 and plain.grids == 0 and len(plain.paths) == 2


def test_checkpoint_cells_run_grouped_by_model_and_land_in_grid_order(engine: Engine, data_dir: Path,
                                                                      checkpoint_store: Path) -> None:
    """Checkpoint on X, seeds on Y: the two cells of each model run one after the other (one
    switch, not three), and each lands in its own place in the grid."""
    from tests.conftest import add_checkpoint

    add_checkpoint(data_dir, checkpoint_store, "sd1-other.safetensors")
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    loads: list[str] = []
    original = engine.bundle

    def counting(query, modules=()):
        bundle = original(query, modules=modules)
        if not loads or loads[-1] != bundle.model_name:
            loads.append(bundle.model_name)
        return bundle

    engine.runner.get_bundle = counting
    result = engine.run(req(**xyz(x_type="Checkpoint name", x_values="sd1, sd1-other", y_type="Seed", y_values="1, 2",
                                  include_lone_images=True)))
    assert loads == ["sd1", "sd1-other"]
    models = [parse_infotext(t)["Model"] for t in result.infotexts[1:]]
    seeds = [parse_infotext(t)["Seed"] for t in result.infotexts[1:]]
    assert models == ["sd1", "sd1-other", "sd1", "sd1-other"] and seeds == ["1", "1", "2", "2"]
