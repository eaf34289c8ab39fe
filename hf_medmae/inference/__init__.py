"""Inference with trained models: load a saved classifier or segmenter, predict on new data, write the outputs."""
