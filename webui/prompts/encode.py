"""Prompt text -> conditioning tensors for the UNet.

- Emphasis from `parse_attention` weights the token embeddings, then the chunk is rescaled so
  its mean is unchanged.
- Prompts are split into chunks of 75 tokens, each wrapped to 77 with start and end tokens and
  encoded separately, then concatenated along the token axis. A chunk that fills up mid-phrase
  breaks after the last comma when one lies within the last 20 tokens; `BREAK` starts a new
  chunk; a textual-inversion embedding is never split across chunks.
- Texts of a batch are padded to the same chunk count with the encoding of an empty chunk.
- `TextConditioner` caches per job, so each distinct text is encoded once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from webui.models.load import ModelBundle, TextEncoder
from webui.prompts.parser import parse_attention

CHUNK = 75
COMMA_BACKTRACK = 20


class EmbeddingLike(Protocol):
    name: str

    @property
    def num_vectors(self) -> int: ...

    def vectors_for(self, encoder_index: int, hidden_size: int) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class Slot:
    """One vector of a textual-inversion embedding standing where a token would."""

    embedding: EmbeddingLike
    index: int


Token = int | Slot


@dataclass
class Chunk:
    tokens: list[Token] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass
class Conditioning:
    context: torch.Tensor  # [B, 77 * chunks, D]
    pooled: torch.Tensor | None  # [B, P] for SDXL and the SDXL refiner (P = projection width)


def _embedding_pattern(embeddings: Sequence[EmbeddingLike]) -> re.Pattern[str] | None:
    names = sorted({e.name for e in embeddings}, key=len, reverse=True)
    if not names:
        return None
    return re.compile(r"(?<![\w])(" + "|".join(re.escape(n) for n in names) + r")(?![\w])", re.IGNORECASE)


def chunk_prompt(tokenizer, text: str, embeddings: Sequence[EmbeddingLike] = ()) -> list[Chunk]:
    """Split a prompt into weighted chunks of at most 75 tokens (start/end not included)."""
    by_name = {e.name.casefold(): e for e in embeddings}
    pattern = _embedding_pattern(embeddings)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks: list[Chunk] = []
    current = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal current, last_comma
        chunks.append(current)
        current, last_comma = Chunk(), -1

    def add_token(tok: Token, weight: float) -> None:
        nonlocal current, last_comma
        if len(current.tokens) == CHUNK:
            if last_comma >= 0 and CHUNK - last_comma <= COMMA_BACKTRACK:
                # move the unfinished phrase after the last comma into the next chunk
                keep = last_comma + 1
                rest_t, rest_w = current.tokens[keep:], current.weights[keep:]
                current.tokens, current.weights = current.tokens[:keep], current.weights[:keep]
                close()
                current.tokens, current.weights = rest_t, rest_w
            else:
                close()
        if tok == comma:
            last_comma = len(current.tokens)
        current.tokens.append(tok)
        current.weights.append(weight)

    for piece, weight in parse_attention(text):
        if piece == "BREAK" and weight == -1.0:
            close()
            continue
        segments = pattern.split(piece) if pattern else [piece]
        for i, segment in enumerate(segments):
            if i % 2 == 1:  # an embedding's trigger word
                emb = by_name[segment.casefold()]
                n = emb.num_vectors
                if n <= CHUNK and len(current.tokens) + n > CHUNK:
                    close()  # never split an embedding across chunks
                for k in range(n):
                    add_token(Slot(emb, k), weight)
            elif segment:
                ids = tokenizer(segment, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
                for tok in ids:
                    add_token(tok, weight)
    if current.tokens or not chunks:
        chunks.append(current)
    return chunks


def count_tokens(tokenizer, text: str, embeddings: Sequence[EmbeddingLike] = ()) -> tuple[int, int]:
    """(tokens used, tokens available): `37/75`, growing to `/150` when a second chunk starts."""
    chunks = chunk_prompt(tokenizer, text, embeddings)
    return sum(len(c.tokens) for c in chunks), CHUNK * len(chunks)


def _token_embedding(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "text_model", model).embeddings.token_embedding


def _final_layer_norm(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "text_model", model).final_layer_norm


@dataclass
class EncodedText:
    context: torch.Tensor  # [chunks * 77, D]
    pooled: torch.Tensor | None  # [P]
    tail: torch.Tensor | None = None  # SD3: T5's tokens, after the CLIP chunks [T, D]


class TextConditioner:
    """Encodes texts for one job with one model; each distinct text is encoded once."""

    def __init__(self, bundle: ModelBundle, clip_skip: int = 1, embeddings: Sequence[EmbeddingLike] = ()) -> None:
        self.bundle = bundle
        self.clip_skip = clip_skip
        self.embeddings = list(embeddings)
        self._cache: dict[str, EncodedText] = {}

    def encode(self, text: str) -> EncodedText:
        if text not in self._cache:
            self._cache[text] = self._encode(text)
        return self._cache[text]

    def batch(self, texts: Sequence[str]) -> Conditioning:
        """Stack texts into one batch, padding shorter ones with empty-chunk encodings."""
        encoded = [self.encode(t) for t in texts]
        longest = max(e.context.shape[0] for e in encoded)
        empty = self.encode("").context
        rows = []
        for e in encoded:
            missing = (longest - e.context.shape[0]) // max(empty.shape[0], 1)  # Flux: no CLIP tokens at all
            tail = [] if e.tail is None else [e.tail]
            rows.append(torch.cat([e.context, *([empty] * missing), *tail]) if missing or tail else e.context)
        pooled = None if encoded[0].pooled is None else torch.stack([e.pooled for e in encoded])
        return Conditioning(torch.stack(rows), pooled)

    @torch.no_grad()
    def _encode(self, text: str) -> EncodedText:
        clips = [e for e in self.bundle.text_encoders if e.spec.kind != "t5"]
        chunks = chunk_prompt(clips[0].tokenizer, text, self.embeddings)
        contexts, pooled = [], []
        for index, enc in enumerate(clips):
            hidden, enc_pooled = self._run_encoder(index, enc, chunks)
            if enc.spec.context:
                contexts.append(hidden)
            if enc_pooled is not None:
                pooled.append(enc_pooled)
        pooled_vector = torch.cat(pooled) if pooled else None
        if not any(spec.kind == "t5" for spec in self.bundle.family.text_encoders):
            # SDXL: CLIP-L and OpenCLIP-bigG side by side; the SDXL refiner: bigG alone
            context = torch.cat(contexts, dim=-1)
            return EncodedText(context.reshape(-1, context.shape[-1]), pooled_vector)
        # SD3: the CLIPs side by side, padded to T5's width, T5's tokens after them; Flux: T5's alone
        width = self.bundle.unet.config.joint_attention_dim
        if contexts:
            context = torch.cat(contexts, dim=-1)
            context = torch.nn.functional.pad(context.reshape(-1, context.shape[-1]), (0, width - context.shape[-1]))
        else:
            context = torch.zeros(0, width, device=self.bundle.runtime.device)
        t5 = next((e for e in self.bundle.text_encoders if e.spec.kind == "t5"), None)
        # without T5 (SD3 only), 77 tokens of zeros stand for it, as SD3's reference code has it
        tail = self._run_t5(t5, text) if t5 is not None else context.new_zeros(CHUNK + 2, width)
        return EncodedText(context, pooled_vector, tail)

    def _run_t5(self, enc: TextEncoder, text: str) -> torch.Tensor:
        """T5's hidden states for `text`: its pieces tokenized with their emphasis, cut to the
        spec's length less the end token, then padded (no attention mask, as SD3 was trained)."""
        tok, limit = enc.tokenizer, enc.spec.max_tokens
        ids: list[int] = []
        weights: list[float] = []
        for piece, weight in parse_attention(text):
            if piece == "BREAK" and weight == -1.0:
                continue  # T5 has no chunks to break
            piece_ids = tok(piece, add_special_tokens=False, verbose=False)["input_ids"]
            ids += piece_ids
            weights += [weight] * len(piece_ids)
        ids, weights = ids[: limit - 1] + [tok.eos_token_id], weights[: limit - 1] + [1.0]
        pad = limit - len(ids)
        input_ids = torch.tensor([ids + [tok.pad_token_id] * pad], device=self.bundle.runtime.device)
        hidden = enc.model(input_ids=input_ids).last_hidden_state.float()
        return self._emphasis(hidden, [weights + [1.0] * pad])[0]

    def _run_encoder(self, index: int, enc: TextEncoder, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor | None]:
        tok = enc.tokenizer
        device = self.bundle.runtime.device
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        hidden_size = enc.model.config.hidden_size
        slot_index = index if enc.spec.embedding_slot is None else enc.spec.embedding_slot
        ids, weights, slots = [], [], []  # slots: (chunk, position, vector)
        for c, chunk in enumerate(chunks):
            row = [bos]
            for pos, t in enumerate(chunk.tokens, start=1):
                if isinstance(t, Slot):
                    vectors = t.embedding.vectors_for(slot_index, hidden_size)
                    if vectors is None:
                        raise ValueError(f"embedding {t.embedding.name!r} does not fit this model ({self.bundle.family.label})")
                    slots.append((c, pos, vectors[t.index]))
                    row.append(pad)
                else:
                    row.append(t)
            row.append(eos)
            n_pad = CHUNK + 2 - len(row)
            ids.append(row + [pad] * n_pad)
            weights.append([1.0] + chunk.weights + [1.0] * (n_pad + 1))
        input_ids = torch.tensor(ids, device=device)
        handle = None
        if slots:
            def inject(_module, _inputs, output):  # per call: put embedding vectors in place of tokens
                output = output.clone()
                for c, pos, vec in slots:
                    output[c, pos] = vec.to(output.dtype)
                return output

            handle = _token_embedding(enc.model).register_forward_hook(inject)
        try:
            out = enc.model(input_ids=input_ids, output_hidden_states=True)
        finally:
            if handle is not None:
                handle.remove()
        layer = min(enc.spec.default_layer_from_end + self.clip_skip - 1, len(out.hidden_states) - 1)
        hidden = out.hidden_states[-layer]
        if enc.spec.final_layer_norm:
            hidden = _final_layer_norm(enc.model)(hidden)
        hidden = self._emphasis(hidden.float(), weights)
        pooled = None
        if enc.spec.pooled:  # from the first chunk; Flux takes CLIP-L's unprojected end token
            pooled = (out.text_embeds if enc.spec.projected else out.pooler_output)[0].float()
        return hidden, pooled

    @staticmethod
    def _emphasis(z: torch.Tensor, weights: list[list[float]]) -> torch.Tensor:
        """Scale each token by its weight, then restore each chunk's mean."""
        if all(w == 1.0 for row in weights for w in row):  # tested on the host: no wait for a GPU
            return z
        before = z.mean(dim=(1, 2), keepdim=True)
        z = z * torch.tensor(weights, dtype=z.dtype, device=z.device)[..., None]
        after = z.mean(dim=(1, 2), keepdim=True)
        return z * (before / after)


def encode(bundle: ModelBundle, texts: list[str], clip_skip: int = 1) -> Conditioning:
    """Encode a batch of texts in one go (a fresh cache: for one-off use and tests)."""
    return TextConditioner(bundle, clip_skip).batch(texts)
