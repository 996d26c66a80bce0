"""Composition root: builds the pieces from a `Config` and wires them together.

The only module that knows everything; the rest receive what they need as arguments.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from webui.config import Config
from webui.models.cache import ModelCache
from webui.models.errors import ModelError
from webui.models.hashing import HashCache
from webui.models.load import ModelBundle, load_bundle
from webui.models.registry import CheckpointInfo, ModelRegistry
from webui.pipeline.runner import Runner
from webui.prompts.tokenizer import TokenizerFactory
from webui.runtime.devices import Runtime, pick_runtime

log = logging.getLogger("webui")


@dataclass
class Engine:
    """Models plus the runner: what the UI, the CLI and the API call into."""

    config: Config
    runtime: Runtime
    registry: ModelRegistry
    cache: ModelCache[ModelBundle]
    tokenizers: TokenizerFactory
    runner: Runner

    def resolve_checkpoint(self, query: str | None) -> CheckpointInfo:
        query = query or self.config.ckpt
        if query:
            return self.registry.find(query)
        items = self.registry.checkpoints()
        if not items:
            raise ModelError(
                f"no checkpoints found: put a Stable Diffusion .safetensors or .ckpt file in "
                f"{self.registry.ckpt_dir} and press refresh"
            )
        return self.registry.find(items[0].name)

    def bundle(self, query: str | None) -> ModelBundle:
        info = self.resolve_checkpoint(query)
        vae = self._vae_for(info)
        prediction = self.registry.prediction_for(info)
        key = (str(info.path.resolve()), str(vae) if vae else None, prediction)

        def load() -> ModelBundle:
            log.info("loading %s (%s)", info.title, self.runtime.describe())
            return load_bundle(
                info.path,
                runtime=self.runtime,
                tokenizers=self.tokenizers,
                name=info.name,
                sha256=info.sha256,
                vae_path=vae,
                prediction=prediction,
            )

        return self.cache.get(key, load)

    def _vae_for(self, info: CheckpointInfo) -> Path | None:
        choice = self.config.vae
        if choice in (None, "", "Automatic"):
            return self.registry.paired_vae(info)
        if choice == "None":
            return None
        return self.registry.find_vae(choice)


def build_engine(config: Config) -> Engine:
    runtime = pick_runtime(config)
    hashes = HashCache(config.cache_path / "hashes.json")
    registry = ModelRegistry(
        config.checkpoints_path, config.vae_path, hashes, overrides_file=config.data_dir / "model-overrides.json"
    )
    registry.refresh(compute_hashes=False)  # cached hashes only: start-up never reads whole files
    engine = Engine(
        config=config,
        runtime=runtime,
        registry=registry,
        cache=ModelCache(config.model_cache_size),
        tokenizers=TokenizerFactory(),
        runner=None,  # type: ignore[arg-type]  # set below: the runner calls back into the engine
    )
    engine.runner = Runner(engine.bundle, config.outputs_path)
    return engine
