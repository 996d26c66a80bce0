"""Loopback (img2img): each result becomes the next init image, `loops` times, the denoising
strength moving from the request's towards `final_denoising_strength` on a chosen curve."""

from __future__ import annotations

import math
import random
from typing import Literal

from pydantic import BaseModel, Field

from webui.pipeline.request import MAX_SEED, GenerationRequest
from webui.pipeline.state import GenerationResult
from webui.scripts.base import Script, ScriptContext, ScriptEnv, combine


class LoopbackArgs(BaseModel):
    loops: int = Field(4, ge=1, le=32)
    final_denoising_strength: float = Field(0.5, ge=0.0, le=1.0)
    denoising_curve: Literal["Aggressive", "Linear", "Lazy"] = "Linear"


def strengths(start: float, final: float, loops: int, curve: str) -> list[float]:
    """The denoising strength of each loop: `start` first, `final` last; Aggressive moves most
    at the start, Lazy at the end."""
    if loops == 1:
        return [start]
    out = []
    for i in range(loops):
        t = i / (loops - 1)
        if curve == "Aggressive":
            t = math.sin(t * math.pi / 2)
        elif curve == "Lazy":
            t = 1 - math.cos(t * math.pi / 2)
        out.append(round(start + (final - start) * t, 6))
    return out


class Loopback(Script):
    title = "Loopback"
    args_model = LoopbackArgs
    positional = ("loops", "final_denoising_strength", "denoising_curve")
    tabs = ("img2img",)

    def plan(self, request: GenerationRequest, args: LoopbackArgs, env: ScriptEnv) -> list[GenerationRequest]:
        if not request.is_img2img:
            raise ValueError("Loopback needs an init image (img2img)")
        seed = request.seed if request.seed != -1 else random.randint(0, MAX_SEED)
        return [request.derive(denoising_strength=s, seed=seed + i, n_iter=1, script_name="", script_args=[])
                for i, s in enumerate(strengths(request.denoising_strength, args.final_denoising_strength,
                                                args.loops, args.denoising_curve))]

    def run(self, ctx: ScriptContext, request: GenerationRequest, args: LoopbackArgs,
            env: ScriptEnv) -> GenerationResult:
        loops = self.plan(request, args, env)
        ctx.expect(loops)
        results = []
        images = list(request.init_images)
        for i, planned in enumerate(loops):
            if ctx.interrupted:
                break
            result = ctx.generate(planned.derive(init_images=tuple(images)), i, len(loops))
            results.append(result)
            if not result.images:
                break
            images = [im.convert("RGB") for im in result.images]  # the batch's results feed the next loop
        return combine(results)
