"""Text -> conditioning tensors for the UNet.

Prompts longer than 75 tokens are split into chunks of 75, each wrapped to 77 with start and
end tokens, encoded separately and concatenated along the token axis; a batch is padded to
its longest prompt's chunk count. (Emphasis, BREAK and the rest of the prompt language come
with issue 4 and plug in here.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from webui.models.load import ModelBundle, TextEncoder

CHUNK = 75


@dataclass
class Conditioning:
    context: torch.Tensor  # [B, 77 * chunks, D]
    pooled: torch.Tensor | None  # [B, P] for SDXL


def _chunks(enc: TextEncoder, texts: list[str]) -> torch.Tensor:
    """Token ids [B, chunks, 77]."""
    tok = enc.tokenizer
    ids = [tok(t, add_special_tokens=False, truncation=False, verbose=False)["input_ids"] for t in texts]
    n_chunks = max(1, *((len(i) + CHUNK - 1) // CHUNK for i in ids))
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    rows = []
    for seq in ids:
        chunks = []
        for c in range(n_chunks):
            part = seq[c * CHUNK : (c + 1) * CHUNK]
            chunks.append([bos, *part, eos] + [pad] * (CHUNK - len(part)))
        rows.append(chunks)
    return torch.tensor(rows, dtype=torch.long)


def _final_layer_norm(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "text_model", model).final_layer_norm


@torch.no_grad()
def encode(bundle: ModelBundle, texts: list[str], clip_skip: int = 1) -> Conditioning:
    contexts, pooled = [], None
    for enc in bundle.text_encoders:
        ids = _chunks(enc, texts).to(bundle.runtime.device)
        b, n, length = ids.shape
        out = enc.model(input_ids=ids.view(b * n, length), output_hidden_states=True)
        layer = min(enc.spec.default_layer_from_end + clip_skip - 1, len(out.hidden_states) - 1)
        hidden = out.hidden_states[-layer]
        if enc.spec.final_layer_norm:
            hidden = _final_layer_norm(enc.model)(hidden)
        contexts.append(hidden.view(b, n * length, -1))
        if enc.spec.pooled:
            pooled = out.text_embeds.view(b, n, -1)[:, 0].float()
    return Conditioning(context=torch.cat(contexts, dim=-1), pooled=pooled)
