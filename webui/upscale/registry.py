"""The upscalers a user can pick: built-in resamplers and the model files in the models folder.

Names: "None" (no upscaling: the image is returned as it is), "Lanczos", "Nearest", then one
per `.pth` / `.pt` / `.ckpt` / `.safetensors` file under `models/ESRGAN/`, `RealESRGAN/`,
`SwinIR/`, `DAT/`, `HAT/`, `ScuNET/` and `upscale_models/` (ComfyUI's folder), sub-folders
included, named by the file's stem. A stem already taken (by a built-in or by an earlier file;
folders in that order, each in path order) gets its folder appended, `"4x-foo (RealESRGAN)"`,
so no file is hidden.

Model files load through spandrel (every architecture it recognises) when it can be imported,
else through the built-in RRDBNet / SRVGGNetCompact loaders (`webui.upscale.spandrel_arch` says
why). A model upscaler runs at its native scale, again on its own output while the image is
still smaller than the target (at most `MAX_PASSES` times, as A1111 does), tiled with blended
overlaps, and the result is resized with Lanczos to the exact target. Weights are read only
through `read_state_dict` (safetensors, or pickles through the weights-only unpickler) and kept
in a small per-registry cache.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from webui.images import list_images, open_image
from webui.models.errors import ModelError
from webui.models.readers import read_state_dict
from webui.outputs import unique_stems
from webui.upscale import spandrel_arch
from webui.upscale.arch import Network, build_network
from webui.upscale.tiles import Cancelled, upscale_tensor

log = logging.getLogger(__name__)

MODEL_FOLDERS = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT", "ScuNET", "upscale_models")
MODEL_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")
MAX_PASSES = 3
MAX_SIDE = 16384  # largest output side accepted: 16384^2 RGB is already 0.8 GB as float32

Kind = Literal["none", "lanczos", "nearest", "model"]
_BUILTINS: tuple[tuple[str, Kind], ...] = (("None", "none"), ("Lanczos", "lanczos"), ("Nearest", "nearest"))
_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class UpscalerInfo:
    name: str
    kind: Kind
    path: Path | None = None  # the weights file, for kind "model"


def target_size(size_in: tuple[int, int], scale: float | None, size: tuple[int, int] | None) -> tuple[int, int] | None:
    """The (width, height) asked for, or None when neither `scale` nor `size` is given.
    ValueError with a message fit for the user on anything else."""
    if scale is not None and size is not None:
        raise ValueError("give either a scale factor or a target size, not both")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"upscale factor must be a positive number, got {scale!r}")
        w, h = (max(1, round(n * scale)) for n in size_in)
        if max(w, h) > MAX_SIDE:
            raise ValueError(
                f"upscale factor {scale:g} would make a {w}x{h} image; the largest side allowed is {MAX_SIDE}"
            )
        return w, h
    if size is not None:
        ok = (
            isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in size)
        )
        if not ok:
            raise ValueError(f"target size must be (width, height) in whole pixels, got {size!r}")
        if not all(1 <= n <= MAX_SIDE for n in size):
            raise ValueError(f"target size {size[0]}x{size[1]} is out of range: each side must be 1..{MAX_SIDE}")
        return int(size[0]), int(size[1])
    return None


def _check_tiling(tile: int, overlap: int) -> None:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0:
        raise ValueError(f"tile size must be 0 (no tiling) or a positive number of pixels, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"tile overlap must be 0 or more pixels, got {overlap!r}")
    if tile and 2 * overlap >= tile:
        raise ValueError(f"tile overlap {overlap} is too large for tiles of {tile} px (must be under half the tile)")


def _to_tensor(image: Image.Image) -> torch.Tensor:
    a = np.asarray(image, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float().div_(255)


def _to_image(x: torch.Tensor) -> Image.Image:
    a = x[0].mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a, "L" if a.shape[2] == 1 else "RGB")


def _plain_mode(image: Image.Image) -> Image.Image:
    """RGB, RGBA or L, converting palette, CMYK, 16-bit and the like."""
    if image.mode in ("RGB", "RGBA", "L"):
        return image
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    return image.convert("RGBA" if has_alpha else "RGB")


class UpscalerRegistry:
    """Scans the `MODEL_FOLDERS` of `models_dir` on `refresh()`; loads models on first use and
    keeps the last `cache_size` (model, device, dtype) combinations."""

    def __init__(self, models_dir: Path, cache_size: int = 2) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.models_dir = Path(models_dir)
        self.cache_size = cache_size
        self._lock = threading.RLock()
        self._entries: dict[str, UpscalerInfo] = {}
        self._cache: OrderedDict[tuple, Network] = OrderedDict()
        self.spandrel = spandrel_arch.Spandrel()
        self.refresh()

    # -- listing ---------------------------------------------------------------------------
    def refresh(self) -> None:
        entries = {name: UpscalerInfo(name, kind) for name, kind in _BUILTINS}
        taken = {name.casefold() for name in entries}
        for folder in MODEL_FOLDERS:
            root = self.models_dir / folder
            if not root.is_dir():
                continue
            files = [p for p in root.rglob("*") if p.suffix.lower() in MODEL_SUFFIXES and p.is_file()]
            for path in sorted(files, key=lambda p: p.relative_to(root).as_posix().lower()):
                name = path.stem
                if name.casefold() in taken:
                    name = f"{path.stem} ({path.parent.relative_to(self.models_dir).as_posix()})"
                if name.casefold() in taken:
                    name = f"{path.stem} ({path.relative_to(self.models_dir).as_posix()})"
                taken.add(name.casefold())
                entries[name] = UpscalerInfo(name, "model", path)
        with self._lock:
            self._entries = entries
            paths = {str(e.path) for e in entries.values() if e.path is not None}
            for key in [k for k in self._cache if k[0] not in paths]:
                del self._cache[key]

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[UpscalerInfo]:
        return list(self._entries.values())

    def get(self, name: str) -> UpscalerInfo:
        """The upscaler called `name` (exact, else ignoring case); ModelError naming the choices."""
        entries = self._entries
        if isinstance(name, str):
            if name in entries:
                return entries[name]
            folded = [e for n, e in entries.items() if n.casefold() == name.casefold()]
            if len(folded) == 1:
                return folded[0]
        raise ModelError(f"unknown upscaler {name!r}; available: {', '.join(entries)}")

    # -- models ----------------------------------------------------------------------------
    def load(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Network:
        """The network of model upscaler `name` on `device` in `dtype`, from the cache if there."""
        info = self.get(name)
        if info.path is None:
            raise ModelError(f"upscaler {info.name!r} is built in, not a model")
        device = torch.device(device)
        try:
            st = info.path.stat()
        except OSError:
            raise ModelError("file not found (removed since the list was refreshed?)", info.path) from None
        key = (str(info.path), st.st_mtime_ns, st.st_size, str(device), dtype)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            for stale in [k for k in self._cache if k[0] == key[0] and k[1:3] != key[1:3]]:
                del self._cache[stale]
            sd = read_state_dict(info.path, lambda _k, dt: torch.float32 if dt.is_floating_point else dt)
            net = self._build(sd, info.path)
            return self._keep(key, net, info, device, dtype)

    def _build(self, sd: dict[str, torch.Tensor], path: Path) -> Network:
        spandrel = self.spandrel.module()
        if spandrel is None:
            try:
                return build_network(sd, path)
            except ModelError as e:  # it may be an architecture spandrel would know
                raise ModelError(f"{e} ({self.spandrel.problem})") from None
        try:
            return spandrel_arch.build_network(spandrel, sd, path)
        except ModelError as refused:
            # an RRDBNet or Compact whose sizes spandrel guesses wrong (its ESRGAN assumes 32 growth
            # channels): the built-in networks read every size from the shapes
            try:
                return build_network(sd, path)
            except ModelError:
                raise refused from None

    def _keep(self, key: tuple, net: Network, info: UpscalerInfo, device: torch.device, dtype: torch.dtype) -> Network:
        net.module.to(device=device, dtype=net.dtype_for(dtype))
        self._cache[key] = net
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        log.info("loaded upscaler %s (%s x%d) on %s", info.name, net.arch, net.scale, device)
        return net

    def unload(self) -> None:
        """Drop every cached model."""
        with self._lock:
            self._cache.clear()

    # -- upscaling -------------------------------------------------------------------------
    def upscale(
        self,
        image: Image.Image,
        name: str,
        *,
        scale: float | None = None,
        size: tuple[int, int] | None = None,
        tile: int = 512,
        tile_overlap: int = 32,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cancel: Callable[[], bool] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Image.Image:
        """`image` upscaled by `name` to `scale` x its size or to `size` = (width, height).

        With neither, a model upscales once at its native scale (built-in resamplers need one).
        "None" returns a copy of the image unchanged, whatever the target. `tile` (input pixels,
        0 = whole image at once) and `tile_overlap` bound memory on large images; `cancel` is
        polled between tiles and raises `Cancelled`; `progress(done, total)` follows the tiles
        of each pass. Raises ModelError (unknown name, unreadable weights) or ValueError.
        """
        info = self.get(name)
        target = target_size(image.size, scale, size)
        _check_tiling(tile, tile_overlap)
        if info.kind == "none":
            return image.copy()
        image = _plain_mode(image)
        if info.kind in _RESAMPLE:
            if target is None:
                raise ValueError(f"{info.name} needs an upscale factor or a target size")
            return image.resize(target, resample=_RESAMPLE[info.kind])
        net = self.load(info.name, device, dtype)
        if target is None:
            target = (image.width * net.scale, image.height * net.scale)
        alpha = image.getchannel("A") if image.mode == "RGBA" else None
        current = image.convert("L" if net.channels == 1 else "RGB")
        passes = 0
        while passes < MAX_PASSES and (
            (net.scale == 1 and passes == 0) or (net.scale > 1 and (current.width < target[0] or current.height < target[1]))
        ):
            x = upscale_tensor(net, _to_tensor(current), tile=tile, overlap=tile_overlap, device=torch.device(device),
                               dtype=net.dtype_for(dtype), cancel=cancel, progress=progress)
            current = _to_image(x)
            passes += 1
        if current.size != target:
            current = current.resize(target, resample=Image.Resampling.LANCZOS)
        if image.mode == "L" and current.mode != "L":
            current = current.convert("L")
        elif image.mode != "L" and current.mode == "L":
            current = current.convert("RGB")
        if alpha is not None:
            current = current.convert("RGB")
            current.putalpha(alpha.resize(target, resample=Image.Resampling.LANCZOS))
        return current

    def upscale_folder(
        self,
        src: Path,
        dst: Path,
        name: str,
        *,
        save: Callable[[Image.Image, Path, str, str], Path],
        cancel: Callable[[], bool] | None = None,
        **options,
    ) -> list[Path]:
        """Upscale every image directly in `src` into `dst` under its own name, keeping its infotext
        (PNG `parameters`, or a JPEG/WebP EXIF comment): `save(image, dst, stem, infotext)` writes
        each (the app's output writer). Files that are not readable images are skipped with a
        warning. `options` are those of `upscale`; `cancel` is also polled between images (raises
        `Cancelled`; what is written stays). Returns the written paths, in source-name order."""
        src, dst = Path(src), Path(dst)
        if not src.is_dir():
            raise ValueError(f"input folder {src} does not exist")
        if dst.resolve() == src.resolve():
            raise ValueError("the output folder must differ from the input folder (files would be overwritten)")
        self.get(name)  # a bad name fails before anything is written
        target_size((1, 1), options.get("scale"), options.get("size"))
        files = list_images(src)
        dst.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for path, stem in zip(files, unique_stems([f.stem for f in files])):
            if cancel is not None and cancel():
                raise Cancelled()
            opened = open_image(path)
            if opened is None:
                continue
            image, infotext = opened
            result = self.upscale(image, name, cancel=cancel, **options)
            written.append(save(result, dst, stem, infotext or ""))
        return written
