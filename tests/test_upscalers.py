"""Upscalers: built-in resamplers, ESRGAN-family model files in both key layouts, tiling,
repeated native-scale passes finished with Lanczos, errors, refusal of pickles with code, batch.

Model files are tiny random-weight networks written here, with key names spelled out from the
published layouts (not taken from our implementation), so loading them tests the detection."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from webui.models.errors import ModelError
from webui.upscale import Cancelled, UpscalerRegistry, build_network

# -- tiny weights in the published layouts -------------------------------------------------


def _conv(g: torch.Generator, cout: int, cin: int, bias: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(cout, cin, 3, 3, generator=g) / math.sqrt(cin * 9)
    return w, torch.full((cout,), bias) + 0.01 * torch.randn(cout, generator=g)


def realesrgan_sd(seed: int = 0, *, feat: int = 8, blocks: int = 2, grow: int = 4, ups: int = 2,
                  unshuffle: int = 1) -> dict[str, torch.Tensor]:
    """BasicSR / Real-ESRGAN RRDBNet keys: conv_first, body.N.rdbK.convJ, conv_body, conv_upI, conv_hr, conv_last."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def put(name: str, cout: int, cin: int, bias: float = 0.0) -> None:
        sd[f"{name}.weight"], sd[f"{name}.bias"] = _conv(g, cout, cin, bias)

    put("conv_first", feat, 3 * unshuffle * unshuffle)
    for i in range(blocks):
        for k in (1, 2, 3):
            for j in range(1, 5):
                put(f"body.{i}.rdb{k}.conv{j}", grow, feat + (j - 1) * grow)
            put(f"body.{i}.rdb{k}.conv5", feat, feat + 4 * grow)
    put("conv_body", feat, feat)
    for i in range(1, ups + 1):
        put(f"conv_up{i}", feat, feat)
    put("conv_hr", feat, feat)
    put("conv_last", 3, feat, bias=0.5)  # mid-grey plus detail: outputs away from the clamp
    return sd


def to_esrgan_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under the original ESRGAN `nn.Sequential` names."""
    blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"body\.(\d+)\.", k)))
    ups = sum(1 for k in sd if re.fullmatch(r"conv_up\d+\.weight", k))
    index = {"conv_first": 0, "conv_hr": 2 + 3 * ups, "conv_last": 4 + 3 * ups}
    index.update({f"conv_up{i + 1}": 3 + 3 * i for i in range(ups)})
    out = {}
    for key, value in sd.items():
        if m := re.fullmatch(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)", key):
            out[f"model.1.sub.{m[1]}.RDB{m[2]}.conv{m[3]}.0.{m[4]}"] = value
        else:
            name, kind = key.rsplit(".", 1)
            out[f"model.1.sub.{blocks}.{kind}" if name == "conv_body" else f"model.{index[name]}.{kind}"] = value
    return out


def srvgg_sd(seed: int = 0, *, feat: int = 8, convs: int = 2, scale: int = 4, zero_last: bool = False):
    """Real-ESRGAN SRVGGNetCompact keys: body.0 conv, body.1 PReLU, ..., body.<last> conv."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    sd["body.0.weight"], sd["body.0.bias"] = _conv(g, feat, 3)
    for i in range(convs + 1):
        sd[f"body.{2 * i + 1}.weight"] = torch.full((feat,), 0.25)
        if i < convs:
            sd[f"body.{2 * i + 2}.weight"], sd[f"body.{2 * i + 2}.bias"] = _conv(g, feat, feat)
    last = 2 * convs + 2
    sd[f"body.{last}.weight"], sd[f"body.{last}.bias"] = _conv(g, 3 * scale * scale, feat)
    if zero_last:
        sd[f"body.{last}.weight"].zero_()
        sd[f"body.{last}.bias"].zero_()
    return sd


def noise_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = len(mode)
    a = rng.integers(0, 256, size=(h, w, bands) if bands > 1 else (h, w), dtype=np.uint8)
    return Image.fromarray(a, mode)


def diff(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))


class _Payload:
    """Unpickling this runs `open(marker, 'w')`: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "ESRGAN").mkdir(parents=True)
    (root / "RealESRGAN").mkdir()
    save_file(realesrgan_sd(1), root / "RealESRGAN" / "tiny-x4.safetensors")
    torch.save(to_esrgan_layout(realesrgan_sd(1)), root / "ESRGAN" / "tiny-x4-old.pth")
    save_file(realesrgan_sd(2, ups=2, unshuffle=2), root / "RealESRGAN" / "tiny-x2.safetensors")
    return root


def count_passes(registry: UpscalerRegistry, name: str) -> list[tuple[int, ...]]:
    """Record the input shape of every forward call of the (cached) network."""
    calls: list[tuple[int, ...]] = []
    registry.load(name).module.register_forward_hook(lambda _m, args, _out: calls.append(tuple(args[0].shape)))
    return calls


# -- listing -------------------------------------------------------------------------------


def test_builtins_and_model_files_are_listed(models: Path) -> None:
    (models / "ESRGAN" / "notes.txt").write_text("not a model")
    (models / "ESRGAN" / "sub").mkdir()
    save_file(realesrgan_sd(3), models / "ESRGAN" / "sub" / "tiny-x4.safetensors")  # same stem as a RealESRGAN file
    save_file(realesrgan_sd(3), models / "RealESRGAN" / "Lanczos.safetensors")  # same name as a built-in
    registry = UpscalerRegistry(models)
    # ESRGAN before RealESRGAN, each in path order (sub/ sorts before tiny-...); a taken name gets its folder
    assert registry.names() == [
        "None", "Lanczos", "Nearest",
        "tiny-x4", "tiny-x4-old", "Lanczos (RealESRGAN)", "tiny-x2", "tiny-x4 (RealESRGAN)",
    ]
    assert registry.get("TINY-X2").name == "tiny-x2"  # case-insensitive fallback
    assert registry.get("tiny-x4").path == models / "ESRGAN" / "sub" / "tiny-x4.safetensors"


def test_missing_folders_give_the_builtins_and_refresh_finds_new_files(tmp_path: Path) -> None:
    registry = UpscalerRegistry(tmp_path / "models")
    assert registry.names() == ["None", "Lanczos", "Nearest"]
    folder = tmp_path / "models" / "RealESRGAN"
    folder.mkdir(parents=True)
    save_file(realesrgan_sd(), folder / "new.safetensors")
    assert "new" not in registry.names()
    registry.refresh()
    assert registry.names()[-1] == "new"
    (folder / "new.safetensors").unlink()
    registry.refresh()
    assert "new" not in registry.names()


# -- built-in resamplers ---------------------------------------------------------------------


@pytest.mark.parametrize("name, resample", [("Lanczos", Image.Resampling.LANCZOS), ("Nearest", Image.Resampling.NEAREST)])
def test_builtin_by_factor_and_to_a_size(tmp_path: Path, name: str, resample: Image.Resampling) -> None:
    registry = UpscalerRegistry(tmp_path)
    image = noise_image(21, 13)
    by_factor = registry.upscale(image, name, scale=2.5)
    assert by_factor.size == (52, 32)  # round(21 * 2.5) = 52 (banker's rounding of 52.5), round(32.5) = 32
    assert by_factor.tobytes() == image.resize((52, 32), resample=resample).tobytes()
    to_size = registry.upscale(image, name, size=(50, 17))
    assert to_size.size == (50, 17) and to_size.mode == "RGB"
    assert registry.upscale(image, name, scale=0.5).size == (10, 6)  # down is allowed too


def test_nearest_2x_repeats_every_pixel(tmp_path: Path) -> None:
    image = noise_image(5, 4)
    out = UpscalerRegistry(tmp_path).upscale(image, "Nearest", scale=2)
    a = np.asarray(image)
    assert np.array_equal(np.asarray(out), a.repeat(2, axis=0).repeat(2, axis=1))


def test_none_returns_the_image_unchanged(tmp_path: Path) -> None:
    image = noise_image(9, 7, mode="RGBA")
    out = UpscalerRegistry(tmp_path).upscale(image, "None", scale=4)
    assert out is not image and out.size == image.size and out.tobytes() == image.tobytes()


# -- model upscalers -------------------------------------------------------------------------


def test_both_rrdb_layouts_load_and_give_the_same_pixels(models: Path) -> None:
    registry = UpscalerRegistry(models)
    image = noise_image(12, 9)
    new = registry.upscale(image, "tiny-x4")
    old = registry.upscale(image, "tiny-x4-old")
    assert new.size == old.size == (48, 36) and new.mode == "RGB"
    assert new.tobytes() == old.tobytes()
    net_new, net_old = registry.load("tiny-x4"), registry.load("tiny-x4-old")
    assert (net_new.arch, net_new.scale, net_old.arch, net_old.scale) == ("RealESRGAN", 4, "ESRGAN", 4)
    assert np.asarray(new).std() > 5  # not a flat or saturated image


def test_x2_pixel_unshuffle_model_on_odd_sizes(models: Path) -> None:
    registry = UpscalerRegistry(models)
    net = registry.load("tiny-x2")
    assert (net.scale, net.multiple) == (2, 2)
    assert registry.upscale(noise_image(7, 5), "tiny-x2").size == (14, 10)


def test_native_scale_is_repeated_then_finished_with_lanczos(models: Path) -> None:
    registry = UpscalerRegistry(models)
    calls = count_passes(registry, "tiny-x2")
    image = noise_image(8, 6)
    out = registry.upscale(image, "tiny-x2", size=(37, 23))
    assert out.size == (37, 23)
    # 8x6 -> 16x12 -> 32x24 -> 64x48: three x2 passes until both sides reach the target, then Lanczos down
    assert calls == [(1, 3, 6, 8), (1, 3, 12, 16), (1, 3, 24, 32)]
    calls.clear()
    assert registry.upscale(image, "tiny-x2", scale=1.5).size == (12, 9)
    assert len(calls) == 1
    calls.clear()
    assert registry.upscale(image, "tiny-x2", scale=0.5).size == (4, 3)
    assert calls == []  # nothing to enlarge: Lanczos only
    calls.clear()
    assert registry.upscale(image, "tiny-x2", scale=100).size == (800, 600)
    assert len(calls) == 3  # at most three passes, then Lanczos the rest of the way


def test_lanczos_finish_matches_model_then_resize(models: Path) -> None:
    registry = UpscalerRegistry(models)
    image = noise_image(10, 10)
    native = registry.upscale(image, "tiny-x4")
    odd = registry.upscale(image, "tiny-x4", size=(31, 29))
    assert odd.tobytes() == native.resize((31, 29), resample=Image.Resampling.LANCZOS).tobytes()


def test_tiled_and_untiled_agree(models: Path) -> None:
    registry = UpscalerRegistry(models)
    image = noise_image(70, 52, seed=3)
    whole = registry.upscale(image, "tiny-x4", tile=0)
    progress: list[tuple[int, int]] = []
    tiled = registry.upscale(image, "tiny-x4", tile=32, tile_overlap=12, progress=lambda d, t: progress.append((d, t)))
    assert whole.size == tiled.size == (280, 208)
    assert progress[-1] == (6, 6) and len(progress) == 6  # 3 x 2 tiles
    d = diff(whole, tiled)
    assert d.mean() < 1.0, d.mean()
    assert np.percentile(d, 99) <= 8
    no_overlap = registry.upscale(image, "tiny-x4", tile=32, tile_overlap=0)
    assert diff(whole, no_overlap).mean() > d.mean()  # the blending is what makes them agree


def test_models_are_cached_per_registry_and_reloaded_when_the_file_changes(models: Path) -> None:
    registry = UpscalerRegistry(models)
    first = registry.load("tiny-x4")
    assert registry.load("tiny-x4") is first
    assert UpscalerRegistry(models).load("tiny-x4") is not first  # no state shared between instances
    path = models / "RealESRGAN" / "tiny-x4.safetensors"
    save_file(realesrgan_sd(9), path)
    assert registry.load("tiny-x4") is not first


def test_rgba_and_grayscale_keep_their_mode(models: Path) -> None:
    registry = UpscalerRegistry(models)
    rgba = noise_image(6, 5, mode="RGBA")
    out = registry.upscale(rgba, "tiny-x4", scale=3)
    assert out.mode == "RGBA" and out.size == (18, 15)
    expected_alpha = rgba.getchannel("A").resize((18, 15), resample=Image.Resampling.LANCZOS)
    assert out.getchannel("A").tobytes() == expected_alpha.tobytes()
    gray = registry.upscale(noise_image(6, 5, mode="L"), "tiny-x4")
    assert gray.mode == "L" and gray.size == (24, 20)
    palette = noise_image(6, 5).convert("P")
    assert registry.upscale(palette, "Lanczos", scale=2).mode == "RGB"


def test_bfloat16_runs(models: Path) -> None:
    registry = UpscalerRegistry(models)
    image = noise_image(8, 8)
    low = registry.upscale(image, "tiny-x4", dtype=torch.bfloat16)
    assert low.size == (32, 32)
    assert diff(low, registry.upscale(image, "tiny-x4")).mean() < 8


def test_srvgg_compact_with_a_zero_residual_is_nearest_upscaling(tmp_path: Path) -> None:
    folder = tmp_path / "RealESRGAN"
    folder.mkdir()
    save_file(srvgg_sd(zero_last=True), folder / "compact-zero.safetensors")
    save_file(srvgg_sd(4, scale=2), folder / "compact-x2.safetensors")
    registry = UpscalerRegistry(tmp_path)
    image = noise_image(7, 6)
    assert registry.load("compact-zero").arch == "SRVGGNetCompact"
    out = registry.upscale(image, "compact-zero")
    assert out.tobytes() == image.resize((28, 24), resample=Image.Resampling.NEAREST).tobytes()
    assert registry.load("compact-x2").scale == 2
    assert registry.upscale(image, "compact-x2").size == (14, 12)


def test_cancel_stops_between_tiles(models: Path) -> None:
    registry = UpscalerRegistry(models)
    seen = []

    def cancel() -> bool:
        seen.append(1)
        return len(seen) > 2

    with pytest.raises(Cancelled):
        registry.upscale(noise_image(64, 64), "tiny-x4", tile=24, tile_overlap=4, cancel=cancel)
    assert len(seen) == 3


# -- errors ----------------------------------------------------------------------------------


def test_unknown_name_lists_the_choices(models: Path) -> None:
    registry = UpscalerRegistry(models)
    with pytest.raises(ModelError) as e:
        registry.upscale(noise_image(4, 4), "R-ESRGAN 4x+", scale=2)
    message = str(e.value)
    assert "'R-ESRGAN 4x+'" in message and "Lanczos" in message and "tiny-x2" in message and "\n" not in message


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(scale=0), "positive number"),
        (dict(scale=-2), "positive number"),
        (dict(scale=float("nan")), "positive number"),
        (dict(scale=float("inf")), "positive number"),
        (dict(scale="2"), "positive number"),
        (dict(scale=True), "positive number"),
        (dict(scale=2, size=(8, 8)), "not both"),
        (dict(size=(0, 8)), "out of range"),
        (dict(size=(8, 100_000)), "out of range"),
        (dict(size=(8.5, 8)), "whole pixels"),
        (dict(size=8), "whole pixels"),
        (dict(scale=5000), "largest side"),
        (dict(scale=2, tile=-1), "tile size"),
        (dict(scale=2, tile=32, tile_overlap=16), "overlap"),
        (dict(), "needs an upscale factor"),
    ],
)
def test_bad_scale_size_and_tiling_are_value_errors(tmp_path: Path, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        UpscalerRegistry(tmp_path).upscale(noise_image(8, 8), "Lanczos", **kwargs)


def test_pickle_with_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    folder = tmp_path / "ESRGAN"
    folder.mkdir()
    marker = tmp_path / "payload-ran"
    torch.save({**to_esrgan_layout(realesrgan_sd()), "evil": _Payload(marker)}, folder / "evil.pth")
    registry = UpscalerRegistry(tmp_path)
    assert "evil" in registry.names()
    with pytest.raises(ModelError) as e:
        registry.upscale(noise_image(4, 4), "evil")
    assert str(e.value).startswith("evil.pth: refused to load")
    assert not marker.exists()


def test_weights_of_another_kind_give_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "ESRGAN"
    folder.mkdir()
    save_file({"encoder.weight": torch.zeros(2, 2)}, folder / "other.safetensors")
    broken = realesrgan_sd()
    del broken["body.1.rdb2.conv3.weight"]
    save_file(broken, folder / "broken.safetensors")
    registry = UpscalerRegistry(tmp_path)
    with pytest.raises(ModelError, match=r"^other\.safetensors: not a supported upscaler.*encoder\.weight"):
        registry.upscale(noise_image(4, 4), "other")
    with pytest.raises(ModelError, match=r"^broken\.safetensors: weights do not fit.*body\.1\.rdb2\.conv3\.weight"):
        registry.upscale(noise_image(4, 4), "broken")
    with pytest.raises(ModelError, match="built in"):
        registry.load("Lanczos")


def test_prefixed_params_ema_keys_are_unwrapped() -> None:
    sd = realesrgan_sd(5)
    wrapped = {**{f"params_ema.{k}": v for k, v in sd.items()}, **{f"params.{k}": v * 0 for k, v in sd.items()}}
    x = torch.rand(1, 3, 6, 6)
    with torch.inference_mode():
        assert torch.equal(build_network(wrapped).module(x), build_network(sd).module(x))  # the EMA copy wins


def test_official_realesrgan_pth_nesting_under_params_ema(tmp_path: Path) -> None:
    folder = tmp_path / "RealESRGAN"
    folder.mkdir()
    sd = realesrgan_sd(6)
    torch.save({"params_ema": sd, "params": {k: v * 0 for k, v in sd.items()}}, folder / "RealESRGAN_x4plus.pth")
    torch.save({"params": sd}, folder / "RealESRGAN_x2.pth")
    registry = UpscalerRegistry(tmp_path)
    assert registry.upscale(noise_image(5, 5), "RealESRGAN_x4plus").size == (20, 20)
    assert registry.upscale(noise_image(5, 5), "RealESRGAN_x2").size == (20, 20)


# -- batch -------------------------------------------------------------------------------------


def test_upscale_folder_writes_pngs_with_the_same_names_and_keeps_parameters(models: Path, tmp_path: Path) -> None:
    from webui.extensions.manager import ExtensionManager
    from webui.outputs import OutputWriter
    from webui.settings import Settings

    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a, Seed: 1")
    noise_image(6, 4).save(src / "a.png", pnginfo=info)
    noise_image(5, 5).save(src / "b.jpg", quality=95)
    noise_image(5, 5).save(src / "b.webp")  # same stem as b.jpg: must not overwrite it
    (src / "c.txt").write_text("not an image")
    (src / "d.png").write_bytes(b"broken")
    save = OutputWriter(tmp_path, tmp_path / "outputs", Settings, ExtensionManager.empty()).save_as
    written = UpscalerRegistry(models).upscale_folder(src, dst, "tiny-x4", save=save, scale=2)
    assert [p.name for p in written] == ["a.png", "b.png", "b_2.png"]
    assert sorted(p.name for p in dst.iterdir()) == ["a.png", "b.png", "b_2.png"]
    with Image.open(dst / "a.png") as a:
        assert a.format == "PNG" and a.size == (12, 8)
        assert a.info["parameters"] == "a cat\nSteps: 20, Sampler: Euler a, Seed: 1"
    with Image.open(dst / "b.png") as b:
        assert b.size == (10, 10) and "parameters" not in b.info
    with pytest.raises(ValueError, match="must differ"):
        UpscalerRegistry(models).upscale_folder(src, src, "Lanczos", save=save, scale=2)
    with pytest.raises(ModelError, match="unknown upscaler"):
        UpscalerRegistry(models).upscale_folder(src, tmp_path / "never", "nope", save=save, scale=2)
    assert not (tmp_path / "never").exists()


# -- an independent implementation as an oracle, when one is importable ----------------------


def _spandrel():
    try:
        import spandrel  # noqa: PLC0415
    except ImportError as e:  # not installed; a torchvision for another torch is replaced by the stand-in
        pytest.skip(f"spandrel not installed ({e}); the cross-check against it is skipped")
    return spandrel


@pytest.mark.parametrize(
    "sd",
    [
        pytest.param(lambda: realesrgan_sd(7, feat=32, grow=32), id="realesrgan-x4"),
        pytest.param(lambda: realesrgan_sd(7, feat=32, grow=32, unshuffle=2), id="realesrgan-x2"),
        pytest.param(lambda: to_esrgan_layout(realesrgan_sd(7, feat=32, grow=32, ups=3)), id="esrgan-x8"),
        pytest.param(lambda: srvgg_sd(7, feat=16), id="compact-x4"),
    ],
)
def test_same_output_as_spandrel(sd) -> None:
    """Our built-in networks (the fallback) against spandrel's (under the torchvision stand-in
    where no matching torchvision exists: see tests/test_spandrel.py)."""
    from webui.testing.torchvision_stand_in import torchvision_stand_in

    with torchvision_stand_in():
        _cross_check(_spandrel(), sd)


def _cross_check(spandrel, sd) -> None:
    weights = sd()
    ours = build_network(dict(weights))
    theirs = spandrel.ModelLoader().load_from_state_dict(dict(weights))
    x = torch.rand(1, 3, 10, 12)
    with torch.inference_mode():
        a, b = ours.module(x), theirs.model.eval()(x)
    assert ours.scale == theirs.scale
    assert torch.allclose(a, b, atol=1e-5)


def test_without_spandrel_the_built_in_loaders_remain_and_say_why(tmp_path: Path) -> None:
    """Where spandrel cannot be imported (here: no torchvision built for this torch), ESRGAN files
    load through the built-in networks, and a file of another architecture is refused with the
    reason spandrel is missing."""
    registry = UpscalerRegistry(tmp_path)
    if registry.spandrel.module() is not None:
        pytest.skip("spandrel imports here: the fallback is not in use")
    assert "spandrel cannot be imported" in registry.spandrel.problem
    assert "TORCH_COMMAND" in registry.spandrel.problem
    (tmp_path / "ESRGAN").mkdir()
    (tmp_path / "SwinIR").mkdir()
    save_file(realesrgan_sd(1), tmp_path / "ESRGAN" / "tiny.safetensors")
    save_file({"layers.0.residual_group.blocks.0.norm1.weight": torch.ones(4), "conv_first.weight": torch.zeros(4, 3, 3, 3)},
              tmp_path / "SwinIR" / "swinir-like.safetensors")
    registry.refresh()
    assert registry.upscale(noise_image(8, 8), "tiny").size == (32, 32)
    with pytest.raises(ModelError, match=r"^swinir-like\.safetensors: .*spandrel cannot be imported"):
        registry.upscale(noise_image(8, 8), "swinir-like")
