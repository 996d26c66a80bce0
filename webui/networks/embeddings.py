"""Textual-inversion embeddings: reading the files and spotting their trigger words.

Formats read (the trigger word is always the file's stem, as in A1111):
- A1111 `.pt`: `{"string_to_param": {"*": [n, dim]}, "string_to_token": ..., "name": ...,
  "step": ..., "sd_checkpoint": ..., "sd_checkpoint_name": ...}`, and the older form whose
  `string_to_param` is a `torch.nn.ParameterDict`;
- diffusers `.bin` (or `.pt`): `{"<token>": [dim] or [n, dim]}`;
- `.safetensors` with `emb_params` [n, dim], or SDXL's `clip_l` [n, 768] + `clip_g` [n, 1280];
- any of these files holding a single tensor.
Pickles are read only with torch's weights-only unpickler; one that needs any other object (it
may carry code) is refused with `ModelError` and nothing in it runs.
"""

from __future__ import annotations

import logging
import pickle
import re
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from webui.models.errors import ModelError
from webui.models.readers import read_state_dict
from webui.networks.registry import NetworkFile, NetworkRegistry

log = logging.getLogger(__name__)

_ROLES_BY_ENCODER = ("clip_l", "clip_g")  # SDXL: encoder 0 is CLIP-L, encoder 1 OpenCLIP bigG
_PARAMETER_DICT = "torch.nn.modules.container.ParameterDict"


@dataclass(frozen=True, eq=False)
class Embedding:
    """Vectors to put in place of the trigger word, per text-encoder role."""

    name: str  # trigger word = file stem
    vectors: dict[str, torch.Tensor]  # "default", or "clip_l" / "clip_g"; each float32 [n, dim] on the CPU
    path: Path | None = None

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    def vectors_for(self, encoder_index: int, hidden_size: int) -> torch.Tensor | None:
        """The vectors for text encoder `encoder_index` of a bundle (width `hidden_size`), or
        None when the embedding has none of that width (made for another model family)."""
        if "default" in self.vectors:
            found = self.vectors["default"]
        elif encoder_index < len(_ROLES_BY_ENCODER):
            found = self.vectors.get(_ROLES_BY_ENCODER[encoder_index])
        else:
            found = None
        return found if found is not None and found.shape[-1] == hidden_size else None

    def fits(self, hidden_sizes: list[int], slots: list[int | None] | None = None) -> bool:
        """True when every text encoder (given by width, in bundle order) gets vectors; `slots`
        names the vector set each encoder takes when it is not its position (the SDXL refiner's
        only encoder takes an SDXL embedding's second set)."""
        slots = slots or [None] * len(hidden_sizes)
        return all(self.vectors_for(i if s is None else s, h) is not None
                   for i, (h, s) in enumerate(zip(hidden_sizes, slots)))


def load_embedding(path: Path) -> Embedding:
    """Read an embedding file. Raises `ModelError` naming the file."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        data: object = read_state_dict(path)
    else:
        data = _load_pickle(path)
    vectors = _vectors(data, path)
    for role, t in vectors.items():
        if t.ndim == 1:
            t = t.unsqueeze(0)
        if t.ndim != 2 or t.shape[0] == 0 or not t.is_floating_point():
            raise ModelError(f"embedding tensor {role!r} has shape {tuple(t.shape)}; expected [vectors, width]", path)
        vectors[role] = t.detach().to("cpu", torch.float32).contiguous()
    if len({t.shape[0] for t in vectors.values()}) != 1:
        raise ModelError("its clip_l and clip_g parts have different numbers of vectors", path)
    return Embedding(name=path.stem, vectors=vectors, path=path)


def _vectors(data: object, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(data, dict):
        raise ModelError(f"not an embedding: the file holds a {type(data).__name__}, not a dict", path)
    if "string_to_param" in data:
        params = data["string_to_param"]
        values = list(params.values()) if hasattr(params, "values") else []
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if not tensors:
            raise ModelError("not an embedding: 'string_to_param' holds no tensor", path)
        star = params["*"] if "*" in params else tensors[0]
        return {"default": star}
    if "clip_l" in data or "clip_g" in data:
        return {k: data[k] for k in ("clip_l", "clip_g") if isinstance(data.get(k), torch.Tensor)}
    if isinstance(data.get("emb_params"), torch.Tensor):
        return {"default": data["emb_params"]}
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(tensors) == 1:
        return {"default": tensors[0]}
    keys = ", ".join(str(k) for k in list(data)[:5]) or "none"
    raise ModelError(
        "not a textual-inversion embedding (expected 'string_to_param', 'emb_params', "
        f"'clip_l'/'clip_g' or a single tensor); keys: {keys}",
        path,
    )


def _load_pickle(path: Path) -> object:
    """torch's weights-only load; the old `ParameterDict` form is the one class let through."""
    if not path.is_file():
        raise ModelError("file not found", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refusal = e
    except Exception as e:  # noqa: BLE001  the unpickler raises anything on garbage input
        raise ModelError(f"not a readable embedding (truncated or corrupt): {_first_line(e)}", path) from None
    if zipfile.is_zipfile(path):
        try:
            extra = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001
            extra = []
        if extra == [_PARAMETER_DICT]:
            try:
                with torch.serialization.safe_globals([torch.nn.ParameterDict]):
                    return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                refusal = e
    raise ModelError(
        "refused to load: the pickle holds objects outside the weights-only allow-list "
        f"(it may contain code; nothing in it was run). Detail: {_first_line(refusal)}",
        path,
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(e).__name__


class EmbeddingLibrary:
    """Embeddings of a `NetworkRegistry`, loaded on first use and cached by path, mtime and size."""

    def __init__(self, registry: NetworkRegistry) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[tuple[int, int], Embedding]] = {}

    def files(self) -> dict[str, NetworkFile]:
        """Trigger word -> file; the first (by name) wins when two files share a stem."""
        out: dict[str, NetworkFile] = {}
        for f in self.registry.embeddings():
            out.setdefault(f.stem, f)
        return out

    def load(self, file: NetworkFile) -> Embedding:
        """The embedding in `file`, from the cache unless the file changed. Raises `ModelError`."""
        try:
            st = file.path.stat()
        except OSError:
            raise ModelError("file not found", file.path) from None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._cache.get(file.path)
        if hit and hit[0] == stamp:
            return hit[1]
        emb = load_embedding(file.path)
        with self._lock:
            self._cache[file.path] = (stamp, emb)
        return emb

    def get(self, name: str) -> Embedding:
        """An embedding by trigger word. Raises `ModelError` when there is none."""
        file = self.files().get(name)
        if file is None:
            raise ModelError(f"embedding {name!r} not found in {self.registry.embeddings_dir}")
        return self.load(file)

    def find_in_prompt(self, text: str) -> list[Embedding]:
        """Embeddings whose trigger word appears in `text` as a whole word (ignoring case, the
        longest name winning where names overlap), in order of first appearance. A file that
        cannot be read is logged and left out."""
        files = self.files()
        if not files or not text:
            return []
        names = sorted(files, key=len, reverse=True)
        pattern = re.compile(
            r"(?<![\w])(" + "|".join(re.escape(n) for n in names) + r")(?![\w])", re.IGNORECASE
        )
        by_fold = {n.casefold(): n for n in reversed(names)}
        found: list[Embedding] = []
        seen: set[str] = set()
        for m in pattern.finditer(text):
            name = by_fold.get(m.group(1).casefold())
            if name is None or name in seen:
                continue
            seen.add(name)
            try:
                found.append(self.load(files[name]))
            except ModelError as e:
                log.warning("embedding skipped: %s", e)
        return found
