"""--channels-last and --compile: same images as the default path; a failing compiler falls back."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from webui.app import build_engine
from webui.cli import build_parser, config_from_args
from webui.config import Config
from webui.pipeline.request import GenerationRequest
from webui.runtime.compile import compile_state


def req() -> GenerationRequest:
    return GenerationRequest(prompt="a red cube", steps=3, width=64, height=64, seed=11, sampler_name="Euler",
                             save_images=False)


def image(data_dir: Path, **flags) -> tuple[np.ndarray, object]:
    engine = build_engine(Config(data_dir=data_dir, dtype="float32", use_cpu=True, **flags))
    result = engine.runner.generate(req())
    return np.asarray(result.images[0]).astype(np.int16), engine


def test_channels_last_same_image(data_dir: Path) -> None:
    plain, _ = image(data_dir)
    nhwc, engine = image(data_dir, channels_last=True)
    unet = engine.bundle(None).unet
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(plain - nhwc).max() <= 2


def test_flags_parse(data_dir: Path) -> None:
    a = build_parser().parse_args(["--compile", "--channels-last", "--data-dir", str(data_dir)])
    config = config_from_args(a)
    assert config.compile and config.channels_last


def test_compile_refused_in_medvram(data_dir: Path) -> None:
    from webui.models.load import load_bundle
    from webui.prompts.tokenizer import TokenizerFactory
    from webui.runtime.devices import Runtime
    from webui.runtime.memory import MemoryManager, SimulatedTransfer

    cpu = torch.device("cpu")
    assert Runtime(cpu, torch.float32, torch.float32, compile=True).compiles
    # medvram's hooks move weights while the UNet runs: no compile (a simulated offload device)
    runtime = Runtime(cpu, torch.float32, torch.float32, compile=True,
                      memory=MemoryManager("medvram", SimulatedTransfer()))
    assert not runtime.compiles
    bundle = load_bundle(data_dir / "models" / "Stable-diffusion" / "sd1.safetensors", runtime=runtime,
                         tokenizers=TokenizerFactory())
    assert compile_state(bundle.unet) == "eager"


def test_compiled_kernels_are_cached_in_the_data_folder(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from webui.runtime.devices import pick_runtime

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing diffusers leaves
    assert pick_runtime(Config(data_dir=data_dir, use_cpu=True, compile=True)).compiles
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == (data_dir / "cache" / "torch-compile").resolve()
    chosen = str(data_dir / "my-cache")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", chosen)  # a folder the user chose stays
    pick_runtime(Config(data_dir=data_dir, use_cpu=True, compile=True))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == chosen


@pytest.fixture
def fresh_dynamo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Nothing compiled earlier in this process or on disk is reused."""
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)
    yield inductor
    torch._dynamo.reset()


def test_compile_failure_falls_back_to_eager(data_dir: Path, fresh_dynamo, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    # A machine without a C++ compiler: inductor's CPU code generation cannot build anything.
    monkeypatch.setattr(fresh_dynamo.cpp, "cxx", (None, "/nonexistent/g++"))
    caplog.set_level(logging.WARNING)
    plain, _ = image(data_dir)
    fell_back, engine = image(data_dir, compile=True)
    assert np.abs(plain - fell_back).max() <= 1
    assert compile_state(engine.bundle(None).unet).startswith("failed: ")
    assert any("torch.compile failed" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_compiled_unet_same_image(data_dir: Path, fresh_dynamo) -> None:
    plain, _ = image(data_dir)
    compiled, engine = image(data_dir, compile=True)
    assert compile_state(engine.bundle(None).unet) == "compiled"
    assert np.abs(plain - compiled).max() <= 2


def test_channels_last_is_on_where_it_was_measured_faster() -> None:
    import torch

    from webui.runtime.devices import pick_channels_last

    on, why = pick_channels_last(None, torch.device("cpu"), torch.bfloat16)
    assert on and "measured" in why
    assert pick_channels_last(None, torch.device("cpu"), torch.float32) == (False, "")
    assert pick_channels_last(None, torch.device("cuda"), torch.float16) == (False, "")  # not measured there
    assert pick_channels_last(False, torch.device("cpu"), torch.bfloat16) == (False, "")
    assert pick_channels_last(True, torch.device("cpu"), torch.float32) == (True, "")
    from webui.cli import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args(["--no-channels-last"])).channels_last is False
    assert config_from_args(build_parser().parse_args([])).channels_last is None
