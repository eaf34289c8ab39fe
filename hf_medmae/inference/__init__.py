"""Inference with trained models: load a saved classifier or segmenter, predict on new images or volumes, write the outputs."""
