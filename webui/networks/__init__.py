"""Extra networks: LoRA / LyCORIS-LoCon files and textual-inversion embeddings.

This package owns
- `registry`: finding the files in `models/Lora/` and `models/embeddings/`, their names as
  typed in prompts, preview images and 12-digit short hashes;
- `lora` (with `lora_names`): reading LoRA files of the kohya/sd-scripts and diffusers/peft
  layouts, matching them to the modules of a loaded `ModelBundle`, and merging them into the
  weights for one job only (restoring the exact original tensors afterwards);
- `embeddings`: reading textual-inversion files (A1111 `.pt`, diffusers `.bin`, `.safetensors`
  incl. SDXL `clip_l`/`clip_g`) and spotting their trigger words in a prompt.

It does not parse `<lora:NAME:W>` out of prompts nor feed embedding vectors to the text
encoders: the prompt and pipeline code call into this package for that.
"""
