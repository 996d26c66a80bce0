"""Gradio Blocks: builds requests from controls and renders results. No model code here."""
