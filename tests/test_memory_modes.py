"""Memory modes (--medvram, --lowvram), VAE tiling, and how the mode is chosen.

Without CUDA the offload device is simulated (`SimulatedTransfer`, named as such): the compute
device is the CPU and offloaded weights are held as float64 copies, so every move is observable,
the image must not change at all, and a component that runs without having been brought to the
compute side fails on the dtype. With CUDA the same paths run for real (those tests skip in CI).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import webui.runtime.devices as devices
from webui.app import Engine, build_engine
from webui.cli import build_parser, config_from_args
from webui.config import Config
from webui.pipeline import latents as lat
from webui.pipeline.request import GenerationRequest
from webui.runtime.memory import (
    CPU_TILE_PIXELS,
    GIB,
    DeviceTransfer,
    MemoryManager,
    SimulatedTransfer,
    pick_memory_mode,
    vae_plan,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red cube on a table", steps=4, width=64, height=64, seed=1234, sampler_name="Euler",
                save_images=False)
    base.update(kw)
    return GenerationRequest(**base)


def pixels(img) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


@pytest.fixture
def engine_with(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """engine_with(mode, dtype, transfer) -> (engine, moves): an engine whose runtime carries a
    MemoryManager for `mode`, recording every move."""

    def make(mode: str, dtype: str = "float32", transfer=None) -> tuple[Engine, list[tuple[str, str]]]:
        moves: list[tuple[str, str]] = []
        original = devices.pick_runtime

        def pick(config: Config, index: int = 0):
            rt = original(config, index)
            if mode == "normal":
                return rt
            manager = MemoryManager(mode, transfer or SimulatedTransfer(), on_move=lambda n, w: moves.append((n, w)))
            return dataclasses.replace(rt, memory=manager)

        monkeypatch.setattr(devices, "pick_runtime", pick)
        use_cpu = transfer is None
        return build_engine(Config(data_dir=data_dir, dtype=dtype, use_cpu=use_cpu)), moves

    yield make


def _floats(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_medvram_same_image_one_component_at_a_time(engine_with, dtype: str) -> None:
    normal, _ = engine_with("normal", dtype)
    expected = pixels(normal.runner.generate(req()).images[0])
    engine, moves = engine_with("medvram", dtype)
    bundle = engine.bundle(None)
    assert _floats(bundle.unet) == {torch.float64}  # offloaded as soon as it is loaded
    image = pixels(engine.runner.generate(req()).images[0])
    assert np.array_equal(image, expected)
    assert moves == [("text_encoder", "compute"), ("text_encoder", "offload"), ("unet", "compute"),
                     ("unet", "offload"), ("vae", "compute"), ("vae", "offload")]
    # between jobs nothing waits on the compute side, and the weights are back in their dtype on use
    for module in (bundle.unet, bundle.vae, bundle.text_encoders[0].model):
        assert _floats(module) == {torch.float64}
    moves.clear()
    assert np.array_equal(pixels(engine.runner.generate(req()).images[0]), expected)
    assert [n for n, w in moves if w == "compute"] == ["text_encoder", "unet", "vae"]


def test_prompt_edits_are_encoded_before_sampling(engine_with) -> None:
    # `[red:blue:3]` changes the text at step 3: its encoding is ready before the UNet starts, so
    # the text encoder never takes the UNet's place mid-loop
    engine, moves = engine_with("medvram")
    engine.runner.generate(req(prompt="a [red:blue:3] cube [on:under:0.5] a table"))
    assert [n for n, w in moves if w == "compute"] == ["text_encoder", "unet", "vae"]


def test_lowvram_streams_unet_blocks_one_at_a_time(engine_with) -> None:
    normal, _ = engine_with("normal")
    expected = pixels(normal.runner.generate(req()).images[0])
    engine, moves = engine_with("lowvram")
    image = pixels(engine.runner.generate(req()).images[0])
    assert np.array_equal(image, expected)
    assert moves[:2] == [("text_encoder", "compute"), ("text_encoder", "offload")]
    assert moves[-2:] == [("vae", "compute"), ("vae", "offload")]
    unet_moves = moves[2:-2]
    assert ("unet", "compute") not in unet_moves  # never whole
    # each block comes in just before it runs and leaves right after: at most one at a time
    for (name_in, where_in), (name_out, where_out) in zip(unet_moves[::2], unet_moves[1::2]):
        assert (where_in, where_out) == ("compute", "offload") and name_in == name_out
    blocks = [n for n, w in unet_moves if w == "compute"]
    per_call = blocks[: blocks.index(blocks[0], 1)]
    assert {"unet.conv_in", "unet.down_blocks.0", "unet.mid_block", "unet.up_blocks.0", "unet.conv_out"} <= set(per_call)
    assert len(blocks) == len(per_call) * 4  # 4 steps, one UNet call each (CFG batched)
    assert _floats(engine.bundle(None).unet) == {torch.float64}


def test_simulated_offload_fails_loudly_when_a_component_is_not_moved(engine_with) -> None:
    """The simulation is strict: without the hooks, an offloaded UNet cannot run."""
    engine, _ = engine_with("medvram")
    unet = engine.bundle(None).unet
    for handle in unet._webui_memory.handles:
        handle.remove()
    with pytest.raises(RuntimeError):
        engine.runner.generate(req())


def test_use_context_moves_in_and_back(engine_with) -> None:
    engine, moves = engine_with("medvram")
    bundle = engine.bundle(None)
    manager = bundle.runtime.memory
    with manager.use(bundle.vae) as vae:
        assert _floats(vae) == {torch.float32}
    assert _floats(bundle.vae) == {torch.float64}
    manager.activate(bundle.unet)
    with manager.use(bundle.unet):  # already there: stays after the block
        pass
    assert _floats(bundle.unet) == {torch.float32}
    manager.offload_all()
    assert _floats(bundle.unet) == {torch.float64}
    assert moves == [("vae", "compute"), ("vae", "offload"), ("unet", "compute"), ("unet", "offload")]


def test_vae_tiling_close_to_untiled(engine_with) -> None:
    engine, _ = engine_with("normal")
    bundle = engine.bundle(None)
    latents = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(0))  # 256x256 pixels
    other = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = pixels(lat.decode(bundle, latents)[0])
        unrelated = pixels(lat.decode(bundle, other)[0])
        bundle.vae.tile_sample_min_size, bundle.vae.tile_latent_min_size = 128, 16  # tiles smaller than the image
        tiled_bundle = dataclasses.replace(bundle, runtime=dataclasses.replace(bundle.runtime, vae_tiling=True))
        calls: list[int] = []
        handle = bundle.vae.decoder.register_forward_pre_hook(lambda *_: calls.append(1))
        tiled = pixels(lat.decode(tiled_bundle, latents)[0])
        handle.remove()
    assert len(calls) > 1  # it really decoded in tiles
    assert not bundle.vae.use_tiling  # and left the shared VAE as it was
    diff = np.abs(tiled - plain)
    assert plain.std() > 20
    # random weights and per-tile group norms: close, not equal; an unrelated image is far off
    assert diff.mean() < 10 and np.abs(unrelated - plain).mean() > 3 * diff.mean(), diff.mean()
    assert np.corrcoef(tiled.ravel(), plain.ravel())[0, 1] > 0.9


def test_vae_plan() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert vae_plan(64, 64, 1, device=cpu, itemsize=4, forced=True, offloading=False).tiled
    small = vae_plan(512, 512, 4, device=cpu, itemsize=4, forced=False, offloading=False)
    assert not small.tiled and not small.sliced
    assert vae_plan(512, 512, 4, device=cpu, itemsize=4, forced=False, offloading=True).sliced
    big = vae_plan(4096, 2048, 1, device=cpu, itemsize=4, forced=False, offloading=False)
    assert 4096 * 2048 > CPU_TILE_PIXELS and big.tiled and not big.sliced
    free = lambda _d: 8 * GIB  # noqa: E731  a stand-in for torch.cuda.mem_get_info
    assert not vae_plan(1024, 1024, 1, device=gpu, itemsize=2, forced=False, offloading=False, free_bytes=free).tiled
    assert vae_plan(2048, 2048, 1, device=gpu, itemsize=2, forced=False, offloading=False, free_bytes=free).tiled


def test_mode_choice() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert pick_memory_mode(False, False, cpu) == ("normal", "normal")
    mode, message = pick_memory_mode(True, False, cpu)
    assert mode == "normal" and "no effect" in message  # never on a CPU
    assert pick_memory_mode(True, False, gpu, free_vram=lambda _d: 80 * GIB)[0] == "medvram"
    assert pick_memory_mode(True, True, gpu, free_vram=lambda _d: 80 * GIB)[0] == "lowvram"
    assert pick_memory_mode(False, False, gpu, free_vram=lambda _d: 80 * GIB)[0] == "normal"
    mode, message = pick_memory_mode(False, False, gpu, free_vram=lambda _d: 4 * GIB)
    assert mode == "medvram" and "automatic" in message
    assert pick_memory_mode(False, False, gpu, free_vram=lambda _d: 2 * GIB)[0] == "lowvram"
    rt = devices.pick_runtime(Config(use_cpu=True, medvram=True, vae_tiling=True))
    assert rt.memory is None and rt.vae_tiling and "memory=normal" in rt.describe()


def test_flags_reach_the_config() -> None:
    config = config_from_args(build_parser().parse_args(["--medvram", "--vae-tiling"]))
    assert (config.medvram, config.lowvram, config.vae_tiling) == (True, False, True)
    assert config_from_args(build_parser().parse_args(["--lowvram"])).lowvram


# --- real CUDA -----------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("mode", ["medvram", "lowvram"])
def test_cuda_modes_same_image(engine_with, mode: str) -> None:
    device = torch.device("cuda")
    normal, _ = engine_with("normal", "float16", DeviceTransfer(device))
    expected = pixels(normal.runner.generate(req()).images[0])
    engine, moves = engine_with(mode, "float16", DeviceTransfer(device))
    image = pixels(engine.runner.generate(req()).images[0])
    assert np.abs(image - expected).max() <= 2
    bundle = engine.bundle(None)
    assert {p.device.type for p in bundle.unet.parameters()} == {"cpu"}
    assert {p.device.type for p in bundle.vae.parameters()} == {"cpu"}
    if mode == "lowvram":
        assert bundle.runtime.memory.prefetch
        assert all(p.is_pinned() for p in bundle.unet.parameters())
        assert ("unet", "compute") not in moves


@cuda
def test_cuda_lowvram_holds_less_on_the_gpu(engine_with) -> None:
    device = torch.device("cuda")
    peaks, reserved = {}, {}
    for mode in ("normal", "lowvram"):
        engine, _ = engine_with(mode, "float16", DeviceTransfer(device))
        engine.bundle(None)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        engine.runner.generate(req())
        peaks[mode] = torch.cuda.max_memory_allocated()
        reserved[mode] = torch.cuda.max_memory_reserved()  # prefetched copies must not pile up in the cache
        engine.cache.clear()
    assert peaks["lowvram"] < peaks["normal"]
    assert reserved["lowvram"] < reserved["normal"]


def test_offloaded_after_a_job_even_when_it_fails(engine_with) -> None:
    from webui.runtime.memory import offloaded_after

    engine, moves = engine_with("medvram")
    bundle = engine.bundle(None)
    with pytest.raises(KeyError):
        with offloaded_after(bundle.runtime.memory):
            bundle.runtime.memory.activate(bundle.unet)
            raise KeyError("the job failed")
    assert moves == [("unet", "compute"), ("unet", "offload")]
    with offloaded_after(None):  # normal mode: nothing to do
        pass
