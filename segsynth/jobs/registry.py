"""Models by name (``segsynth models``). A manifest shipped in the package
(``segsynth/data/models.json``) names the bundled models and the official checkpoints segsynth
can fetch; ``pull``/``add`` download them with pooch (hash-checked, retried, a progress bar),
unpack the checkpoint, export it to ONNX (the export extra) and install the result whole into
``CACHE/models/NAME`` (a staging folder renamed at the end: an interrupted or refused install
leaves nothing under the name). Nothing touches the network unless pull or add is asked.

Where the manifest publishes no sha256, the hash of the first download is recorded
(``CACHE/models/known-hashes.json``) and every later download of that file must match it.
Non-commercial licences need ``accept_license`` once (recorded in ``accepted-licences.json``).

An installed model folder: ``model.json`` (what it is, where it came from, its hashes),
``segmenter.onnx`` and/or ``generator.onnx`` (+ ``generator-encoder.onnx``), and for a
generator its official checkpoint (``generator-checkpoint/``: re-exported at another --size).
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import onnx
import pooch
import requests

from segsynth.core import onnxmeta
from segsynth.core.errors import InputError, ModelError
from segsynth.core.paths import BUNDLED_GENERATORS, bundled
from segsynth.jobs.progress import Progress
from segsynth.stream.infer.segmenter import BUNDLED
from segsynth.stream.io.demux import sha256_of
from segsynth.stream.io.mux import atomic_output

log = logging.getLogger("segsynth")
NAME = re.compile(r"[a-z0-9][a-z0-9._+-]{0,63}")
ROLES = ("segmenter", "generator")
FILES = {"segmenter": "segmenter.onnx", "generator": "generator.onnx"}
MIRROR_ENV = "SEGSYNTH_MODEL_MIRROR"


@dataclass(frozen=True)
class Part:
    """One download of a model and the role it plays: ``deeplab`` (a state dict .pth: a
    segmenter) or ``spade`` (a checkpoint folder, ``member`` inside an archive: a generator)."""

    role: str
    format: str
    file: str  # the download's name (and its name on a mirror)
    urls: tuple[str, ...] = ()
    sha256: str | None = None
    size: int | None = None
    member: str | None = None


@dataclass(frozen=True)
class Entry:
    name: str
    roles: tuple[str, ...]
    label_set: str = ""
    licence: str = ""
    description: str = ""
    bundled: bool = False
    non_commercial: bool = False
    licence_url: str = ""
    parts: tuple[Part, ...] = field(default=())


@functools.cache
def manifest() -> dict[str, Entry]:
    data = json.loads(resources.files("segsynth.data").joinpath("models.json").read_text())
    out = {}
    for name, e in data["models"].items():
        parts = tuple(Part(**{**p, "urls": tuple(p.get("urls", ()))}) for p in e.get("parts", ()))
        out[name] = Entry(name, tuple(e["roles"]), e.get("label_set", ""), e.get("licence", ""), e.get("description", ""),
                          e.get("bundled", False), e.get("non_commercial", False), e.get("licence_url", ""), parts)
    return out


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


class _DownloadBar:
    """pooch's progress-bar protocol (total, update, reset, close) over segsynth's Progress."""

    def __init__(self, what: str, quiet: bool) -> None:
        self.what, self.quiet, self.total, self._progress = what, quiet, None, None

    def update(self, n: int) -> None:
        if self._progress is None:
            self._progress = Progress(f"download {self.what}", self.total // 2**20 if self.total else None,
                                      unit="MiB", enabled=not self.quiet)
            self._bytes = 0
        self._bytes += n
        self._progress.update(self._bytes // 2**20 - self._progress.done)

    def reset(self) -> None:
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None


class Registry:
    """The models of one cache folder (``home``: segsynth's cache, see core.paths.cache_dir)."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.root = self.home / "models"
        self.manifest = manifest()

    # ---- what there is ----------------------------------------------------------------------
    def record(self, name: str) -> dict | None:
        """The model.json of an installed model (None: not installed)."""
        if not NAME.fullmatch(name):
            return None
        try:
            return json.loads((self.root / name / "model.json").read_text())
        except (OSError, ValueError):
            return None

    def names(self) -> list[str]:
        added = sorted(p.name for p in self.root.glob("*")  # not the hidden staging and removal folders
                       if NAME.fullmatch(p.name) and self.record(p.name) is not None) if self.root.is_dir() else []
        return [*self.manifest, *(n for n in added if n not in self.manifest)]

    def listing(self) -> list[dict]:
        """Every known model: name, roles, label set, size, licence, state, paths."""
        rows = []
        for name in self.names():
            entry, record = self.manifest.get(name), self.record(name)
            if entry is not None and entry.bundled:
                graphs = self._bundled_graphs(name)
                rows.append({"name": name, "roles": list(entry.roles), "label_set": entry.label_set,
                             "size": sum(p.stat().st_size for p in graphs), "licence": entry.licence,
                             "state": "bundled", "paths": [str(p) for p in graphs], "description": entry.description})
            elif record is not None:
                rows.append({"name": name, "roles": record["roles"], "label_set": record.get("label_set", ""),
                             "size": _size(self.root / name), "licence": record.get("licence", ""),
                             "state": "installed", "paths": [str(p) for p in self._graphs(name, record)],
                             "description": record.get("description", "")})
            else:
                sizes = [p.size for p in entry.parts]
                rows.append({"name": name, "roles": list(entry.roles), "label_set": entry.label_set,
                             "size": sum(sizes) if None not in sizes else None, "licence": entry.licence,
                             "state": "not installed", "paths": [], "description": entry.description})
        return rows

    def _bundled_graphs(self, name: str) -> list[Path]:
        files = {"ade20k+voc": [BUNDLED["ade20k"], BUNDLED["voc"]]}.get(name) or (
            [BUNDLED[name]] if name in BUNDLED else list(BUNDLED_GENERATORS.get(name, ())))
        return [p for p in map(bundled, files) if p.is_file()]

    def paths(self, name: str) -> list[Path]:
        """The ONNX graphs of ``name``, one per role (a generator's style encoder after it)."""
        entry = self.manifest.get(name)
        if entry is not None and entry.bundled:
            return self._bundled_graphs(name)
        record = self.record(name)
        if record is None:
            raise self.missing(name, "path")
        return self._graphs(name, record)

    def _graphs(self, name: str, record: dict) -> list[Path]:
        folder = self.root / name
        out = [folder / record["files"][r] for r in ROLES if r in record["files"]]
        encoder = folder / "generator-encoder.onnx"
        return out + ([encoder] if encoder.is_file() else [])

    def missing(self, name: str, flag: str) -> ModelError | InputError:
        """A known model not installed (ModelError, exit 4: how to get it), or a name nobody
        knows (InputError, exit 2: the nearest names)."""
        entry = self.manifest.get(name)
        if entry is not None:
            how = f"segsynth models pull {name}"
            if entry.non_commercial:
                how += " --accept-license"
            return ModelError(f"{flag} {name}: not installed; '{how}' fetches it (licence {entry.licence})")
        near = difflib.get_close_matches(name, self.names(), n=1)
        hint = f"; did you mean {near[0]}?" if near else "; segsynth models list shows the names"
        return InputError(f"{flag} {name}: no model of that name{hint}")

    # ---- names on the command line ------------------------------------------------------------
    def resolve(self, spec: str, role: str, size: tuple[int, int] | None = None) -> str:
        """What --segmenter/--generator ``spec`` means for the stream library: bundled names,
        paths and ``none`` unchanged; an installed model's graph for ``role`` (a generator at
        another ``size`` (W, H): its checkpoint folder, exported at that size); a known model
        not installed: ModelError saying how to get it."""
        entry, record = self.manifest.get(spec), self.record(spec)
        if record is None and (spec == "none" or (entry is not None and entry.bundled) or not NAME.fullmatch(spec)
                               or Path(spec).exists()):
            return spec  # a bundled name or a path: the stream library takes it
        if record is None:
            raise self.missing(spec, f"--{role}")
        if role not in record["files"]:
            raise ModelError(f"--{role} {spec}: this model has no {role} (it is a {' + '.join(record['roles'])})")
        graph = self.root / spec / record["files"][role]
        if role == "generator" and size is not None:
            meta = onnxmeta.read(onnx.load(str(graph), load_external_data=False))
            h, w = (int(v) for v in meta.get(onnxmeta.SIZE, "0x0").split("x"))
            checkpoint = self.root / spec / "generator-checkpoint"
            if (w, h) != tuple(size) and checkpoint.is_dir():
                return str(checkpoint)
        return str(graph)

    # ---- installing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        """One install or removal at a time in this cache (other processes wait)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _json(self, name: str) -> dict:
        try:
            return json.loads((self.root / name).read_text())
        except (OSError, ValueError):
            return {}

    def _write_json(self, name: str, data: dict) -> None:
        with atomic_output(self.root / name) as tmp:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")

    def pull(self, name: str, *, mirror: str | None = None, accept_license: bool = False, quiet: bool = False) -> dict:
        """Fetch, verify, export and install the manifest's model ``name``; its record."""
        entry = self.manifest.get(name)
        if entry is None:
            if self.record(name) is not None:
                raise InputError(f"pull {name}: installed with 'segsynth models add', not from the manifest: nothing "
                                 "to pull")
            raise self.missing(name, "pull")
        if entry.bundled:
            raise InputError(f"pull {name}: bundled with segsynth, nothing to fetch ({', '.join(map(str, self.paths(name)))})")
        if self.record(name) is not None:
            log.info("%s is installed already: %s", name, self.root / name)
            return self.record(name)
        self._check_licence(entry, accept_license)
        mirror = mirror or os.environ.get(MIRROR_ENV) or None
        sources = {p.role: [*([f"{mirror.rstrip('/')}/{p.file}"] if mirror else []), *p.urls] for p in entry.parts}
        return self._install(name, entry.parts, sources, {"licence": entry.licence, "description": entry.description},
                             quiet=quiet)

    def add(self, name: str, source: str, *, sha256: str | None = None, kind: str | None = None,
            licence: str = "", quiet: bool = False) -> dict:
        """Install an official-format checkpoint (an http(s) URL or a local path: a folder, a
        .tar.gz/.zip of one, or a .pth) as ``name``."""
        if not NAME.fullmatch(name) or name.endswith(".onnx"):
            raise InputError(f"add {name}: a name is lower-case letters, digits and . _ + - (up to 64), not a file name")
        if name in self.manifest or name == "none":
            raise InputError(f"add {name}: that name is taken by the manifest (segsynth models pull {name}); "
                             "choose another")
        if self.record(name) is not None:
            raise InputError(f"add {name}: installed already; segsynth models rm {name} first")
        if kind not in (None, *ROLES):
            raise InputError(f"--kind {kind}: choose segmenter or generator")
        if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
            raise InputError(f"--sha256 {sha256}: 64 hexadecimal digits are needed")
        remote = source.startswith(("http://", "https://"))
        if not remote and not Path(source).exists():
            raise InputError(f"add {name}: {source}: no such file or folder (SOURCE: an http(s) URL or a local path)")
        if not remote and Path(source).is_dir() and sha256:
            raise InputError("--sha256 checks a downloaded or archived file; SOURCE is a folder")
        file = Path(source.split("?")[0].rstrip("/")).name or "checkpoint"
        role = kind or ("segmenter" if file.endswith((".pth", ".pt")) else "generator")
        part = Part(role=role, format="deeplab" if role == "segmenter" else "spade", file=file,
                    sha256=sha256.lower() if sha256 else None)
        about = {"licence": licence or "as its source says", "description": f"added from {source}"}
        return self._install(name, (part,), {role: [source]}, about, quiet=quiet)

    def remove(self, name: str) -> Path:
        entry = self.manifest.get(name)
        if entry is not None and entry.bundled:
            raise InputError(f"rm {name}: bundled with segsynth; it cannot be removed")
        with self._locked():
            folder = self.root / name
            if not NAME.fullmatch(name) or not folder.is_dir():  # a folder whose model.json is broken goes too
                if name in self.manifest:
                    raise InputError(f"rm {name}: not installed")
                raise self.missing(name, "rm")
            trash = self.root / f".{name}.removing-{os.getpid()}"
            os.replace(folder, trash)  # gone under its name at once; the files after
            shutil.rmtree(trash, ignore_errors=True)
        return folder

    def _check_licence(self, entry: Entry, accept: bool) -> None:
        if not entry.non_commercial:
            return
        key = entry.licence_url or entry.licence
        if key in self._json("accepted-licences.json"):
            return
        if not accept:
            raise InputError(f"pull {entry.name}: its weights are licensed {entry.licence} (non-commercial: "
                             f"{entry.licence_url}); run again with --accept-license to accept it (asked once)")
        with self._locked():
            accepted = self._json("accepted-licences.json")
            accepted[key] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self._write_json("accepted-licences.json", accepted)

    def _install(self, name: str, parts: tuple[Part, ...], sources: dict[str, list[str]], about: dict, *,
                 quiet: bool) -> dict:
        with self._locked():
            if self.record(name) is not None:  # another process installed it meanwhile
                return self.record(name)
            for stale in self.root.glob(f".{name}.staging-*"):  # left by a killed install
                shutil.rmtree(stale, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=self.root))
            try:
                record = {"name": name, "roles": [p.role for p in parts], "files": {}, "sources": {}, "sha256": {},
                          **about}
                first_seen = {}  # manifest files without a published hash: recorded once the install succeeds
                for part in parts:
                    got, digest = self._fetch(part, sources[part.role], staging / "downloads", quiet)
                    if digest:
                        record["sha256"][part.file] = digest
                        if part.urls and not self._known_hash(part):
                            first_seen[part.file] = digest
                    record["sources"][part.role] = sources[part.role]
                    self._make(part, got, staging, record)
                    shutil.rmtree(staging / "downloads", ignore_errors=True)
                record["installed"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                (staging / "model.json").write_text(json.dumps(record, indent=1) + "\n")
                if first_seen:
                    self._write_json("known-hashes.json", {**self._json("known-hashes.json"), **first_seen})
                    for file, digest in first_seen.items():
                        log.warning("notice: %s has no published sha256; recorded %s (this first download) in %s: "
                                    "later downloads must match it", file, digest, self.root / "known-hashes.json")
                os.replace(staging, self.root / name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        log.info("installed %s: %s", name, ", ".join(str(p) for p in self.paths(name)))
        return record

    # ---- one part: fetch, unpack, export --------------------------------------------------------
    def _known_hash(self, part: Part) -> str | None:
        """The sha256 ``part`` must have: given (--sha256, the manifest), or for a manifest file
        without a published one, the hash its first successful install recorded."""
        return part.sha256 or (self._json("known-hashes.json").get(part.file) if part.urls else None)

    def _fetch(self, part: Part, sources: list[str], folder: Path, quiet: bool) -> tuple[Path, str | None]:
        """The part's file (a local folder is used where it is) and its sha256, checked against
        the one it must have (None for a folder)."""
        folder.mkdir(parents=True, exist_ok=True)
        local = [s for s in sources if not s.startswith(("http://", "https://"))]
        if local:
            path = Path(local[0])
            return path, self._verify(part, path, local[0]) if path.is_file() else None
        failures = []
        for url in sources:  # the mirror first, then the manifest's URLs
            try:  # pooch retries what breaks off; the hash is checked below, once (a mismatch does not heal)
                fetcher = pooch.create(path=folder, base_url="", registry={part.file: None}, urls={part.file: url},
                                       retry_if_failed=2)
                downloader = pooch.HTTPDownloader(progressbar=_DownloadBar(part.file, quiet), timeout=60)
                with _quiet_pooch():
                    path = Path(fetcher.fetch(part.file, downloader=downloader))
                break
            except (requests.RequestException, OSError) as exc:
                failures.append(f"{url}: {exc}")
        else:
            raise ModelError(f"could not download {part.file}: {'; '.join(failures)}; nothing was installed "
                             f"(offline? --mirror URL or ${MIRROR_ENV} names a site that serves {part.file})")
        digest = self._verify(part, path, url)
        if not part.urls and not part.sha256:
            log.info("%s: sha256 %s (give --sha256 to have it checked)", url, digest)
        return path, digest

    def _verify(self, part: Part, path: Path, source: str) -> str:
        """``path``'s sha256, refused (ModelError) where it is not the one ``part`` must have."""
        got, known = sha256_of(path), self._known_hash(part)
        if known and got != known:
            where = "" if part.sha256 else f" (recorded at its first install in {self.root / 'known-hashes.json'})"
            raise ModelError(f"{source}: sha256 {got} does not match the expected {known}{where}; nothing was "
                             "installed")
        return got

    def _make(self, part: Part, got: Path, staging: Path, record: dict) -> None:
        try:  # imported here: exporting needs torch, the export extra
            from segsynth.core.config import ExportConfig
            from segsynth.jobs.export import run_export
        except ImportError as exc:
            raise ModelError("installing a checkpoint exports it to ONNX, which needs the export extra "
                             "(pip install 'segsynth[export]')") from exc
        out = staging / FILES[part.role]
        if part.format == "deeplab":
            pth = got if got.is_file() and not _archive(got) else _unpacked_file(got, staging / "unpacked", (".pth", ".pt"))
            log.info("exporting %s to ONNX (the segmenter)", part.file)
            run_export(ExportConfig(what="deeplab", out=out, checkpoint=pth, argmax=True))
        else:
            checkpoint = staging / "generator-checkpoint"
            source = got if got.is_dir() else _unpack_checkpoint(got, checkpoint.with_name("unpacked"), part.member)
            shutil.copytree(source, checkpoint, dirs_exist_ok=False)
            what = "student" if (checkpoint / "student.json").is_file() else "spade"
            if what == "spade" and not (checkpoint / "latest_net_G.pth").is_file():
                raise ModelError(f"{part.file}: no SPADE checkpoint in it (a folder with opt.txt and latest_net_G.pth, "
                                 "or a student's student.json)")
            log.info("exporting %s to ONNX (the generator)", part.file)
            run_export(ExportConfig(what=what, out=out, checkpoint=checkpoint))
            encoder = staging / "generator-encoder.onnx"
            if (checkpoint / "latest_net_E.pth").is_file():
                run_export(ExportConfig(what="encoder", out=encoder, checkpoint=checkpoint))
            elif (checkpoint / "encoder.onnx").is_file():
                shutil.copyfile(checkpoint / "encoder.onnx", encoder)
        meta = onnxmeta.read(onnx.load(str(out), load_external_data=False))
        record["files"][part.role] = out.name
        record["label_set"] = record.get("label_set") or meta.get(onnxmeta.LABEL_SET, "")


@contextlib.contextmanager
def _quiet_pooch():
    """pooch logs every download at INFO; segsynth says what it does itself."""
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _archive(path: Path) -> bool:
    """A .tar(.gz) or .zip; not a .pth, although PyTorch writes those as zip files."""
    return path.is_file() and path.suffix not in (".pth", ".pt") and (tarfile.is_tarfile(path) or zipfile.is_zipfile(path))


def _members(path: Path) -> list[str]:
    """The regular files of an archive; an absolute name, a ``..`` or a link refuses it whole."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
    else:
        with tarfile.open(path) as t:
            members = t.getmembers()
        if any(m.issym() or m.islnk() or m.isdev() for m in members):
            raise ModelError(f"{path.name}: refuses an archive holding links or devices")
        names = [m.name for m in members if m.isfile()]
    for n in names:
        if n.startswith(("/", "\\")) or ".." in Path(n).parts or (len(n) > 1 and n[1] == ":"):
            raise ModelError(f"{path.name}: refuses to unpack {n!r}, a name outside its folder")
    return names


def _extract(path: Path, folder: Path, names: list[str]) -> None:
    """Only ``names``, and nothing outside ``folder`` (no absolute paths, ``..`` or links)."""
    folder.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for n in names:
                z.extract(n, folder)
        return
    with tarfile.open(path) as t:  # the names were checked by _members; the data filter too where Python has it
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        t.extractall(folder, members=[t.getmember(n) for n in names], **safe)


def _unpack_checkpoint(path: Path, folder: Path, member: str | None) -> Path:
    """The checkpoint folder inside archive ``path``: the one called ``member``, else the only
    folder holding latest_net_G.pth (or student.json)."""
    if not _archive(path):
        raise ModelError(f"{path.name}: not a checkpoint folder, .tar.gz or .zip")
    names = _members(path)
    folders = sorted({str(Path(n).parent) for n in names if Path(n).name in ("latest_net_G.pth", "student.json")})
    if member:
        folders = [f for f in folders if Path(f).name == member]
    if len(folders) != 1:
        found = ", ".join(Path(f).name for f in folders) or "none"
        want = f"a folder {member!r} with" if member else "exactly one folder with"
        raise ModelError(f"{path.name}: expected {want} latest_net_G.pth (or student.json); found: {found}")
    inside = folders[0]
    _extract(path, folder, [n for n in names if str(Path(n).parent) == inside])
    return folder / inside


def _unpacked_file(path: Path, folder: Path, suffixes: tuple[str, ...]) -> Path:
    names = [n for n in _members(path) if n.endswith(suffixes)] if _archive(path) else []
    if len(names) != 1:
        raise ModelError(f"{path.name}: expected one {' or '.join(suffixes)} file in it, found {len(names)}")
    _extract(path, folder, names)
    return folder / names[0]
