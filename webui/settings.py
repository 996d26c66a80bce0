"""User settings: the typed `Settings` model, extension sections, and `config.json` on disk.

`Settings` is what the Settings tab edits (output folders, file names, image format, generation
defaults, live previews, model cache). Each field carries its UI label (`title`), help text
(`description`) and, in `json_schema_extra`, its `section` and, when a change does not show at
once, a `note` saying when it does. `SettingsStore` owns `config.json` in the data dir:

- Settings fields are top-level keys (A1111's names where one exists); an extension's section is
  an object under its registered name, validated by the extension's own pydantic model.
- Keys nobody here knows (an extension not loaded now, a newer version, A1111's own keys) are
  kept as they are on every save.
- A corrupt or unreadable file never stops start-up: a warning names it, defaults are used, and
  the file is left alone until the user saves (then a copy is kept as `config.json.corrupt`).
- Saves are atomic (temporary file + `os.replace`) and all access goes through one lock.
- `subscribe` callbacks run after each successful update: that is how changes apply live.

No torch or gradio here: the page, the API and the command line all import this module.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from webui.files import write_atomic
from webui.samplers.table import SCHEDULES, find_sampler, resolve, sampler_names

log = logging.getLogger(__name__)
ANY_SAMPLER = frozenset({"*"})  # validation context: a stored sampler name may be an extension's

OUTPUT_KINDS = ("txt2img", "img2img", "extras", "txt2img-grids", "img2img-grids")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")

SAVING = "Saving images"
DEFAULTS = "Generation defaults"
PREVIEWS = "Live previews"
MODELS = "Models"
LIMITS = "Limits"
SPEED = "Speed"
FACES = "Face restoration"


def _setting(default: Any, title: str, description: str, section: str, note: str | None = None,
             **extra_schema: Any) -> Any:
    extra: dict[str, Any] = {"section": section, **extra_schema}
    if note:
        extra["note"] = note
    kwargs = {k: extra.pop(k) for k in ("ge", "le", "multiple_of", "max_length") if k in extra}
    return Field(default, title=title, description=description, json_schema_extra=extra, **kwargs)


_OUTDIR_HELP = "Empty: {default}. A relative path is relative to the data folder."


class Settings(BaseModel):
    """What the Settings tab edits. Immutable: `SettingsStore.update` makes a new one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- saving ---
    samples_format: Literal["png", "jpeg", "webp"] = _setting(
        "png", "File format for images", "PNG is lossless; JPEG and WebP keep the parameters in EXIF.", SAVING)
    jpeg_quality: int = _setting(
        95, "Quality for JPEG and WebP", "1 (smallest files) to 100 (best quality).", SAVING, ge=1, le=100)
    filename_pattern: str = _setting(
        "[seed]", "File name pattern",
        "Files are named NNNNN-<pattern>.<ext>. Tokens: [seed] [steps] [cfg] [sampler] [width] [height] "
        "[model_name] [model_hash] [prompt_words] [date] [datetime] [job_timestamp].", SAVING, max_length=200)
    outdir_txt2img_samples: str = _setting(
        "", "Output folder for txt2img images", _OUTDIR_HELP.format(default="outputs/txt2img-images"), SAVING)
    outdir_img2img_samples: str = _setting(
        "", "Output folder for img2img images", _OUTDIR_HELP.format(default="outputs/img2img-images"), SAVING)
    outdir_extras_samples: str = _setting(
        "", "Output folder for extras images", _OUTDIR_HELP.format(default="outputs/extras-images"), SAVING)
    grid_save: bool = _setting(
        True, "Save grids", "Save the grid of a batch, or of a script (X/Y/Z plot, prompt matrix), beside its "
        "images (when the images are saved).", SAVING)
    grid_format: Literal["png", "jpeg", "webp"] = _setting(
        "png", "File format for grids", "Grids can be large: JPEG or WebP keeps them small.", SAVING)
    return_grid: bool = _setting(
        True, "Show grids in results",
        "A batch of several images also gives a grid of them, first among the results (A1111's return_grid).",
        SAVING)
    n_rows: int = _setting(
        -1, "Grid rows", "-1: as square as it gets; 0: one row per batch; more: that many rows.", SAVING,
        ge=-1, le=64)
    outdir_txt2img_grids: str = _setting(
        "", "Output folder for txt2img grids", _OUTDIR_HELP.format(default="outputs/txt2img-grids"), SAVING)
    outdir_img2img_grids: str = _setting(
        "", "Output folder for img2img grids", _OUTDIR_HELP.format(default="outputs/img2img-grids"), SAVING)

    # --- generation defaults ---
    default_sampler: str = _setting(
        "Euler a", "Sampler", "The sampler a new page starts with.", DEFAULTS,
        note="applies to pages opened after the change", choices=sampler_names())
    default_scheduler: str = _setting(
        "Automatic", "Schedule type", "The schedule type a new page starts with.", DEFAULTS,
        note="applies to pages opened after the change", choices=list(SCHEDULES))
    default_steps: int = _setting(
        20, "Sampling steps", "The number of steps a new page starts with.", DEFAULTS,
        note="applies to pages opened after the change", ge=1, le=150)
    default_width: int = _setting(
        512, "Width", "The image width a new page starts with (a multiple of 8).", DEFAULTS,
        note="applies to pages opened after the change", ge=64, le=2048, multiple_of=8)
    default_height: int = _setting(
        512, "Height", "The image height a new page starts with (a multiple of 8).", DEFAULTS,
        note="applies to pages opened after the change", ge=64, le=2048, multiple_of=8)
    default_cfg_scale: float = _setting(
        7.0, "CFG scale", "The CFG scale a new page starts with.", DEFAULTS,
        note="applies to pages opened after the change", ge=1.0, le=30.0, step=0.5)

    # --- live previews ---
    live_previews_enable: bool = _setting(
        True, "Show live previews", "Show the image while it is being made.", PREVIEWS,
        note="applies from the next generation")
    show_progress_every_n_steps: int = _setting(
        3, "Preview every N steps", "How often the live preview is refreshed, in sampling steps.", PREVIEWS,
        note="applies from the next generation", ge=1, le=100)
    live_preview_method: Literal["Approximate", "TAESD"] = _setting(
        "TAESD", "Preview method",
        "TAESD (sharper) when its decoder is in models/VAE-approx, else a fast approximation.", PREVIEWS,
        note="applies from the next generation")

    # --- models ---
    model_cache_size: int = _setting(
        1, "Checkpoints loaded at the same time",
        "How many checkpoints stay ready on the device (A1111: sd_checkpoints_limit). --model-cache-size overrides it.",
        MODELS, note="applies to the next model load", ge=1, le=8)
    sd_noise_schedule: Literal["Default", "Zero Terminal SNR"] = _setting(
        "Default", "Noise schedule for sampling",
        "Zero Terminal SNR rescales the model's schedule so that its last step is pure noise, as v-prediction "
        "models trained that way (NoobAI-XL v-pred and others) need when their file does not say so (a file with a "
        "`ztsnr` key always samples that way). A1111's sd_noise_schedule.", MODELS,
        note="applies from the next generation")
    ckpt_cache: int = _setting(
        0, "Checkpoints cached in RAM",
        "How many more checkpoints wait in RAM after being switched away from, so switching back does not "
        "read the file again (A1111: sd_checkpoint_cache). --ckpt-cache overrides it.",
        MODELS, note="applies to the next model switch", ge=0, le=8)

    # --- speed ---
    token_merging_ratio: float = _setting(
        0.0, "Token merging ratio",
        "Merge this share of similar tokens in self-attention (ToMe): faster, at some cost in detail. 0: off.",
        SPEED, note="applies from the next generation", ge=0.0, le=0.9, step=0.05)
    token_merging_ratio_hr: float = _setting(
        0.0, "Token merging ratio for the hires pass", "0: the ratio above. The larger hires image gains most.",
        SPEED, note="applies from the next generation", ge=0.0, le=0.9, step=0.05)
    token_merging_ratio_img2img: float = _setting(
        0.0, "Token merging ratio for img2img", "0: the first ratio above.",
        SPEED, note="applies from the next generation", ge=0.0, le=0.9, step=0.05)
    deepcache_interval: int = _setting(
        0, "Step caching interval (DeepCache)",
        "Run the whole UNet on every n-th model call and only its outer layers in between, reusing the deep "
        "features: 3 takes about half the time per image, at some cost in detail. 0 or 1: off.",
        SPEED, note="applies from the next generation", ge=0, le=20, step=1)
    deepcache_branch: int = _setting(
        0, "Step caching depth (DeepCache branch)",
        "How many outer layers are recomputed on cached calls: 0 the fewest (fastest); higher keeps more detail.",
        SPEED, note="applies from the next generation", ge=0, le=6, step=1)

    # --- ControlNet ---
    control_net_unit_count: int = _setting(
        3, "ControlNet units", "How many ControlNet units a generation may use, and the page shows "
        "(A1111's control_net_unit_count).", MODELS, note="the page shows the new count after a restart",
        ge=1, le=10)

    # --- face restoration ---
    face_restoration: bool = _setting(
        False, "Restore faces", "Restore every face found in txt2img and img2img results (a request's "
        "restore_faces overrides it).", FACES, note="applies from the next generation")
    face_restoration_model: Literal["CodeFormer", "GFPGAN"] = _setting(
        "CodeFormer", "Face restoration model",
        "Weights from models/Codeformer (the codeformer extra) or models/GFPGAN; when the chosen one is missing, "
        "the other is used.", FACES, note="applies from the next generation")
    code_former_weight: float = _setting(
        0.5, "CodeFormer weight", "0: the strongest restoration; 1: the closest to the face as it was.", FACES,
        note="applies from the next generation", ge=0.0, le=1.0, step=0.05)

    # --- limits ---
    max_input_megapixels: int = _setting(
        64, "Largest input image, megapixels",
        "Images uploaded or sent to the API with more pixels are refused before they are decoded (a few KB "
        "can claim 20000x20000).", LIMITS, note="applies at once", ge=1, le=1000)

    @model_validator(mode="before")
    @classmethod
    def _split_legacy_sampler(cls, data: Any) -> Any:
        """`DPM++ 2M Karras` (an old combined name) sets the sampler and the schedule type."""
        if isinstance(data, Mapping) and isinstance(data.get("default_sampler"), str):
            name = data["default_sampler"]
            if find_sampler(name) is None:
                try:
                    spec, schedule = resolve(name, str(data.get("default_scheduler") or "Automatic"))
                except ValueError:
                    return data  # reported by the field validator, naming the field
                data = {**data, "default_sampler": spec.name, "default_scheduler": schedule}
        return data

    @field_validator("default_sampler")
    @classmethod
    def _known_sampler(cls, v: str, info: ValidationInfo) -> str:
        spec = find_sampler(v)
        if spec is not None:
            return spec.name
        # an extension's sampler: the store says which exist (validation context "samplers"), or
        # ANY_SAMPLER while it reads the file, before extensions have loaded
        extra = (info.context or {}).get("samplers", ())
        if extra is ANY_SAMPLER or v in extra:
            return v
        raise ValueError(f"unknown sampler {v!r} (available: {', '.join([*sampler_names(), *extra])})")

    @field_validator("default_scheduler")
    @classmethod
    def _known_schedule(cls, v: str) -> str:
        for label in SCHEDULES:
            if v.strip().lower() == label.lower():
                return label
        raise ValueError(f"unknown schedule type {v!r} (available: {', '.join(SCHEDULES)})")

    @field_validator("filename_pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be empty (the default is [seed])")
        if "/" in v or "\\" in v or _CONTROL_CHARS.search(v):
            raise ValueError("must not contain / or \\ or control characters")
        return v

    @field_validator("outdir_txt2img_samples", "outdir_img2img_samples", "outdir_extras_samples",
                     "outdir_txt2img_grids", "outdir_img2img_grids")
    @classmethod
    def _folder(cls, v: str, info: ValidationInfo) -> str:
        if _CONTROL_CHARS.search(v):
            raise ValueError("must not contain control characters")
        v = v.strip()
        context = info.context or {}
        root = context.get("outdir_root")
        if v and root is not None and info.field_name in context.get("changed", ()):
            # a change from the page or the API (not what the file says): stay inside the data folder
            root = Path(root).resolve()
            target = (root / Path(v).expanduser()).resolve()
            if target != root and root not in target.parents:
                raise ValueError(f"must be inside the data folder {root} (start the server with --any-outdir "
                                 "to allow other folders)")
        return v

    def samples_dir(self, kind: str, data_dir: Path, outputs: Path) -> Path:
        """Where images of `kind` (txt2img, img2img, extras, txt2img-grids, img2img-grids) go,
        before the dated folder: the setting when set (relative to `data_dir`), else
        `<outputs>/<kind>-images` (`<outputs>/<kind>` for grids)."""
        if kind not in OUTPUT_KINDS:
            raise ValueError(f"unknown output kind {kind!r} (available: {', '.join(OUTPUT_KINDS)})")
        grids = kind.endswith("-grids")
        configured = getattr(self, f"outdir_{kind.removesuffix('-grids')}_{'grids' if grids else 'samples'}")
        if not configured:
            return Path(outputs) / (kind if grids else f"{kind}-images")
        path = Path(configured).expanduser()
        return path if path.is_absolute() else Path(data_dir) / path


# --- describing fields (for the Settings tab and the options API) -----------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """What a UI needs to render one field: its kind, label, help, bounds and choices."""

    name: str
    kind: Literal["choice", "bool", "int", "float", "str", "json"]
    title: str
    description: str
    section: str
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None


def _extra(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


def describe(model: type[BaseModel], default_section: str = "") -> list[FieldSpec]:
    """One `FieldSpec` per field of `model`, in declaration order."""
    specs = []
    for name, info in model.model_fields.items():
        extra = _extra(info)
        annotation = info.annotation
        args = typing.get_args(annotation)
        minimum = maximum = step = None
        for meta in info.metadata:
            if isinstance(meta, (annotated_types.Ge, annotated_types.Gt)):
                minimum = float(getattr(meta, "ge", getattr(meta, "gt", 0)))
            elif isinstance(meta, (annotated_types.Le, annotated_types.Lt)):
                maximum = float(getattr(meta, "le", getattr(meta, "lt", 0)))
            elif isinstance(meta, annotated_types.MultipleOf):
                step = float(meta.multiple_of)
        choices: tuple[Any, ...] = ()
        if typing.get_origin(annotation) is Literal:
            kind, choices = "choice", args
        elif extra.get("choices"):
            kind, choices = "choice", tuple(extra["choices"])
        elif annotation is bool:
            kind = "bool"
        elif annotation is int:
            kind = "int"
        elif annotation is float:
            kind = "float"
        elif annotation is str:
            kind = "str"
        else:
            kind = "json"  # anything else is edited as JSON text
        if "step" in extra:
            step = float(extra["step"])
        specs.append(FieldSpec(
            name=name, kind=kind, title=info.title or name.replace("_", " ").capitalize(),
            description=info.description or "", section=str(extra.get("section", default_section)),
            choices=choices, minimum=minimum, maximum=maximum, step=step,
        ))
    return specs


def notes_for(model: type[BaseModel], changed: list[str], prefix: str = "") -> list[str]:
    """`"<field> <note>"` for each changed field whose change does not show at once."""
    notes = []
    for name in changed:
        note = _extra(model.model_fields[name]).get("note")
        if note:
            notes.append(f"{prefix}{name} {note}")
    return notes


def validation_message(error: ValidationError, prefix: str = "") -> str:
    """One line: `default_steps: Input should be less than or equal to 150; ...`."""
    parts = []
    for e in error.errors():
        where = prefix + (".".join(str(x) for x in e.get("loc", ())) or "settings")
        msg = "unknown setting" if e.get("type") == "extra_forbidden" else e.get("msg", "invalid")
        parts.append(f"{where}: {msg}".replace("Value error, ", ""))
    return "; ".join(parts).replace("\n", " ")


# --- the store --------------------------------------------------------------------------------------


def _validate_leniently(model: type[BaseModel], raw: Mapping[str, Any], where: str) -> BaseModel:
    """`model` from the known keys of `raw`; a bad stored value falls back to its default with a
    warning (a hand-edited file should not take the app down)."""
    values = {k: v for k, v in raw.items() if k in model.model_fields}
    while True:
        try:
            return model.model_validate(values, context={"samplers": ANY_SAMPLER})
        except ValidationError as e:
            bad = {str(err["loc"][0]) for err in e.errors() if err.get("loc")}
            bad &= set(values)
            if not bad:  # a model-level error: give up on stored values
                log.warning("%s: stored settings are invalid (%s); using defaults", where, validation_message(e))
                return model()
            log.warning("%s: ignoring invalid stored value(s): %s", where, validation_message(e))
            for key in bad:
                values.pop(key)


class SettingsStore:
    """`config.json` and the settings in it; see the module doc. Thread-safe."""

    def __init__(self, path: Path, outdir_root: Path | None = None) -> None:
        """`outdir_root`: changes may only set output folders inside it (None: anywhere). What the
        file itself says is the operator's choice and is not checked."""
        self.path = Path(path)
        self.outdir_root = outdir_root
        self._lock = threading.RLock()
        self._subscribers: list[Callable[[Settings], None]] = []
        self._section_models: dict[str, type[BaseModel]] = {}
        self._section_values: dict[str, BaseModel] = {}
        self._corrupt = False
        self._extra_samplers: tuple[str, ...] = ()  # the loaded extensions' samplers
        self._raw: dict[str, Any] = self._read()
        self._settings: Settings = _validate_leniently(Settings, self._raw, str(self.path))  # type: ignore[assignment]

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            log.warning("could not read settings file %s (%s); using defaults, the file is left as is", self.path, e)
            self._corrupt = True
            return {}
        try:
            data = json.loads(text)
        except ValueError as e:
            log.warning("settings file %s is not valid JSON (%s); using defaults, the file is left as is", self.path, e)
            self._corrupt = True
            return {}
        if not isinstance(data, dict):
            log.warning("settings file %s does not hold a JSON object; using defaults, the file is left as is",
                        self.path)
            self._corrupt = True
            return {}
        return data

    # --- reading ---

    def get(self) -> Settings:
        with self._lock:
            return self._settings

    def sections(self) -> dict[str, type[BaseModel]]:
        with self._lock:
            return dict(self._section_models)

    def section(self, name: str) -> BaseModel:
        with self._lock:
            if name not in self._section_values:
                raise KeyError(f"no settings section {name!r} is registered")
            return self._section_values[name].model_copy(deep=True)

    # --- registering ---

    def register_section(self, name: str, model: type[BaseModel]) -> BaseModel:
        """Add an extension's section; its stored values (under `name`) are validated by `model`.
        Returns the current values. Registering the same model again is a no-op."""
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
            raise ValueError(f"settings section name {name!r} must be letters, digits, '_', '.' or '-'")
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"settings section {name!r} needs a pydantic model class, got {model!r}")
        with self._lock:
            if name in Settings.model_fields:
                raise ValueError(f"settings section name {name!r} is taken by a built-in setting")
            if name in self._section_models:
                if self._section_models[name] is model:
                    return self.section(name)
                raise ValueError(f"settings section {name!r} is already registered")
            try:
                model()
            except ValidationError as e:
                raise ValueError(f"settings section {name!r}: every field needs a default "
                                 f"({validation_message(e)})") from None
            stored = self._raw.get(name)
            if stored is not None and not isinstance(stored, dict):
                log.warning("%s: section %r is not an object; using its defaults", self.path, name)
                stored = None
            self._section_models[name] = model
            self._section_values[name] = _validate_leniently(model, stored or {}, f"{self.path} [{name}]")
            return self.section(name)

    def subscribe(self, callback: Callable[[Settings], None]) -> None:
        """Call `callback(new_settings)` after every successful update (in update order)."""
        with self._lock:
            self._subscribers.append(callback)

    def allow_samplers(self, names: Iterable[str]) -> None:
        """Extension samplers a setting may name (the default sampler), once extensions loaded."""
        with self._lock:
            self._extra_samplers = tuple(names)
            chosen = self._settings.default_sampler
            if find_sampler(chosen) is None and chosen not in self._extra_samplers:
                fallback = Settings.model_fields["default_sampler"].default
                log.warning("%s: default_sampler %r is not a sampler here (no loaded extension has it); using %r",
                            self.path, chosen, fallback)
                self._settings = self._settings.model_copy(update={"default_sampler": fallback})

    def extra_choices(self, field: str) -> list[str]:
        """Choices beyond the field's own for the Settings tab (the extensions' samplers)."""
        return list(self._extra_samplers) if field == "default_sampler" else []

    # --- changing ---

    def update(self, changes: Mapping[str, Any],
               sections: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Settings, list[str]]:
        """Validate `changes` (and, all or nothing, `sections`: name -> changes) merged into the
        current values, save, tell subscribers. Returns the new settings and notes on when the
        changes take effect. ValueError (one line, naming the field) and nothing saved on bad input."""
        with self._lock:
            new = self._merge(Settings, self._settings, changes,
                              context={"samplers": self._extra_samplers, "outdir_root": self.outdir_root,
                                       "changed": set(changes) if isinstance(changes, Mapping) else set()})
            new_sections: dict[str, BaseModel] = {}
            for name, section_changes in (sections or {}).items():
                if name not in self._section_models:
                    raise ValueError(f"{name}: no such settings section")
                new_sections[name] = self._merge(self._section_models[name], self._section_values[name],
                                                 section_changes, prefix=f"{name}.")
            changed = _changed(self._settings, new)
            notes = notes_for(Settings, changed)
            section_changed = False
            for name, value in new_sections.items():
                keys = _changed(self._section_values[name], value)
                section_changed |= bool(keys)
                notes += notes_for(self._section_models[name], keys, prefix=f"{name}.")
            if not changed and not section_changed:
                return self._settings, ["No changes."]
            self._save(new, {**self._section_values, **new_sections})
            self._settings = new  # type: ignore[assignment]
            self._section_values.update(new_sections)
            notes += self._notify(new)  # type: ignore[arg-type]
            return self._settings, notes

    def keep_foreign(self, values: Mapping[str, Any]) -> None:
        """Save values for keys this app has no setting for (options of A1111's that a client set),
        so that they read back as set. They change nothing here."""
        with self._lock:
            ours = set(Settings.model_fields) | set(self._section_models)
            if clash := sorted(set(values) & ours):
                raise ValueError(f"{', '.join(clash)}: settings of this app, change them with update()")
            self._raw = {**self._raw, **values}
            self._save(self._settings, self._section_values)

    def stored(self) -> dict[str, Any]:
        """Everything config.json holds, foreign keys included (a copy)."""
        with self._lock:
            return dict(self._raw)

    def update_section(self, name: str, changes: Mapping[str, Any]) -> tuple[BaseModel, list[str]]:
        """`update` for one extension section; returns its new values and the notes."""
        with self._lock:
            _, notes = self.update({}, {name: changes})
            return self.section(name), notes

    @staticmethod
    def _merge(model: type[BaseModel], current: BaseModel, changes: Mapping[str, Any], prefix: str = "",
               context: dict[str, Any] | None = None) -> BaseModel:
        if not isinstance(changes, Mapping):
            raise ValueError(f"{prefix or 'settings'}: expected an object of name: value pairs")
        try:
            return model.model_validate({**current.model_dump(), **changes}, context=context)
        except ValidationError as e:
            raise ValueError(validation_message(e, prefix)) from None

    def _save(self, settings: BaseModel, sections: Mapping[str, BaseModel]) -> None:
        data = dict(self._raw)
        data.update(settings.model_dump(mode="json"))
        for name, value in sections.items():
            data[name] = value.model_dump(mode="json")
        text = json.dumps(data, indent=4, ensure_ascii=False) + "\n"
        if self._corrupt and self.path.exists():
            keep = self.path.with_name(self.path.name + ".corrupt")
            shutil.copy2(self.path, keep)
            log.warning("replacing unreadable settings file %s; its old content is in %s", self.path, keep)
        write_atomic(self.path, text)
        self._raw = data
        self._corrupt = False

    def _notify(self, settings: Settings) -> list[str]:
        """Run the subscribers; one failing is logged and reported, the others still run."""
        problems = []
        for callback in list(self._subscribers):
            try:
                callback(settings)
            except Exception as e:  # noqa: BLE001 - the settings are saved; report, don't undo
                name = getattr(callback, "__qualname__", repr(callback))
                log.exception("applying settings in %s failed", name)
                problems.append(f"could not apply the change live ({name}: {e}); it applies after a restart")
        return problems


def _changed(old: BaseModel, new: BaseModel) -> list[str]:
    before, after = old.model_dump(), new.model_dump()
    return [k for k in after if before.get(k) != after[k]]
