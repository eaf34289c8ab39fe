"""Inference with trained models: load a saved classifier or segmenter, predict new images or volumes."""
