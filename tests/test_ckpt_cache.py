"""The checkpoint cache: models ready on the device, more parked in RAM (`--ckpt-cache N`).

Without CUDA, parking is observed through `SimulatedTransfer` (named as such: a CPU stand-in
for an accelerator, holding "offloaded" weights as float64 copies), so a parked model is
visibly off the compute side and any use of it before it is brought back fails loudly.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from webui.app import Engine, build_engine
from webui.cli import build_parser, config_from_args
from webui.config import Config
from webui.models.cache import ModelCache
from webui.pipeline.request import GenerationRequest
from webui.runtime import devices
from webui.runtime.memory import SimulatedTransfer


class Weights:
    """Stands for a loaded model in the cache's own tests (the cache is generic)."""

    def __init__(self, name: str) -> None:
        self.name = name


def test_one_ready_model_frees_the_old_one_before_loading_the_next() -> None:
    cache: ModelCache[Weights] = ModelCache(capacity=1)
    a = cache.get("a", lambda: Weights("a"))
    gone = weakref.ref(a)
    del a
    seen_alive: list[bool] = []

    def load_b() -> Weights:
        seen_alive.append(gone() is not None)
        return Weights("b")

    cache.get("b", load_b)
    assert seen_alive == [False]
    assert cache.keys() == ["b"] and cache.parked_keys() == []


def test_ram_cache_parks_and_brings_back_without_loading() -> None:
    events: list[str] = []
    cache: ModelCache[Weights] = ModelCache(capacity=1, ram_capacity=1, park=lambda w: events.append(f"park {w.name}"),
                                            unpark=lambda w: events.append(f"unpark {w.name}"))

    def loader(name: str):
        def load() -> Weights:
            events.append(f"load {name}")
            return Weights(name)
        return load

    a = cache.get("a", loader("a"))
    cache.get("b", loader("b"))
    assert cache.get("a", loader("a")) is a
    # a is parked before b loads, b before a comes back: never two ready at once
    assert events == ["load a", "park a", "load b", "park b", "unpark a"]
    assert cache.keys() == ["a"] and cache.parked_keys() == ["b"]
    cache.get("c", loader("c"))  # a parked, b (the oldest parked) dropped
    assert cache.parked_keys() == ["a"]
    events.clear()
    cache.get("b", loader("b"))
    assert events == ["park c", "load b"]  # b was dropped: read again


def test_capacity_change_applies_at_the_next_switch() -> None:
    cache: ModelCache[Weights] = ModelCache(capacity=2)
    cache.get("a", lambda: Weights("a"))
    cache.get("b", lambda: Weights("b"))
    cache.capacity, cache.ram_capacity = 1, 1
    cache.get("c", lambda: Weights("c"))
    assert cache.keys() == ["c"] and cache.parked_keys() == ["b"]


# --- through the engine ---------------------------------------------------------------------------


def req(checkpoint: str) -> GenerationRequest:
    return GenerationRequest(prompt="a red cube", steps=3, width=64, height=64, seed=5, sampler_name="Euler",
                             save_images=False, checkpoint=checkpoint)


@pytest.fixture
def parking_engine(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """An engine whose runtime parks models through the simulated transfer, with --ckpt-cache 1."""
    original = devices.pick_runtime
    monkeypatch.setattr(devices, "pick_runtime", lambda config, index=0: dataclasses.replace(original(config, index), park=SimulatedTransfer()))
    return build_engine(Config(data_dir=data_dir, dtype="float32", use_cpu=True, ckpt_cache=1))


def _dtypes(engine: Engine, name: str) -> set[torch.dtype]:
    bundle = next(b for k, b in _all(engine) if Path(k[0]).name == name)
    return {p.dtype for m in bundle.modules() for p in m.parameters()}


def _all(engine: Engine):
    return [(k, engine.cache.peek(k)) for k in engine.cache.keys() + engine.cache.parked_keys()]


def test_switching_back_is_instant_and_gives_the_same_image(parking_engine: Engine,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    engine = parking_engine
    caplog.set_level(logging.INFO, logger="webui")
    first = np.asarray(engine.runner.generate(req("sd1.safetensors")).images[0])
    sd1 = engine.bundle("sd1.safetensors")
    engine.runner.generate(req("sd2.safetensors"))
    assert _dtypes(engine, "sd1.safetensors") == {torch.float64}  # parked: off the compute side
    assert _dtypes(engine, "sd2.safetensors") == {torch.float32}
    again = np.asarray(engine.runner.generate(req("sd1.safetensors")).images[0])
    assert engine.bundle("sd1.safetensors") is sd1  # the same model, not a new load
    assert _dtypes(engine, "sd1.safetensors") == {torch.float32}
    assert np.array_equal(first, again)
    loads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading ")]
    assert len(loads) == 2, loads  # sd1 and sd2 once each


def test_without_ram_cache_the_old_model_is_read_again(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine = build_engine(Config(data_dir=data_dir, dtype="float32", use_cpu=True))
    caplog.set_level(logging.INFO, logger="webui")
    sd1 = weakref.ref(engine.bundle("sd1.safetensors"))
    engine.bundle("sd2.safetensors")
    gc.collect()
    assert sd1() is None  # freed, not kept
    engine.bundle("sd1.safetensors")
    assert len([r for r in caplog.records if r.getMessage().startswith("loading ")]) == 3


def test_setting_and_flag(data_dir: Path) -> None:
    engine = build_engine(Config(data_dir=data_dir, dtype="float32", use_cpu=True))
    assert (engine.cache.capacity, engine.cache.ram_capacity) == (1, 0)
    engine.settings.update({"ckpt_cache": 2, "model_cache_size": 2})
    assert (engine.cache.capacity, engine.cache.ram_capacity) == (2, 2)
    flagged = build_engine(Config(data_dir=data_dir, dtype="float32", use_cpu=True, ckpt_cache=3))
    flagged.settings.update({"ckpt_cache": 1})
    assert flagged.cache.ram_capacity == 3  # the flag wins over the setting
    a = build_parser().parse_args(["--ckpt-cache", "2", "--data-dir", str(data_dir)])
    assert config_from_args(a).ckpt_cache == 2
    with pytest.raises(ValueError):
        Config(data_dir=data_dir, ckpt_cache=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_switch_holds_one_model_on_the_gpu(data_dir: Path) -> None:
    engine = build_engine(Config(data_dir=data_dir, ckpt_cache=1))
    engine.bundle("sd1.safetensors")
    one = torch.cuda.memory_allocated()
    engine.bundle("sd2.safetensors")
    engine.bundle("sd1.safetensors")
    assert engine.cache.parked_keys() and torch.cuda.memory_allocated() <= one * 1.1
