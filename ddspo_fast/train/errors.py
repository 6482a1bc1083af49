"""Exceptions of a training run that went wrong, for callers (and the CLI) to tell apart.

Bad settings and inputs raise ``ValueError`` (or a subclass here) naming the setting, file
or step; ``fsio.LockedError`` (output_dir in use) and ``fsio.DiskFullError`` (no space
left while writing a named path) come from the file-system layer.
"""

from __future__ import annotations

from ..fsio import DiskFullError, LockedError

__all__ = ["TrainingError", "NonFiniteError", "OutputDirNotEmptyError", "ResumeMismatchError",
           "CorruptCheckpointError", "UntrustedCheckpointError", "DiskFullError",
           "LockedError"]


class TrainingError(RuntimeError):
    """A run that started went wrong; every good result written so far is kept."""


class NonFiniteError(TrainingError):
    """The loss or a gradient became NaN/inf. ``step`` is the first optimizer step it was
    seen at; ``checkpoint`` the newest (finite) checkpoint, or None."""

    def __init__(self, message: str, step: int, checkpoint: str | None = None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class OutputDirNotEmptyError(ValueError):
    """output_dir holds an earlier run and neither resume nor overwrite was asked for."""


class ResumeMismatchError(ValueError):
    """A setting that defines the run differs from the checkpoint's. ``field`` names it."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing, truncated or fails its checksum. ``file`` names it."""

    def __init__(self, message: str, file: str):
        super().__init__(message)
        self.file = file


class UntrustedCheckpointError(ValueError):
    """A checkpoint (or cache) file can be read only by trusting it: a pickle of an earlier
    version, or a folder without a manifest. ``file`` names it; ``--trust-checkpoint``
    (``trust_checkpoint=True``) allows it."""

    def __init__(self, message: str, file: str):
        super().__init__(message)
        self.file = file
