"""TAESD live previews: the released key layout, loading both file formats strictly, decoding to
8x-size RGB images, picking the file per family, and refusing bad files and pickles with code.

The expected key names are spelled out from the published decoder layout (madebyollin/taesd:
clamp, conv, relu, 3 x [3 blocks, upsample, conv], block, conv), not read from our module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from webui.models.errors import ModelError
from webui.pipeline.taesd import TAESDDecoder, TaesdPreviewer, find_taesd, load_taesd
from webui.testing.make_taesd import write_taesd


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions: one intra-op thread is faster, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Sequential indices of the released decoder that hold weights.
_BLOCKS = (3, 4, 5, 8, 9, 10, 13, 14, 15, 18)  # each: conv.0 / conv.2 / conv.4, weight + bias
_UP_CONVS = (7, 12, 17)  # 3x3 convs without bias after each 2x upsample


def _expected_keys() -> list[str]:
    keys = ["1.weight", "1.bias"]
    for i in range(3, 20):
        if i in _BLOCKS:
            keys += [f"{i}.conv.{j}.{p}" for j in (0, 2, 4) for p in ("weight", "bias")]
        elif i in _UP_CONVS:
            keys.append(f"{i}.weight")
    return keys + ["19.weight", "19.bias"]


EXPECTED_HEAD = [
    "1.weight", "1.bias",
    "3.conv.0.weight", "3.conv.0.bias", "3.conv.2.weight", "3.conv.2.bias", "3.conv.4.weight", "3.conv.4.bias",
    "4.conv.0.weight",
]
EXPECTED_MIDDLE = ["5.conv.4.bias", "7.weight", "8.conv.0.weight"]
EXPECTED_TAIL = [
    "17.weight",
    "18.conv.0.weight", "18.conv.0.bias", "18.conv.2.weight", "18.conv.2.bias", "18.conv.4.weight", "18.conv.4.bias",
    "19.weight", "19.bias",
]
EXPECTED_COUNT = 2 + 10 * 6 + 3 + 2  # 67 tensors
EXPECTED_PARAMS = 1_222_531  # the decoder size madebyollin/taesd publishes


def test_key_layout_matches_released_decoder():
    sd = TAESDDecoder().state_dict()
    keys = list(sd)
    assert len(keys) == EXPECTED_COUNT
    assert keys[: len(EXPECTED_HEAD)] == EXPECTED_HEAD
    assert keys[-len(EXPECTED_TAIL):] == EXPECTED_TAIL
    assert keys[19:22] == EXPECTED_MIDDLE
    assert keys == _expected_keys()
    assert sum(v.numel() for v in sd.values()) == EXPECTED_PARAMS
    assert tuple(sd["1.weight"].shape) == (64, 4, 3, 3)
    assert tuple(sd["7.weight"].shape) == (64, 64, 3, 3)
    assert tuple(sd["19.weight"].shape) == (3, 64, 3, 3)
    assert tuple(sd["19.bias"].shape) == (3,)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_written_file_loads_strictly_and_decodes(tmp_path: Path, suffix: str):
    path = write_taesd(tmp_path / f"taesd_decoder{suffix}", seed=3)
    decoder = load_taesd(path, "cpu", torch.float32)
    assert not decoder.training
    assert all(not p.requires_grad for p in decoder.parameters())
    reference = TAESDDecoder()
    reference.load_state_dict(decoder.state_dict(), strict=True)  # same layout both ways

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = TaesdPreviewer(decoder)(latents)
    assert len(images) == 2
    for image in images:
        assert isinstance(image, Image.Image)
        assert image.mode == "RGB" and image.size == (64, 64)
    assert images[0].tobytes() != images[1].tobytes()


def test_same_seed_same_weights_and_both_formats_agree(tmp_path: Path):
    a = load_taesd(write_taesd(tmp_path / "a.safetensors", seed=1), "cpu", torch.float32).state_dict()
    b = load_taesd(write_taesd(tmp_path / "b.pth", seed=1), "cpu", torch.float32).state_dict()
    c = load_taesd(write_taesd(tmp_path / "c.pth", seed=2), "cpu", torch.float32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["1.weight"], c["1.weight"])


def test_previewer_casts_bf16_latents_and_non_square(tmp_path: Path):
    decoder = load_taesd(write_taesd(tmp_path / "taesd_decoder.safetensors"), "cpu", torch.float32)
    images = TaesdPreviewer(decoder)(torch.randn(1, 4, 6, 10).to(torch.bfloat16))
    assert [im.size for im in images] == [(80, 48)]


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # find_taesd only looks at names; loading is tested elsewhere
    return path


def test_find_taesd_per_family(tmp_path: Path):
    from webui.models.families import FAMILIES

    models = tmp_path / "models"
    for family in ("sd1", "sd2", "sdxl"):
        assert find_taesd(models, FAMILIES[family].taesd_stem) is None
    folder = models / "VAE-approx"
    _touch(folder / "taesd_encoder.safetensors")  # encoders are not decoders
    (folder / "taesdxl_decoder.pth").mkdir()  # nor are folders
    assert find_taesd(models, FAMILIES["sd1"].taesd_stem) is None
    assert find_taesd(models, FAMILIES["sdxl"].taesd_stem) is None

    sd_pth = _touch(folder / "taesd_decoder.pth")
    assert find_taesd(models, FAMILIES["sd1"].taesd_stem) == sd_pth
    assert find_taesd(models, FAMILIES["sd2"].taesd_stem) == sd_pth
    assert find_taesd(models, FAMILIES["sdxl"].taesd_stem) is None  # an SD1 decoder is no use for SDXL latents

    sd_st = _touch(folder / "taesd_decoder.safetensors")
    xl_st = _touch(folder / "taesdxl_decoder.safetensors")
    assert find_taesd(models, FAMILIES["sd1"].taesd_stem) == sd_st  # safetensors preferred
    assert find_taesd(models, FAMILIES["sd2"].taesd_stem) == sd_st
    assert find_taesd(models, FAMILIES["sdxl"].taesd_stem) == xl_st


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_file_is_a_model_error(tmp_path: Path, suffix: str):
    path = write_taesd(tmp_path / f"taesd_decoder{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=rf"taesd_decoder\{suffix}") as err:
        load_taesd(path, "cpu", torch.float32)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_wrong_keys_and_wrong_shapes_are_model_errors(tmp_path: Path, suffix: str):
    sd = TAESDDecoder().state_dict()
    renamed = {("decoder." + k): v.contiguous() for k, v in sd.items()}
    reshaped = dict(sd)
    reshaped["1.weight"] = torch.zeros(64, 16, 3, 3)  # a 16-channel (taef1-style) input conv

    for name, bad in (("renamed", renamed), ("reshaped", reshaped)):
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in bad.items()}, str(path))
        else:
            torch.save(bad, path)
        with pytest.raises(ModelError, match=path.name) as err:
            load_taesd(path, "cpu", torch.float32)
        assert "\n" not in str(err.value)


def test_missing_file_is_a_model_error(tmp_path: Path):
    with pytest.raises(ModelError, match="nothing.pth"):
        load_taesd(tmp_path / "nothing.pth", "cpu", torch.float32)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path: Path):
    marker = tmp_path / "pwned"
    sd = dict(TAESDDecoder().state_dict())
    sd["payload"] = _Payload(marker)
    path = tmp_path / "taesd_decoder.pth"
    torch.save(sd, path)
    assert not marker.exists()
    with pytest.raises(ModelError, match="taesd_decoder.pth") as err:
        load_taesd(path, "cpu", torch.float32)
    assert "refused" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
