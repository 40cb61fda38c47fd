"""Products of graph transforms kept on disk (``CachedFile``), and the engine cache: built TensorRT engines on disk, keyed by everything that makes an engine
unportable - the ONNX graph's hash, the GPU's name and compute capability, the TensorRT
version, precision and the shape profile. Each engine has a JSON sidecar with its key
fields, so an engine built for another GPU or TensorRT version is recognised as stale
(and rebuilt, with a message) rather than loaded and failing obscurely.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger("segsynth")


@dataclass(frozen=True)
class EngineKey:
    graph_sha256: str
    gpu: str
    compute_capability: str  # "9.0"
    tensorrt: str
    precision: str  # "fp16" or "fp32"
    profile: str  # e.g. "image:1x3x513x513/4x3x513x513/8x3x513x513"

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]

    def describe(self) -> str:
        return f"{self.gpu} (sm {self.compute_capability}), TensorRT {self.tensorrt}, {self.precision}"


def graph_sha256(onnx_bytes: bytes) -> str:
    return hashlib.sha256(onnx_bytes).hexdigest()


def content_key(*parts: bytes | str | Path, length: int = 16) -> str:
    """A hex digest of files (their bytes), bytes and strings: the name of a cached product."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.read_bytes() if isinstance(part, Path) else part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:length]


class CachedFile:
    """A graph transform's product kept on disk, the way Polygraphy's loaders compose:
    ``CachedFile(path)(make)`` returns ``path``, made once by ``make(tmp)`` (which writes the
    product to ``tmp``). Written whole or not at all - a temporary name in the same folder,
    renamed - so a crash, or two processes making it at once, never leave half a file. Every
    cached artefact goes through it: re-shaped segmenters, fused chains, FP16 graphs, exported
    generators, TensorRT engines."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __call__(self, make: Callable[[Path], None]) -> Path:
        if self.path.is_file():
            return self.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}-{threading.get_ident()}.partial{self.path.suffix}")
        try:
            make(tmp)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        return self.path


def profile_string(shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]) -> str:
    return ";".join(f"{name}:" + "/".join("x".join(map(str, s)) for s in triple) for name, triple in sorted(shapes.items()))


class EngineCache:
    """A directory of ``<digest>.engine`` files with ``<digest>.json`` sidecars."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: EngineKey) -> Path:
        return self.directory / f"{key.digest}.engine"

    def load(self, key: EngineKey) -> bytes | None:
        """The cached engine for ``key``, or None. Engines cached for the same graph on another
        GPU / TensorRT version are reported, since they cannot be reused here."""
        path = self.path(key)
        if path.is_file():
            return path.read_bytes()
        for sidecar in self.directory.glob("*.json") if self.directory.is_dir() else []:
            try:
                other = EngineKey(**json.loads(sidecar.read_text()))
            except (ValueError, TypeError):
                continue
            if other.graph_sha256 == key.graph_sha256 and other != key:
                log.info("engine cache: the engine for this graph was built for %s; building one for %s",
                         other.describe(), key.describe())
                break
        return None

    def store(self, key: EngineKey, engine: bytes) -> Path:
        path = self.path(key)
        path.unlink(missing_ok=True)  # a rebuild replaces it
        CachedFile(path)(lambda tmp: tmp.write_bytes(engine))
        path.with_suffix(".json").write_text(json.dumps(asdict(key), indent=1) + "\n")
        return path

    def entries(self) -> list[tuple[EngineKey, Path]]:
        out = []
        for sidecar in sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []:
            try:
                key = EngineKey(**json.loads(sidecar.read_text()))
            except (ValueError, TypeError):
                continue
            if self.path(key).is_file():
                out.append((key, self.path(key)))
        return out
