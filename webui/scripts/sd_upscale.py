"""SD upscale (img2img): upscale the init image by `scale_factor` with an upscaler, then run
img2img over it in overlapping tiles of the request's width x height, and blend the tiles back
with linear ramps across the overlaps (the same blending Extras' tiled upscaling uses), so the
image gains detail at a size the model could not render in one piece."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field

from webui.infotext import add_fields
from webui.pipeline.request import MAX_SEED, GenerationRequest
from webui.pipeline.state import GenerationResult
from webui.scripts.base import Script, ScriptContext, ScriptEnv
from webui.upscale.tiles import tile_starts, tile_weight


class SdUpscaleArgs(BaseModel):
    info: str | None = None  # A1111's first argument is its help text
    overlap: int = Field(64, ge=0, le=256)
    upscaler_index: int | str = "Lanczos"  # an index into /sdapi/v1/upscalers, or a name
    scale_factor: float = Field(2.0, ge=1.0, le=4.0)


def tiles(width: int, height: int, tile_w: int, tile_h: int, overlap: int) -> list[tuple[int, int]]:
    """(left, top) of every tile, row by row."""
    return [(x, y) for y in tile_starts(height, tile_h, overlap) for x in tile_starts(width, tile_w, overlap)]


def blend(pieces: list[Image.Image], origins: list[tuple[int, int]], size: tuple[int, int],
          overlap: int) -> Image.Image:
    """The tiles put back together, ramped across the overlaps."""
    w, h = size
    out = torch.zeros(h, w, 3)
    weight = torch.zeros(h, w, 1)
    for piece, (x0, y0) in zip(pieces, origins):
        pw, ph = piece.size
        ov = min(overlap, pw // 2, ph // 2)
        mask = tile_weight(ph, pw, ov, top=y0 > 0, bottom=y0 + ph < h, left=x0 > 0, right=x0 + pw < w)[..., None]
        out[y0:y0 + ph, x0:x0 + pw] += torch.from_numpy(np.asarray(piece.convert("RGB"), dtype=np.float32)) * mask
        weight[y0:y0 + ph, x0:x0 + pw] += mask
    return Image.fromarray(out.div_(weight).round_().clamp_(0, 255).to(torch.uint8).numpy())


class SdUpscale(Script):
    title = "SD upscale"
    args_model = SdUpscaleArgs
    positional = ("info", "overlap", "upscaler_index", "scale_factor")
    tabs = ("img2img",)

    hidden = ("info",)

    def choices(self, tab: str, env: ScriptEnv) -> dict[str, list[str]]:
        return {"upscaler_index": ["None", *env.upscalers()]}

    def _upscaler(self, args: SdUpscaleArgs, env: ScriptEnv) -> str:
        names = ["None", *env.upscalers()]  # A1111's list starts with "None"
        if isinstance(args.upscaler_index, int):
            if not 0 <= args.upscaler_index < len(names):
                raise ValueError(f"SD upscale: upscaler_index {args.upscaler_index} is out of range "
                                 f"(0-{len(names) - 1}: {', '.join(names)})")
            return names[args.upscaler_index]
        found = next((n for n in names if n.lower() == args.upscaler_index.strip().lower()), None)
        if found is None:
            raise ValueError(f"SD upscale: unknown upscaler {args.upscaler_index!r} (available: {', '.join(names)})")
        return found

    def _layout(self, request: GenerationRequest, args: SdUpscaleArgs) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        source = request.init_images[0]
        size = (round(source.width * args.scale_factor), round(source.height * args.scale_factor))
        tile_w, tile_h = min(request.width, size[0]), min(request.height, size[1])
        if args.overlap * 2 >= min(tile_w, tile_h):
            raise ValueError(f"SD upscale: tile overlap {args.overlap} must be under half the tile "
                             f"({tile_w}x{tile_h}, the request's width and height)")
        return size, tiles(size[0], size[1], tile_w, tile_h, args.overlap)

    def plan(self, request: GenerationRequest, args: SdUpscaleArgs, env: ScriptEnv) -> list[GenerationRequest]:
        if not request.is_img2img:
            raise ValueError("SD upscale needs an init image (img2img)")
        self._upscaler(args, env)
        size, origins = self._layout(request, args)
        tile_w, tile_h = min(request.width, size[0]) // 8 * 8, min(request.height, size[1]) // 8 * 8
        seed = request.seed if request.seed != -1 else random.randint(0, MAX_SEED)
        # each tile of each of n_iter images: one img2img of the tile's size, no mask, one image
        return [request.derive(width=tile_w, height=tile_h, seed=seed + i, batch_size=1, n_iter=1, mask=None,
                               outpaint=None, script_name="", script_args=[])
                for i in range(request.n_iter) for _ in origins]

    def run(self, ctx: ScriptContext, request: GenerationRequest, args: SdUpscaleArgs,
            env: ScriptEnv) -> GenerationResult:
        planned = self.plan(request, args, env)
        ctx.expect(planned)
        upscaler = self._upscaler(args, env)
        size, origins = self._layout(request, args)
        source = request.init_images[0].convert("RGB")
        big = source.resize(size, Image.Resampling.LANCZOS) if upscaler == "None" else ctx.upscale(source, upscaler, size)
        out = GenerationResult([], [], [], [], [])
        k = 0
        for image_no in range(request.n_iter):
            pieces = []
            for x0, y0 in origins:
                if ctx.interrupted:
                    out.interrupted = True
                    return out
                tile_req = planned[k]
                crop = big.crop((x0, y0, x0 + tile_req.width, y0 + tile_req.height))
                result = ctx.generate(tile_req.derive(init_images=(crop,), save_images=False), k, len(planned))
                k += 1
                pieces.append(result.images[0] if result.images else crop)
            image = blend(pieces, origins, size, args.overlap)
            first = planned[image_no * len(origins)]
            info = add_fields(result.infotexts[0] if result.infotexts else "", {
                "Script": self.title, "Size": f"{size[0]}x{size[1]}", "SD upscale overlap": args.overlap,
                "SD upscale upscaler": upscaler})
            path = ctx.save_image(image, "img2img", info, first.seed) if request.save_images else None
            out.images.append(image)
            out.seeds.append(first.seed)
            out.subseeds.append(first.subseed)
            out.infotexts.append(info)
            if path:
                out.paths.append(path)
        return out

