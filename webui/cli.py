"""Command line: `webui [flags]` serves the page; `webui txt2img ...` generates without a server."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from webui.config import Config, parse_auth
from webui.pipeline.request import MaskedContent, ResizeMode, labelled


def device_ids(text: str) -> tuple[int, ...]:
    """`0` or `0,1,3` -> device indices (argparse type)."""
    try:
        ids = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a device index or a list like 0,1") from None
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct device indices >= 0, like 0,1")
    return ids


def _common(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("folders and models")
    g.add_argument("--data-dir", type=Path, default=Path("."), help="root for models/, outputs/ and caches (default: .)")
    g.add_argument("--models-dir", type=Path, help="models folder (default: <data-dir>/models)")
    g.add_argument("--ckpt-dir", type=Path, help="checkpoints folder (default: <models-dir>/Stable-diffusion)")
    g.add_argument("--vae-dir", type=Path, help="VAE folder (default: <models-dir>/VAE)")
    g.add_argument("--lora-dir", type=Path, help="LoRA folder (default: <models-dir>/Lora)")
    g.add_argument("--embeddings-dir", type=Path, help="textual-inversion folder (default: <models-dir>/embeddings)")
    g.add_argument("--controlnet-dir", type=Path, help="ControlNet models folder (default: <models-dir>/ControlNet)")
    g.add_argument("--styles-file", type=Path, help="styles CSV (default: <data-dir>/styles.csv)")
    g.add_argument("--outdir", type=Path, help="output folder (default: <data-dir>/outputs)")
    g.add_argument("--vae", help='VAE to use: "Automatic" (default), "None", or a file name in the VAE folder')
    g = ap.add_argument_group("device and precision")
    g.add_argument("--use-cpu", action="store_true", help="run on the CPU even if a GPU is present")
    g.add_argument("--device-id", type=device_ids, default=(),
                   help="GPU index, or several (0,1,2): one worker per device, all serving one queue")
    g.add_argument("--all-gpus", action="store_true", help="one worker per visible GPU")
    g.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="run the engine as Ray Serve replicas (the ray extra; docs/scaling.md): 'auto' (a local "
                   "or the RAY_ADDRESS cluster) or a cluster address")
    g.add_argument("--ray-min-replicas", type=int, default=1, help="with --ray: fewest replicas kept (default 1)")
    g.add_argument("--ray-max-replicas", type=int, default=2,
                   help="with --ray: most replicas, one GPU each on GPU nodes (default 2)")
    g.add_argument("--workers", type=int, help="number of workers, spread over the devices in turn (default: one per "
                   "device; with --use-cpu, N workers share the CPU)")
    g.add_argument("--no-half", action="store_true", help="run the whole model in float32")
    g.add_argument("--no-half-vae", action="store_true", help="run the VAE in float32")
    g.add_argument("--precision", choices=("autocast", "full"), default="autocast", help="full = float32 (same as --no-half)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto", help="model dtype (default: auto)")
    g.add_argument("--attention", choices=("auto", "sdpa", "xformers", "sliced"), default="auto",
                   help="attention backend (default: auto = xformers on CUDA when it works, else PyTorch SDPA)")
    g.add_argument("--xformers", action="store_const", const="xformers", dest="attention", help="same as --attention xformers")
    g.add_argument("--opt-sdp-attention", action="store_const", const="sdpa", dest="attention", help="same as --attention sdpa")
    for flag in ("--opt-split-attention", "--opt-sub-quad-attention"):
        g.add_argument(flag, action="store_const", const="sliced", dest="attention", help="same as --attention sliced")
    g.add_argument("--medvram", action="store_true",
                   help="keep only the running component (text encoder, UNet, VAE) on the GPU")
    g.add_argument("--lowvram", action="store_true", help="stream the UNet's blocks to the GPU as they run (slowest, least VRAM)")
    g.add_argument("--vae-tiling", action="store_true", help="always decode and encode images in tiles (default: large images only)")
    g.add_argument("--fp8-weights", choices=("auto", "packed", "upcast"), default="auto",
                   help="float8 and GGUF Flux/SD3.5 weights: kept packed (float8 / quantised) in memory and upcast "
                        "a layer a call, or upcast when loaded (auto: packed on a GPU, upcast on the CPU)")
    g.add_argument("--model-cache-size", type=int, help="checkpoints loaded on the device at once (default: the setting, 1)")
    g.add_argument("--ckpt-cache", type=int, metavar="N",
                   help="checkpoints kept in RAM besides the loaded ones, for instant switching (default: the setting, 0)")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first image; cached between runs)")
    g.add_argument("--channels-last", action="store_const", const=True, default=None,
                   help="UNet and VAE in channels-last memory format (default: on where measured faster, the CPU "
                        "in bfloat16)")
    g.add_argument("--no-channels-last", action="store_const", const=False, dest="channels_last",
                   help="keep the default memory format")
    g.add_argument("--verbose", action="store_true", help="log more")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="webui", description="Stable Diffusion web UI. Without a command: serve the page.")
    _common(ap)
    s = ap.add_argument_group("server")
    s.add_argument("--listen", action="store_true", help="listen on 0.0.0.0 (default: 127.0.0.1 only)")
    s.add_argument("--port", type=int, help="port (default: 7860; 7861 with --nowebui)")
    s.add_argument("--share", action="store_true", help="ask Gradio for a temporary public link")
    s.add_argument("--gradio-auth", help="user:pass[,user2:pass2] required to open the page")
    s.add_argument("--allowed-hosts", default="",
                   help="more names the server answers to, comma-separated (a reverse proxy's name; * for any); "
                        "default: localhost and 127.0.0.1, plus this machine's names with --listen")
    s.add_argument("--cors-allow-origins", default="",
                   help="other sites allowed to send requests that change things, comma-separated origins "
                        "(https://example.com; * for any)")
    s.add_argument("--autolaunch", action="store_true", help="open the page in the default browser")
    s.add_argument("--api", action="store_true", help="serve the HTTP API at /sdapi/v1 beside the page")
    s.add_argument("--nowebui", action="store_true", help="serve only the HTTP API (default port 7861)")
    s.add_argument("--api-auth", help="user:pass[,user2:pass2] required by every API route (default: --gradio-auth)")
    s.add_argument("--max-steps", type=int, default=150, help="API: most sampling steps a request may ask (150)")
    s.add_argument("--max-pixels", type=int, default=4096 * 4096,
                   help="API: most pixels per request, width x height x batch size, hires included")
    s.add_argument("--job-retention", type=float, default=600.0, help="seconds a finished queued job stays readable")
    s.add_argument("--job-retention-count", type=int, default=100,
                   help="finished jobs kept for their clients at most (the oldest dropped first) (100)")
    s.add_argument("--job-retention-mb", type=int, default=1024,
                   help="MiB of finished jobs' images kept at most (the oldest dropped first) (1024)")
    s.add_argument("--any-outdir", action="store_true",
                   help="output folders set in Settings or over the API may be outside the data folder")
    s.add_argument("--max-body-mb", type=int, default=100,
                   help="largest request body in MiB (uploads, API bodies); larger ones answer 413 (100)")
    s.add_argument("--api-server-stop", action="store_true",
                   help="API: allow /sdapi/v1/server-stop, server-kill and server-restart (refused otherwise)")
    s.add_argument("--extensions-dir", type=Path, help="extensions folder (default: <data-dir>/extensions)")
    s.add_argument("--disable-all-extensions", action="store_true", help="start without any extension")
    s.add_argument("--enable-insecure-extension-access", action="store_true",
                   help="allow installing extensions from the page even with --listen or --share")
    s.add_argument("--ckpt", help="checkpoint selected at start (title, name, hash or path)")
    sub = ap.add_subparsers(dest="command")
    t = sub.add_parser("txt2img", help="generate images from a prompt and exit", description="Generate images and print their paths.")
    _generation_args(t)
    h = t.add_argument_group("hires fix")
    h.add_argument("--enable-hr", action="store_true", help="upscale and denoise again at a larger size")
    h.add_argument("--hr-scale", type=float, default=2.0)
    h.add_argument("--hr-resize-x", type=int, default=0)
    h.add_argument("--hr-resize-y", type=int, default=0)
    h.add_argument("--hr-upscaler", default="Latent", help="Latent, Lanczos, Nearest or a model in models/ESRGAN")
    h.add_argument("--hr-steps", type=int, default=0, dest="hr_second_pass_steps")
    h.add_argument("--denoising-strength", type=float, default=0.7)
    i = sub.add_parser("img2img", help="transform or inpaint an image and exit", description="img2img / inpainting; prints the paths.")
    _generation_args(i)
    i.add_argument("--init-image", type=Path, required=True, action="append", dest="init_images")
    i.add_argument("--mask", type=Path, help="white = repaint")
    i.add_argument("--denoising-strength", type=float, default=0.75)
    i.add_argument("--resize-mode", type=int, default=0, choices=range(4), help=labelled(ResizeMode))
    i.add_argument("--mask-blur", type=int, default=4)
    i.add_argument("--inpainting-fill", type=int, default=1, choices=range(4), help=labelled(MaskedContent))
    i.add_argument("--inpaint-full-res", action="store_true", help="only the masked area, at full resolution")
    i.add_argument("--inpaint-full-res-padding", type=int, default=32)
    i.add_argument("--inpainting-mask-invert", type=int, default=0, choices=(0, 1))
    i.add_argument("--outpaint", metavar="L,T,R,B", help="extend the canvas by these pixels and paint the border")
    return ap


def _generation_args(t: argparse.ArgumentParser) -> None:
    _common(t)
    t.add_argument("--ckpt", required=True, help="checkpoint: a path, or a title/name/hash from the models folder")
    t.add_argument("--prompt", required=True)
    t.add_argument("--negative-prompt", default="")
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--cfg-scale", type=float, default=7.0)
    t.add_argument("--seed", type=int, default=-1)
    t.add_argument("--subseed", type=int, default=-1, help="variation seed")
    t.add_argument("--subseed-strength", type=float, default=0.0)
    t.add_argument("--width", type=int, default=512)
    t.add_argument("--height", type=int, default=512)
    t.add_argument("--sampler", default="Euler a", dest="sampler_name")
    t.add_argument("--scheduler", default="Automatic")
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--n-iter", type=int, default=1)
    t.add_argument("--clip-skip", type=int, default=1)
    t.add_argument("--tiling", action="store_true")
    t.add_argument("--style", action="append", default=[], dest="styles", help="apply a style from the styles file (repeatable)")
    t.add_argument("--prediction", choices=("auto", "epsilon", "v"), default="auto", help="override v-prediction detection")
    t.add_argument("--refiner", dest="refiner_checkpoint", help="checkpoint that takes over for the last steps")
    t.add_argument("--refiner-switch-at", type=float, default=0.8, help="fraction of the steps before the refiner (0.8)")
    t.add_argument("--eta", type=float, help="noise multiplier of ancestral samplers and DDIM")
    t.add_argument("--s-churn", type=float)
    t.add_argument("--s-noise", type=float)
    cn = t.add_argument_group("ControlNet (one unit)")
    cn.add_argument("--controlnet", help="a ControlNet, T2I-Adapter or IP-Adapter in models/ControlNet (name or title)")
    cn.add_argument("--control-image", type=Path, help="its control image (img2img: the init image when left out)")
    cn.add_argument("--control-module", default="none", help="the preprocessor: canny, depth_anything, openpose, ... "
                                                               "(none: the image as it is)")
    cn.add_argument("--control-weight", type=float, default=1.0)
    sc = t.add_argument_group("scripts")
    sc.add_argument("--script", dest="script_name", default="",
                    help='run a script with this request as its template: "x/y/z plot", "prompt matrix", '
                         '"prompts from file or textbox", and on img2img "sd upscale", "loopback"')
    sc.add_argument("--script-args", metavar="JSON", help='the script\'s arguments, e.g. \'{"loops": 3}\'')
    for axis in "xyz":
        sc.add_argument(f"--{axis}-type", help=f"X/Y/Z plot: the {axis.upper()} axis (e.g. Steps, CFG Scale, Sampler)")
        sc.add_argument(f"--{axis}-values", help=f'X/Y/Z plot: the {axis.upper()} values (e.g. "10,20" or "1-5")')


# argparse destinations that are GenerationRequest fields of the same name
_REQUEST_FIELDS = (
    "prompt", "negative_prompt", "steps", "cfg_scale", "seed", "subseed", "subseed_strength", "width", "height",
    "sampler_name", "scheduler", "batch_size", "n_iter", "clip_skip", "tiling", "enable_hr", "hr_scale", "hr_resize_x",
    "hr_resize_y", "hr_upscaler", "hr_second_pass_steps", "denoising_strength", "resize_mode", "mask_blur",
    "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
    "refiner_checkpoint", "refiner_switch_at", "eta", "s_churn", "s_noise",
)


def config_from_args(a: argparse.Namespace) -> Config:
    return Config(
        data_dir=a.data_dir,
        models_dir=a.models_dir,
        ckpt_dir=a.ckpt_dir,
        vae_dir=a.vae_dir,
        lora_dir=a.lora_dir,
        embeddings_dir=a.embeddings_dir,
        controlnet_dir=a.controlnet_dir,
        styles_file=a.styles_file,
        outdir=a.outdir,
        vae=a.vae,
        listen=getattr(a, "listen", False),
        port=getattr(a, "port", None) or (7861 if getattr(a, "nowebui", False) else 7860),
        share=getattr(a, "share", False),
        gradio_auth=parse_auth(getattr(a, "gradio_auth", None)),
        allowed_hosts=tuple(h.strip() for h in getattr(a, "allowed_hosts", "").split(",") if h.strip()),
        cors_allow_origins=tuple(o.strip() for o in getattr(a, "cors_allow_origins", "").split(",") if o.strip()),
        autolaunch=getattr(a, "autolaunch", False),
        api=getattr(a, "api", False) or getattr(a, "nowebui", False),
        nowebui=getattr(a, "nowebui", False),
        api_auth=parse_auth(getattr(a, "api_auth", None)),
        max_steps=getattr(a, "max_steps", 150),
        max_pixels=getattr(a, "max_pixels", 4096 * 4096),
        job_retention_s=getattr(a, "job_retention", 600.0),
        api_server_stop=getattr(a, "api_server_stop", False),
        max_body_mb=getattr(a, "max_body_mb", 100),
        any_outdir=getattr(a, "any_outdir", False),
        job_retention_count=getattr(a, "job_retention_count", 100),
        job_retention_mb=getattr(a, "job_retention_mb", 1024),
        extensions_dir=getattr(a, "extensions_dir", None),
        disable_all_extensions=getattr(a, "disable_all_extensions", False),
        enable_insecure_extension_access=getattr(a, "enable_insecure_extension_access", False),
        use_cpu=a.use_cpu,
        device_ids=a.device_id,
        all_gpus=a.all_gpus,
        workers=a.workers,
        ray=a.ray,
        ray_min_replicas=a.ray_min_replicas,
        ray_max_replicas=a.ray_max_replicas,
        no_half=a.no_half or a.precision == "full",
        no_half_vae=a.no_half_vae,
        dtype=a.dtype,
        attention=a.attention,
        medvram=a.medvram,
        lowvram=a.lowvram,
        vae_tiling=a.vae_tiling,
        fp8_weights=a.fp8_weights,
        ckpt=a.ckpt,
        model_cache_size=a.model_cache_size,
        ckpt_cache=a.ckpt_cache,
        compile=a.compile,
        channels_last=a.channels_last,
        prediction=getattr(a, "prediction", "auto"),
    )


def _generate(a: argparse.Namespace, config: Config) -> int:
    from webui.app import build_engine
    from webui.images import open_untrusted
    from webui.pipeline.request import GenerationRequest

    def read(path: str) -> object:
        try:
            return open_untrusted(Path(path), what=str(path))
        except ValueError as e:
            raise ValueError(f"cannot read image: {e}") from None

    fields = {k: getattr(a, k) for k in _REQUEST_FIELDS if hasattr(a, k)}
    if a.command == "img2img":
        fields["init_images"] = tuple(read(p) for p in a.init_images)
        fields["mask"] = read(a.mask) if a.mask else None
        if a.outpaint:
            from webui.pipeline.init_image import Outpaint

            fields["outpaint"] = Outpaint.parse(a.outpaint).sizes()
    if a.controlnet:
        fields["controlnet"] = [{"model": a.controlnet, "module": a.control_module, "weight": a.control_weight,
                                 "image": read(a.control_image) if a.control_image else None}]
    elif a.control_image:
        raise ValueError("--control-image needs --controlnet (the model that reads it)")
    fields["script_name"], fields["script_args"] = a.script_name, _script_args(a)
    request = GenerationRequest(styles=tuple(a.styles), checkpoint=a.ckpt, **fields)
    engine = build_engine(config)
    engine.check(request)  # what the page and the API check too, with the same messages
    result = engine.run(request)
    for p in result.paths:
        print(p)
    return 0


def _script_args(a: argparse.Namespace) -> dict[str, Any]:
    """--script-args (JSON object) with the X/Y/Z axis flags on top."""
    args: dict[str, Any] = {}
    if a.script_args:
        try:
            args = json.loads(a.script_args)
        except ValueError as err:
            raise ValueError(f"--script-args: not JSON ({err})") from None
        if not isinstance(args, dict):
            raise ValueError('--script-args: a JSON object of argument names, e.g. {"loops": 3}')
    for axis in "xyz":
        for part in ("type", "values"):
            if (value := getattr(a, f"{axis}_{part}", None)) is not None:
                args[f"{axis}_{part}"] = value
    if args and not a.script_name:
        raise ValueError("--script-args and --x-type/--x-values need --script")
    return args


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from webui.models.errors import ModelError

    try:
        config = config_from_args(a)
        if a.command in ("txt2img", "img2img"):
            return _generate(a, config)
        from webui.server import serve

        serve(config)
        return 0
    except ValidationError as e:
        from webui.pipeline.request import validation_message

        print(f"error: {validation_message(e)}", file=sys.stderr)
    except (ModelError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
