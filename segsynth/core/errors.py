"""The one exception tree of segsynth.

User mistakes (bad paths, corrupt media, unknown class names, incompatible checkpoints)
raise a subclass of :class:`SegsynthError`; the CLI prints ``str(err)`` as one line on
stderr and exits with ``err.exit_code``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import signal


class SegsynthError(Exception):
    """Base class: a problem the user can fix, reported as one line. ``field``: the option or
    request field at fault, where one is (the HTTP API names it); ``status``: the HTTP status
    a request that caused it gets."""

    exit_code = 1
    status = 422

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InputError(SegsynthError):
    """A missing, unreadable or unsupported input file or argument value."""

    exit_code = 2


class OutputError(SegsynthError):
    """The output cannot be written (missing directory, would overwrite the input, disk full)."""

    exit_code = 3


class Conflict(OutputError):
    """An output another stream of this process writes or reads; ``owner`` is that stream."""

    status = 409

    def __init__(self, message: str, *, owner: str, field: str | None = "sinks") -> None:
        super().__init__(message, field=field)
        self.owner = owner


class Forbidden(InputError):
    """A path or address the service may not touch (outside ``--media-root``, a listener beyond loopback)."""

    status = 403


class ServiceError(InputError):
    """A request the service refuses, with its HTTP ``status`` (and ``field``, the body field at fault)."""

    def __init__(self, message: str, field: str | None = None, status: int = 422) -> None:
        super().__init__(message, field=field)
        self.status = status


class LabelError(InputError):
    """An unknown class name or a malformed remap rule."""


class ModelError(SegsynthError):
    """A model file or checkpoint that is missing, corrupt or of the wrong kind."""

    exit_code = 4
    status = 500


class BackendError(SegsynthError):
    """An inference backend that cannot run here (no GPU, package missing, CUDA error)."""

    exit_code = 5
    status = 503


class SourceError(SegsynthError):
    """A live source that cannot be opened or keeps failing."""

    exit_code = 6


class Interrupted(SegsynthError):
    """The run was stopped by SIGINT (exit 130) or SIGTERM (exit 143) after a clean drain."""

    def __init__(self, signum: int, message: str = "") -> None:
        name = signal.Signals(signum).name
        super().__init__(message or f"stopped by {name}; output flushed and closed")
        self.signum = signum
        self.exit_code = 128 + signum


@contextlib.contextmanager
def at_field(name: str):
    """Errors raised in the block that name no field are about ``name``."""
    try:
        yield
    except SegsynthError as exc:
        if exc.field is None:
            exc.field = name
        raise
