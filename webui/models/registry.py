"""The checkpoints and VAEs a user dropped into the models folders, and how they are named.

Names follow A1111: a checkpoint's name is its path relative to `models/Stable-diffusion/`
(with extension, `/` separators), its title `name [hash10]`, its model name the name without
extension. A title without a hash means the hash has not been computed yet.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from webui.models.errors import ModelError
from webui.models.hashing import HashCache

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")  # .sft: Black Forest Labs' first Flux releases
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # read only with the weights-only unpickler
GGUF_SUFFIXES = (".gguf",)  # quantised transformers (city96's Flux / SD3.5 files): the gguf extra
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES + GGUF_SUFFIXES
CHECKPOINT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".gguf")
VAE_SUFFIXES = (".safetensors", ".sft", ".pt", ".ckpt")
Prediction = Literal["epsilon", "v"]
_V_PARAM = re.compile(r"""^\s*parameterization\s*:\s*["']?v["']?\s*$""", re.M)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    name: str
    sha256: str | None = None

    @property
    def model_name(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def hash10(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash10}]" if self.sha256 else self.name


def match_name(name: str, listed: list[str]) -> str | None:
    """The listed name (a path relative to its folder) that `name` stands for: the same, or
    without its folder or suffix (`vae-ft-mse`, infotext's `ae`)."""
    for n in listed:
        base = n.rsplit("/", 1)[-1]
        if name in (n, n.rsplit(".", 1)[0], base, base.rsplit(".", 1)[0]):
            return n
    return None


def scan_folder(root: Path, suffixes: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[tuple[str, Path]]:
    """(name relative to `root` with `/`, path) of the files under `root` with these suffixes, by name."""
    if not root.is_dir():
        return []
    found = []
    for p in root.rglob("*"):
        name = p.relative_to(root).as_posix()
        if p.is_file() and p.suffix.lower() in suffixes and not any(name.lower().endswith(s) for s in skip):
            found.append((name, p))
    return sorted(found, key=lambda item: item[0].lower())


class ModelRegistry:
    """Scans the folders on `refresh()`; lookups never touch the disk except for hashing."""

    def __init__(self, ckpt_dir: Path, vae_dir: Path, hashes: HashCache, overrides_file: Path) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.vae_dir = Path(vae_dir)
        self.hashes = hashes
        self.overrides_file = Path(overrides_file)
        self._lock = threading.Lock()
        self._checkpoints: list[CheckpointInfo] = []
        self._vaes: dict[str, Path] = {}

    # --- scanning -----------------------------------------------------------------------------

    def refresh(self, compute_hashes: bool = True) -> list[CheckpointInfo]:
        """Rescan the folders. With `compute_hashes`, hash files not hashed before (slow for new files)."""
        # a paired VAE (foo.vae.safetensors beside foo.safetensors) is not a checkpoint
        files = scan_folder(self.ckpt_dir, CHECKPOINT_SUFFIXES, skip=tuple(".vae" + s for s in VAE_SUFFIXES))
        infos = []
        for name, path in files:
            digest = self.hashes.get(path) if compute_hashes else self.hashes.cached(path)
            infos.append(CheckpointInfo(path=path, name=name, sha256=digest))
        vaes = {name: path for name, path in scan_folder(self.vae_dir, VAE_SUFFIXES)}
        with self._lock:
            self._checkpoints, self._vaes = infos, vaes
        return infos

    def hash_missing_in_background(self) -> threading.Thread:
        """Compute missing hashes off the start-up path; titles gain their hash when done."""
        t = threading.Thread(target=self.refresh, kwargs={"compute_hashes": True}, name="model-hasher", daemon=True)
        t.start()
        return t

    def checkpoints(self) -> list[CheckpointInfo]:
        with self._lock:
            return list(self._checkpoints)

    def titles(self) -> list[str]:
        return [c.title for c in self.checkpoints()]

    def vae_names(self) -> list[str]:
        with self._lock:
            return list(self._vaes)

    def vae_files(self) -> list[tuple[str, Path]]:
        """(name, file) of each VAE in models/VAE, as of the last refresh."""
        with self._lock:
            return list(self._vaes.items())

    # --- lookup -------------------------------------------------------------------------------

    def find(self, query: str) -> CheckpointInfo:
        """A checkpoint by title, name, model name, hash prefix, or a path to any file."""
        q = query.strip()
        items = self.checkpoints()
        bare = re.sub(r"\s*\[[0-9a-fA-F]{8,64}\]$", "", q)
        for c in items:
            if q in (c.title, c.name, c.model_name) or bare in (c.name, c.model_name):
                return self._with_hash(c)
        for c in items:
            if c.path.name == bare or c.path.stem == bare:
                return self._with_hash(c)
        if re.fullmatch(r"[0-9a-fA-F]{8,64}", q):
            for c in items:
                if c.sha256 and c.sha256.startswith(q.lower()):
                    return c
        p = Path(q).expanduser()
        if p.is_file():
            try:
                name = p.resolve().relative_to(self.ckpt_dir.resolve()).as_posix()
            except ValueError:
                name = p.name
            return CheckpointInfo(path=p, name=name, sha256=self.hashes.get(p))
        known = ", ".join(c.name for c in items[:10]) or f"none; put a .safetensors file in {self.ckpt_dir}"
        raise ModelError(f"checkpoint {query!r} not found (available: {known})")

    def _with_hash(self, c: CheckpointInfo) -> CheckpointInfo:
        return c if c.sha256 else CheckpointInfo(path=c.path, name=c.name, sha256=self.hashes.get(c.path))

    def find_vae(self, name: str) -> Path:
        with self._lock:
            vaes = dict(self._vaes)
        if (found := match_name(name, list(vaes))) is not None:
            return vaes[found]
        p = Path(name).expanduser()
        if p.is_file():
            return p
        raise ModelError(f"VAE {name!r} not found (available: {', '.join(vaes) or 'none'})")

    def paired_vae(self, ckpt: CheckpointInfo) -> Path | None:
        """`foo.vae.safetensors` (or .pt/.ckpt) beside `foo.safetensors`."""
        stem = ckpt.path.with_suffix("")
        for suffix in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
            candidate = stem.with_name(stem.name + ".vae" + suffix)
            if candidate.is_file():
                return candidate
        return None

    # --- v-prediction -------------------------------------------------------------------------

    def prediction_for(self, ckpt: CheckpointInfo) -> Prediction | None:
        """The user's per-model override, else a `foo.yaml` beside the file, else None (ask the file)."""
        override = self._overrides().get(ckpt.name)
        if override in ("epsilon", "v"):
            return override
        yaml = ckpt.path.with_suffix(".yaml")
        if yaml.is_file():
            try:
                return "v" if _V_PARAM.search(yaml.read_text(errors="replace")) else "epsilon"
            except OSError:
                return None
        return None

    def set_prediction_override(self, name: str, prediction: Prediction | None) -> None:
        with self._lock:
            data = self._overrides()
            if prediction is None:
                data.pop(name, None)
            else:
                data[name] = prediction
            self.overrides_file.parent.mkdir(parents=True, exist_ok=True)
            self.overrides_file.write_text(json.dumps(data, indent=1, sort_keys=True))

    def _overrides(self) -> dict[str, str]:
        try:
            data = json.loads(self.overrides_file.read_text())
            return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}
