"""Interrogation (image -> prompt). Today: booru-style taggers, the WD14 family (ONNX models
with their `selected_tags.csv`), which the popular Tagger extension runs; a CLIP/BLIP captioner
is not available yet."""
