"""The prompt stage: styles, then extensions' `process_prompt`, then the extra-network tags out
of the text, then the embeddings the texts use -- for one batch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from webui.extensions import api as ext
from webui.extensions.manager import ExtensionManager
from webui.models.errors import ModelError
from webui.models.hashing import HashCache
from webui.models.load import ModelBundle
from webui.networks.embeddings import Embedding, EmbeddingLibrary
from webui.networks.registry import NetworkFile, NetworkRegistry
from webui.pipeline.state import BatchState, JobState
from webui.prompts.parser import extract_extra_networks, lora_weight
from webui.prompts.styles import StyleStore, apply_styles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Library:
    """The user's files the prompt stage draws on: styles, LoRAs, embeddings."""

    styles: StyleStore
    networks: NetworkRegistry
    embeddings: EmbeddingLibrary
    hashes: HashCache

    def lora_hashes(self, loras: list[tuple[NetworkFile, float]]) -> str | None:
        """The infotext's "Lora hashes" value (None without LoRAs)."""
        return ", ".join(f"{f.stem}: {f.short_hash(self.hashes)}" for f, _ in loras) or None

    def ti_hashes(self, embeddings: list[Embedding]) -> str | None:
        """The infotext's "TI hashes" value (None without embeddings)."""
        files = self.embeddings.files() if embeddings else {}
        return ", ".join(f"{e.name}: {f.short_hash(self.hashes) if (f := files.get(e.name)) else 'unknown'}"
                         for e in embeddings) or None


def fits(embedding: Embedding, bundle: ModelBundle) -> bool:
    """Whether `embedding` has vectors for every text encoder of `bundle`, of their widths."""
    encoders = bundle.text_encoders
    return embedding.fits([e.model.config.hidden_size for e in encoders], [e.spec.embedding_slot for e in encoders])


def stage_prompt(job: JobState, batch: BatchState, library: Library, extensions: ExtensionManager,
                 data_dir: Path) -> None:
    """Fills the batch's prompts, negative prompts, LoRAs and embeddings."""
    r, n = job.request, len(batch)
    known = {s.name: s for s in library.styles.list()}
    missing = [name for name in r.styles if name not in known]
    if missing:
        raise ModelError(f"style {missing[0]!r} not found in {library.styles.path}")
    prompt, negative = apply_styles(r.prompt, r.negative_prompt, [known[name] for name in r.styles])
    prompts, negatives = [prompt] * n, [negative] * n
    if extensions.has("process_prompt"):
        _, parsed = extract_extra_networks(prompt)
        stage = ext.PromptStage(prompts=list(prompts), negative_prompts=list(negatives), seeds=list(batch.seeds),
                                extra_networks=[(t.kind, t.name, tuple(t.args)) for t in parsed],
                                batch_index=batch.index, request=r, data_dir=data_dir)
        extensions.call("process_prompt", stage, job.ext)
        if len(stage.prompts) != n or len(stage.negative_prompts) != n:
            raise ValueError("an extension changed the number of prompts in process_prompt")
        prompts, negatives = [str(p) for p in stage.prompts], [str(p) for p in stage.negative_prompts]
        job.infotext_fields.update(stage.infotext)
    cleaned = [extract_extra_networks(p) for p in prompts]
    batch.loras = []
    for tag in cleaned[0][1]:  # LoRAs apply to the whole batch: the first image's tags
        if tag.kind == "lora":
            weight = lora_weight(tag)  # a malformed tag is reported before a missing file
            batch.loras.append((library.networks.find_lora(tag.name), weight))
        else:
            log.warning("extra network <%s:%s> ignored: only <lora:...> is supported", tag.kind, tag.name)
    batch.prompts = [text for text, _ in cleaned]
    batch.negative_prompts = [extract_extra_networks(p)[0] for p in negatives]  # tags in the negative are dropped
    texts = "\n".join([*batch.prompts, *batch.negative_prompts, r.hr_prompt, r.hr_negative_prompt])
    batch.embeddings = [e for e in library.embeddings.find_in_prompt(texts) if fits(e, batch.bundle)]
