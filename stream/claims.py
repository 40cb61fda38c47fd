"""Which stream of this process writes which path, and which reads which: one writer per
output path, and never a path another stream reads (so two streams cannot both write one
file, and no stream overwrites another's source). Sessions claim their paths before they
open anything and release them once their outputs are closed. Thread-safe."""

from __future__ import annotations

import os
import threading

from segsynth.core.errors import Conflict

_lock = threading.Lock()
_writers: dict[str, str] = {}  # path -> the stream that writes it
_readers: dict[str, set[str]] = {}  # path -> the streams that read it


def _key(path: str) -> str:
    return os.path.realpath(path)


def claim(stream: str, writes: list[str], reads: list[str]) -> None:
    """Claim ``writes`` and ``reads`` (file paths) for ``stream``, all or none; Conflict
    naming the other stream when one is taken."""
    writes, reads = [(p, _key(p)) for p in writes], [(p, _key(p)) for p in reads]
    with _lock:
        for path, key in writes:
            if _writers.get(key, stream) != stream:
                raise Conflict(f"sinks: {path} is written by stream {_writers[key]!r}", owner=_writers[key])
            others = _readers.get(key, set()) - {stream}
            if others:
                owner = sorted(others)[0]
                raise Conflict(f"sinks: {path} is the source of stream {owner!r}", owner=owner)
        for path, key in reads:
            if _writers.get(key, stream) != stream:
                raise Conflict(f"source: {path} is being written by stream {_writers[key]!r}", owner=_writers[key],
                               field="source")
        for _, key in writes:
            _writers[key] = stream
        for _, key in reads:
            _readers.setdefault(key, set()).add(stream)


def release(stream: str) -> None:
    """Give up every path ``stream`` claimed."""
    with _lock:
        for key in [k for k, owner in _writers.items() if owner == stream]:
            del _writers[key]
        for key in list(_readers):
            _readers[key].discard(stream)
            if not _readers[key]:
                del _readers[key]
