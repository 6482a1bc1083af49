"""Exceptions of a training run that went wrong, for callers (and the CLI) to tell apart.

Every error here is a ``TrainingError``; the ones about a setting, a file or a folder the
user gave are also ``ValueError`` (the command line names the flag they are about). Other
bad settings raise plain ``ValueError`` naming the setting; ``fsio.LockedError``
(output_dir in use) and ``fsio.DiskFullError`` (no space left while writing a named path)
come from the file-system layer.
"""

from __future__ import annotations

from ..fsio import DiskFullError, LockedError

__all__ = ["TrainingError", "NonFiniteError", "OutputDirNotEmptyError", "ResumeMismatchError",
           "CorruptCheckpointError", "UntrustedCheckpointError", "UnsupportedDistributedError",
           "DiskFullError", "LockedError"]


class TrainingError(RuntimeError):
    """A run that started went wrong; every good result written so far is kept."""


class NonFiniteError(TrainingError):
    """The loss or a gradient became NaN/inf. ``step`` is the first optimizer step it was
    seen at (None when it was found in weights about to be written); ``checkpoint`` the
    newest (finite) checkpoint, or None."""

    def __init__(self, message: str, step: int | None = None, checkpoint: str | None = None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class OutputDirNotEmptyError(TrainingError, ValueError):
    """output_dir holds an earlier run and neither resume nor overwrite was asked for."""


class ResumeMismatchError(TrainingError, ValueError):
    """A setting that defines the run differs from the checkpoint's. ``field`` names it."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class CorruptCheckpointError(TrainingError, ValueError):
    """A checkpoint file is missing, truncated or fails its checksum. ``file`` names it."""

    def __init__(self, message: str, file: str):
        super().__init__(message)
        self.file = file


class UntrustedCheckpointError(TrainingError, ValueError):
    """A checkpoint (or cache) file can be read only by trusting it: a pickle of an earlier
    version, or a folder without a manifest. ``file`` names it; ``--trust-checkpoint``
    (``trust_checkpoint=True``) allows it."""

    def __init__(self, message: str, file: str):
        super().__init__(message)
        self.file = file


class UnsupportedDistributedError(TrainingError, ValueError):
    """The launch asks for a distributed mode the trainers do not run (FSDP, DeepSpeed)."""
