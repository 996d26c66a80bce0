"""Textual-inversion embeddings: every file format, per-encoder vectors for SDXL, refusal of
pickles that carry code, and the library that finds trigger words in prompts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from webui.models.errors import ModelError
from webui.models.hashing import HashCache
from webui.models.load import ModelBundle, load_bundle
from webui.networks.embeddings import EmbeddingLibrary, load_embedding
from webui.networks.registry import NetworkRegistry
from webui.prompts.tokenizer import TokenizerFactory
from webui.runtime.devices import Runtime


def widths(bundle: ModelBundle) -> list[int]:
    return [te.model.config.hidden_size for te in bundle.text_encoders]


@pytest.fixture(scope="module")
def bundles(checkpoint_store: Path) -> dict[str, ModelBundle]:
    rt = Runtime(torch.device("cpu"), torch.float32, torch.float32)
    tok = TokenizerFactory()
    return {f: load_bundle(checkpoint_store / f"{f}.safetensors", runtime=rt, tokenizers=tok) for f in ("sd1", "sdxl")}


def a1111_pt(path: Path, vectors: torch.Tensor) -> Path:
    """What A1111's textual-inversion training writes: plain values beside the tensor."""
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vectors.clone().requires_grad_(True)},
            "name": "name-inside-the-file",
            "step": 1500,
            "sd_checkpoint": "a9263745",
            "sd_checkpoint_name": "v1-5-pruned-emaonly",
        },
        path,
    )
    return path


def test_a1111_pt(tmp_path: Path) -> None:
    vec = torch.randn(3, 32)
    emb = load_embedding(a1111_pt(tmp_path / "my-style.pt", vec))
    assert emb.name == "my-style"  # the trigger word is the file stem, not the name stored inside
    assert emb.num_vectors == 3
    assert list(emb.vectors) == ["default"]
    assert torch.equal(emb.vectors["default"], vec) and not emb.vectors["default"].requires_grad


def test_old_parameterdict_pt(tmp_path: Path) -> None:
    vec = torch.randn(2, 32)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, tmp_path / "old.pt")
    emb = load_embedding(tmp_path / "old.pt")
    assert torch.equal(emb.vectors["default"], vec)
    assert type(emb.vectors["default"]) is torch.Tensor


def test_diffusers_bin(tmp_path: Path) -> None:
    vec = torch.randn(32)
    torch.save({"<cat-toy>": vec}, tmp_path / "cat-toy.bin")
    emb = load_embedding(tmp_path / "cat-toy.bin")
    assert emb.name == "cat-toy" and emb.vectors["default"].shape == (1, 32)
    torch.save({"<multi>": torch.randn(4, 32)}, tmp_path / "multi.bin")
    assert load_embedding(tmp_path / "multi.bin").num_vectors == 4


def test_safetensors_emb_params_and_fp16(tmp_path: Path) -> None:
    vec = torch.randn(2, 32).half()
    save_file({"emb_params": vec}, tmp_path / "half.safetensors")
    emb = load_embedding(tmp_path / "half.safetensors")
    assert emb.vectors["default"].dtype == torch.float32 and emb.vectors["default"].shape == (2, 32)
    assert torch.equal(emb.vectors["default"], vec.float())


def test_sdxl_embedding_gives_each_encoder_its_own_vectors(tmp_path: Path, bundles: dict[str, ModelBundle]) -> None:
    clip_l, clip_g = torch.randn(2, 32), torch.randn(2, 48)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "xl-neg.safetensors")
    emb = load_embedding(tmp_path / "xl-neg.safetensors")
    assert emb.num_vectors == 2 and set(emb.vectors) == {"clip_l", "clip_g"}
    xl = widths(bundles["sdxl"])
    assert xl == [32, 48]
    first, second = emb.vectors_for(0, xl[0]), emb.vectors_for(1, xl[1])
    assert torch.equal(first, clip_l) and torch.equal(second, clip_g)
    assert emb.fits(xl)
    assert emb.vectors_for(1, 32) is None  # clip_g has the wrong width for a 32-wide encoder


def test_width_decides_which_family_an_embedding_fits(tmp_path: Path, bundles: dict[str, ModelBundle]) -> None:
    save_file({"emb_params": torch.randn(1, 32)}, tmp_path / "sd1-emb.safetensors")
    save_file({"emb_params": torch.randn(1, 768)}, tmp_path / "big.safetensors")
    small, big = load_embedding(tmp_path / "sd1-emb.safetensors"), load_embedding(tmp_path / "big.safetensors")
    assert small.fits(widths(bundles["sd1"])) and small.vectors_for(0, 32) is not None
    assert not small.fits(widths(bundles["sdxl"]))  # no vectors for the 48-wide second encoder
    assert big.vectors_for(0, 32) is None and not big.fits(widths(bundles["sd1"]))


class _Payload:
    """Unpickling this runs `open(marker, 'w')`: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_code_carrying_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}, "x": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match=r"evil\.pt: refused to load"):
        load_embedding(tmp_path / "evil.pt")
    assert not marker.exists()
    # a ParameterDict beside other objects is refused as well: only the lone old form is let through
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(1, 32))})
    torch.save({"string_to_param": params, "x": _Payload(marker)}, tmp_path / "evil2.pt")
    with pytest.raises(ModelError, match="refused"):
        load_embedding(tmp_path / "evil2.pt")
    assert not marker.exists()


def test_unreadable_or_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"definitely not a pickle")
    with pytest.raises(ModelError, match=r"junk\.pt"):
        load_embedding(tmp_path / "junk.pt")
    save_file({"a": torch.zeros(2, 4), "b": torch.zeros(2, 4)}, tmp_path / "two.safetensors")
    with pytest.raises(ModelError, match="not a textual-inversion embedding"):
        load_embedding(tmp_path / "two.safetensors")
    save_file({"emb_params": torch.zeros(2, 3, 4)}, tmp_path / "cube.safetensors")
    with pytest.raises(ModelError, match="shape"):
        load_embedding(tmp_path / "cube.safetensors")
    torch.save([torch.zeros(1, 4)], tmp_path / "list.pt")
    with pytest.raises(ModelError, match="not a dict"):
        load_embedding(tmp_path / "list.pt")


# --- library ------------------------------------------------------------------------------------


def _library(tmp_path: Path) -> tuple[EmbeddingLibrary, Path]:
    emb_dir = tmp_path / "embeddings"
    (emb_dir / "neg").mkdir(parents=True)
    save_file({"emb_params": torch.randn(2, 32)}, emb_dir / "EasyNegative.safetensors")
    a1111_pt(emb_dir / "neg" / "bad-hands-5.pt", torch.randn(1, 32))
    a1111_pt(emb_dir / "bad-hands.pt", torch.randn(4, 32))
    (emb_dir / "broken.pt").write_bytes(b"not a pickle")
    reg = NetworkRegistry(tmp_path / "Lora", emb_dir, HashCache(tmp_path / "hashes.json"))
    reg.refresh()
    return EmbeddingLibrary(reg), emb_dir


def test_find_in_prompt_whole_words_longest_first(tmp_path: Path) -> None:
    lib, _ = _library(tmp_path)
    assert lib.find_in_prompt("a cat, (easynegative:1.2)") == [lib.get("EasyNegative")]
    found = lib.find_in_prompt("bad-hands-5, EasyNegative, bad-hands and EasyNegative again")
    assert [e.name for e in found] == ["bad-hands-5", "EasyNegative", "bad-hands"]
    assert lib.find_in_prompt("EasyNegatives notEasyNegative bad-handsx") == []
    assert lib.find_in_prompt("") == []


def test_library_is_lazy_caches_and_notices_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lib, emb_dir = _library(tmp_path)
    # the broken file is never read unless named in a prompt
    first = lib.find_in_prompt("EasyNegative")[0]
    assert lib.find_in_prompt("EasyNegative")[0] is first
    path = emb_dir / "EasyNegative.safetensors"
    save_file({"emb_params": torch.randn(5, 32)}, path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    second = lib.find_in_prompt("EasyNegative")[0]
    assert second is not first and second.num_vectors == 5
    with caplog.at_level(logging.WARNING):
        assert lib.find_in_prompt("broken EasyNegative") == [second]
    assert "broken.pt" in caplog.text
    with pytest.raises(ModelError, match="not found"):
        lib.get("missing")
