"""Reading weight files: safetensors and ckpt, refusal of pickles that carry code, damaged files."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from webui.models.errors import ModelError
from webui.models.readers import read_state_dict


def test_safetensors_and_ckpt_hold_the_same_weights(checkpoint_store: Path) -> None:
    a = read_state_dict(checkpoint_store / "sd1.safetensors")
    b = read_state_dict(checkpoint_store / "sd1.ckpt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Payload:
    """Unpickling this runs `open(marker, 'w')`: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_is_refused_and_the_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, bad)
    # the same file read with a full unpickler would create the marker; ours must not
    with pytest.raises(ModelError) as e:
        read_state_dict(bad)
    assert not marker.exists()
    message = str(e.value)
    assert message.startswith("evil.ckpt: refused to load") and "\n" not in message


def test_legacy_pickle_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    bad = tmp_path / "old.ckpt"
    with open(bad, "wb") as f:
        torch.save({"x": _Payload(marker)}, f, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelError, match="refused"):
        read_state_dict(bad)
    assert not marker.exists()


def test_plain_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    bad = tmp_path / "plain.ckpt"
    bad.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ModelError):
        read_state_dict(bad)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["sd1.safetensors", "sd1.ckpt"])
def test_truncated_file_gives_one_line_naming_the_file(tmp_path: Path, checkpoint_store: Path, name: str) -> None:
    data = (checkpoint_store / name).read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError) as e:
        read_state_dict(cut)
    assert str(e.value).startswith(f"{name}: ")
    assert "\n" not in str(e.value)


def test_garbage_and_empty_files(tmp_path: Path) -> None:
    for name, content in [("junk.safetensors", b"\x00" * 100), ("empty.ckpt", b""), ("text.ckpt", b"hello world")]:
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ModelError, match=name):
            read_state_dict(p)


def test_zip_without_tensors_and_missing_file(tmp_path: Path) -> None:
    z = tmp_path / "notes.ckpt"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("a.txt", "nothing")
    with pytest.raises(ModelError):
        read_state_dict(z)
    with pytest.raises(ModelError, match="not found"):
        read_state_dict(tmp_path / "absent.safetensors")


def test_dict_without_tensors_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "nothing.safetensors"
    save_file({}, p)
    with pytest.raises(ModelError):
        from webui.models.detect import detect

        detect(read_state_dict(p), p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reads_straight_to_the_gpu(checkpoint_store: Path) -> None:
    select = lambda _k, dt: torch.float16 if dt.is_floating_point else dt  # noqa: E731
    on_cpu = read_state_dict(checkpoint_store / "sd1.safetensors", select)
    on_gpu = read_state_dict(checkpoint_store / "sd1.safetensors", select, torch.device("cuda"))
    assert on_cpu.keys() == on_gpu.keys()
    for k, v in on_gpu.items():
        assert v.device.type == "cuda" and torch.equal(v.cpu(), on_cpu[k]), k
