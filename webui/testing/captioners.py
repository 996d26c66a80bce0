"""Tiny random-weight BLIP captioner and CLIP model folders, in transformers' layout, for the CLIP
interrogator's tests (nothing is downloaded: the BLIP tokenizer's vocabulary is a few words written
here, CLIP's comes from the BPE vocabulary the app ships)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "cat", "dog", "red", "house",
         "on", "the", "hill", "painting", "with", "tree", "sky")


def write_blip(folder: Path, seed: int = 0) -> Path:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37}
    config = BlipConfig(text_config={**small, "vocab_size": len(WORDS), "max_position_embeddings": 64,
                                     "bos_token_id": WORDS.index("[DEC]"), "pad_token_id": 0,
                                     "sep_token_id": WORDS.index("[SEP]"), "eos_token_id": WORDS.index("[SEP]")},
                        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=16)
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder


def write_clip(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from webui.prompts.tokenizer import EOS_TOKEN, TokenizerFactory

    tokenizer = TokenizerFactory().get(EOS_TOKEN)
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37}
    config = CLIPConfig(text_config={**small, "vocab_size": len(tokenizer), "max_position_embeddings": 77},
                        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder
