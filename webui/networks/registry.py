"""The LoRA and embedding files a user dropped into `models/Lora/` and `models/embeddings/`.

A file's name is its path relative to its folder without the extension, with `/` separators
(`style/ink` for `models/Lora/style/ink.safetensors`); prompts usually type just the stem
(`<lora:ink:0.8>`), which is accepted too. Scanning happens on `refresh()` (and once more when
a LoRA lookup misses, so a file dropped in while running is found); hashes are computed only
when asked for, through the shared on-disk `HashCache`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from webui.models.errors import ModelError
from webui.models.hashing import HashCache
from webui.models.readers import safetensors_metadata

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")  # pickles are read weights-only
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
_PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class NetworkFile:
    """One LoRA or embedding file."""

    name: str  # relative path without extension, `/` separators
    path: Path
    preview: Path | None = None
    role: str = "lora"  # "lora" or "embedding": they are hashed differently

    @property
    def stem(self) -> str:
        return self.path.stem

    def short_hash(self, hashes: HashCache) -> str:
        """The 12-hex hash infotext records (cached on disk; computed on first use). For a
        `.safetensors` LoRA it is the "addnet" hash of the tensor data, as A1111 and civitai
        use; otherwise the sha256 of the whole file."""
        kind = "addnet" if self.role == "lora" and self.path.suffix.lower() == ".safetensors" else "sha256"
        return hashes.get(self.path, kind)[:12]


def _preview_for(path: Path) -> Path | None:
    """`name.png` / `name.preview.png` (or .jpg/.jpeg/.webp) beside `name.<ext>`."""
    stem = path.with_suffix("")
    for middle in ("", ".preview"):
        for suffix in _PREVIEW_SUFFIXES:
            candidate = stem.with_name(stem.name + middle + suffix)
            if candidate.is_file():
                return candidate
    return None


def scan_networks(root: Path, suffixes: tuple[str, ...], role: str = "lora") -> list[NetworkFile]:
    """Every file under `root` (sub-folders included) with one of `suffixes`, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.rglob("*"):
        if p.suffix.lower() in suffixes and p.is_file():
            name = p.relative_to(root).with_suffix("").as_posix()
            found.append(NetworkFile(name=name, path=p, preview=_preview_for(p), role=role))
    # a stem with two suffixes (x.safetensors and x.pt): keep the safetensors one first
    found.sort(key=lambda f: (f.name.lower(), f.path.suffix.lower() != ".safetensors"))
    return found


class NetworkRegistry:
    """Lists of LoRA and embedding files; lookups do not touch the disk except on a miss."""

    def __init__(self, lora_dir: Path, embeddings_dir: Path, hashes: HashCache) -> None:
        self.lora_dir = Path(lora_dir)
        self.embeddings_dir = Path(embeddings_dir)
        self.hashes = hashes
        self._lock = threading.Lock()
        self._loras: list[NetworkFile] = []
        self._embeddings: list[NetworkFile] = []
        self._metadata: dict[tuple[str, int, int], dict[str, str]] = {}  # (path, mtime, size) -> metadata

    def refresh(self) -> None:
        """Rescan both folders."""
        loras = scan_networks(self.lora_dir, LORA_SUFFIXES)
        embeddings = scan_networks(self.embeddings_dir, EMBEDDING_SUFFIXES, role="embedding")
        with self._lock:
            self._loras, self._embeddings = loras, embeddings

    def loras(self) -> list[NetworkFile]:
        with self._lock:
            return list(self._loras)

    def embeddings(self) -> list[NetworkFile]:
        with self._lock:
            return list(self._embeddings)

    def metadata(self, file: NetworkFile) -> dict[str, str]:
        """The file's training metadata (safetensors header), read once per version of the file."""
        try:
            st = file.path.stat()
        except OSError:
            return {}
        key = (str(file.path), st.st_mtime_ns, st.st_size)
        with self._lock:
            found = self._metadata.get(key)
        if found is None:
            found = safetensors_metadata(file.path)
            with self._lock:
                self._metadata = {k: v for k, v in self._metadata.items() if k[0] != key[0]}
                self._metadata[key] = found
        return found

    def find_lora(self, name: str) -> NetworkFile:
        """A LoRA by the name typed in `<lora:NAME:w>`: its relative path without extension, its
        stem, or either with the extension. Exact matches first, then ignoring case; on a miss the
        folder is rescanned once. Raises `ModelError` listing some available names."""
        found = _match(self.loras(), name)
        if found is None:
            self.refresh()
            found = _match(self.loras(), name)
        if found is None:
            names = [f.name for f in self.loras()]
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            raise ModelError(f"LoRA {name!r} not found in {self.lora_dir} (available: {shown or 'none'})")
        return found


def _match(files: list[NetworkFile], query: str) -> NetworkFile | None:
    q = query.strip().replace("\\", "/")
    keys = (
        lambda f: f.name,
        lambda f: f.stem,
        lambda f: f"{f.name}{f.path.suffix}",
        lambda f: f.path.name,
    )
    for fold in (False, True):
        want = q.casefold() if fold else q
        for key in keys:
            for f in files:
                k = key(f)
                if (k.casefold() if fold else k) == want:
                    return f
    return None
