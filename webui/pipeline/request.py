"""`GenerationRequest`: the one validated description of a generation, shared by the page,
the command line and (later) the HTTP API."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError, ConfigDict, Field, field_validator, model_validator

from webui.samplers.table import resolve

MAX_SEED = 2**32 - 1


class GenerationRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    width: int = Field(512, ge=64, le=4096)
    height: int = Field(512, ge=64, le=4096)
    sampler_name: str = "Euler a"
    scheduler: str = "Automatic"
    batch_size: int = Field(1, ge=1, le=16)
    n_iter: int = Field(1, ge=1, le=100)
    clip_skip: int = Field(1, ge=1, le=12)
    styles: tuple[str, ...] = ()  # names from styles.csv, applied to prompt and negative in order
    checkpoint: str | None = None  # title, name or hash; None = the server's current model
    save_images: bool = True

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (got {v}; try {v - v % 8} or {v + 8 - v % 8})")
        return v

    @model_validator(mode="after")
    def _known_sampler(self) -> "GenerationRequest":
        spec, schedule = resolve(self.sampler_name, self.scheduler)
        if (spec.name, schedule) != (self.sampler_name, self.scheduler):
            # normalise legacy combined names ("Euler a Karras") into sampler + schedule
            object.__setattr__(self, "sampler_name", spec.name)
            object.__setattr__(self, "scheduler", schedule)
        return self


def validation_message(error: ValidationError) -> str:
    """One clause per bad field: `steps: Input should be greater than or equal to 1`."""
    parts = []
    for e in error.errors():
        where = ".".join(str(x) for x in e.get("loc", ())) or "request"
        parts.append(f"{where}: {e.get('msg', 'invalid')}".replace("Value error, ", ""))
    return "; ".join(parts)
