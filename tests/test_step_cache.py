"""Step caching (DeepCache): what a cached call recomputes, how often the deep part runs, and per
job on the tiny checkpoint -- on changes the pixels, off is bit-exact, nothing stays installed,
Settings / override / infotext."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from tests.test_shipped_prompt_extensions import engine_for, infos, pixels, req
from webui.pipeline.stepcache import step_cache, unet_deep_modules


def _names(unet: torch.nn.Module, modules: list[torch.nn.Module]) -> list[str]:
    by_id = {id(m): name for name, m in unet.named_modules()}
    return [by_id[id(m)] for m in modules]


def _unet_call(unet, x: torch.Tensor, t: float, context: torch.Tensor) -> torch.Tensor:
    return unet(x, torch.tensor([t]), encoder_hidden_states=context, return_dict=False)[0]


def _installed(unet: torch.nn.Module) -> bool:
    return bool(unet._forward_pre_hooks) or any("forward" in m.__dict__ for m in unet.modules())


def test_which_layers_a_cached_call_skips(data_dir: Path) -> None:
    """Branch 0 keeps the outermost skips fresh (conv_in, the first down layer, the last two up
    layers); a deeper branch keeps more; a branch past the model's depth caches nothing."""
    unet = engine_for(data_dir).bundle(None).unet
    shallow = _names(unet, unet_deep_modules(unet, 0))
    assert shallow[0] == "down_blocks.0.downsamplers.0" and "mid_block" in shallow
    assert shallow[-1] == "up_blocks.0.upsamplers.0"  # the last up block runs fresh
    assert not any(n.startswith(("down_blocks.0.resnets", "up_blocks.1", "conv_")) for n in shallow)
    deeper = _names(unet, unet_deep_modules(unet, 1))
    assert set(deeper) < set(shallow) and "down_blocks.0.downsamplers.0" not in deeper
    assert unet_deep_modules(unet, 6) == []
    assert unet_deep_modules(torch.nn.Linear(2, 2), 0) is None  # not a UNet: no step cache


def test_a_cached_call_reuses_the_deep_features_and_runs_them_every_nth_call(data_dir: Path) -> None:
    unet = engine_for(data_dir).bundle(None).unet
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        full_500, full_300 = _unet_call(unet, x, 500, context), _unet_call(unet, x, 300, context)
        deep_runs = []
        handle = unet.mid_block.resnets[0].register_forward_hook(lambda *_: deep_runs.append(1))
        with step_cache(unet, 3) as cache:
            assert cache is not None and _installed(unet)
            first = _unet_call(unet, x, 500, context)  # full: fills the cache
            same = _unet_call(unet, x, 500, context)  # cached, same inputs: the same output exactly
            later = _unet_call(unet, x, 300, context)  # cached: fresh outer layers on old deep features
            outs = [_unet_call(unet, x, 300, context) for _ in range(4)]  # calls 3..6
            other_size = _unet_call(unet, torch.randn(2, 4, 16, 16, generator=gen), 300, context)
        handle.remove()
    assert torch.equal(first, full_500) and torch.equal(same, full_500)
    assert not torch.equal(later, full_300) and not torch.equal(later, full_500)
    assert torch.equal(outs[0], full_300)  # call 3: the whole model again
    assert cache.calls == 8 and cache.full_calls == 4 and len(deep_runs) == 4  # calls 0, 3, 6, and the new size
    assert other_size.shape[-1] == 16
    assert not _installed(unet)


def test_per_job_on_off_and_restored(data_dir: Path) -> None:
    engine = engine_for(data_dir)
    unet = engine.bundle(None).unet
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    plain = engine.runner.generate(req(steps=4))
    cached = engine.runner.generate(req(steps=4, deepcache_interval=2))
    assert not np.array_equal(pixels(cached.images[0]), pixels(plain.images[0]))
    info = infos(cached)[0]
    assert info["DeepCache interval"] == "2" and info["DeepCache branch"] == "0"
    assert "DeepCache interval" not in infos(plain)[0]
    assert not _installed(unet)
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    again = engine.runner.generate(req(steps=4, deepcache_interval=1))  # 1: every call is full
    assert np.array_equal(pixels(again.images[0]), pixels(plain.images[0]))
    assert "DeepCache interval" not in infos(again)[0]
    deeper = engine.runner.generate(req(steps=4, deepcache_interval=2, deepcache_branch=1))
    assert not np.array_equal(pixels(deeper.images[0]), pixels(cached.images[0]))
    engine.settings.update({"deepcache_interval": 2})
    from_settings = engine.runner.generate(req(steps=4))
    assert np.array_equal(pixels(from_settings.images[0]), pixels(cached.images[0]))
    overridden = engine.runner.generate(req(steps=4, deepcache_interval=0))
    assert np.array_equal(pixels(overridden.images[0]), pixels(plain.images[0]))
    hires = engine.runner.generate(req(steps=3, enable_hr=True, hr_scale=1.5, deepcache_interval=2))
    assert hires.images[0].size == (96, 96) and not _installed(unet)


def test_sdxl_unet(data_dir: Path, checkpoint_store: Path) -> None:
    shutil.copy(checkpoint_store / "sdxl.safetensors", data_dir / "models" / "Stable-diffusion" / "sdxl.safetensors")
    engine = engine_for(data_dir)
    plain = engine.runner.generate(req(steps=3, checkpoint="sdxl"))
    cached = engine.runner.generate(req(steps=3, checkpoint="sdxl", deepcache_interval=2))
    assert not np.array_equal(pixels(cached.images[0]), pixels(plain.images[0]))
    assert not _installed(engine.bundle("sdxl").unet)


def test_override_settings_and_infotext() -> None:
    from webui.api.models import GenerationBody
    from webui.infotext import infotext_to_fields, parse_infotext

    request, notes = GenerationBody.model_validate({
        "prompt": "x", "override_settings": {"deepcache_interval": 3, "deepcache_branch": 1}}).to_request()
    assert request.deepcache_interval == 3 and request.deepcache_branch == 1 and not notes
    text = "a cube\nSteps: 9, Sampler: Euler, Seed: 5, Size: 64x64, DeepCache interval: 3, DeepCache branch: 1"
    fields = infotext_to_fields(parse_infotext(text))
    assert fields["deepcache_interval"] == 3 and fields["deepcache_branch"] == 1


def test_the_seam_takes_a_first_block_cache_rule(data_dir: Path) -> None:
    """A rule that looks at what the fresh layers computed (the first-block cache the transformer
    families will use): the whole model runs again only when the probe's output moved."""
    from webui.pipeline.stepcache import StepCache, first_block_change

    unet = engine_for(data_dir).bundle(None).unet
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    nudged = x + 1e-4 * torch.randn(x.shape, generator=gen)
    other = torch.randn(x.shape, generator=gen)
    cache = StepCache(unet, unet_deep_modules(unet, 0), first_block_change(0.05), probe=unet.down_blocks[0].resnets[0])
    with torch.no_grad():
        full_other = _unet_call(unet, other, 500, context)
        with cache.installed():
            _unet_call(unet, x, 500, context)  # full: nothing cached yet
            _unet_call(unet, nudged, 500, context)  # the probe barely moved: cached
            assert cache.full_calls == 1 and cache.reuse
            moved = _unet_call(unet, other, 500, context)  # it moved: the whole model again
            assert cache.full_calls == 2 and not cache.reuse
    assert torch.equal(moved, full_other)
    assert not _installed(unet)


def test_off_for_a_compiled_unet(data_dir: Path) -> None:
    """--compile and step caching do not mix (the swapped forwards would make torch.compile trace
    again on every call): the cache stays off and the infotext does not claim it."""
    from webui.runtime.compile import compile_unet

    engine = engine_for(data_dir)
    unet = engine.bundle(None).unet
    compile_unet(unet)  # installs the compiled call; nothing is traced until the UNet runs
    try:
        with step_cache(unet, 3) as cache:
            assert cache is None and not _installed(unet)
    finally:
        unet._compiled_call_impl = None
