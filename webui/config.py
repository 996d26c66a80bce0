"""Typed, immutable settings built from command-line flags.

A `Config` is made once at start-up and never changes during a job; per-request choices
live on the request (see `webui.pipeline.request`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DType = Literal["auto", "float32", "bfloat16", "float16"]


class Config(BaseModel):
    model_config = ConfigDict(frozen=True)

    # folders
    data_dir: Path = Path(".")
    models_dir: Path | None = None  # default: <data_dir>/models
    ckpt_dir: Path | None = None  # default: <models_dir>/Stable-diffusion
    vae_dir: Path | None = None  # default: <models_dir>/VAE
    lora_dir: Path | None = None  # default: <models_dir>/Lora
    embeddings_dir: Path | None = None  # default: <models_dir>/embeddings
    controlnet_dir: Path | None = None  # default: <models_dir>/ControlNet
    styles_file: Path | None = None  # default: <data_dir>/styles.csv
    outdir: Path | None = None  # default: <data_dir>/outputs
    any_outdir: bool = False  # output folders set in Settings / the API may be outside the data folder

    # server
    listen: bool = False
    port: int = 7860
    share: bool = False
    allowed_hosts: tuple[str, ...] = ()  # more Host names the server answers to (see webui.guard)
    cors_allow_origins: tuple[str, ...] = ()  # other sites' origins allowed to send requests that change things
    gradio_auth: tuple[tuple[str, str], ...] = ()
    autolaunch: bool = False
    api: bool = False  # serve /sdapi/v1 beside the page
    nowebui: bool = False  # serve only the API (port 7861 unless --port)
    api_auth: tuple[tuple[str, str], ...] = ()
    max_steps: int = 150  # API limits: steps, and pixels per request (width x height x batch, hires included)
    max_pixels: int = 4096 * 4096
    job_retention_s: float = 600.0  # how long a finished queued job's result stays available
    job_retention_count: int = Field(100, ge=1)  # at most this many finished jobs kept (oldest dropped first)
    job_retention_mb: int = Field(1024, ge=1)  # and at most this much of their images
    max_body_mb: int = Field(100, ge=1)  # largest request body, before anything decodes it
    api_server_stop: bool = False  # allow the API's server-stop / server-kill / server-restart

    # extensions
    extensions_dir: Path | None = None  # default: <data_dir>/extensions
    disable_all_extensions: bool = False
    enable_insecure_extension_access: bool = False  # allow installing while listening beyond localhost

    # device and precision
    use_cpu: bool = False
    device_ids: tuple[int, ...] = ()  # --device-id 0,1: one worker per device (empty: device 0)
    all_gpus: bool = False  # one worker per visible GPU
    workers: int | None = Field(None, ge=1, le=64)  # workers over those devices in turn (default: one each)
    ray: str | None = None  # "auto" or a Ray cluster's address: the engine runs as Ray Serve replicas
    ray_min_replicas: int = Field(1, ge=0, le=1024)
    ray_max_replicas: int = Field(2, ge=1, le=1024)
    no_half: bool = False
    no_half_vae: bool = False
    dtype: DType = "auto"
    attention: Literal["auto", "sdpa", "xformers", "sliced"] = "auto"  # see webui.runtime.attention
    medvram: bool = False  # only the running component on the GPU (see webui.runtime.memory)
    lowvram: bool = False  # UNet blocks streamed to the GPU as they run
    vae_tiling: bool = False  # always decode/encode in tiles (otherwise only images over a pixel budget)
    # float8 and GGUF transformer weights (Flux / SD3.5 files): kept packed (float8 / quantised) and
    # upcast a layer a call, or upcast once when loaded; "auto": packed on a GPU, upcast on the CPU
    # (no fast float8 casts or dequantisation there)
    fp8_weights: Literal["auto", "packed", "upcast"] = "auto"
    compile: bool = False  # torch.compile the UNet (see webui.runtime.compile)
    channels_last: bool | None = None  # UNet and VAE in channels-last memory format; None: where measured faster

    # models
    ckpt: str | None = None
    vae: str | None = None  # "Automatic" (paired file, else the checkpoint's own), "None", or a name
    model_cache_size: int | None = Field(None, ge=1)  # models ready on the device; None = the Settings value
    ckpt_cache: int | None = Field(None, ge=0)  # more models parked in RAM; None = the Settings value
    prediction: Literal["auto", "epsilon", "v"] = "auto"  # force v-prediction on or off for every model

    @property
    def models_path(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    @property
    def checkpoints_path(self) -> Path:
        return self.ckpt_dir or self.models_path / "Stable-diffusion"

    @property
    def vae_path(self) -> Path:
        return self.vae_dir or self.models_path / "VAE"

    @property
    def lora_path(self) -> Path:
        return self.lora_dir or self.models_path / "Lora"

    @property
    def embeddings_path(self) -> Path:
        return self.embeddings_dir or self.models_path / "embeddings"

    @property
    def controlnet_path(self) -> Path:
        return self.controlnet_dir or self.models_path / "ControlNet"

    @property
    def extensions_path(self) -> Path:
        return self.extensions_dir or self.data_dir / "extensions"

    @property
    def exposed(self) -> bool:
        """True when people beyond this computer can reach the server."""
        return self.listen or self.share

    @property
    def styles_path(self) -> Path:
        return self.styles_file or self.data_dir / "styles.csv"

    @property
    def outputs_path(self) -> Path:
        return self.outdir or self.data_dir / "outputs"

    @property
    def cache_path(self) -> Path:
        """Where the hash cache and other derived data live."""
        return self.data_dir / "cache"

    @property
    def server_name(self) -> str:
        return "0.0.0.0" if self.listen else "127.0.0.1"


def parse_auth(text: str | None) -> tuple[tuple[str, str], ...]:
    """`user:pass[,user2:pass2]` -> ((user, pass), ...). Raises ValueError on a malformed pair."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user:
            raise ValueError(f"expected user:password, got {item!r}")
        pairs.append((user, password))
    return tuple(pairs)
