"""Find, order, load and call extensions; enable/disable them; say why one is off.

Sources: `extensions/<name>/` folders with an `extension.toml` manifest, and installed Python
packages declaring a `webui.extensions` entry point. Order: `requires` / `load_after` /
`load_before` constraints, then name. An extension that cannot load (import error, unknown hook
name, incompatible API version, missing requirement, a start-up hook raising) is disabled with
its reason and the app runs on. Hooks of a job are called in that order; a hook raising during a
job fails the job with an error naming the extension.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from webui.errors import ExtensionError
from webui.extensions import api
from webui.extensions.api import JobRejected, SettingsRegistry, UiSection
from webui.extensions.hookspecs import Hooks
from webui.files import write_atomic

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "webui.extensions"
MANIFEST = "extension.toml"


class Status(StrEnum):
    NOT_LOADED = "not loaded"
    LOADED = "loaded"
    DISABLED = "disabled"
    ERROR = "error"


@dataclass
class Extension:
    name: str
    version: str = "0"
    description: str = ""
    api_version: str = api.API_VERSION
    path: Path | None = None  # the folder (None for an installed package)
    source: str = "folder"  # "folder" or "package"
    requires: tuple[str, ...] = ()
    load_after: tuple[str, ...] = ()
    load_before: tuple[str, ...] = ()
    enabled: bool = True  # the user's choice
    state: Status = Status.NOT_LOADED
    reason: str = ""  # why it is disabled (when not by the user) or failed
    module: ModuleType | None = None
    ui: UiSection | None = None
    samplers: list[Any] = field(default_factory=list)  # SamplerSpec of the samplers it adds
    axes: list[api.XyzAxis] = field(default_factory=list)  # X/Y/Z plot axes it adds
    detectors: list[api.Detector] = field(default_factory=list)  # detectors it adds
    settings_model: type[BaseModel] | None = None
    loader: Callable[[], ModuleType] | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.state is Status.LOADED

    @property
    def status(self) -> str:
        """The Extensions tab's words: "loaded", "disabled", "disabled (<why>)", "error: <why>"."""
        if self.state is Status.ERROR:
            return f"error: {self.reason}"
        return f"{self.state} ({self.reason})" if self.reason else str(self.state)

    def assets(self) -> tuple[list[Path], list[Path]]:
        """(javascript files, css files) the page adds."""
        if self.path is None:
            return [], []
        js = sorted((self.path / "javascript").glob("*.js")) if (self.path / "javascript").is_dir() else []
        css = [self.path / "style.css"] if (self.path / "style.css").is_file() else []
        return js, css


def _tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def read_manifest(folder: Path) -> Extension:
    """The extension described by `folder/extension.toml` (ValueError with the reason)."""
    try:
        data = tomllib.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{MANIFEST} unreadable: {e}") from None
    module = data.get("module", "__init__.py" if (folder / "__init__.py").is_file() else "main.py")
    ext = Extension(
        name=str(data.get("name") or folder.name),
        version=str(data.get("version", "0")),
        description=str(data.get("description", "")),
        api_version=str(data.get("api", data.get("api_version", api.API_VERSION))),
        path=folder,
        requires=_tuple(data.get("requires")),
        load_after=_tuple(data.get("load_after")),
        load_before=_tuple(data.get("load_before")),
    )
    entry = folder / module
    ext.loader = lambda: _import_file(ext.name, entry)
    return ext


def _import_file(name: str, entry: Path) -> ModuleType:
    if not entry.is_file():
        raise ImportError(f"{entry.name} not found in {entry.parent}")
    module_name = f"webui_extension_{''.join(c if c.isalnum() else '_' for c in name)}"
    location = entry.parent if entry.name == "__init__.py" else None
    spec = importlib.util.spec_from_file_location(
        module_name, entry, submodule_search_locations=[str(location)] if location else None)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {entry}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def compatible(version: str) -> bool:
    """Same major version as ours (the stability promise holds within a major version)."""
    return version.split(".")[0] == api.API_VERSION.split(".")[0]


def order(extensions: list[Extension]) -> list[Extension]:
    """Constraints first (requires/load_after: after; load_before: before), then by name.
    Extensions caught in a cycle get an error status and are left out."""
    by_name = {e.name: e for e in extensions}
    after: dict[str, set[str]] = {e.name: set() for e in extensions}
    for e in extensions:
        for other in (*e.requires, *e.load_after):
            if other in by_name:
                after[e.name].add(other)
        for other in e.load_before:
            if other in by_name:
                after[other].add(e.name)
    result: list[Extension] = []
    placed: set[str] = set()
    while len(placed) < len(by_name):
        ready = sorted(n for n in by_name if n not in placed and after[n] <= placed)
        if not ready:
            for n in sorted(set(by_name) - placed):
                by_name[n].state = Status.ERROR
                by_name[n].reason = "load order cycle between " + ", ".join(sorted(set(by_name) - placed))
            break
        result.append(by_name[ready[0]])
        placed.add(ready[0])
    return result


@dataclass(frozen=True)
class JobExtensions:
    """What one job gives each extension's hooks: args, settings and scratch by extension name."""

    args: dict[str, Any]
    settings: dict[str, Any]
    job_id: str = ""
    scratch: dict[str, dict[str, Any]] = field(default_factory=dict)  # each extension's own, for the job


class _Core:
    """The built-in `generate`: runs the job the wrappers wrap."""

    @api.hookimpl(trylast=True)
    def generate(self, job: api.JobInfo) -> Any:
        return job._run()


class ExtensionManager:
    @classmethod
    def empty(cls) -> "ExtensionManager":
        """A manager with no extensions (loaded, calling no hook): what an engine built without
        extensions has, so callers never ask whether there is one."""
        manager = cls([], None, enabled=False, packages=False)
        manager.load()
        return manager

    def __init__(self, folders: list[Path], state_file: Path | None, *, enabled: bool = True,
                 packages: bool = True, data_dir: Path | None = None) -> None:
        self.data_dir = data_dir or Path(".")
        self.folders = folders  # scanned in order; the last is where installs go
        self.state_file = state_file
        self.enabled = enabled  # False: --disable-all-extensions
        self.packages = packages
        self.pm = pluggy.PluginManager(api.PROJECT)
        self.pm.add_hookspecs(Hooks)
        self.pm.register(_Core(), name="_core")
        self.extensions: list[Extension] = []
        self._settings_sink: Callable[[str, type[BaseModel]], None] | None = None
        self._settings_source: Callable[[str], BaseModel | None] | None = None

    # --- discovery and loading ----------------------------------------------------------------

    def discover(self) -> list[Extension]:
        found: list[Extension] = []
        for root in self.folders:
            if not root.is_dir():
                continue
            for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if not (folder / MANIFEST).is_file():
                    continue
                try:
                    ext = read_manifest(folder)
                except ValueError as e:
                    ext = Extension(name=folder.name, path=folder, state=Status.ERROR, reason=str(e))
                if any(other.name == ext.name for other in found):
                    ext.state, ext.reason = Status.ERROR, f"another extension is already named {ext.name!r}"
                    ext.name = f"{ext.name} ({folder})"
                found.append(ext)
        if self.packages:
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                dist = getattr(ep, "dist", None)
                ext = Extension(name=ep.name, version=dist.version if dist else "0", source="package",
                                description=(dist.metadata.get("Summary") or "") if dist else "")
                ext.loader = ep.load
                found.append(ext)
        return found

    def load(self, settings_sink: Callable[[str, type[BaseModel]], None] | None = None,
             settings_source: Callable[[str], BaseModel | None] | None = None) -> list[Extension]:
        """Discover, order and register every enabled extension; call `register_settings`."""
        self._settings_sink, self._settings_source = settings_sink, settings_source
        disabled = self._disabled()
        exts = self.discover()
        for e in exts:
            e.enabled = e.name not in disabled
        self.extensions = order([e for e in exts if e.state is not Status.ERROR]) + [
            e for e in exts if e.state is Status.ERROR]
        names = {e.name for e in self.extensions if e.enabled}
        modules: list[Extension] = []
        for e in self.extensions:
            if e.state is Status.ERROR:
                continue
            if not self.enabled:
                e.state, e.reason = Status.DISABLED, "--disable-all-extensions"
                continue
            if not e.enabled:
                e.state = Status.DISABLED
                continue
            missing = [r for r in e.requires if r not in names]
            if missing:
                self._fail(e, f"requires {', '.join(missing)}, which is not installed or not enabled")
                continue
            if not compatible(e.api_version):
                self._fail(e, f"targets extension API {e.api_version}; this app provides {api.API_VERSION}")
                continue
            try:
                assert e.loader is not None
                e.module = e.loader()
                if hasattr(e.module, "WEBUI_API") and not compatible(str(e.module.WEBUI_API)):
                    raise ValueError(f"targets extension API {e.module.WEBUI_API}; this app provides {api.API_VERSION}")
            except Exception as err:  # noqa: BLE001  any failure disables this extension only
                self._fail(e, f"{type(err).__name__}: {err}")
                continue
            modules.append(e)
        # pluggy calls the last registered first: register in reverse so hooks run in load order
        for e in reversed(modules):
            try:
                self.pm.register(e.module, name=e.name)
                self.pm.check_pending()
            except Exception as err:  # noqa: BLE001  e.g. a misspelt hook name
                self._unregister(e)
                self._fail(e, f"{type(err).__name__}: {err}")
                continue
            e.state = Status.LOADED
        for e in self.active():
            self._start(e)
        return self.extensions

    def _start(self, e: Extension) -> None:
        def add(model: type[BaseModel]) -> None:
            e.settings_model = model
            if self._settings_sink:
                self._settings_sink(e.name, model)

        if not self._call_startup(e, "register_settings", settings=SettingsRegistry(add)):
            return
        hook = "samplers"
        try:
            e.samplers = self._sampler_specs(e, self._call_one(e, hook) or [])
            hook = "xyz_axes"
            e.axes = self._axes(e, self._call_one(e, hook) or [])
            hook = "detectors"
            e.detectors = self._detectors(e, self._call_one(e, hook) or [])
            hook = "ui_contribution"
            e.ui = self._call_one(e, hook)
        except Exception as err:  # noqa: BLE001
            self._unregister(e)
            self._fail(e, f"{hook} raised {type(err).__name__}: {err}")

    def _sampler_specs(self, e: Extension, given: list[Any]) -> list[Any]:
        from webui.samplers.table import SamplerSpec, find_sampler

        taken = {s.name.lower() for other in self.active() if other is not e for s in other.samplers}
        specs = []
        for sampler in given:
            if not isinstance(sampler, api.ExtensionSampler):
                raise TypeError("samplers must return ExtensionSampler objects")
            if find_sampler(sampler.name) is not None or sampler.name.lower() in taken:
                raise ValueError(f"sampler name {sampler.name!r} is already taken")
            specs.append(SamplerSpec(sampler.name, f"extension:{e.name}", stochastic=sampler.stochastic,
                                     options=tuple(sampler.options), implementation=sampler.fn))
        return specs

    def _axes(self, e: Extension, given: list[Any]) -> list[api.XyzAxis]:
        from webui.scripts.xyz import AXES

        taken = {a.label.lower() for a in AXES} | {a.label.lower() for o in self.active() if o is not e for a in o.axes}
        for axis in given:
            if not isinstance(axis, api.XyzAxis) or axis.kind not in (int, float, str) or not callable(axis.apply):
                raise TypeError("xyz_axes must return XyzAxis objects with kind int, float or str")
            if axis.label.lower() in taken:
                raise ValueError(f"X/Y/Z axis label {axis.label!r} is already taken")
            taken.add(axis.label.lower())
        return list(given)

    def _detectors(self, e: Extension, given: list[Any]) -> list[api.Detector]:
        taken = {d.name.lower() for o in self.active() if o is not e for d in o.detectors}
        for d in given:
            if not isinstance(d, api.Detector) or not callable(d.detect):
                raise TypeError("detectors must return Detector objects")
            if d.name.lower() in taken:
                raise ValueError(f"detector name {d.name!r} is already taken")
            taken.add(d.name.lower())
        return list(given)

    def detectors(self) -> dict[str, api.Detector]:
        """Every active extension's detectors, by name."""
        return {d.name: d for e in self.active() for d in e.detectors}

    def xyz_axes(self) -> list[api.XyzAxis]:
        """Every active extension's X/Y/Z plot axes, in load order."""
        return [a for e in self.active() for a in e.axes]

    def sampler_specs(self) -> list[Any]:
        """Every active extension's samplers (webui.samplers.table.SamplerSpec)."""
        return [s for e in self.active() for s in e.samplers]

    def app_started(self, app: Any) -> None:
        for e in self.active():
            self._call_startup(e, "app_started", app=app)

    def _call_startup(self, e: Extension, hook: str, **kwargs: Any) -> bool:
        try:
            self._call_one(e, hook, **kwargs)
            return True
        except Exception as err:  # noqa: BLE001
            self._unregister(e)
            self._fail(e, f"{hook} raised {type(err).__name__}: {err}")
            return False

    def _call_one(self, e: Extension, hook: str, **kwargs: Any) -> Any:
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            if impl.plugin_name == e.name:
                return impl.function(*[kwargs[a] for a in impl.argnames])
        return None

    def _unregister(self, e: Extension) -> None:
        if self.pm.get_plugin(e.name) is not None:
            self.pm.unregister(name=e.name)

    @staticmethod
    def _fail(e: Extension, reason: str) -> None:
        e.state, e.reason = Status.ERROR, reason
        log.error("extension %s disabled: %s", e.name, reason)

    def status_line(self, e: Extension) -> str:
        """`e.status`, with the extension's own `extension_status` note when it is loaded."""
        if not e.active:
            return e.status
        try:
            note = self._call_one(e, "extension_status", settings=self.settings_of(e), data_dir=self.data_dir)
        except Exception as err:  # noqa: BLE001  a status line must never break the listing
            note = f"status unavailable ({type(err).__name__}: {err})"
        return f"loaded: {note}" if note else e.status

    def active(self) -> list[Extension]:
        return [e for e in self.extensions if e.active]

    def get(self, name: str) -> Extension | None:
        return next((e for e in self.extensions if e.name == name), None)

    # --- enable / disable (takes effect on the next start) -------------------------------------

    def _disabled(self) -> set[str]:
        if self.state_file is None or not self.state_file.is_file():
            return set()
        try:
            return set(json.loads(self.state_file.read_text(encoding="utf-8")).get("disabled", []))
        except (OSError, ValueError, AttributeError):
            log.warning("could not read %s; every extension is enabled", self.state_file)
            return set()

    def set_enabled(self, name: str, enabled: bool) -> None:
        if self.get(name) is None:
            raise ValueError(f"no extension named {name!r}")
        disabled = self._disabled()
        (disabled.discard if enabled else disabled.add)(name)
        assert self.state_file is not None
        write_atomic(self.state_file, json.dumps({"disabled": sorted(disabled)}, indent=2))
        e = self.get(name)
        assert e is not None
        e.enabled = enabled

    # --- calling hooks during a job -----------------------------------------------------------

    def validate_args(self, given: dict[str, Any]) -> dict[str, Any]:
        """Each extension's raw values -> its args model (ValueError naming the extension)."""
        out: dict[str, Any] = {}
        for name, raw in given.items():
            e = self.get(name)
            if e is None or not e.active:
                raise ValueError(f"extensions: no active extension named {name!r}")
            model = e.ui.args_model if e.ui else None
            if model is None:
                out[name] = raw
                continue
            if isinstance(raw, dict) and "args" in raw and set(raw) <= {"args"}:
                raw = raw["args"]  # A1111's alwayson_scripts shape
            if isinstance(raw, (list, tuple)):  # positional, in the model's field order
                raw = dict(zip(model.model_fields, raw))
            try:
                out[name] = model.model_validate(raw or {})
            except ValidationError as err:
                detail = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in err.errors())
                raise ValueError(f"extensions.{name}: {detail}") from None
        return out

    def unknown_args(self, given: dict[str, Any]) -> list[str]:
        """`extension.field` for every named value its args model has no field for (a misspelt
        `colour` for `color`): validation would silently drop them, so callers report them."""
        unknown = []
        for name, raw in given.items():
            e = self.get(name)
            model = e.ui.args_model if e is not None and e.ui else None
            if isinstance(raw, dict) and set(raw) <= {"args"}:
                raw = raw.get("args")
            if model is not None and isinstance(raw, dict):
                unknown += [f"{name}.{k}" for k in raw if k not in model.model_fields]
            elif model is not None and isinstance(raw, (list, tuple)) and len(raw) > len(model.model_fields):
                unknown.append(f"{name}: {len(raw) - len(model.model_fields)} value(s) past its "
                               f"{len(model.model_fields)} fields")
        return unknown

    def job_context(self, given: dict[str, Any], job_id: str = "") -> JobExtensions:
        """Once per job: every active extension's validated args (its defaults when the request
        gives none) and a snapshot of its settings, so hooks in the sampling loop look nothing up."""
        args = self.validate_args(given)
        for e in self.active():
            if e.name not in args:
                args[e.name] = self.default_args(e)
        return JobExtensions(args, {e.name: self.settings_of(e) for e in self.active()}, job_id)

    def call(self, hook: str, stage: Any, job: JobExtensions | None = None) -> None:
        """Call `hook` on every active extension in load order, giving each its own args and
        settings (from `job`, else looked up now) on the stage."""
        hc = getattr(self.pm.hook, hook)
        for impl in reversed(hc.get_hookimpls()):
            if impl.plugin_name == "_core":
                continue
            name = impl.plugin_name
            if job is None:
                job = self.job_context({})
            if hasattr(stage, "args"):
                stage.args = job.args.get(name)
            if hasattr(stage, "settings"):
                stage.settings = job.settings.get(name)
            if hasattr(stage, "scratch"):
                stage.scratch = job.scratch.setdefault(name, {})
            if hasattr(stage, "job_id"):
                stage.job_id = job.job_id
            values = {"stage": stage, "saved": stage}
            try:
                impl.function(*[values[a] for a in impl.argnames])
            except JobRejected:
                raise
            except Exception as err:
                raise ExtensionError(f"extension {impl.plugin_name!r} failed in {hook}: "
                                     f"{type(err).__name__}: {err}") from err

    def settings_of(self, e: Extension | None) -> Any:
        """An extension's current Settings section (None when it declared none)."""
        if e is None or e.settings_model is None:
            return None
        if self._settings_source is None:
            return e.settings_model()
        return self._settings_source(e.name)

    @staticmethod
    def default_args(e: Extension | None) -> Any:
        """An extension's args when the request gives none: its model's defaults."""
        if e is None or e.ui is None or e.ui.args_model is None:
            return None
        try:
            return e.ui.args_model()
        except ValidationError:
            return None

    def has(self, hook: str) -> bool:
        return any(i.plugin_name != "_core" for i in getattr(self.pm.hook, hook).get_hookimpls())

    def run_job(self, info: api.JobInfo, run: Callable[[], Any]) -> Any:
        """`run()` inside every extension's `generate` wrapper."""
        info._run = run
        try:
            return self.pm.hook.generate(job=info)
        except (JobRejected, ExtensionError):
            raise
        except Exception as err:
            plugin = _plugin_in_traceback(err, self.extensions)
            if plugin is None:
                raise
            raise ExtensionError(f"extension {plugin!r} failed in generate: {type(err).__name__}: {err}") from err

    def model_loaded(self, model: Any) -> None:
        for impl in reversed(self.pm.hook.model_loaded.get_hookimpls()):
            try:
                impl.function(*[{"model": model}[a] for a in impl.argnames])
            except Exception as err:  # noqa: BLE001  a reader of the model must not break loading
                log.error("extension %s failed in model_loaded: %s: %s", impl.plugin_name, type(err).__name__, err)

    def assets(self) -> tuple[list[Path], list[Path]]:
        js: list[Path] = []
        css: list[Path] = []
        for e in self.active():
            j, c = e.assets()
            js += j
            css += c
        return js, css

    def sections(self, tab: str) -> Iterable[Extension]:
        return [e for e in self.active() if e.ui is not None and tab in e.ui.tabs]


def _plugin_in_traceback(err: BaseException, extensions: list[Extension]) -> str | None:
    """The extension whose module raised `err` (for errors inside `generate` wrappers)."""
    modules = {e.module.__name__: e.name for e in extensions if e.module is not None}
    tb = err.__traceback__
    found = None
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        for module, ext in modules.items():
            if name == module or name.startswith(module + "."):
                found = ext
        tb = tb.tb_next
    return found
