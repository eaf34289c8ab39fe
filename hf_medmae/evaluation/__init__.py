"""Evaluation protocols shared by the tasks and the studies: metrics on predictions, frozen-feature probes, reconstruction checks."""
