"""Few-step models: LCM, Lightning, Hyper-SD and Turbo checkpoints and LoRAs, and the sampler,
schedule, steps and CFG their authors recommend.

These are distilled to sample in 1-8 steps with little or no guidance; with ordinary settings
(20+ steps, CFG 7) they give burnt images. Their weights look like any other checkpoint or LoRA
of the family (no key tells them apart), so they are recognised from what the file says about
itself -- its safetensors metadata (`modelspec.title`, kohya's `ss_output_name`, ...) -- and
failing that from the file name, which is a guess and is reported as one.

Recommendations (the model cards' own): LCM: the LCM sampler, 4 steps, CFG 1 (latent-consistency's
LCM-LoRA card); SDXL-Lightning: Euler on the SGM Uniform ("trailing") schedule, CFG 1, the step
count of the file (ByteDance's card); Hyper-SD: the same, CFG 1 (5 for the CFG-preserving
variants); SD/SDXL-Turbo: Euler a on the trailing schedule (`Simple`), CFG 1, 4 steps (Stability's
card allows 1-4).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from webui.models.readers import safetensors_metadata

# metadata fields that name or describe a model, as training tools write them
_META_FIELDS = ("modelspec.title", "ss_output_name", "name")
_STEPS = re.compile(r"(\d{1,2})[-_ ]?steps?(?![a-z])")
# (kind, pattern over the lower-cased text); Lightning and Hyper-SD files always name their step
# count ("sdxl_lightning_4step_lora"), which keeps a "lightning bolt" style LoRA out
_KINDS = (
    ("LCM", re.compile(r"(^|[^a-z])lcm([^a-z]|$)|latent[-_ ]consistency")),
    ("Lightning", re.compile(r"lightning.*\d[-_ ]?steps?(?![a-z])|\d[-_ ]?steps?.*lightning")),
    ("Hyper-SD", re.compile(r"hyper[-_ ]?sd")),
    ("Turbo", re.compile(r"(^|[^a-z])turbo([^a-z]|$)")),
)


@dataclass(frozen=True)
class FewStep:
    """What to sample a few-step model with."""

    kind: str  # LCM, Lightning, Hyper-SD or Turbo
    sampler_name: str
    scheduler: str
    steps: int
    cfg_scale: float
    source: str  # what told us: "metadata" or "file name"
    file: str  # the checkpoint or LoRA it comes from

    @property
    def guessed(self) -> bool:
        return self.source == "file name"

    def describe(self) -> str:
        how = "guessed from its file name" if self.guessed else "from its metadata"
        return (f"{self.file}: {self.kind} ({how}): {self.sampler_name}, {self.scheduler} schedule, "
                f"{self.steps} steps, CFG {self.cfg_scale:g}")

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "guessed": self.guessed}


def _recommend(kind: str, text: str) -> tuple[str, str, int, float]:
    found = _STEPS.search(text)
    steps = int(found.group(1)) if found else 0
    if kind == "LCM":
        return "LCM", "SGM Uniform", steps or 4, 1.0
    if kind == "Turbo":
        return "Euler a", "Simple", steps or 4, 1.0
    cfg = 5.0 if kind == "Hyper-SD" and "cfg" in text else 1.0
    return "Euler", "SGM Uniform", steps or (8 if kind == "Hyper-SD" else 4), cfg


def _kind(text: str) -> str | None:
    return next((kind for kind, pattern in _KINDS if pattern.search(text)), None)


def recognise(path: Path, name: str | None = None, metadata: dict[str, str] | None = None) -> FewStep | None:
    """The few-step recommendation for a checkpoint or LoRA file, or None for an ordinary model.
    `metadata`: the file's, when the caller has it already."""
    label = name or path.stem
    meta = safetensors_metadata(path) if metadata is None else metadata
    described = " ".join(meta.get(k, "") for k in _META_FIELDS).lower()
    for text, source in ((described, "metadata"), (path.stem.lower(), "file name")):
        kind = _kind(text)
        if kind:
            sampler, scheduler, steps, cfg = _recommend(kind, text)
            return FewStep(kind, sampler, scheduler, steps, cfg, source, label)
    return None
