"""Errors the engine raises for bad input.

Every user-facing failure (bad file, mismatched checkpoints, impossible hyperparameters) is a
`MergeExplorerError`: the CLI turns it into exit code 2 and one line on stderr, the app into an
error box. Anything else escaping the engine is a bug.
"""
from __future__ import annotations


class MergeExplorerError(ValueError):
    """Base class: a problem with the user's input, stated so the user can fix it."""


class CheckpointError(MergeExplorerError):
    """A checkpoint cannot be read, or does not match the others (names the file and tensor)."""


class ConfigError(MergeExplorerError):
    """A hyperparameter or option is out of range or inconsistent."""
