"""Tokenizers built offline from the vocabularies shipped in `webui/resources`.

SD1, SD2 and SDXL all use OpenAI's CLIP BPE (49408 tokens); they differ only in the padding
token ("<|endoftext|>" for CLIP-L, "!" for OpenCLIP). `bpe_simple_vocab_16e6.txt.gz` is the
MIT-licensed file published with OpenAI CLIP and re-shipped by open_clip. SD3's T5-XXL uses T5
v1.1's SentencePiece vocabulary, `t5_tokenizer.json.gz` (Apache-2.0; see T5_TOKENIZER_NOTICE.md).
"""

from __future__ import annotations

import gzip
import threading
from importlib import resources

from transformers import CLIPTokenizer, PreTrainedTokenizerBase

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
T5_FILE = "t5_tokenizer.json.gz"
T5_PAD = "<pad>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _read_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    raw = resources.files("webui.resources").joinpath(VOCAB_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    alphabet = _bytes_to_unicode()
    words = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {w: i for i, w in enumerate(words)}, merges  # type: ignore[return-value]


class TokenizerFactory:
    """Builds each tokenizer once (0.3 s) and hands the same instance out afterwards."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vocab: tuple[dict[str, int], list[tuple[str, str]]] | None = None
        self._made: dict[str, PreTrainedTokenizerBase] = {}

    def get(self, pad_token: str) -> PreTrainedTokenizerBase:
        """CLIP's tokenizer padding with `pad_token`; T5's for T5_PAD."""
        if pad_token == T5_PAD:
            return self._t5()
        with self._lock:
            if pad_token not in self._made:
                if self._vocab is None:
                    self._vocab = _read_vocab()
                vocab, merges = self._vocab
                self._made[pad_token] = CLIPTokenizer(
                    vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=77
                )
            return self._made[pad_token]

    def _t5(self) -> PreTrainedTokenizerBase:
        with self._lock:
            if T5_PAD not in self._made:
                from tokenizers import Tokenizer
                from transformers import PreTrainedTokenizerFast

                raw = gzip.decompress(resources.files("webui.resources").joinpath(T5_FILE).read_bytes())
                self._made[T5_PAD] = PreTrainedTokenizerFast(
                    tokenizer_object=Tokenizer.from_str(raw.decode("utf-8")), eos_token="</s>", pad_token=T5_PAD,
                    unk_token="<unk>", model_max_length=512)
            return self._made[T5_PAD]

    def warm(self) -> None:
        """Build the tokenizers every family uses (CLIP-L's and OpenCLIP's padding)."""
        for pad in (EOS_TOKEN, "!"):
            self.get(pad)
