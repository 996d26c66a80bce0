"""`/sdapi/v1/...`: the A1111 HTTP API over the engine and its job queue, plus queued jobs.

Routes are thin: they validate (pydantic), check what needs the registry (model, upscaler
names, size budget), submit to the same job queue the page uses, and shape the answer. Every
bad input answers 4xx with a JSON body naming the field and the reason; the route class below
turns validation errors into that shape for these routes only (the page's routes keep theirs).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image

import webui
from webui import extras
from webui.api.a1111 import option_defaults
from webui.api.models import (
    ExtrasBatchImagesBody,
    ExtrasBatchImagesResponse,
    ExtrasOptions,
    ExtrasSingleImageBody,
    ExtrasSingleImageResponse,
    GenerationBody,
    GenerationResponse,
    InterrogateBody,
    JobBody,
    JobStatus,
    PngInfoBody,
    PngInfoResponse,
    ProgressResponse,
    ProgressState,
)
from webui.app import Engine
from webui.images import png_bytes, read_infotext
from webui.infotext import parse_infotext
from webui.jobs.queue import Job
from webui.models.errors import ModelError
from webui.pipeline.request import GenerationRequest
from webui.samplers.table import SAMPLERS, SCHEDULES

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PREFIX = "/sdapi/v1"


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message, "detail": message}
    if field:
        body["field"] = field
    return JSONResponse(status_code=status, content=body)


class ApiRoute(APIRoute):
    """Validation errors as `{"error", "detail", "errors": [{"field", "message"}]}` (422), without
    echoing the input back (it may be a megabyte of base64)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as e:
                errors = []
                for err in e.errors():
                    loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
                    errors.append({"field": ".".join(loc) or "body",
                                   "message": str(err.get("msg", "invalid")).replace("Value error, ", "")})
                text = "; ".join(f"{x['field']}: {x['message']}" for x in errors)
                return JSONResponse(status_code=422, content={"error": text, "detail": text, "errors": errors})
            except HTTPException as e:
                text = str(e.detail)
                return JSONResponse(status_code=e.status_code, content={"error": text, "detail": text},
                                    headers=e.headers)

        return handle


def basic_auth(users: tuple[tuple[str, str], ...]) -> Callable:
    """HTTP Basic over `users`; a no-op dependency when there are none."""
    security = HTTPBasic(auto_error=False)

    def check(credentials: HTTPBasicCredentials | None = Depends(security)) -> None:
        if not users:
            return
        if credentials is not None:
            for user, password in users:
                ok_user = secrets.compare_digest(credentials.username.encode(), user.encode())
                ok_pass = secrets.compare_digest(credentials.password.encode(), password.encode())
                if ok_user and ok_pass:
                    return
        raise HTTPException(status_code=401, detail="authentication required",
                            headers={"WWW-Authenticate": "Basic"})

    return check


def _b64(image: Image.Image, infotext: str | None = None) -> str:
    return base64.b64encode(png_bytes(image, infotext)).decode("ascii")


# A1111's option names for settings we name otherwise (read and written under both names)
OPTION_ALIASES = {"sd_checkpoint_cache": "ckpt_cache", "sd_checkpoints_limit": "model_cache_size",
                  "samples_filename_pattern": "filename_pattern"}
# A1111 option values that our settings spell otherwise
OPTION_VALUES = {("samples_format", "jpg"): "jpeg"}
# read-only facts in A1111's option list: accepted in a POST (clients send back what GET gave), never stored
DERIVED_OPTIONS = {"sd_checkpoint_hash"}


class Api:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.config = engine.config

    # --- checks before a job is queued -------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        """The engine's check (the page and the CLI make the same), as HTTP answers: a checkpoint
        named but not found 404, none at all 409, anything else 422."""
        try:
            self.engine.check(request)
        except ModelError as err:  # no checkpoint named and none to default to: 409
            default = str(err).startswith("checkpoint: ") and not request.checkpoint
            raise HTTPException(409 if default else 404, str(err)) from None
        except ValueError as err:
            raise HTTPException(422, str(err)) from None

    def upscale(self, images: list[Image.Image], body: ExtrasOptions) -> tuple[list[Image.Image], list[str], str]:
        """`images` through the Extras stage (a job on the queue): the images, each one's infotext,
        and the info line (with the notes)."""
        second = body.upscaler_2 if body.upscaler_2 != "None" and body.extras_upscaler_2_visibility > 0 else None
        how = extras.Upscale(body.upscaler_1, scale=body.upscaling_resize,
                             size=(body.upscaling_resize_w, body.upscaling_resize_h) if body.resize_mode == 1 else None,
                             second=second, visibility=body.extras_upscaler_2_visibility,
                             gfpgan_visibility=body.gfpgan_visibility, codeformer_visibility=body.codeformer_visibility,
                             codeformer_weight=body.codeformer_weight)
        try:
            result = extras.run(self.engine, images, how, save=False, owner="api")
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        except RuntimeError as err:
            raise HTTPException(500, str(err)) from None
        info = how.infotext(result.images[0]) if result.images else ""
        return result.images, result.infotexts, "; ".join([info, *body.notes])

    def options(self) -> dict[str, Any]:
        """GET /options: every key A1111's has (its default where we have no such setting, the value
        a client stored otherwise), our settings under their names and A1111's, the current model."""
        e, cfg = self.engine, self.config
        defaults = option_defaults()
        try:
            current = e.resolve_checkpoint(None)
        except ModelError:
            current = None
        stored = e.settings.stored()
        settings = e.settings.get().model_dump(mode="json")
        return {
            **defaults,
            **{k: v for k, v in stored.items() if k in defaults},
            **settings,
            **{a1111: settings[ours] for a1111, ours in OPTION_ALIASES.items()},
            # each extension's Settings section, under its name
            **{name: e.settings.section(name).model_dump(mode="json") for name in e.settings.sections()},
            "sd_model_checkpoint": current.title if current else None,
            "sd_checkpoint_hash": current.sha256 if current else None,
            "sd_vae": stored.get("sd_vae", cfg.vae or "Automatic"),
        }

    def set_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """POST /options: A1111's keys and ours. Ours are validated and applied (all or nothing),
        `sd_model_checkpoint` switches the model now, other A1111 keys are stored and reported as
        not applied; a key neither app has answers 422 and nothing changes."""
        e = self.engine
        setting_keys = set(type(e.settings.get()).model_fields)
        a1111_keys = set(option_defaults())
        section_names = set(e.settings.sections())
        sections = {k: v for k, v in options.items() if k in section_names}
        options = {k: v for k, v in options.items() if k not in section_names}
        unknown = sorted(k for k in options if OPTION_ALIASES.get(k, k) not in setting_keys
                         and k not in a1111_keys)
        if unknown:
            raise HTTPException(422, f"options not known: {', '.join(unknown)} (neither a setting of this app nor "
                                     "an A1111 option; per-request settings go in override_settings)")
        before = self.options()
        changes = {OPTION_ALIASES.get(k, k): OPTION_VALUES.get((k, v), v) if isinstance(v, str) else v
                   for k, v in options.items() if OPTION_ALIASES.get(k, k) in setting_keys}
        foreign = {k: v for k, v in options.items() if OPTION_ALIASES.get(k, k) not in setting_keys
                   and k not in DERIVED_OPTIONS and k != "sd_model_checkpoint"}
        checkpoint = options.get("sd_model_checkpoint")
        if "sd_model_checkpoint" in options:
            if not isinstance(checkpoint, str) or not checkpoint:
                raise HTTPException(422, "sd_model_checkpoint: a checkpoint title, name or hash")
            try:
                e.registry.find(checkpoint)
            except ModelError as err:
                raise HTTPException(404, f"sd_model_checkpoint: {err}") from None
        notes: list[str] = []
        if changes or sections:
            try:
                _, notes = e.settings.update(changes, sections)
            except ValueError as err:
                raise HTTPException(422, str(err)) from None
        if foreign:
            e.settings.keep_foreign(foreign)
        title = None
        if checkpoint is not None:  # loaded now, as A1111 does (a model already loaded is not read again)
            try:
                title = e.load_checkpoint(checkpoint)
            except ModelError as err:
                raise HTTPException(422, f"sd_model_checkpoint: {err}") from None
        not_applied = sorted(k for k, v in foreign.items() if before.get(k) != v)
        if not_applied:
            notes.append(f"stored, not applied (no such feature here): {', '.join(not_applied)}")
        if title:
            notes.append(f"model: {title}")
        return {"notes": notes, "not_applied": not_applied}

    # --- generation ---------------------------------------------------------------------------

    def submit(self, body: GenerationBody, kind: str) -> tuple[Job, list[str]]:
        try:
            request, notes = body.to_request()
        except ValueError as err:  # a ValidationError after override_settings
            raise HTTPException(422, str(err)) from None
        if kind == "img2img" and not request.is_img2img:
            raise HTTPException(422, "init_images: img2img needs at least one image")
        if kind == "txt2img" and request.is_img2img:
            raise HTTPException(422, "init_images: not used by txt2img (use img2img)")
        if request.mask is not None and request.mask.size != request.init_images[0].size:
            notes.append(f"mask {request.mask.size[0]}x{request.mask.size[1]} resized to the image's "
                         f"{request.init_images[0].size[0]}x{request.init_images[0].size[1]}")
        self.check(request)
        if unknown := self.engine.extensions.unknown_args(request.extensions):
            notes.append(f"alwayson_scripts: ignored (no such argument): {', '.join(unknown)}")
        return self.engine.submit(request, owner="api"), notes

    @staticmethod
    def echo(body: GenerationBody) -> dict[str, Any]:
        """The request as `parameters` echoes it (A1111: every field; images only when asked), made
        when the job is submitted, so a finished job need not keep the decoded images."""
        exclude = {"notes", "a1111_echo"} | (set() if body.include_init_images else {"init_images", "mask"})
        return {**body.a1111_echo, **body.model_dump(mode="json", exclude=exclude)}

    def response(self, job: Job, echo: dict[str, Any], send_images: bool, notes: list[str]) -> GenerationResponse:
        if job.state == "cancelled":
            raise HTTPException(409, "the job was cancelled before it started")
        if job.error:
            raise HTTPException(422 if job.bad_input else 500, job.error)
        result = job.result
        images = [_b64(im, text) for im, text in zip(result.images, result.infotexts)] if send_images else []
        return GenerationResponse(images=images, parameters=echo, info=json.dumps(self.info(job, notes)))

    @staticmethod
    def info(job: Job, notes: list[str]) -> dict[str, Any]:
        r: GenerationRequest = job.request
        result = job.result
        parsed = [parse_infotext(t) for t in result.infotexts]
        first = parsed[0] if parsed else {}
        return {
            "prompt": r.prompt, "negative_prompt": r.negative_prompt,
            "all_prompts": [f["Prompt"] for f in parsed[result.grids:]],
            "all_negative_prompts": [f["Negative prompt"] for f in parsed[result.grids:]],
            "seed": result.seeds[0] if result.seeds else r.seed, "all_seeds": result.seeds[result.grids:],
            "subseed": result.subseeds[0] if result.subseeds else r.subseed,
            "all_subseeds": result.subseeds[result.grids:],
            "subseed_strength": r.subseed_strength, "width": r.width, "height": r.height,
            "sampler_name": r.sampler_name, "scheduler": r.scheduler, "cfg_scale": r.cfg_scale, "steps": r.steps,
            "batch_size": r.batch_size, "restore_faces": "Face restoration" in first,
            "face_restoration_model": first.get("Face restoration"),
            "sd_model_name": first.get("Model"), "sd_model_hash": first.get("Model hash"),
            "sd_vae_name": first.get("VAE"), "seed_resize_from_w": r.seed_resize_from_w,
            "seed_resize_from_h": r.seed_resize_from_h, "denoising_strength": r.denoising_strength,
            "clip_skip": r.clip_skip, "styles": list(r.styles), "index_of_first_image": result.grids,
            "infotexts": result.infotexts, "interrupted": result.interrupted,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
            "version": webui.__version__, "notes": notes,
        }

    def generate(self, body: GenerationBody, kind: str) -> GenerationResponse:
        job, notes = self.submit(body, kind)
        echo = self.echo(body)
        job.done.wait()
        return self.response(job, echo, echo.get("send_images", True), notes)

    # --- progress and jobs --------------------------------------------------------------------

    def progress(self, skip_current_image: bool) -> ProgressResponse:
        jobs = self.engine.jobs
        job = jobs.running
        queued = jobs.queued()
        if job is None or job.progress is None:
            return ProgressResponse(progress=0.0, eta_relative=0.0,
                                    state=ProgressState(job_count=queued + (job is not None)))
        p = job.progress
        image = None if skip_current_image or job.preview is None else _b64(job.preview)
        state = ProgressState(
            job=job.id, job_count=queued + 1, job_no=p.batch, sampling_step=p.step, sampling_steps=p.total_steps,
            interrupted=job.token.interrupted, skipped=job.token.skipped,
            job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        )
        return ProgressResponse(progress=p.fraction, eta_relative=p.eta, state=state, current_image=image,
                                textinfo=f"Step {p.step}/{p.total_steps}")

    def workers(self) -> list[dict]:
        running = {job.worker: job for job in self.engine.jobs.running_jobs()}
        out = []
        for w in self.engine.workers:
            job = running.get(w.name)
            device = None if w.remote else w.runtime.device  # a Ray lane's device is its replica's
            out.append({"name": w.name, "device": str(device) if device else "ray", "busy": job is not None,
                        "job": job.id if job is not None else None,
                        "models": [Path(key[0]).name for key in w.loaded()],
                        "cuda": _cuda(device) if device else None})
        return out

    def job_status(self, job: Job, with_image: bool = True) -> JobStatus:
        p = job.progress
        status = JobStatus(
            id=job.id, type=job.kind, state=job.state, position=self.engine.jobs.position(job), worker=job.worker,
            progress=1.0 if job.state == "done" else (p.fraction if p else 0.0), eta_relative=p.eta if p else 0.0,
            step=p.step if p else 0, steps=p.total_steps if p else 0, error=job.error,
            current_image=_b64(job.preview) if with_image and job.preview is not None and job.state == "running"
            else None,
        )
        if job.state == "done":
            status.result = self.response(job, job.meta["echo"], job.meta["send_images"], job.meta["notes"])
        return status


def build_router(engine: Engine) -> APIRouter:  # noqa: C901  one flat list of small routes
    api = Api(engine)
    cfg = engine.config
    router = APIRouter(prefix=PREFIX, route_class=ApiRoute, tags=["sdapi"])

    @router.post("/txt2img", response_model=GenerationResponse)
    def txt2img(body: GenerationBody) -> GenerationResponse:
        return api.generate(body, "txt2img")

    @router.post("/img2img", response_model=GenerationResponse)
    def img2img(body: GenerationBody) -> GenerationResponse:
        return api.generate(body, "img2img")

    @router.post("/jobs", response_model=JobStatus, status_code=202)
    def submit_job(body: JobBody) -> JobStatus:
        """Queue a txt2img or img2img job (`type`); answers at once with its id."""
        job, notes = api.submit(body, body.type)
        job.meta.update(echo=api.echo(body), send_images=body.send_images, notes=notes)
        return api.job_status(job, with_image=False)

    @router.get("/jobs/{job_id}", response_model=JobStatus)
    def get_job(job_id: str) -> JobStatus:
        job = engine.jobs.get(job_id)
        if job is None or "echo" not in job.meta:
            raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept {cfg.job_retention_s:g}s)")
        return api.job_status(job)

    @router.delete("/jobs/{job_id}", response_model=JobStatus)
    def cancel_job(job_id: str) -> JobStatus:
        """Cancel that job only: dropped if queued, interrupted (keeping what is done) if running."""
        job = engine.jobs.get(job_id)
        if job is None or "echo" not in job.meta:
            raise HTTPException(404, f"no job {job_id!r}")
        engine.jobs.cancel(job)
        return api.job_status(job, with_image=False)

    @router.get("/progress", response_model=ProgressResponse)
    def progress(skip_current_image: bool = False) -> ProgressResponse:
        return api.progress(skip_current_image)

    @router.post("/interrupt")
    def interrupt() -> dict:
        """Interrupt what runs now (every worker's job); DELETE /jobs/{id} stops one job only."""
        jobs = engine.jobs.running_jobs()
        for job in jobs:
            job.token.interrupt()
        return {"interrupted": jobs[0].id if jobs else None, "jobs": [job.id for job in jobs]}

    @router.post("/skip")
    def skip() -> dict:
        jobs = engine.jobs.running_jobs()
        for job in jobs:
            job.token.skip()
        return {"skipped": jobs[0].id if jobs else None, "jobs": [job.id for job in jobs]}

    @router.post("/extra-single-image", response_model=ExtrasSingleImageResponse)
    def extra_single_image(body: ExtrasSingleImageBody) -> ExtrasSingleImageResponse:
        (out,), (text,), note = api.upscale([body.image], body)
        return ExtrasSingleImageResponse(html_info=note, image=_b64(out, text))

    @router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse)
    def extra_batch_images(body: ExtrasBatchImagesBody) -> ExtrasBatchImagesResponse:
        out, texts, note = api.upscale([item.data for item in body.imageList], body)
        return ExtrasBatchImagesResponse(html_info=note, images=[_b64(im, t) for im, t in zip(out, texts)])

    @router.post("/png-info", response_model=PngInfoResponse)
    def png_info(body: PngInfoBody) -> PngInfoResponse:
        if body.image is None:
            return PngInfoResponse(info="", items={}, parameters={})
        text = read_infotext(body.image) or ""
        params = parse_infotext(text) if text else {}
        items = {k: v for k, v in body.image.info.items() if isinstance(v, (str, int, float))}
        return PngInfoResponse(info=text, items=items, parameters=params)

    @router.get("/options")
    def get_options() -> dict:
        """Every option A1111 has (its default where this app has no such setting), the Settings
        (as in the Settings tab, also under A1111's names) and the current model."""
        return api.options()

    @router.post("/options")
    def set_options(options: dict[str, Any]) -> dict:
        """Change Settings (saved, applied at once where possible) and `sd_model_checkpoint` (loads
        that model now; requests that name none use it). Other A1111 options are stored and listed
        in `not_applied`. Per-request choices go in `override_settings`."""
        return api.set_options(options)

    @router.get("/sd-models")
    def sd_models() -> list[dict]:
        return [{"title": c.title, "model_name": c.model_name, "hash": c.hash10, "sha256": c.sha256,
                 "filename": str(c.path), "config": None} for c in engine.registry.checkpoints()]

    @router.get("/sd-vae")
    def sd_vae() -> list[dict]:
        return [{"model_name": n, "filename": str(cfg.vae_path / n)} for n in engine.registry.vae_names()]

    @router.get("/samplers")
    def samplers() -> list[dict]:
        extra = engine.extensions.sampler_specs()
        return [{"name": s.name, "aliases": list(s.aliases), "options": {o: "" for o in s.options}}
                for s in (*SAMPLERS, *extra)]

    @router.get("/schedulers")
    def schedulers() -> list[dict]:
        return [{"name": n.lower().replace(" ", "_"), "label": n, "aliases": None, "default_rho": -1,
                 "need_inner_model": False} for n in SCHEDULES]

    @router.get("/upscalers")
    def upscalers() -> list[dict]:
        out = []
        for info in engine.upscalers.entries():
            out.append({"name": info.name, "model_name": info.name if info.path else None,
                        "model_path": str(info.path) if info.path else None, "model_url": None,
                        "scale": _scale_of(info.name)})
        return out

    @router.get("/latent-upscale-modes")
    def latent_modes() -> list[dict]:
        return [{"name": "Latent"}]

    @router.get("/loras")
    def loras() -> list[dict]:
        return [{"name": f.stem, "alias": f.stem, "path": str(f.path), "metadata": engine.networks.metadata(f)}
                for f in engine.networks.loras()]

    @router.get("/few-step")
    def few_step(checkpoint: str | None = None, prompt: str = "") -> dict:
        """The sampler, schedule, steps and CFG a few-step checkpoint, or a LoRA in `prompt`, is made
        for (LCM, Lightning, Hyper-SD, Turbo), as the page's ⚡ button fills them."""
        try:
            found = engine.few_step(checkpoint, prompt)
        except ModelError as err:
            raise HTTPException(404, str(err)) from None
        return {"recognised": True, **found.as_dict()} if found else {"recognised": False}

    @router.get("/embeddings")
    def embeddings() -> dict:
        return {"loaded": {f.stem: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                    "shape": None, "vectors": None} for f in engine.networks.embeddings()},
                "skipped": {}}

    @router.get("/prompt-styles")
    def prompt_styles() -> list[dict]:
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in engine.styles.list()]

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints() -> dict:
        engine.registry.refresh(compute_hashes=True)
        return {}

    @router.post("/refresh-vae")
    def refresh_vae() -> dict:
        engine.registry.refresh(compute_hashes=False)
        return {}

    @router.post("/refresh-loras")
    def refresh_loras() -> dict:
        engine.networks.refresh()
        return {}

    @router.get("/cmd-flags")
    def cmd_flags() -> dict:
        flags = cfg.model_dump(mode="json", exclude={"gradio_auth", "api_auth"})
        flags["gradio_auth"] = bool(cfg.gradio_auth)
        flags["api_auth"] = bool(cfg.api_auth)
        rt = engine.runtime
        flags["attention_backend"] = getattr(rt, "attention", "sdpa")
        flags["device"] = str(rt.device)
        flags["memory_mode"] = rt.memory.mode if rt.memory is not None else "normal"
        flags["runtime"] = engine.describe_runtime()
        return flags

    @router.get("/memory")
    def memory() -> dict:
        """A1111's `ram` and `cuda` (the first worker's GPU), and each worker's device memory."""
        workers = api.workers()
        return {"ram": _ram(), "cuda": _cuda(engine.runtime.device), "workers": workers}

    @router.get("/workers")
    def workers() -> list[dict]:
        """Each worker: its device, whether it is busy (and with which job), the models it holds."""
        return api.workers()

    @router.get("/scripts")
    def scripts() -> dict:
        """Per tab: the scripts `script_name` selects, then the extensions that take values in
        `alwayson_scripts` (A1111 lists both in one list)."""
        from webui.scripts import all_scripts

        return {tab: [*(s.name for s in all_scripts() if tab in s.tabs),
                      *(e.name for e in engine.extensions.sections(tab))] for tab in ("txt2img", "img2img")}

    @router.get("/extensions")
    def extensions() -> list[dict]:
        ext = engine.extensions
        return [{"name": e.name, "version": e.version, "enabled": e.enabled, "status": ext.status_line(e),
                 "source": e.source,
                 "path": str(e.path) if e.path else None, "remote": None, "branch": None, "commit_hash": None,
                 "commit_date": None} for e in ext.extensions]

    @router.get("/face-restorers")
    def face_restorers() -> list[dict]:
        """Those whose weights are present, as A1111 lists them."""
        return [{"name": r.name, "cmd_dir": str(r.folder)} for r in engine.faces.restorers() if r.path is not None]

    @router.get("/realesrgan-models")
    def realesrgan_models() -> list[dict]:
        return [{"name": i.name, "path": str(i.path), "scale": _scale_of(i.name)} for i in engine.upscalers.entries()
                if i.path is not None and "realesrgan" in str(i.path.parent.name).lower()]

    @router.get("/hypernetworks")
    def hypernetworks() -> list[dict]:
        return []  # hypernetworks are not supported

    @router.get("/sd-modules")
    def sd_modules() -> list[dict]:
        """Forge's list of separate model parts (VAEs and text encoders): what `modules` and
        `override_settings.forge_additional_modules` may name."""
        return [{"model_name": n, "filename": str(path)} for n, path in engine.module_files()]

    @router.post("/refresh-embeddings")
    def refresh_embeddings() -> dict:
        engine.networks.refresh()
        return {}

    @router.post("/unload-checkpoint")
    def unload_checkpoint() -> dict:
        engine.unload_checkpoints()
        return {}

    @router.post("/reload-checkpoint")
    def reload_checkpoint() -> dict:
        try:
            engine.load_checkpoint(None)
        except ModelError as err:
            raise HTTPException(409, str(err)) from None
        return {}

    @router.get("/script-info")
    def script_info() -> list[dict]:
        """The scripts (`script_name`, their arguments in `script_args` order) and the extensions
        that take values (`alwayson_scripts`), in the shape of A1111's script info."""
        from webui.scripts import all_scripts
        from webui.settings import describe

        ext = engine.extensions
        out = []
        for tab in ("txt2img", "img2img"):
            for script in all_scripts():
                if tab in script.tabs:
                    model = script.args_model
                    args = [{"label": f.name, "value": getattr(model(), f.name, None), "minimum": f.minimum,
                             "maximum": f.maximum, "step": f.step, "choices": list(f.choices) or None}
                            for f in describe(model)]
                    out.append({"name": script.name, "is_alwayson": False, "is_img2img": tab == "img2img",
                                "args": args})
            for e in ext.sections(tab):
                args = [{"label": f.title, "value": getattr(e.ui.args_model(), f.name, None) if e.ui.args_model
                         else None, "minimum": f.minimum, "maximum": f.maximum, "step": f.step,
                         "choices": list(f.choices) or None}
                        for f in (describe(e.ui.args_model) if e.ui.args_model else [])]
                out.append({"name": e.name, "is_alwayson": True, "is_img2img": tab == "img2img", "args": args})
        return out

    @router.post("/interrogate")
    def interrogate(body: InterrogateBody) -> dict:
        """`clip`: a BLIP caption with the style terms a CLIP model ranks (models/BLIP,
        models/clip_interrogate); `deepdanbooru` (A1111's tagger) runs the first WD14 tagger in
        models/interrogators; a tagger's own name runs that one."""
        taggers = engine.taggers.names()
        if body.model == "clip":
            if missing := engine.clip_interrogator.missing():
                raise HTTPException(422, f"model: {missing}")
            try:
                return {"caption": engine.clip_interrogator.interrogate(body.image)}
            except ModelError as err:
                raise HTTPException(422, str(err)) from None
        if body.model != "deepdanbooru" and body.model.lower() not in (t.lower() for t in taggers):
            raise HTTPException(404, f"model: interrogator {body.model!r} not found (available: clip, deepdanbooru"
                                     f"{''.join(', ' + t for t in taggers)})")
        try:
            tags = engine.taggers.interrogate(body.image, None if body.model == "deepdanbooru" else body.model,
                                              threshold=body.threshold, character_threshold=body.character_threshold,
                                              exclude=tuple(t for t in body.exclude_tags.split(",") if t.strip()))
        except ModelError as err:
            raise HTTPException(422, str(err)) from None
        return {"caption": tags.caption}

    def _server_control(action: str) -> None:
        if not cfg.api_server_stop:
            raise HTTPException(403, f"{action} is off: start the server with --api-server-stop to allow it")

    @router.post("/server-stop")
    def server_stop() -> Response:
        _server_control("server-stop")
        _signal_later(signal.SIGINT)  # the same path as Ctrl+C: the page and API close cleanly
        return Response("Stopping.", media_type="text/plain")

    @router.post("/server-kill")
    def server_kill() -> Response:
        _server_control("server-kill")
        threading.Timer(0.2, os._exit, args=(0,)).start()
        return Response("Killing.", media_type="text/plain")

    @router.post("/server-restart")
    def server_restart() -> Response:
        _server_control("server-restart")
        raise HTTPException(501, "restart is not supported: this process has no launcher that restarts it; "
                                 "stop it (server-stop) and start it again")

    return router


def _scale_of(name: str) -> int:
    """An upscaler's factor as its name says it (4x-UltraSharp, RealESRGAN_x2plus); 4 when it does not."""
    m = re.search(r"(?:^|[^a-z0-9])x?([1-8])x|x([1-8])(?:[^0-9]|$)", name.lower())
    return int(m.group(1) or m.group(2)) if m else 4


def _signal_later(sig: int, delay: float = 0.2) -> None:
    """Send `sig` to this process after the current response is out."""
    threading.Timer(delay, os.kill, args=(os.getpid(), sig)).start()


def _ram() -> dict:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return {"error": "unknown on this system"}
    return {"free": free, "used": total - free, "total": total}


def _cuda(device: torch.device) -> dict:
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return {"error": "no CUDA device"}
    free, total = torch.cuda.mem_get_info(device)
    return {"system": {"free": free, "used": total - free, "total": total},
            "active": {"current": torch.cuda.memory_allocated(device), "peak": torch.cuda.max_memory_allocated(device)}}


def attach(app: FastAPI, engine: Engine) -> None:
    """Add the API routes, and `/docs` + `/openapi.json` describing them, to `app` (it may be
    already serving). `--api-auth` guards every one of them."""
    # --api-auth, else the page's --gradio-auth: an auth flag covers every route
    guard = [Depends(basic_auth(engine.config.api_auth or engine.config.gradio_auth))]
    router = build_router(engine)
    app.include_router(router, dependencies=guard)
    from webui.api.controlnet import build_controlnet_router

    controlnet = build_controlnet_router(engine, ApiRoute)
    app.include_router(controlnet, dependencies=guard)
    schema: dict[str, Any] = {}

    def openapi() -> dict:
        if not schema:
            schema.update(get_openapi(title="Stable Diffusion web UI API", version=webui.__version__,
                                      routes=[*router.routes, *controlnet.routes]))
        return schema

    app.add_api_route("/openapi.json", openapi, methods=["GET"], include_in_schema=False, dependencies=guard)
    app.add_api_route("/docs", lambda: get_swagger_ui_html(openapi_url="/openapi.json", title="API docs"),
                      methods=["GET"], include_in_schema=False, dependencies=guard)
