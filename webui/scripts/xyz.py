"""X/Y/Z plot: one generation per combination of up to three axes' values, laid out as a
labelled grid (one X x Y grid per Z value, side by side).

The axis list is A1111 1.10's, in its order, because A1111's API clients pick an axis by its
index in that list (`script_args[0]`), filtered by tab; axes with nothing to change here are
listed and refused with a reason when chosen. An axis may also be named by its label.
Extensions add axes through the `xyz_axes` hook; they come after the built-in ones.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from webui.pipeline.request import MAX_SEED, GenerationRequest
from webui.pipeline.state import GenerationResult
from webui.scripts.base import Script, ScriptContext, ScriptEnv, combine, kind_of
from webui.scripts.grid import annotate, image_grid
from webui.scripts.values import parse_values

Apply = Callable[[dict[str, Any], Any], None]  # (request fields, value) -> changes the fields


@dataclass(frozen=True)
class Axis:
    label: str
    kind: type  # int, float or str
    apply: Apply | None  # None: listed for A1111's indices, not supported here
    tab: str | None = None  # "txt2img" / "img2img": only on that tab
    why: str = ""  # why an unsupported axis is not


def _field(name: str) -> Apply:
    def apply(fields: dict[str, Any], value: Any) -> None:
        fields[name] = value

    return apply


def _optional_name(name: str) -> Apply:
    def apply(fields: dict[str, Any], value: Any) -> None:
        fields[name] = None if str(value).strip().lower() in ("", "none") else value

    return apply


def _styles(fields: dict[str, Any], value: Any) -> None:
    fields["styles"] = (*fields.get("styles", ()), *[s.strip() for s in str(value).split(",") if s.strip()])


def _size(fields: dict[str, Any], value: Any) -> None:
    try:
        w, h = (int(v) for v in str(value).lower().replace(" ", "").split("x"))
    except ValueError:
        raise ValueError(f"Size: {value!r} is not WIDTHxHEIGHT (e.g. 512x768)") from None
    fields["width"], fields["height"] = w, h


def _none(why: str) -> dict[str, Any]:
    return {"apply": None, "why": why}


_NO_OVERRIDE = "this app has no such setting"
AXES: tuple[Axis, ...] = (
    Axis("Nothing", str, lambda fields, value: None),
    Axis("Seed", int, _field("seed")),
    Axis("Var. seed", int, _field("subseed")),
    Axis("Var. strength", float, _field("subseed_strength")),
    Axis("Steps", int, _field("steps")),
    Axis("Hires steps", int, _field("hr_second_pass_steps"), tab="txt2img"),
    Axis("CFG Scale", float, _field("cfg_scale")),
    Axis("Image CFG Scale", float, tab="img2img", **_none("only instruct-pix2pix models use it")),
    Axis("Prompt S/R", str, None),  # handled in plan(): it needs the whole list
    Axis("Prompt order", str, None),  # idem
    Axis("Sampler", str, _field("sampler_name"), tab="txt2img"),
    Axis("Hires sampler", str, _field("hr_sampler_name"), tab="txt2img"),
    Axis("Sampler", str, _field("sampler_name"), tab="img2img"),
    Axis("Checkpoint name", str, _field("checkpoint")),
    Axis("Negative Guidance minimum sigma", float, **_none(_NO_OVERRIDE)),
    Axis("Sigma Churn", float, _field("s_churn")),
    Axis("Sigma min", float, _field("s_tmin")),
    Axis("Sigma max", float, _field("s_tmax")),
    Axis("Sigma noise", float, _field("s_noise")),
    Axis("Schedule type", str, _field("scheduler")),
    Axis("Schedule min sigma", float, **_none(_NO_OVERRIDE)),
    Axis("Schedule max sigma", float, **_none(_NO_OVERRIDE)),
    Axis("Schedule rho", float, **_none(_NO_OVERRIDE)),
    Axis("Skip Early CFG", float, **_none(_NO_OVERRIDE)),
    Axis("Beta schedule alpha", float, **_none(_NO_OVERRIDE)),
    Axis("Beta schedule beta", float, **_none(_NO_OVERRIDE)),
    Axis("Eta", float, _field("eta")),
    Axis("Clip skip", int, _field("clip_skip")),
    Axis("Denoising", float, _field("denoising_strength")),
    Axis("Initial noise multiplier", float, **_none(_NO_OVERRIDE)),
    Axis("Extra noise", float, **_none(_NO_OVERRIDE)),
    Axis("Hires upscaler", str, _field("hr_upscaler"), tab="txt2img"),
    Axis("Cond. Image Mask Weight", float, tab="img2img", **_none(_NO_OVERRIDE)),
    Axis("VAE", str, **_none("the VAE is a server setting here (Settings, or --vae), not per request")),
    Axis("Styles", str, _styles),
    Axis("UniPC Order", int, **_none("the UniPC order is fixed here")),
    Axis("Face restore", str, **_none("face restoration is not available yet")),
    Axis("Token merging ratio", float, **_none("token merging is not available yet")),
    Axis("Token merging ratio high-res", float, **_none("token merging is not available yet")),
    Axis("Always discard next-to-last sigma", str, **_none(_NO_OVERRIDE)),
    Axis("SGM noise multiplier", str, **_none(_NO_OVERRIDE)),
    Axis("Refiner checkpoint", str, _optional_name("refiner_checkpoint")),
    Axis("Refiner switch at", float, _field("refiner_switch_at")),
    Axis("RNG source", str, **_none("noise is always drawn on the CPU here (A1111's \"CPU\")")),
    Axis("FP8 mode", str, **_none(_NO_OVERRIDE)),
    Axis("Size", str, _size),
)
NOTHING = AXES[0]
SEED_AXES = ("Seed", "Var. seed")
# labels that change only the first pass's prompt text, computed from the whole value list
PROMPT_AXES = ("Prompt S/R", "Prompt order")


def axes_for(tab: str, extension_axes: list[Any] = ()) -> list[Axis]:  # type: ignore[assignment]
    """The axes of `tab` in A1111's order (its `x_type` indices), then the extensions'."""
    own = [a for a in AXES if a.tab in (None, tab)]
    return own + [Axis(a.label, a.kind, a.apply) for a in extension_axes]


class XyzArgs(BaseModel):
    x_type: int | str = "Seed"  # A1111's index into its axis list for the tab, or the label
    x_values: str = ""
    x_values_dropdown: list[Any] = Field(default_factory=list)
    y_type: int | str = "Nothing"
    y_values: str = ""
    y_values_dropdown: list[Any] = Field(default_factory=list)
    z_type: int | str = "Nothing"
    z_values: str = ""
    z_values_dropdown: list[Any] = Field(default_factory=list)
    draw_legend: bool = True
    include_lone_images: bool = False
    include_sub_grids: bool = False
    no_fixed_seeds: bool = False  # "Keep -1 for seeds"
    vary_seeds_x: bool = False
    vary_seeds_y: bool = False
    vary_seeds_z: bool = False
    margin_size: int = Field(0, ge=0, le=500)
    csv_mode: bool = False


@dataclass(frozen=True)
class AxisValues:
    axis: Axis
    text: str  # as given (written into the grid's infotext)
    values: list[Any]
    labels: list[str]


def _label(axis: Axis, value: Any) -> str:
    if axis is NOTHING:
        return ""
    if isinstance(value, float):
        value = f"{value:g}"
    return f"{axis.label}: {value}"


def _prompt_values(axis: Axis, values: list[str], request: GenerationRequest) -> list[Apply]:
    """Prompt S/R: the first value is searched for in the prompts and each value put in its
    place. Prompt order: every ordering of the values, which must all be in the prompt."""
    prompt, negative = request.prompt, request.negative_prompt
    if axis.label == "Prompt S/R":
        if not values:
            raise ValueError("Prompt S/R: give the text to replace first, then its replacements")
        search = values[0]
        if search not in prompt and search not in negative:
            raise ValueError(f"Prompt S/R: {search!r} is not in the prompt or the negative prompt")

        def replace(value: str) -> Apply:
            def apply(fields: dict[str, Any], _: Any) -> None:
                fields["prompt"] = fields["prompt"].replace(search, value)
                fields["negative_prompt"] = fields["negative_prompt"].replace(search, value)

            return apply

        return [replace(v) for v in values]
    missing = [v for v in values if v not in prompt]
    if missing:
        raise ValueError(f"Prompt order: {missing[0]!r} is not in the prompt")
    tokens = sorted(values, key=prompt.index)

    def order(permutation: tuple[str, ...]) -> Apply:
        def apply(fields: dict[str, Any], _: Any) -> None:
            text, out, start = fields["prompt"], "", 0
            for token, new in zip(tokens, permutation):  # each token's place gets the next of this order
                at = text.index(token, start)
                out += text[start:at] + new
                start = at + len(token)
            fields["prompt"] = out + text[start:]

        return apply

    return [order(p) for p in itertools.permutations(values)]


class XyzPlot(Script):
    title = "X/Y/Z plot"
    args_model = XyzArgs
    positional = tuple(XyzArgs.model_fields)

    hidden = ("x_values_dropdown", "y_values_dropdown", "z_values_dropdown", "csv_mode")

    def choices(self, tab: str, env: ScriptEnv) -> dict[str, list[str]]:
        labels = [a.label for a in axes_for(tab, env.axes()) if a.apply is not None or a.label in PROMPT_AXES]
        return {"x_type": labels, "y_type": labels, "z_type": labels}

    def _axes(self, request: GenerationRequest, args: XyzArgs, env: ScriptEnv) -> list[AxisValues]:
        available = axes_for(kind_of(request), env.axes())
        out = []
        for name in ("x", "y", "z"):
            chosen = getattr(args, f"{name}_type")
            if isinstance(chosen, int):
                if not 0 <= chosen < len(available):
                    raise ValueError(f"script_args: {name}_type {chosen} is not an axis index (0-{len(available) - 1})")
                axis = available[chosen]
            else:
                axis = next((a for a in available if a.label.lower() == chosen.strip().lower()), None)
                if axis is None:
                    raise ValueError(f"script_args: {name}_type: no axis {chosen!r} on {kind_of(request)} "
                                     f"(axes: {', '.join(a.label for a in available)})")
            if axis is NOTHING:
                out.append(AxisValues(axis, "", [None], [""]))
                continue
            if axis.apply is None and axis.label not in PROMPT_AXES:
                raise ValueError(f"{name.upper()} axis {axis.label!r} is not supported here: {axis.why}")
            dropdown = getattr(args, f"{name}_values_dropdown")
            text = getattr(args, f"{name}_values")
            if dropdown and not args.csv_mode:
                values = [axis.kind(v) for v in dropdown]
                text = ", ".join(str(v) for v in dropdown)
            else:
                try:
                    values = parse_values(text, axis.kind)
                except ValueError as err:
                    raise ValueError(f"{name.upper()} values ({axis.label}): {err}") from None
            if not values:
                raise ValueError(f"{name.upper()} values ({axis.label}): none given")
            if axis.label in SEED_AXES and not args.no_fixed_seeds:
                values = [random.randint(0, MAX_SEED) if v == -1 else v for v in values]
            if axis.label == "Prompt order":
                labels = [", ".join(p) for p in itertools.permutations(values)]
                out.append(AxisValues(axis, text, _prompt_values(axis, values, request), labels))
            elif axis.label == "Prompt S/R":
                out.append(AxisValues(axis, text, _prompt_values(axis, values, request), values))
            else:
                out.append(AxisValues(axis, text, values, [_label(axis, v) for v in values]))
        return out

    def _cells(self, request: GenerationRequest, args: XyzArgs, axes: list[AxisValues]) -> list[GenerationRequest]:
        """One request per cell, X fastest, then Y, then Z (the grid's order)."""
        xs, ys, zs = axes
        base_seed = request.seed if request.seed != -1 or args.no_fixed_seeds else random.randint(0, MAX_SEED)
        cells = []
        template = request.model_dump(exclude={"init_images", "mask", "script_name", "script_args"})
        total = len(xs.values) * len(ys.values) * len(zs.values)
        for iz, iy, ix in itertools.product(range(len(zs.values)), range(len(ys.values)), range(len(xs.values))):
            fields: dict[str, Any] = {**template, "seed": base_seed, "script_name": "", "script_args": []}
            if base_seed != -1:
                fields["seed"] = base_seed + (ix if args.vary_seeds_x else 0) + \
                    (iy * len(xs.values) if args.vary_seeds_y else 0) + \
                    (iz * len(xs.values) * len(ys.values) if args.vary_seeds_z else 0)
            try:
                for av, i in ((xs, ix), (ys, iy), (zs, iz)):
                    value = av.values[i]
                    if av.axis.label in PROMPT_AXES:
                        value(fields, None)
                    elif av.axis.apply is not None:
                        av.axis.apply(fields, value)
                cells.append(request.derive(**fields))
            except ValueError as err:
                raise ValueError(f"{self.title}, image {len(cells) + 1} of {total}: {err}") from None
        return cells

    def plan(self, request: GenerationRequest, args: XyzArgs, env: ScriptEnv) -> list[GenerationRequest]:
        return self._cells(request, args, self._axes(request, args, env))

    def run(self, ctx: ScriptContext, request: GenerationRequest, args: XyzArgs, env: ScriptEnv) -> GenerationResult:
        axes = self._axes(request, args, env)
        xs, ys, zs = axes
        cells = self._cells(request, args, axes)
        # cells that share a model run together (a model switch costs a load), then go back to grid order
        order = sorted(range(len(cells)), key=lambda i: (cells[i].checkpoint or "", cells[i].refiner_checkpoint or ""))
        done = ctx.generate_all([cells[i] for i in order])
        if len(done) < len(cells) or not all(r.images for r in done):  # interrupted: what was made, no grid
            made = combine(done)
            made.interrupted = True
            return made
        results = [done[order.index(i)] for i in range(len(cells))]
        made = combine(results)
        firsts = [r.images[0] for r in results]  # a cell's first image is its grid cell
        per_grid = len(xs.values) * len(ys.values)
        w, h = firsts[0].size
        sub_grids = []
        for iz in range(len(zs.values)):
            grid = image_grid(firsts[iz * per_grid:(iz + 1) * per_grid], rows=len(ys.values), margin=args.margin_size)
            if args.draw_legend:
                grid = annotate(grid, w, h, xs.labels if xs.axis is not NOTHING else [],
                                ys.labels if ys.axis is not NOTHING else [], args.margin_size)
            sub_grids.append(grid)
        grid = sub_grids[0]
        if len(sub_grids) > 1:
            grid = image_grid(sub_grids, rows=1, margin=args.margin_size)
            if args.draw_legend:
                grid = annotate(grid, sub_grids[0].width, sub_grids[0].height, zs.labels, [], args.margin_size)
        first = results[0]
        info = self._grid_infotext(first.infotexts[0], axes, args)
        kind = kind_of(request)
        path = ctx.save_grid(grid, kind, info, first.seeds[0])
        out = GenerationResult([grid], [first.seeds[0]], [first.subseeds[0]], [info], [path] if path else [],
                               grids=1)
        if args.include_sub_grids and len(sub_grids) > 1:
            for iz, sub in enumerate(sub_grids):
                out.images.append(sub)
                out.seeds.append(results[iz * per_grid].seeds[0])
                out.subseeds.append(results[iz * per_grid].subseeds[0])
                out.infotexts.append(self._grid_infotext(results[iz * per_grid].infotexts[0], axes[:2], args))
                out.grids += 1
        if args.include_lone_images:
            out.images += made.images
            out.seeds += made.seeds
            out.subseeds += made.subseeds
            out.infotexts += made.infotexts
        out.paths += made.paths
        out.interrupted = made.interrupted
        return out

    def _grid_infotext(self, cell_infotext: str, axes: list[AxisValues], args: XyzArgs) -> str:
        """The first cell's parameters plus what makes the grid: `Script`, each axis's type and
        values (and the fixed seeds a -1 became), as A1111 writes them."""
        from webui.infotext import add_fields

        extra: dict[str, str] = {"Script": self.title}
        for name, av in zip("XYZ", axes):
            if av.axis is NOTHING:
                continue
            extra[f"{name} Type"] = av.axis.label
            extra[f"{name} Values"] = av.text
            if av.axis.label in SEED_AXES and not args.no_fixed_seeds:
                extra[f"Fixed {name} Values"] = ", ".join(str(v) for v in av.values)
        return add_fields(cell_infotext, extra)
