"""Errors that name the problem and the fix.

Every user-facing mistake (bad data, bad config, wrong checkpoint) raises one of these, so callers
can catch them by kind and users read a sentence instead of a stack trace from deep inside torch.
"""


class MedMAEError(ValueError):
    """Base class: a `ValueError` whose message says what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}\n  Fix: {fix}")


class ConfigError(MedMAEError):
    """A configuration key or value is missing, unknown, or out of range."""


class DataError(MedMAEError):
    """Input data cannot be used: unreadable file, wrong shape, NaN pixels, bad labels, empty set."""


class CheckpointError(MedMAEError):
    """A checkpoint does not fit: wrong architecture, missing weights, pickled weights, wrong shape."""
