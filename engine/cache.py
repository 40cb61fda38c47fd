"""The engine cache: built TensorRT engines on disk, keyed by everything that makes an engine
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
from dataclasses import asdict, dataclass
from pathlib import Path

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
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(engine)
        os.replace(tmp, path)
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
