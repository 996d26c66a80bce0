"""Attention backends (choice, flags, installation, sliced == SDPA), precision paths, and the
float32 retry of a half-precision VAE that produces NaNs.

The CUDA device and the xformers build this CPU machine lacks are simulated where a test says
so: `FAKE_CUDA` is only a `torch.device("cuda")` value handed to `pick_attention` (nothing runs
on it), and `fake_xformers_*` stand in for `import xformers.ops` and the probe call.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from webui.app import Engine, build_engine
from webui.cli import build_parser, config_from_args
from webui.config import Config
from webui.models.load import load_bundle
from webui.pipeline import latents as lat
from webui.pipeline.request import GenerationRequest
from webui.prompts.tokenizer import TokenizerFactory
from webui.runtime.attention import (
    ChunkedAttnProcessor,
    apply_attention,
    attention_backend_of,
    make_processor,
    pick_attention,
)
from webui.runtime.devices import Runtime, pick_runtime

CPU = torch.device("cpu")
FAKE_CUDA = torch.device("cuda", 0)  # a simulated device: only its type is read, nothing runs on it
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red cube on a table", steps=4, width=64, height=64, seed=1234, sampler_name="Euler",
                save_images=False)
    base.update(kw)
    return GenerationRequest(**base)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


# --- fakes for the absent CUDA xformers build ---------------------------------------------------


def fake_xformers_missing() -> ModuleType:
    raise ModuleNotFoundError("No module named 'xformers'")


def fake_xformers_ops() -> ModuleType:
    return ModuleType("fake_xformers.ops")


def fake_probe_ok(ops: ModuleType, device: torch.device) -> None:
    return None


def fake_probe_broken(ops: ModuleType, device: torch.device) -> None:
    raise NotImplementedError("No operator found for `memory_efficient_forward` with inputs")


# --- choice -------------------------------------------------------------------------------------


def test_xformers_not_importable_falls_back_to_sdpa_with_the_reason() -> None:
    backend, message = pick_attention("xformers", FAKE_CUDA, import_ops=fake_xformers_missing, probe=fake_probe_ok)
    assert backend == "sdpa"
    assert message == ("xformers requested but not importable (ModuleNotFoundError: No module named 'xformers'): "
                       "using PyTorch SDPA")
    backend, message = pick_attention("auto", FAKE_CUDA, import_ops=fake_xformers_missing, probe=fake_probe_ok)
    assert backend == "sdpa" and "not importable (ModuleNotFoundError" in message


@pytest.mark.skipif(HAS_XFORMERS, reason="xformers is installed here")
def test_real_import_of_absent_xformers_falls_back() -> None:
    backend, message = pick_attention("xformers", FAKE_CUDA, probe=fake_probe_ok)
    assert backend == "sdpa" and "not importable (ModuleNotFoundError" in message and "using PyTorch SDPA" in message


def test_cuda_with_working_xformers_uses_it() -> None:
    for requested in ("auto", "xformers"):
        assert pick_attention(requested, FAKE_CUDA, import_ops=fake_xformers_ops, probe=fake_probe_ok)[0] == "xformers"


def test_xformers_failing_its_test_call_falls_back() -> None:
    backend, message = pick_attention("xformers", FAKE_CUDA, import_ops=fake_xformers_ops, probe=fake_probe_broken)
    assert backend == "sdpa"
    assert "failed a test call on cuda:0 (NotImplementedError: No operator found" in message
    assert message.endswith("using PyTorch SDPA")


def test_xformers_is_never_used_off_cuda() -> None:
    backend, message = pick_attention("xformers", CPU, import_ops=fake_xformers_ops, probe=fake_probe_ok)
    assert backend == "sdpa" and "the device is cpu" in message
    assert pick_attention("auto", CPU, import_ops=fake_xformers_ops, probe=fake_probe_ok)[0] == "sdpa"


def test_explicit_backends_and_unknown_names() -> None:
    assert pick_attention("sliced", CPU)[0] == "sliced"
    assert pick_attention("sliced", FAKE_CUDA, import_ops=fake_xformers_ops, probe=fake_probe_ok)[0] == "sliced"
    assert pick_attention("sdpa", FAKE_CUDA, import_ops=fake_xformers_ops, probe=fake_probe_ok)[0] == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        pick_attention("flash", CPU)


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], "auto"),
        (["--xformers"], "xformers"),
        (["--attention", "sliced"], "sliced"),
        (["--opt-sdp-attention"], "sdpa"),
        (["--opt-split-attention"], "sliced"),
        (["--opt-sub-quad-attention"], "sliced"),
        (["--attention", "sdpa"], "sdpa"),
    ],
)
def test_flags(flags: list[str], expected: str) -> None:
    assert config_from_args(build_parser().parse_args(flags)).attention == expected
    sub = ["txt2img", "--ckpt", "x", "--prompt", "p", *flags]
    assert config_from_args(build_parser().parse_args(sub)).attention == expected


def test_runtime_carries_the_backend(caplog: pytest.LogCaptureFixture) -> None:
    r = pick_runtime(Config(use_cpu=True, attention="sliced"))
    assert r.attention == "sliced" and "attention=sliced" in r.describe()
    with caplog.at_level(logging.WARNING):
        r = pick_runtime(Config(use_cpu=True, attention="xformers"))
    assert r.attention == "sdpa" and "xformers requested but the device is cpu" in r.attention_message
    assert r.attention_message in caplog.text
    assert pick_runtime(Config(use_cpu=True)).attention == "sdpa"


# --- the sliced processor -----------------------------------------------------------------------


@pytest.mark.parametrize("cross", [False, True])
def test_chunked_processor_equals_sdpa_on_one_layer(cross: bool) -> None:
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    layer = Attention(query_dim=32, cross_attention_dim=24 if cross else None, heads=4, dim_head=8).eval()
    x = torch.randn(2, 37, 32)
    context = torch.randn(2, 11, 24) if cross else None
    with torch.no_grad():
        layer.set_processor(make_processor("sdpa"))
        want = layer(x, context)
        layer.set_processor(ChunkedAttnProcessor(query_chunk=5))  # 37 = 7 blocks of 5 + a tail of 2
        got = layer(x, context)
        layer.set_processor(ChunkedAttnProcessor(max_bytes=1))  # one query per block
        one = layer(x, context)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one, want, rtol=1e-5, atol=1e-6)


def test_chunk_size_follows_the_memory_budget() -> None:
    q = torch.empty(2, 8, 4096, 40, dtype=torch.float16)
    per_query = 2 * 8 * 4096 * 2
    assert ChunkedAttnProcessor(max_bytes=per_query * 100).chunk_size(q, 4096) == 100
    assert ChunkedAttnProcessor(max_bytes=1).chunk_size(q, 4096) == 1
    assert ChunkedAttnProcessor(query_chunk=64).chunk_size(q, 4096) == 64


# --- through the real loader and runner ---------------------------------------------------------


@pytest.fixture
def engine(data_dir: Path) -> Engine:
    return build_engine(Config(data_dir=data_dir, dtype="float32"))


def test_loader_installs_the_configured_backend(data_dir: Path) -> None:
    sliced = build_engine(Config(data_dir=data_dir, dtype="float32", attention="sliced", use_cpu=True)).bundle(None)
    assert sliced.runtime.attention == "sliced"
    assert attention_backend_of([sliced.unet, sliced.vae]) == {"sliced"}
    default = build_engine(Config(data_dir=data_dir, dtype="float32", use_cpu=True)).bundle(None)
    assert attention_backend_of([default.unet, default.vae]) == {"sdpa"}


def test_sliced_attention_gives_the_sdpa_image(engine: Engine) -> None:
    bundle = engine.bundle(None)
    sdpa = engine.runner.generate(req()).images[0]
    # blocks of 7 queries: the tiny model's 64-token layers run in 10 blocks, the last one short
    assert apply_attention(bundle, "sliced", query_chunk=7) > 0
    assert attention_backend_of([bundle.unet, bundle.vae]) == {"sliced"}
    sliced = engine.runner.generate(req()).images[0]
    assert pixels(sdpa).std() > 5  # a real image, not a flat one that would match anything
    diff = np.abs(pixels(sdpa) - pixels(sliced))
    assert diff.max() <= 1, diff.max()
    apply_attention(bundle, "sdpa")
    assert np.array_equal(pixels(engine.runner.generate(req()).images[0]), pixels(sdpa))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("attention", ["sdpa", "sliced"])
def test_precisions_give_finite_images(data_dir: Path, dtype: str, attention: str) -> None:
    engine = build_engine(Config(data_dir=data_dir, dtype=dtype, attention=attention, use_cpu=True))
    bundle = engine.bundle(None)
    assert bundle.unet.dtype == getattr(torch, dtype)
    image = engine.runner.generate(req()).images[0]
    assert image.size == (64, 64) and pixels(image).std() > 5


# --- NaN VAE fallback ---------------------------------------------------------------------------


def overflow_in_float16(vae: torch.nn.Module, gain: float = 2e4) -> None:
    """Make the VAE overflow in float16 only: post_quant_conv multiplies the latents by `gain`
    (well inside float16's range as a weight, but |z| > 3.3 times it is beyond 65504, so the
    activations become inf and then NaN), and conv_in takes the gain back out. In float32 the
    same weights decode to finite values."""
    with torch.no_grad():
        conv = vae.post_quant_conv
        conv.weight.copy_(torch.eye(conv.weight.shape[0]).view_as(conv.weight) * gain)
        conv.bias.zero_()
        vae.decoder.conv_in.weight.mul_(1 / gain)


def test_half_vae_nans_are_decoded_again_in_float32(checkpoint_store: Path, caplog: pytest.LogCaptureFixture) -> None:
    runtime = Runtime(device=CPU, dtype=torch.float32, vae_dtype=torch.float16)
    bundle = load_bundle(checkpoint_store / "sd1.safetensors", runtime=runtime, tokenizers=TokenizerFactory())
    overflow_in_float16(bundle.vae)
    before = {k: v.clone() for k, v in bundle.vae.state_dict().items()}
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    scaled = latents / bundle.family.latent_scaling_factor
    with torch.no_grad():
        assert not torch.isfinite(bundle.vae.decode(scaled.half()).sample).all()  # the forced NaNs are real
        reference = copy.deepcopy(bundle.vae).float().decode(scaled).sample  # the same weights in float32
    assert torch.isfinite(reference).all()
    with caplog.at_level(logging.WARNING, logger="webui.pipeline.latents"), torch.inference_mode():
        images = lat.decode(bundle, latents)
    assert ("VAE produced NaNs in float16; decoded again in float32. Use --no-half-vae to skip the first try"
            in caplog.text)
    want = ((reference.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for image, expected in zip(images, want):
        assert np.array_equal(np.asarray(image), expected)
        assert pixels(image).std() > 5
    # the VAE is back in float16, bit for bit, and its weights are still ordinary tensors
    after = bundle.vae.state_dict()
    assert bundle.vae.dtype == torch.float16
    assert all(torch.equal(before[k], after[k]) and not after[k].is_inference() for k in before)


def test_a_finite_half_vae_decodes_once(checkpoint_store: Path, caplog: pytest.LogCaptureFixture) -> None:
    runtime = Runtime(device=CPU, dtype=torch.float32, vae_dtype=torch.float16)
    bundle = load_bundle(checkpoint_store / "sd1.safetensors", runtime=runtime, tokenizers=TokenizerFactory())
    with caplog.at_level(logging.WARNING, logger="webui.pipeline.latents"), torch.inference_mode():
        images = lat.decode(bundle, torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3)) * 0.1)
    assert "NaNs" not in caplog.text and pixels(images[0]).std() > 0


def test_runner_recovers_from_a_nan_vae(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    half = build_engine(Config(data_dir=data_dir, dtype="float16", use_cpu=True))
    overflow_in_float16(half.bundle(None).vae)
    with caplog.at_level(logging.WARNING, logger="webui.pipeline.latents"):
        image = half.runner.generate(req()).images[0]
    assert "VAE produced NaNs in float16; decoded again in float32" in caplog.text
    # the same UNet (float16) with the VAE loaded in float32 from the start: the same picture, up
    # to the float16 rounding of the VAE weights the retry starts from
    full_vae = build_engine(Config(data_dir=data_dir, dtype="float16", no_half_vae=True, use_cpu=True))
    overflow_in_float16(full_vae.bundle(None).vae)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="webui.pipeline.latents"):
        reference = full_vae.runner.generate(req()).images[0]
    assert "NaNs" not in caplog.text
    assert pixels(reference).std() > 5
    diff = np.abs(pixels(image) - pixels(reference))
    assert diff.mean() < 0.5 and diff.max() <= 2, (diff.mean(), diff.max())


# --- on a real CUDA device ----------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_backend_generates(data_dir: Path) -> None:
    engine = build_engine(Config(data_dir=data_dir, attention="auto"))
    runtime = engine.runtime
    assert runtime.device.type == "cuda"
    if not HAS_XFORMERS:
        assert runtime.attention == "sdpa" and "not importable" in runtime.attention_message
    else:  # xformers, or SDPA with the reason this build could not be used
        assert runtime.attention == "xformers" or "using PyTorch SDPA" in runtime.attention_message
    image = engine.runner.generate(req()).images[0]
    assert pixels(image).std() > 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["sdpa", "sliced", "xformers"])
def test_cuda_backends_agree(data_dir: Path, attention: str) -> None:
    base = build_engine(Config(data_dir=data_dir, attention="sdpa")).runner.generate(req()).images[0]
    engine = build_engine(Config(data_dir=data_dir, attention=attention))
    image = engine.runner.generate(req()).images[0]
    assert np.abs(pixels(base) - pixels(image)).mean() < 2
