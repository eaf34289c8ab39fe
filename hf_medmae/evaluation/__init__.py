"""Evaluation protocols shared by the tasks and the studies: scores of predictions, frozen-feature probes."""
