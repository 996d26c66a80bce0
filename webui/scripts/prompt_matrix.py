"""Prompt matrix: `a cat | in a hat | at night` makes every combination of the optional parts
(after the first `|`) with the fixed first part -- 2^(n-1) images -- and a grid labelled with
which parts each image has."""

from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, Field

from webui.pipeline.request import MAX_SEED, GenerationRequest
from webui.pipeline.state import GenerationResult
from webui.scripts.base import Script, ScriptContext, ScriptEnv, combine, kind_of
from webui.scripts.grid import annotate, image_grid

MAX_PARTS = 10  # 512 images


class PromptMatrixArgs(BaseModel):
    put_at_start: bool = False  # the optional parts before the fixed one
    different_seeds: bool = False  # each combination its own seed
    prompt_type: Literal["positive", "negative"] = "positive"  # which prompt holds the `|` parts
    variations_delimiter: Literal["comma", "space"] = "comma"
    margin_size: int = Field(0, ge=0, le=500)


def _parts(text: str) -> list[str]:
    return [p.strip() for p in text.split("|")]


class PromptMatrix(Script):
    title = "Prompt matrix"
    args_model = PromptMatrixArgs
    positional = tuple(PromptMatrixArgs.model_fields)

    def plan(self, request: GenerationRequest, args: PromptMatrixArgs, env: ScriptEnv) -> list[GenerationRequest]:
        field = "prompt" if args.prompt_type == "positive" else "negative_prompt"
        parts = _parts(getattr(request, field))
        if len(parts) < 2:
            raise ValueError(f"Prompt matrix: the {args.prompt_type} prompt needs parts separated by | "
                             "(e.g. a cat | in a hat | at night)")
        if len(parts) - 1 > MAX_PARTS:
            raise ValueError(f"Prompt matrix: at most {MAX_PARTS} optional parts ({2 ** MAX_PARTS} images)")
        fixed, optional = parts[0], parts[1:]
        sep = ", " if args.variations_delimiter == "comma" else " "
        seed = request.seed if request.seed != -1 else random.randint(0, MAX_SEED)
        cells = []
        for combo in range(2 ** len(optional)):
            chosen = [p for bit, p in enumerate(optional) if combo >> bit & 1]
            text = sep.join([*chosen, fixed] if args.put_at_start else [fixed, *chosen])
            cells.append(request.derive(**{field: text, "seed": seed + combo if args.different_seeds else seed,
                                           "script_name": "", "script_args": []}))
        return cells

    def run(self, ctx: ScriptContext, request: GenerationRequest, args: PromptMatrixArgs,
            env: ScriptEnv) -> GenerationResult:
        cells = self.plan(request, args, env)
        results = ctx.generate_all(cells)
        made = combine(results)
        firsts = [r.images[0] for r in results if r.images]
        if len(firsts) < len(cells):
            made.interrupted = True
            return made
        field = "prompt" if args.prompt_type == "positive" else "negative_prompt"
        optional = _parts(getattr(request, field))[1:]
        cols_bits = (len(optional) + 1) // 2  # the low bits vary along a row, the high bits down a column
        cols, rows = 2 ** cols_bits, 2 ** (len(optional) - cols_bits)

        def label(bits: int, parts: list[str]) -> str:
            return "\n".join(("+ " if bits >> i & 1 else "- ") + p for i, p in enumerate(parts))

        w, h = firsts[0].size
        grid = image_grid(firsts, rows=rows, margin=args.margin_size)
        grid = annotate(grid, w, h, [label(c, optional[:cols_bits]) for c in range(cols)],
                        [label(r, optional[cols_bits:]) for r in range(rows)] if rows > 1 else [], args.margin_size)
        from webui.infotext import add_fields

        info = add_fields(results[0].infotexts[0], {"Script": self.title})
        path = ctx.save_grid(grid, kind_of(request), info, results[0].seeds[0])
        return GenerationResult([grid, *made.images], [made.seeds[0], *made.seeds],
                                [made.subseeds[0], *made.subseeds], [info, *made.infotexts],
                                ([path] if path else []) + made.paths, grids=1)
