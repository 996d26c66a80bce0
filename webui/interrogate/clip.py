"""The CLIP interrogator (A1111's "Interrogate CLIP", the API's `model: "clip"`): a BLIP caption
of the image, then the medium, artist, movement and flavours (webui.interrogate.terms) that a
CLIP model ranks closest to it: "a house on a hill, a watercolor painting, by Claude Monet,
impressionism, soft lighting, pastel colors".

Weights, in transformers' folder layout (config, weights, tokenizer and preprocessor files, as
their model repositories hold them), read offline:
- `models/BLIP/<name>/`: `BlipForConditionalGeneration` (Salesforce/blip-image-captioning-base or
  -large);
- `models/clip_interrogate/<name>/`: `CLIPModel` (openai/clip-vit-large-patch14, ...). Without it
  the caption comes alone, and the log says so.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from webui.interrogate.terms import KINDS
from webui.models.errors import ModelError

log = logging.getLogger(__name__)

# how many of each kind join the caption, in this order (A1111 picks one medium, artist and
# movement and several flavours)
PICKS = (("mediums", 1), ("artists", 1), ("movements", 1), ("flavours", 3))


def _first_model_dir(root: Path) -> Path | None:
    """The first folder (by name) under `root` holding a config.json."""
    if not root.is_dir():
        return None
    found = sorted((p.parent for p in root.glob("*/config.json")), key=lambda p: p.name.lower())
    return found[0] if found else None


def _from_folder(folder: Path, model_class: Any, processor_class: Any, what: str) -> tuple[Any, Any]:
    """A transformers model and its processor from `folder`, offline; ModelError naming the folder."""
    try:
        model = model_class.from_pretrained(folder, local_files_only=True).eval()
        processor = processor_class.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"not a {what} folder ({type(e).__name__}: {e})", folder) from None
    log.info("loaded %s %s for interrogation", what, folder.name)
    return model, processor


def _projected(out: Any) -> torch.Tensor:
    """CLIP's projected embeddings: transformers 5 returns them as the output's pooler_output,
    earlier versions as the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipInterrogator:
    """BLIP and CLIP from the models folder, loaded on first use and kept."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)
        self._lock = threading.Lock()
        self._blip: tuple[Path, Any, Any] | None = None  # (folder, model, processor)
        self._clip: tuple[Path, Any, Any, dict[str, tuple[list[str], torch.Tensor]]] | None = None

    @property
    def blip_dir(self) -> Path | None:
        return _first_model_dir(self.models_dir / "BLIP")

    @property
    def clip_dir(self) -> Path | None:
        return _first_model_dir(self.models_dir / "clip_interrogate")

    def missing(self) -> str | None:
        """What to put where for a caption (None when BLIP is here)."""
        if self.blip_dir is None:
            return (f"no BLIP captioner: put a transformers BLIP captioning model folder (config.json, weights, "
                    f"tokenizer and preprocessor files, e.g. Salesforce/blip-image-captioning-base) in "
                    f"{self.models_dir / 'BLIP'}/<name>/, and for the style terms a CLIP model folder in "
                    f"{self.models_dir / 'clip_interrogate'}/<name>/")
        return None

    def _load_blip(self) -> tuple[Any, Any]:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        folder = self.blip_dir
        if folder is None:
            raise ModelError(self.missing() or "no BLIP captioner")
        if self._blip is None or self._blip[0] != folder:
            self._blip = (folder, *_from_folder(folder, BlipForConditionalGeneration, BlipProcessor,
                                                 "BLIP captioning model"))
        return self._blip[1], self._blip[2]

    def _load_clip(self) -> tuple[Any, Any, dict[str, tuple[list[str], torch.Tensor]]] | None:
        from transformers import CLIPModel, CLIPProcessor

        folder = self.clip_dir
        if folder is None:
            return None
        if self._clip is None or self._clip[0] != folder:
            self._clip = (folder, *_from_folder(folder, CLIPModel, CLIPProcessor, "CLIP model"), {})
        return self._clip[1], self._clip[2], self._clip[3]

    def _terms(self, kind: str) -> list[str]:
        """Our list of `kind`, plus the user's `models/clip_interrogate/<kind>.txt` if there."""
        own = self.models_dir / "clip_interrogate" / f"{kind}.txt"
        extra = [t.strip() for t in own.read_text(encoding="utf-8").splitlines() if t.strip()] if own.is_file() else []
        return list(dict.fromkeys([*KINDS[kind], *extra]))

    def interrogate(self, image: Image.Image, max_tokens: int = 40) -> str:
        """The caption, then the ranked terms when a CLIP model is here. ModelError when BLIP is not."""
        with self._lock, torch.inference_mode():
            model, processor = self._load_blip()
            inputs = processor(images=image.convert("RGB"), return_tensors="pt")
            ids = model.generate(**inputs, max_new_tokens=max_tokens, num_beams=1, do_sample=False)
            caption = processor.decode(ids[0], skip_special_tokens=True).strip()
            clip = self._load_clip()
            if clip is None:
                log.info("no CLIP model in %s: the caption comes without style terms",
                         self.models_dir / "clip_interrogate")
                return caption
            return ", ".join(part for part in (caption, *self._ranked(image, *clip)) if part)

    def _ranked(self, image: Image.Image, model: Any, processor: Any,
                cache: dict[str, tuple[list[str], torch.Tensor]]) -> list[str]:
        pixels = processor(images=image.convert("RGB"), return_tensors="pt")
        picture = _projected(model.get_image_features(**pixels))
        picture = picture / picture.norm(dim=-1, keepdim=True)
        picked: list[str] = []
        for kind, count in PICKS:
            terms = self._terms(kind)
            if kind not in cache or cache[kind][0] != terms:  # text embeddings once per list
                text = processor(text=terms, return_tensors="pt", padding=True, truncation=True)
                features = _projected(model.get_text_features(**text))
                cache[kind] = (terms, features / features.norm(dim=-1, keepdim=True))
            scores = (cache[kind][1] @ picture[0]).tolist()
            best = sorted(range(len(terms)), key=lambda i: scores[i], reverse=True)[:count]
            picked += [f"by {terms[i]}" if kind == "artists" else terms[i] for i in best]
        return picked
