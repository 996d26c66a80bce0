"""The models folder: listing, titles with hashes, the on-disk hash cache, refresh, lookups."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.conftest import add_checkpoint
from webui.app import build_engine
from webui.config import Config
from webui.models.errors import ModelError


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_titles_are_name_and_hash10_and_subfolders_count(data_dir: Path, checkpoint_store: Path) -> None:
    nested = add_checkpoint(data_dir, checkpoint_store, "sdxl.safetensors", "xl/base.safetensors")
    engine = build_engine(Config(data_dir=data_dir))
    engine.registry.refresh()
    titles = engine.registry.titles()
    assert f"xl/base.safetensors [{sha256(nested)[:10]}]" in titles
    sd1 = data_dir / "models/Stable-diffusion/sd1.safetensors"
    assert f"sd1.safetensors [{sha256(sd1)[:10]}]" in titles


def test_start_up_reads_no_file_and_refresh_finds_new_ones(data_dir: Path, checkpoint_store: Path) -> None:
    engine = build_engine(Config(data_dir=data_dir))
    # nothing hashed yet: titles carry no hash, so start-up did not read the files
    assert sorted(engine.registry.titles()) == ["sd1.safetensors", "sd2.safetensors"]
    add_checkpoint(data_dir, checkpoint_store, "sd1-other.safetensors")
    engine.registry.refresh()
    assert len(engine.registry.titles()) == 3
    assert all("[" in t for t in engine.registry.titles())


def test_hash_cache_is_used_and_invalidated_by_a_change(data_dir: Path) -> None:
    cache_file = data_dir / "cache" / "hashes.json"
    engine = build_engine(Config(data_dir=data_dir))
    engine.registry.refresh()
    entries = json.loads(cache_file.read_text())
    sd1 = str((data_dir / "models/Stable-diffusion/sd1.safetensors").resolve())
    assert entries[sd1]["sha256"] == sha256(Path(sd1))
    # A value that could not come from hashing proves the next start reads the cache.
    entries[sd1]["sha256"] = "ab" * 32
    cache_file.write_text(json.dumps(entries))
    again = build_engine(Config(data_dir=data_dir))
    assert "sd1.safetensors [ababababab]" in again.registry.titles()
    # Touching the file (new mtime) makes the cached value stale: it is recomputed.
    st = os.stat(sd1)
    os.utime(sd1, (st.st_atime, st.st_mtime + 5))
    again.registry.refresh()
    assert f"sd1.safetensors [{sha256(Path(sd1))[:10]}]" in again.registry.titles()


def test_background_hashing_fills_titles(data_dir: Path) -> None:
    engine = build_engine(Config(data_dir=data_dir))
    engine.registry.hash_missing_in_background().join(timeout=30)
    assert all("[" in t for t in engine.registry.titles())


def test_lookup_by_title_name_stem_hash_and_path(data_dir: Path) -> None:
    engine = build_engine(Config(data_dir=data_dir))
    engine.registry.refresh()
    sd1 = data_dir / "models/Stable-diffusion/sd1.safetensors"
    h = sha256(sd1)
    for query in (f"sd1.safetensors [{h[:10]}]", "sd1.safetensors", "sd1", h[:10], h, str(sd1)):
        assert engine.registry.find(query).path.resolve() == sd1.resolve(), query
    with pytest.raises(ModelError, match="not found.*sd1.safetensors"):
        engine.registry.find("missing-model")


def test_empty_models_folder_explains_itself(tmp_path: Path) -> None:
    engine = build_engine(Config(data_dir=tmp_path))
    assert engine.registry.titles() == []
    with pytest.raises(ModelError, match="no checkpoints found.*Stable-diffusion"):
        engine.resolve_checkpoint(None)


def test_v_prediction_from_yaml_and_override(data_dir: Path) -> None:
    engine = build_engine(Config(data_dir=data_dir))
    info = engine.registry.find("sd2")
    assert engine.registry.prediction_for(info) is None
    info.path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert engine.registry.prediction_for(info) == "v"
    engine.registry.set_prediction_override(info.name, "epsilon")
    assert engine.registry.prediction_for(info) == "epsilon"
    engine.registry.set_prediction_override(info.name, None)
    assert engine.registry.prediction_for(info) == "v"
