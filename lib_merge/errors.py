"""Errors that carry the file and key they are about.

Every failure a user can cause (a bad file, a bad parameter, a name that
exists) is one of these, so the CLI, the tab and the HTTP route can show a
single clear line instead of a traceback.
"""
from __future__ import annotations


class MergeError(Exception):
    """Base of every error meant for the user; ``str()`` is the one-line message."""

    def __init__(self, message: str, path: str | None = None, key: str | None = None) -> None:
        self.path = path
        self.key = key
        parts = []
        if path:
            parts.append(str(path))
        if key:
            parts.append(f"key {key}")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class CheckpointError(MergeError):
    """A file that cannot be read as a checkpoint (missing, corrupt, unsafe)."""


class ArchitectureError(MergeError):
    """Inputs of different or unknown architectures."""


class ShapeMismatchError(MergeError):
    """A key whose shape differs between base and a model."""


class ParameterError(MergeError):
    """A merge parameter outside its range, refused before any work."""


class OutputError(MergeError):
    """The output name or location is refused, or the write failed."""


class NonFiniteError(MergeError):
    """NaN/Inf in an input or produced by the merge."""


class MergeCancelled(MergeError):
    """The user cancelled; no output was written."""


def describe(error: MergeError) -> dict:
    """A MergeError as plain data (for a worker process to send to its parent)."""
    message = str(error)
    return {"type": type(error).__name__, "message": message, "path": error.path, "key": error.key}


def rebuild(data: dict) -> MergeError:
    """The MergeError that :func:`describe` described, with the same class, text, path and key."""
    cls = globals().get(str(data.get("type")), MergeError)
    if not (isinstance(cls, type) and issubclass(cls, MergeError)):
        cls = MergeError
    error = cls.__new__(cls)
    Exception.__init__(error, data.get("message", "merge failed"))
    error.path = data.get("path")
    error.key = data.get("key")
    return error
