"""SD3.5 Medium at full size on this machine: loading memory and the denoiser step.

Writes (once, to bench/.cache/, random weights) Stability's layout of SD3.5 Medium: the 2.5B
MMDiT and the VAE in `sd35-medium-random-bf16.safetensors`, CLIP-L and CLIP-G as separate files
in `text_encoder/` (T5-XXL left out: it is optional, and 4.7B more parameters would not fit this
benchmark's time); with `--layouts fp8 fp8-packed gguf gguf-packed` also the MMDiT with its 2-D
weights in float8_e4m3fn and as a Q8_0 GGUF file (bare keys, as city96's), each upcast when loaded
or kept packed as --fp8-weights packed does. Then, each in a fresh child process:

  load:  peak RSS while `load_bundle` builds the model, minus RSS before it, as a ratio to the
         files' size (goal <= 1.3: about one copy of the weights; float8 and GGUF weights upcast
         when read take more than their files, packed ones about their files)
  step:  one denoiser call at 256x256 (a 16x32x32 latent, 154 text tokens) through our CFG
         denoiser and SD3 adapter, against the bare diffusers SD3Transformer2DModel call on the
         same inputs, measured alternately in the same process (goal: ratio <= 1.02); for float8
         and GGUF also against the bf16 file's step (packed weights are upcast / dequantised a
         layer a call)

Prints figures and ratios, never pass/fail. Run it alone (2 cores: anything beside it skews it).

    python bench/sd3.py [--repeats 3] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache" / "sd35"
CKPT = CACHE / "Stable-diffusion" / "sd35-medium-random-bf16.safetensors"
LAYOUTS = {"bf16": CKPT, "fp8": CKPT.with_name("sd35-medium-random-fp8.safetensors"),
           "gguf": CKPT.with_name("sd35-medium-random-Q8_0.gguf")}
# the same files, their float8 weights / GGUF blocks kept packed (--fp8-weights packed)
LAYOUTS["fp8-packed"] = LAYOUTS["fp8"]
LAYOUTS["gguf-packed"] = LAYOUTS["gguf"]
ENCODERS = CACHE / "text_encoder"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")

_LOAD = r"""
import gc, json, resource, sys, threading, time
from pathlib import Path
import torch
from webui.models.load import load_bundle
from webui.prompts.tokenizer import TokenizerFactory
from webui.runtime.devices import Runtime

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

peak = [0]
def watch():
    while True:
        peak[0] = max(peak[0], rss()); time.sleep(0.01)

tokenizers = TokenizerFactory(); tokenizers.warm(); tokenizers.get("<pad>")
dtype = getattr(torch, sys.argv[2])
runtime = Runtime(device=torch.device("cpu"), dtype=dtype, vae_dtype=dtype, float8_packed=sys.argv[4] == "packed")
gc.collect()
before = rss()
threading.Thread(target=watch, daemon=True).start()
start = time.perf_counter()
bundle = load_bundle(Path(sys.argv[1]), runtime=runtime, tokenizers=tokenizers, text_encoder_dirs=[Path(sys.argv[3])],
                     vae_dir=Path(sys.argv[3]).parent / "VAE")
seconds = time.perf_counter() - start
time.sleep(0.05)
print(json.dumps({"seconds": seconds, "peak_delta": max(peak[0], rss()) - before}))
"""

_STEP = r"""
import json, sys, time
from pathlib import Path
import torch
from webui.models.load import load_bundle
from webui.pipeline.conditioning import PromptPlan, ScheduledConditioning
from webui.pipeline.denoiser import CFGDenoiser
from webui.pipeline.sampling import noise_schedule
from webui.prompts.encode import TextConditioner
from webui.prompts.tokenizer import TokenizerFactory
from webui.runtime.devices import Runtime

dtype = getattr(torch, sys.argv[2])
repeats = int(sys.argv[4])
torch.manual_seed(0)
bundle = load_bundle(Path(sys.argv[1]), runtime=Runtime(device=torch.device("cpu"), dtype=dtype, vae_dtype=dtype,
                                                      float8_packed=sys.argv[5] == "packed"),
                     tokenizers=TokenizerFactory(), text_encoder_dirs=[Path(sys.argv[3])],
                     vae_dir=Path(sys.argv[3]).parent / "VAE")
plan = PromptPlan(cond=[[([(1, "a lighthouse at dusk")], 1.0)]], uncond=[[(1, "")]])
conditioning = ScheduledConditioning(TextConditioner(bundle), plan, guided=False)
denoiser = CFGDenoiser(bundle, noise_schedule(bundle), conditioning, 1.0)
x = torch.randn(1, 16, 32, 32)
sigma = torch.tensor(0.8)
sc = conditioning.at(1)
transformer = bundle.unet.transformer
context, pooled = sc.context.to(dtype), sc.pooled.to(dtype)

def bare():
    return transformer(hidden_states=x.to(dtype), encoder_hidden_states=context, pooled_projections=pooled,
                       timestep=torch.tensor([800.0]), return_dict=False)[0]

with torch.no_grad():
    denoiser(x, sigma); bare()  # warm-up
    ours, theirs = [], []
    for _ in range(repeats):
        t = time.perf_counter(); denoiser(x, sigma); ours.append(time.perf_counter() - t)
        t = time.perf_counter(); bare(); theirs.append(time.perf_counter() - t)
print(json.dumps({"ours": min(ours), "bare": min(theirs), "tokens": int(context.shape[1])}))
"""


def write_files() -> None:
    """The full-size random-weight files (once): built on the meta device, filled in bf16."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sys.path.insert(0, str(REPO))
    from webui.testing.make_checkpoint import vae_to_ldm
    from webui.testing.make_sd3 import FULL_CONFIGS, mmdit_to_original

    def filled(module: torch.nn.Module) -> torch.nn.Module:
        module = module.to_empty(device="cpu").to(torch.bfloat16)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.02)
        return module

    torch.manual_seed(0)
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**FULL_CONFIGS["sd3.5-medium"])
    sd = mmdit_to_original(filled(transformer))
    del transformer
    vae = AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        use_quant_conv=False, use_post_quant_conv=False).to(torch.bfloat16)
    sd.update(vae_to_ldm(vae))
    CKPT.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(CKPT))
    del sd
    ENCODERS.mkdir(parents=True, exist_ok=True)
    for name, width, layers, heads, act in (("clip_l", 768, 12, 12, "quick_gelu"), ("clip_g", 1280, 32, 20, "gelu")):
        with torch.device("meta"):
            model = CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=width, intermediate_size=width * 4, num_hidden_layers=layers, num_attention_heads=heads,
                projection_dim=width, hidden_act=act, max_position_embeddings=77, vocab_size=49408))
        tensors = {k: v.contiguous() for k, v in filled(model).state_dict().items() if "position_ids" not in k}
        save_file(tensors, str(ENCODERS / f"{name}.safetensors"))


def write_layout(layout: str) -> None:
    """The bf16 file's MMDiT (with its VAE) again, in float8 or as Q8_0 GGUF."""
    import torch
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(REPO))
    sd = load_file(str(CKPT))
    if layout == "fp8":
        save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 and k.startswith("model.") else v for k, v in sd.items()},
                  str(LAYOUTS["fp8"]))
        return
    from webui.testing.make_flux import write_gguf

    # the GGUF file holds the transformer alone; the VAE goes beside it, as users keep them
    write_gguf(LAYOUTS["gguf"], {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()
                                 if k.startswith("model.diffusion_model.")})
    (CACHE / "VAE").mkdir(exist_ok=True)
    save_file({k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")},
              str(CACHE / "VAE" / "sd3_vae.safetensors"))


def _packing(layout: str) -> str:
    return "packed" if layout.endswith("-packed") else "upcast"


def child(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                         check=False)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--layouts", nargs="+", default=["bf16"], choices=sorted(LAYOUTS))
    ap.add_argument("--no-step", action="store_true", help="measure loading only")
    args = ap.parse_args()
    if not CKPT.exists() or not (ENCODERS / "clip_g.safetensors").exists():
        start = time.perf_counter()
        write_files()
        print(f"wrote the random-weight files in {time.perf_counter() - start:.0f} s")
    encoders = sum(p.stat().st_size for p in ENCODERS.glob("*.safetensors"))
    for layout in args.layouts:
        if not LAYOUTS[layout].exists():
            write_layout(layout.removesuffix("-packed"))
        vae = CACHE / "VAE" / "sd3_vae.safetensors"
        size = LAYOUTS[layout].stat().st_size + encoders + (vae.stat().st_size if layout.startswith("gguf") else 0)
        load = child(_LOAD, str(LAYOUTS[layout]), args.dtype, str(ENCODERS), _packing(layout))
        print(f"{layout}: files {size / 2**30:.2f} GiB (MMDiT 2.5B + VAE, CLIP-L, CLIP-G); load into {args.dtype}: "
              f"{load['seconds']:.1f} s, peak RSS delta {load['peak_delta'] / 2**30:.2f} GiB = "
              f"{load['peak_delta'] / size:.2f} x the files")
    if args.no_step:
        return
    steps = {}
    for layout in dict.fromkeys(["bf16", *args.layouts]):  # bf16 first: the others' baseline
        step = child(_STEP, str(LAYOUTS[layout]), args.dtype, str(ENCODERS), str(args.repeats), _packing(layout))
        steps[layout] = step["ours"]
        print(f"{layout}: one denoiser call at 256x256 ({step['tokens']} text tokens, computed in {args.dtype}): "
              f"ours {step['ours']:.2f} s, bare diffusers transformer {step['bare']:.2f} s, "
              f"ratio {step['ours'] / step['bare']:.3f}; against bf16 weights {step['ours'] / steps['bf16']:.2f}x")

if __name__ == "__main__":
    main()
