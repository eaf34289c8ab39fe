"""Evaluation protocols shared by the tasks and the studies.

Metrics on predictions, frozen-feature probes, reconstruction checks, study results.
"""
