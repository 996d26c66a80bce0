"""Composition root: builds the pieces from a `Config` and wires them together.

The only module that knows everything; the rest receive what they need as arguments.
torch, diffusers and transformers take seconds to import, so the model side is built on first
use (or by `warm_up` in the background once the page is served), never on the start-up path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from webui.config import Config
from webui.controlnet.models import ControlNetLibrary
from webui.extensions.manager import ExtensionManager
from webui.interrogate.clip import ClipInterrogator
from webui.interrogate.tagger import Taggers
from webui.jobs.queue import Job, JobQueue
from webui.models.cache import ModelCache
from webui.models.errors import ModelError
from webui.models.fewstep import FewStep, recognise
from webui.models.hashing import HashCache
from webui.models.registry import CheckpointInfo, ModelRegistry
from webui.networks.registry import NetworkRegistry
from webui.outputs import OutputWriter
from webui.prompts.styles import StyleStore
from webui.samplers.table import resolve
from webui.settings import Settings, SettingsStore
from webui.workers import Worker, make_workers

if TYPE_CHECKING:
    from webui.controlnet.units import ControlUnit
    from webui.faces import FaceRestorers
    from webui.models.detect import ModelControls
    from webui.models.load import ModelBundle
    from webui.models.modules import ModuleChoice
    from webui.networks.embeddings import EmbeddingLibrary
    from webui.pipeline.batch import FolderBatch
    from webui.pipeline.progress import CancelToken, ProgressFn
    from webui.pipeline.request import GenerationRequest
    from webui.pipeline.runner import Library, Runner
    from webui.pipeline.state import GenerationResult
    from webui.prompts.tokenizer import TokenizerFactory
    from webui.runtime.devices import Runtime
    from webui.scripts import Script, ScriptEnv
    from webui.upscale import UpscalerRegistry

log = logging.getLogger("webui")


@dataclass(frozen=True)
class _ModelSide:
    """What every worker shares on the model side (none of it is tied to a device)."""

    tokenizers: TokenizerFactory
    embeddings: EmbeddingLibrary
    upscalers: UpscalerRegistry
    faces: FaceRestorers
    library: Library


class Engine:
    """Models plus the runner: what the UI, the command line and the API call into."""

    def __init__(self, config: Config, registry: ModelRegistry, networks: NetworkRegistry, styles: StyleStore,
                 extensions: ExtensionManager | None = None, settings: SettingsStore | None = None) -> None:
        self.config = config
        self.extensions = extensions if extensions is not None else ExtensionManager.empty()
        self.settings = settings or SettingsStore(config.data_dir / "config.json")
        self.registry = registry
        self.networks = networks
        self.styles = styles
        current = self.settings.get()
        self.writer = OutputWriter(config.data_dir, config.outputs_path, self.settings.get, self.extensions)
        if config.ray:
            from webui.scale.ray_serve import make_lanes

            self.workers = make_lanes(config, self.writer)
        else:
            self.workers = make_workers(config, self._make_runner, park=self._park, unpark=self._unpark)
        self.controlnets = ControlNetLibrary(config.controlnet_path, registry.hashes,
                                             clip_vision=config.models_path / "clip_vision")
        self.taggers = Taggers(config.models_path / "interrogators")
        self.clip_interrogator = ClipInterrogator(config.models_path)
        self.jobs = JobQueue(retention_s=config.job_retention_s, max_jobs=config.job_retention_count,
                             max_bytes=config.job_retention_mb * 2**20, workers=self.workers)
        self._apply_settings(current)
        self.settings.subscribe(self._apply_settings)
        # the model a request without a checkpoint runs on (the API's `sd_model_checkpoint`
        # option); starts as --ckpt, else the first listed
        self.current_checkpoint: str | None = config.ckpt
        self._side: _ModelSide | None = None
        self._side_lock = threading.Lock()

    def _apply_settings(self, s: Settings) -> None:
        """What applies live when the Settings tab (or the API's options) change."""
        self.jobs.preview_every = s.show_progress_every_n_steps if s.live_previews_enable else 0
        # an explicit --model-cache-size / --ckpt-cache wins over the setting
        c = self.config
        for worker in self.workers:
            worker.cache.capacity = max(1, c.model_cache_size if c.model_cache_size is not None
                                        else s.model_cache_size)
            worker.cache.ram_capacity = max(0, c.ckpt_cache if c.ckpt_cache is not None else s.ckpt_cache)
        # PIL's process-wide limit is the one every decode obeys (ours and Gradio's; see images.open_untrusted)
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = s.max_input_megapixels * 1_000_000

    @staticmethod
    def _park(bundle: ModelBundle) -> None:
        if bundle.runtime.park is not None:
            from webui.runtime.memory import park

            park(bundle.modules(), bundle.runtime.park)

    @staticmethod
    def _unpark(bundle: ModelBundle) -> None:
        if bundle.runtime.park is not None:
            from webui.runtime.memory import unpark

            unpark(bundle.modules(), bundle.runtime.park)

    # --- the model side, built once on first use ---------------------------------------------

    def _model_side(self) -> _ModelSide:
        with self._side_lock:
            if self._side is None:
                from webui.faces import FaceRestorers
                from webui.networks.embeddings import EmbeddingLibrary
                from webui.pipeline.runner import Library
                from webui.prompts.tokenizer import TokenizerFactory
                from webui.upscale import UpscalerRegistry

                embeddings = EmbeddingLibrary(self.networks)
                upscalers = UpscalerRegistry(self.config.models_path)
                faces = FaceRestorers(self.config.models_path, upscalers.spandrel)  # one spandrel import for both
                library = Library(self.styles, self.networks, embeddings, self.registry.hashes)
                self._side = _ModelSide(TokenizerFactory(), embeddings, upscalers, faces, library)
            return self._side

    def _make_runner(self, worker: Worker) -> Runner:
        from webui.pipeline.runner import Runner

        side = self._model_side()
        device = worker.runtime.device

        def upscale(image, name: str, size: tuple[int, int]):
            return side.upscalers.upscale(image, name, size=size, device=device)

        return Runner(lambda query, modules=(): self.bundle(query, worker, modules), side.library, self.writer,
                      upscale=upscale, models_path=self.config.models_path, extensions=self.extensions,
                      settings=self.settings.get, data_dir=self.config.data_dir, controlnets=self.controlnets,
                      faces=side.faces)

    @property
    def worker(self) -> Worker:
        """The first worker: what runs work called outside the queue (tests, the command line)."""
        return self.workers[0]

    @property
    def runtime(self) -> Runtime:
        return self.worker.runtime

    @property
    def cache(self) -> ModelCache[ModelBundle]:
        return self.worker.cache

    def extension_sampler_names(self) -> list[str]:
        return [s.name for s in self.extensions.sampler_specs()]

    def describe_runtime(self) -> str:
        """Device, precision, attention backend (and why), memory mode, compile: one line (one a
        worker when there are several)."""
        lines = []
        for w in self.workers:
            if w.remote:
                lines.append(f"{w.name}: a lane to Ray Serve replicas (each replica's device is the one Ray gave it)")
                continue
            rt = w.runtime
            line = f"{rt.describe()}. Attention: {rt.attention_message or rt.attention}"
            lines.append(line if len(self.workers) == 1 else f"{w.name}: {line}")
        return "\n".join(lines)

    @property
    def runner(self) -> Runner:
        return self.worker.runner

    @property
    def upscalers(self) -> UpscalerRegistry:
        return self._model_side().upscalers

    @property
    def faces(self) -> FaceRestorers:
        return self._model_side().faces

    def upscaler_names(self) -> list[str]:
        """Image upscalers for hires fix and Extras (builds the model side on first call)."""
        return [n for n in self.upscalers.names() if n != "None"]

    def upscaler_problem(self) -> str | None:
        """Why spandrel cannot load upscalers here (None when it can); tries its import once."""
        registry = self.upscalers
        registry.spandrel.module()
        return registry.spandrel.problem

    def count_tokens(self, text: str) -> tuple[int, int]:
        """(used, available) tokens of a prompt as it will be chunked: `37/75`, `80/150`."""
        from webui.prompts.encode import count_tokens
        from webui.prompts.parser import extract_extra_networks

        side = self._model_side()
        clean, _ = extract_extra_networks(text)
        embeddings = side.embeddings.find_in_prompt(clean)
        return count_tokens(side.tokenizers.get("<|endoftext|>"), clean, embeddings)

    def check(self, request: GenerationRequest) -> None:
        """What a request needs from this server, checked before it is queued, the same for the
        page, the command line and the API: names that must exist here (checkpoints, upscaler,
        samplers of extensions, extension arguments) and the server's limits. ModelError for a
        checkpoint, ValueError otherwise; each message starts with the field."""
        cfg = self.config
        if request.steps > cfg.max_steps:
            raise ValueError(f"steps: at most {cfg.max_steps} on this server (got {request.steps})")
        width, height = request.canvas_size()
        pixels = width * height
        if (hires := request.hires_size()) is not None:
            pixels = max(pixels, hires[0] * hires[1])  # the size the hires pass renders at
        if pixels * request.batch_size > cfg.max_pixels:
            raise ValueError(f"width/height: {width}x{height} x batch {request.batch_size} (and hires) exceeds this "
                             f"server's budget of {cfg.max_pixels} pixels")
        for field, query in (("checkpoint", request.checkpoint), ("refiner_checkpoint", request.refiner_checkpoint)):
            if field == "checkpoint" or query:
                try:
                    self.resolve_checkpoint(query)
                except ModelError as err:
                    raise ModelError(f"{field}: {err}") from None
        if request.modules:
            self._check_modules(request)
        if request.enable_hr and not request.is_img2img and not request.hr_upscaler.lower().startswith("latent"):
            self.check_upscaler(request.hr_upscaler, "hr_upscaler")
        extra = self.extensions.sampler_specs()
        for field, name in (("sampler_name", request.sampler_name), ("hr_sampler_name", request.hr_sampler_name)):
            if name:
                try:
                    resolve(name, request.scheduler, extra)
                except ValueError as err:
                    raise ValueError(f"{field}: {err}") from None
        if request.extensions:
            try:
                self.extensions.validate_args(request.extensions)
            except ValueError as err:
                raise ValueError(f"alwayson_scripts: {err}") from None
        limit = self.settings.get().control_net_unit_count
        if (active := sum(u.active for u in request.controlnet)) > limit:
            raise ValueError(f"controlnet: at most {limit} enabled units on this server (Settings: ControlNet "
                             f"units; got {active})")
        for i, unit in enumerate(request.controlnet):
            if unit.active:
                self._check_control_unit(i, unit, request)
        try:
            self.faces.plan(request, self.settings.get())
        except ModelError as err:
            raise ValueError(str(err)) from None
        if request.script_name:
            self._check_script(request)

    def _check_modules(self, request: GenerationRequest) -> None:
        """The VAE / text encoder files exist (ModelError), are such parts and the checkpoint takes
        them (ValueError)."""
        from webui.models.detect import family_of
        from webui.models.modules import ModuleNotFound, check_fits
        from webui.models.readers import tensor_names

        try:
            choice = self.module_choice(request.modules)
            family = family_of(dict.fromkeys(tensor_names(self.resolve_checkpoint(request.checkpoint).path)))
            if family is not None:
                check_fits(choice, family)
        except ModuleNotFound as err:
            raise ModelError(f"modules: {err}") from None
        except ModelError as err:
            raise ValueError(f"modules: {err}") from None

    def _check_control_unit(self, i: int, unit: ControlUnit, request: GenerationRequest) -> None:
        from webui.controlnet import preprocess
        from webui.controlnet.units import NO_MASK

        try:
            preprocess.check(unit.module, self.controlnets.annotators)
            self.controlnets.find(unit.model)
            if preprocess.is_inpaint(unit.module) and unit.inpaint_mask(request.mask) is None:
                raise ValueError(NO_MASK)
        except (ValueError, ModelError) as err:
            raise type(err)(f"controlnet unit {i}: {err}") from None
        if unit.image is None and not request.is_img2img:
            raise ValueError(f"controlnet unit {i}: no image (give one, or use img2img, whose image it then takes)")

    def preprocess(self, module: str, images: list[Any], resolution: int, a: float = -1,
                   b: float = -1) -> list[Any]:
        """Control images made by preprocessor `module` (the page's preview, the API's detect), as a
        job on a worker: an annotator's model runs on its device. -1 thresholds: the module's own.
        ValueError for an unknown module or one whose weights are missing."""
        from webui.controlnet import preprocess

        preprocess.check(module, self.controlnets.annotators)
        da, db = preprocess.defaults(module)

        def work(progress, cancel, every, worker: Worker) -> list[Any]:
            return [preprocess.run(module, image, resolution, a if a != -1 else da, b if b != -1 else db,
                                   self.controlnets.annotators, str(worker.runtime.device)) for image in images]

        job = self.jobs.submit("preprocess", work, owner="api")
        job.done.wait()
        if job.error:
            raise ValueError(job.error)
        return job.result

    # --- scripts (the Script dropdown) ----------------------------------------------------------

    def script_env(self) -> ScriptEnv:
        from webui.scripts import ScriptEnv

        return ScriptEnv(checkpoints=lambda: [c.title for c in self.registry.checkpoints()],
                         upscalers=lambda: self.upscalers.names(), styles=lambda: [s.name for s in self.styles.list()],
                         axes=self.extensions.xyz_axes)

    def _script(self, request: GenerationRequest) -> tuple[Script, Any]:
        from webui.scripts import find_script

        script = find_script(request.script_name, "img2img" if request.is_img2img else "txt2img")
        return script, script.parse(request.script_args)

    def _check_script(self, request: GenerationRequest) -> None:
        """Every generation the script will run is checked like a request of its own, so a bad
        cell (a sampler name in an X/Y/Z list) is reported before any image is made."""
        script, args = self._script(request)
        planned = script.plan(request, args, self.script_env())
        for i, sub in enumerate(planned, 1):
            try:
                self.check(sub)
            except (ValueError, ModelError) as err:
                raise type(err)(f"{script.title}, image {i} of {len(planned)}: {err}") from None

    def run(self, request: GenerationRequest, progress: ProgressFn | None = None, cancel: CancelToken | None = None,
            preview_every: int = 0, worker: Worker | None = None) -> GenerationResult:
        """Generate now, on this thread (with `worker`'s device and models; default the first):
        the request, or the script it names."""
        worker = worker or self.worker
        runner = worker.runner
        if not request.script_name:
            result = runner.generate(request, progress=progress, cancel=cancel, preview_every=preview_every)
            from webui.scripts.grid import add_batch_grid

            return add_batch_grid(request, result, self.settings.get(), self.writer)
        from webui.pipeline.progress import CancelToken
        from webui.scripts import ScriptContext

        script, args = self._script(request)
        env = self.script_env()
        runtime = worker.runtime
        ctx = ScriptContext(
            generate_fn=runner.generate, cancel=cancel or CancelToken(), progress=progress,
            preview_every=preview_every,
            save_fn=lambda image, kind, info, seed: self.writer.save(image, kind, info, seed=seed),
            upscale_fn=lambda image, name, size: self.upscalers.upscale(image, name, size=size, device=runtime.device),
            settings=self.settings.get())
        return script.run(ctx, request, args, env)

    def submit(self, request: GenerationRequest, *, owner: str | None = None,
               folder: FolderBatch | None = None) -> Job:
        """Queue a generation (with `folder`: img2img over each image in it); answers at once."""
        kind = "img2img" if request.is_img2img or folder is not None else "txt2img"

        def work(progress, cancel, preview_every: int, worker: Worker):
            nonlocal request
            if worker.remote and not request.checkpoint:  # the front's choice, not the replica's default
                request = request.model_copy(update={"checkpoint": self.resolve_checkpoint(None).title})
            if folder is not None:
                from webui.pipeline.batch import img2img_folder

                return img2img_folder(worker.runner, request, folder, progress, cancel, preview_every)
            return self.run(request, progress, cancel, preview_every, worker)

        def release(job: Job) -> None:  # a finished job keeps its request's text, not its images
            job.request = job.request.without_inputs()

        local = [w for w in self.workers if not w.remote]
        # only a choice among several workers
        affinity = self.model_key(request.checkpoint, request.modules) if len(local) > 1 else None
        return self.jobs.submit(kind, work, request=request, owner=owner, release=release, affinity=affinity)

    def warm_up(self) -> threading.Thread:
        """Import the model stack and build the CLIP tokenizers in the background, so the first
        load and generation do not wait for them."""

        def work() -> None:
            side = self._model_side()
            side.tokenizers.warm()
            for worker in self.workers:  # each logs its device; a device that cannot be used says so now
                worker.start()

        t = threading.Thread(target=work, name="warm-up", daemon=True)
        t.start()
        return t

    # --- checkpoints --------------------------------------------------------------------------

    def model_controls(self, query: str | None) -> ModelControls:
        """What the page offers for the checkpoint `query` beyond the common controls (Flux's
        distilled guidance, a flow model's shift and samplers), read from its tensor names alone."""
        from webui.models.detect import ModelControls, model_controls
        from webui.models.readers import tensor_names

        try:
            return model_controls(tensor_names(self.resolve_checkpoint(query).path))
        except ModelError:
            return ModelControls()

    def resolve_checkpoint(self, query: str | None) -> CheckpointInfo:
        query = query or self.current_checkpoint
        if query:
            return self.registry.find(query)
        items = self.registry.checkpoints()
        if not items:
            raise ModelError(
                f"no checkpoints found: put a Stable Diffusion .safetensors or .ckpt file in "
                f"{self.registry.ckpt_dir} and press refresh"
            )
        return self.registry.find(items[0].name)

    def few_step(self, checkpoint: str | None, prompt: str = "") -> FewStep | None:
        """The recommended sampling of a few-step LoRA in `prompt` (it decides how the model
        samples), else of a few-step checkpoint; None when neither is one."""
        from webui.prompts.parser import extract_extra_networks

        for tag in extract_extra_networks(prompt or "")[1]:
            if tag.kind != "lora":
                continue
            try:
                lora = self.networks.find_lora(tag.name)
            except ModelError:
                continue  # named when the job runs
            found = recognise(lora.path, lora.name, self.networks.metadata(lora))
            if found:
                return found
        info = self.resolve_checkpoint(checkpoint)
        return recognise(info.path, info.name)

    def _key(self, info: CheckpointInfo, choice: ModuleChoice) -> tuple[Hashable, Path | None, str]:
        vae = choice.vae or self._vae_for(info)
        forced = self.config.prediction
        prediction = forced if forced != "auto" else self.registry.prediction_for(info)
        encoders = tuple((role, str(path.resolve())) for role, path in choice.text_encoders)
        return (str(info.path.resolve()), str(vae) if vae else None, prediction, encoders), vae, prediction

    def module_choice(self, names: tuple[str, ...] | list[str]) -> ModuleChoice:
        """The files a request's `modules` ("VAE / Text encoder") name; ModelError naming a bad one."""
        from webui.models.modules import ModuleChoice, resolve
        from webui.models.text_encoders import text_encoder_dirs

        if not names:
            return ModuleChoice()
        return resolve(names, self.registry.vae_files(), text_encoder_dirs(self.config.models_path))

    def module_files(self) -> list[tuple[str, Path]]:
        """(name, file) of what the page's "VAE / Text encoder" selector offers."""
        from webui.models.modules import available
        from webui.models.text_encoders import text_encoder_dirs

        return available(self.registry.vae_files(), text_encoder_dirs(self.config.models_path))

    def module_names(self) -> list[str]:
        return [name for name, _ in self.module_files()]

    def model_key(self, query: str | None, modules: tuple[str, ...] = ()) -> Hashable | None:
        """What identifies the model `query` loads as in a worker's cache (None: no such model)."""
        try:
            return self._key(self.resolve_checkpoint(query), self.module_choice(modules))[0]
        except (ModelError, OSError):
            return None

    def bundle(self, query: str | None, worker: Worker | None = None, modules: tuple[str, ...] = ()) -> ModelBundle:
        """The loaded model for `query` (None: the start-up choice or the first listed) on
        `worker` (default: the first), with the VAE / text encoder files `modules` names."""
        worker = worker or self.worker
        info = self.resolve_checkpoint(query)
        choice = self.module_choice(modules)
        key, vae, prediction = self._key(info, choice)
        side = self._model_side()

        def load() -> ModelBundle:
            from webui.models.load import load_bundle
            from webui.models.text_encoders import text_encoder_dirs

            log.info("loading %s on %s", info.title, worker.name)
            bundle = load_bundle(
                info.path,
                runtime=worker.runtime,
                tokenizers=side.tokenizers,
                name=info.name,
                sha256=info.sha256,
                vae_path=vae,
                prediction=prediction,
                text_encoder_dirs=text_encoder_dirs(self.config.models_path),
                vae_dir=self.config.vae_path,
                chosen=choice,
            )
            self.extensions.model_loaded(bundle)
            return bundle

        return worker.cache.get(key, load)

    def check_upscaler(self, name: str, field: str) -> None:
        """ValueError naming `field` when no upscaler is called `name` here."""
        if name not in (names := self.upscalers.names()):
            raise ValueError(f"{field}: unknown upscaler {name!r} (available: {', '.join(names)})")

    def load_checkpoint(self, query: str | None) -> str:
        """Make `query` the model for requests that name none, and load it now, on every worker in
        queue order (A1111's `sd_model_checkpoint` option, `reload-checkpoint`). Its title;
        raises ModelError for a name not found or a file that does not load."""
        info = self.resolve_checkpoint(query)
        jobs = self._on_each_worker("load", lambda progress, cancel, every, worker: self.bundle(info.title, worker))
        if errors := [job.error for job in jobs if job.error]:
            raise ModelError(errors[0])
        self.current_checkpoint = info.title
        return info.title

    def unload_checkpoints(self) -> None:
        """Free every loaded model (ready and parked) on every worker, after the jobs already queued."""
        self._on_each_worker("unload", lambda progress, cancel, every, worker: worker.cache.clear())

    def _on_each_worker(self, kind: str, work) -> list[Job]:
        """The same work on each local worker, in queue order on each; waits for all. Ray Serve
        replicas are left out: Serve cannot address one, and each loads what its jobs name."""
        jobs = [self.jobs.submit(kind, work, owner="api", pin=i) for i, w in enumerate(self.workers) if not w.remote]
        for job in jobs:
            job.done.wait()
        return jobs

    def _vae_for(self, info: CheckpointInfo) -> Path | None:
        choice = self.config.vae
        if choice in (None, "", "Automatic"):
            return self.registry.paired_vae(info)
        if choice == "None":
            return None
        return self.registry.find_vae(choice)


def build_engine(config: Config) -> Engine:
    hashes = HashCache(config.cache_path / "hashes.json")
    registry = ModelRegistry(
        config.checkpoints_path, config.vae_path, hashes, overrides_file=config.data_dir / "model-overrides.json"
    )
    registry.refresh(compute_hashes=False)  # cached hashes only: start-up never reads whole files
    networks = NetworkRegistry(config.lora_path, config.embeddings_path, hashes)
    networks.refresh()
    settings = SettingsStore(config.data_dir / "config.json", outdir_root=None if config.any_outdir else config.data_dir)
    return Engine(config, registry, networks, StyleStore(config.styles_path), load_extensions(config, settings), settings)


SHIPPED_EXTENSIONS = Path(__file__).resolve().parent / "builtin_extensions"  # inside the package: `pip install .` carries them


def load_extensions(config: Config, settings: SettingsStore) -> ExtensionManager:
    """The shipped extensions (`webui/builtin_extensions/`) and the user's, loaded and ordered."""
    from webui.extensions.manager import ExtensionManager

    folders = [config.extensions_path]
    if SHIPPED_EXTENSIONS.is_dir() and SHIPPED_EXTENSIONS.resolve() != config.extensions_path.resolve():
        folders.insert(0, SHIPPED_EXTENSIONS)
    manager = ExtensionManager(folders, config.data_dir / "extensions.json", enabled=not config.disable_all_extensions,
                               data_dir=config.data_dir)
    manager.load(settings_sink=settings.register_section, settings_source=settings.section)
    settings.allow_samplers(spec.name for spec in manager.sampler_specs())
    for e in manager.extensions:
        log.info("extension %s %s: %s", e.name, e.version, e.status)
    return manager
