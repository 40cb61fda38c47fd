"""The model sets of a service. The set the service starts with stays loaded; a stream that names
other models (``segmenter``, ``generator``, ``models`` tier) gets them loaded on first use,
shared by every stream that names the same set (loaded once), and unloaded ``keep_alive``
seconds after the last stream using it was deleted. At most ``limit`` sets at once: beyond
it an idle set is unloaded early, else the request is refused (503) with the reason, rather
than the machine swapping itself to death."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import typing
from collections.abc import Callable

from prometheus_client.core import GaugeMetricFamily

from segsynth.core.config import ModelConfig
from segsynth.core.errors import InputError, ModelError, ServiceError
from segsynth.jobs.models import named
from segsynth.jobs.registry import Registry
from segsynth.stream.infer.models import ModelSet

log = logging.getLogger("segsynth")
FIELDS = ("segmenter", "generator", "models")  # what a stream may name
STUDIO = "studio-"  # holders named so are studio requests, not streams


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return None


@dataclasses.dataclass
class _Loaded:
    models: ModelSet
    key: tuple[str, str, str]
    load_seconds: float
    memory_mb: float | None  # the process's resident memory grew by this much while it loaded (approximate)
    pinned: bool = False  # the service's own set: never unloaded
    users: set = dataclasses.field(default_factory=set)  # its holders: stream ids, studio requests
    idle_since: float | None = None
    timer: threading.Timer | None = None  # the keep-alive running out


@dataclasses.dataclass
class _Loading:
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: BaseException | None = None  # what the load raised: the requests waiting for it raise it too


def _field(exc: Exception) -> str:
    return "generator" if "--generator" in str(exc) else "segmenter"


class ModelSets:
    def __init__(self, base: ModelSet, config: ModelConfig, *, loader: Callable[[ModelConfig], ModelSet] | None,
                 limit: int = 2, keep_alive: float = 60.0) -> None:
        """``base``: the loaded set of ``config`` (its names as the user gave them);
        ``loader``: how another set is loaded (segsynth.jobs.models.load_models; None: no other)."""
        self.config, self.loader, self.limit, self.keep_alive = config, loader, limit, keep_alive
        base_key = self.key({})
        self.sets: dict[tuple, _Loaded] = {base_key: _Loaded(base, base_key, 0.0, None, pinned=True)}
        self._loading: dict[tuple, _Loading] = {}
        self._held: dict[str, tuple] = {}  # holder -> the key of the set it holds
        self._lock = threading.Lock()
        self._closed = False

    def known(self, name: str) -> bool:
        """``name`` is a model name of the manifest or an installed one (not a path)."""
        registry = Registry(self.config.cache_dir)
        return name in registry.manifest or registry.record(name) is not None

    def unknown(self, field: str, name: str) -> typing.NoReturn:
        """422: no model is called ``name`` (with the nearest names)."""
        raise ServiceError(str(Registry(self.config.cache_dir).missing(name, field)), field)

    def key(self, spec: dict) -> tuple[str, str, str]:
        c = self.config
        return (spec.get("segmenter") or c.segmenter, spec.get("generator") or c.generator, spec.get("models") or c.models)

    def acquire(self, holder: str, spec: dict) -> ModelSet:
        """The set ``spec`` names, loaded if need be, held for ``holder`` (a unique name: a
        stream id, a studio request) until ``release(holder)``."""
        key = self.key(spec)
        cfg = self._config(key) if self.loader is not None and key not in self.sets else None  # unknown names: 422
        while True:
            with self._lock:
                if self._closed:
                    raise ServiceError("the service is shutting down", status=503)
                if holder in self._held:
                    raise RuntimeError(f"{holder} holds a model set already")
                loaded = self.sets.get(key)
                if loaded is not None:
                    self._hold(loaded, holder)
                    return loaded.models
                pending = self._loading.get(key)
                if pending is None:
                    if self.loader is None:
                        field = next(f for f, mine, asked in zip(FIELDS, self.key({}), key) if mine != asked)
                        raise ServiceError(f"{field}: this service runs {'+'.join(self.key({}))} and loads no "
                                           "other models", field)
                    evict = self._make_room(key)
                    pending = self._loading[key] = _Loading()
                    break
            pending.done.wait()  # another request is loading this set: then take it, or its error
            if pending.error is not None:
                raise pending.error
        try:
            if evict is not None:
                evict.models.close()
            loaded = self._load(key, cfg or self._config(key))
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            with self._lock:
                del self._loading[key]
                if pending.error is None:
                    if self._closed:  # shut down while it loaded
                        pending.error = ServiceError("the service is shutting down", status=503)
                    else:
                        self.sets[key] = loaded
                        self._hold(loaded, holder)
            pending.done.set()
        if pending.error is not None:
            loaded.models.close()
            raise pending.error
        return loaded.models

    def _hold(self, loaded: _Loaded, holder: str) -> None:
        """Under the lock."""
        loaded.users.add(holder)
        self._held[holder] = loaded.key
        loaded.idle_since = None
        if loaded.timer is not None:
            loaded.timer.cancel()
            loaded.timer = None

    def _make_room(self, key) -> _Loaded | None:
        """Under the lock: the idle set unloaded for ``key`` (None: room enough), or 503."""
        if len(self.sets) + len(self._loading) < self.limit:
            return None
        idle = sorted((s for s in self.sets.values() if not s.pinned and not s.users), key=lambda s: s.idle_since or 0)
        if idle:
            log.info("model set %s: unloaded early, to make room for %s", "+".join(idle[0].key), "+".join(key))
            if idle[0].timer is not None:
                idle[0].timer.cancel()
            return self.sets.pop(idle[0].key)
        busy = "; ".join("+".join(s.key) + (" (the service's own)" if s.pinned else f" ({len(s.users)} holders)")
                         for s in self.sets.values())
        loading = f", {len(self._loading)} loading" if self._loading else ""
        raise ServiceError(f"this service holds at most {self.limit} model sets (--max-model-sets) and they are in "
                           f"use: {busy}{loading}; delete streams or start the service with a higher limit", status=503)

    def _config(self, key) -> ModelConfig:
        """The ModelConfig of ``key``, its names checked (segsynth models)."""
        segmenter, generator, tier = key
        try:
            cfg = dataclasses.replace(self.config, segmenter=segmenter, generator=generator, models=tier)
        except InputError as exc:
            raise ServiceError(f"models: {exc}", "models") from None
        try:
            named(cfg)
        except (InputError, ModelError) as exc:
            raise ServiceError(str(exc), _field(exc)) from None
        return cfg

    def _load(self, key, cfg: ModelConfig) -> _Loaded:
        before, start = _rss_mb(), time.monotonic()
        try:
            models = self.loader(cfg)
        except (InputError, ModelError) as exc:
            raise ServiceError(str(exc), _field(exc)) from None
        seconds, after = time.monotonic() - start, _rss_mb()
        log.info("model set %s: loaded in %.1f s", "+".join(key), seconds)
        return _Loaded(models, key, seconds, round(after - before, 1) if before and after else None)

    def release(self, holder: str) -> None:
        """``holder`` no longer needs its set; an unpinned set nobody holds is unloaded
        ``keep_alive`` seconds later, unless it is taken again meanwhile."""
        with self._lock:
            loaded = self.sets.get(self._held.pop(holder, None))
            if loaded is None:
                return
            loaded.users.discard(holder)
            if not loaded.users and not loaded.pinned and not self._closed:
                loaded.idle_since = time.monotonic()
                if loaded.timer is not None:
                    loaded.timer.cancel()
                loaded.timer = threading.Timer(self.keep_alive, self._expire, (loaded, loaded.idle_since))
                loaded.timer.daemon = True
                loaded.timer.start()

    def _expire(self, loaded: _Loaded, since: float) -> None:
        with self._lock:
            if loaded.users or loaded.idle_since != since or self.sets.get(loaded.key) is not loaded:
                return
            del self.sets[loaded.key]
        loaded.models.close()
        log.info("model set %s: unloaded (no stream used it for %.0f s)", "+".join(loaded.key), self.keep_alive)

    def status(self) -> list[dict]:
        """Each loaded set: its names, the streams holding it (and how many studio requests),
        load seconds, memory, seconds idle."""
        now = time.monotonic()
        with self._lock:
            return [{"segmenter": s.key[0], "generator": s.key[1], "models": s.key[2], "default": s.pinned,
                     "streams": sorted(u for u in s.users if not u.startswith(STUDIO)),
                     "requests": sum(u.startswith(STUDIO) for u in s.users),
                     "load_seconds": round(s.load_seconds, 2), "memory_mb": s.memory_mb,
                     "idle_seconds": round(now - s.idle_since, 1) if s.idle_since is not None else None}
                    for s in self.sets.values()]

    def collect(self):
        """Prometheus: which models are loaded, each set's load time and streams."""
        loaded = GaugeMetricFamily("segsynth_model_loaded", "1 for each model loaded in some model set",
                                   labels=["name"])
        seconds = GaugeMetricFamily("segsynth_model_set_load_seconds", "Seconds a loaded model set took to load "
                                    "(0 for the service's own, loaded at start)", labels=["segmenter", "generator",
                                                                                          "models"])
        streams = GaugeMetricFamily("segsynth_model_set_streams", "Streams using a loaded model set",
                                    labels=["segmenter", "generator", "models"])
        sets = self.status()
        for name in sorted({s[role] for s in sets for role in ("segmenter", "generator") if s[role] != "none"}):
            loaded.add_metric([name], 1)
        for s in sets:
            labels = [s["segmenter"], s["generator"], s["models"]]
            seconds.add_metric(labels, s["load_seconds"])
            streams.add_metric(labels, len(s["streams"]))
        yield from (loaded, seconds, streams)

    def close(self) -> None:
        """Unload every set but the service's own (its owner closes that)."""
        with self._lock:
            self._closed = True
            others = [s for s in self.sets.values() if not s.pinned]
            self.sets = {k: s for k, s in self.sets.items() if s.pinned}
            for s in others:
                if s.timer is not None:
                    s.timer.cancel()
        for s in others:
            s.models.close()
