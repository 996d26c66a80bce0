"""Checkpoints: find them (registry), read them safely (readers), recognise them (detect),
turn them into runnable modules (load), and keep a few loaded (cache)."""
