"""Output directories, manifests, atomic writes and up-to-date checks (DESIGN §5).

Every stage writes one output directory. `manifest.json` is written last and atomically, so its presence means
the stage finished; it records the resolved recipe and the sha256 of every input, which is what makes a re-run
with the same recipe and inputs "up to date". Every file is written to a temporary name beside its target,
flushed and fsynced, then renamed over it: a killed process leaves the old file or the new one, never half of
one (the lesson of Lightning #688 and HF Trainer #35782).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

import mmctl
from mmctl.errors import BusyError, DataError, UsageError

MANIFEST = "manifest.json"
LOGS = ("metrics.jsonl", "samples.jsonl")  # what a training run appends to: JSON lines, each with its step
LOCK = ".lock"  # held (flock) by the process writing the directory
RECORD = (MANIFEST, "recipe.yaml", *LOGS)  # the files that say what ran in a stage's directory
PENDING = ".pending"  # products of the run in progress, published by finish()
BACKUP = ".backup"  # the record as the run in progress found it
PREVIOUS = "previous"  # the last finished run's record, while a newer run is unfinished
# Libraries whose versions a manifest records when they are installed.
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "bitsandbytes", "datasets", "numpy")


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_path(path: str | Path, known: dict | None = None, seen: dict | None = None) -> str:
    """sha256 of a file, or of a directory as the hash of its files' relative names and hashes.

    `known` maps each file's relative name ("" for a file given itself) to [size, mtime_ns, sha256] as an earlier
    run recorded them: a file whose size and modification time are both unchanged is not read again (make's and
    rsync's test; a re-run over a 2 GB corpus is "up to date" in a moment). `seen`, when given, is filled the same
    way for the next run."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: input not found")
    known = known if isinstance(known, dict) else {}

    def digest(p: Path, rel: str) -> str:
        stat = p.stat()
        entry = known.get(rel)
        valid = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], str)
        sha = entry[2] if valid and entry[:2] == [stat.st_size, stat.st_mtime_ns] else sha256_file(p)
        if seen is not None:
            seen[rel] = [stat.st_size, stat.st_mtime_ns, sha]
        return sha

    if path.is_file():
        return digest(path, "")
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        rel = p.relative_to(path).as_posix()
        h.update(f"{rel}\0{digest(p, rel)}\n".encode())
    return h.hexdigest()


def regular_file(path: str | Path) -> Path:
    """`path`, which must exist and be a regular file (a FIFO or device would block a reader forever)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file beside it, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as safetensors, flushed to disk, with the permissions every other file gets (safetensors
    itself creates files readable by their owner only, ignoring the umask)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, path,
              metadata={"format": "pt", **(metadata or {})})
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return path


def publish_dir(tmp: str | Path, final: str | Path) -> Path:
    """Move a fully written directory `tmp` to `final`, replacing any old one, never leaving a mix of the two."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)
    return final


def read_manifest(out: str | Path) -> dict | None:
    """The manifest of a finished stage, or None if there is none (or it is unreadable)."""
    path = Path(out) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "mmctl": mmctl.__version__}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_commit() -> str | None:
    """The commit of the mmctl source tree when it is a git checkout (editable installs), else None."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# Names inside a stage's directory that belong to its record, never to a product (a method or phase `name`).
RESERVED = {*RECORD, LOCK, PREVIOUS, "checkpoints", "phases", "rollouts"}
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a directory inside a stage's output dir (None if it can): a plain name — letters,
    digits, `.`, `_`, `+`, `-`, no path separator, not `..`, not one of the record's own names."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or ".." in name:
        return (f"{name!r} is not a plain name (letters, digits, . _ + -; no / or ..; at most 100 characters): it "
                "names a directory inside the output dir")
    if name in RESERVED:
        return f"{name!r} is a name the output dir's record uses; choose another"
    return None


class StageDir:
    """One stage's output directory and its record: the up-to-date check, recipe.yaml, the logs, the products
    and the manifest — kept so that a failed run never costs the last good one anything.

    A run goes `begin()` → `log()` / `product(name)` → `finish(results)`:
    - `begin` keeps a copy of the record as it found it (`.backup/`) and, when a finished run is here, its record
      in `previous/`; it drops the manifest (a run in progress never looks finished) and starts the logs.
    - Products are written under `.pending/` and published over the old ones only by `finish`, just before the
      manifest: until then the last finished run's `model/` (or shards, or quantized dirs) is untouched.
    - `abandon(saved_progress)` after a failure puts the record back as `begin` found it — unless the attempt
      saved resumable training state, in which case it is this directory's run now (re-running resumes it) and
      the last finished run's record stays in `previous/`.
    A directory that holds another stage's run, or files that are no stage's, is refused as the run starts.
    """

    def __init__(self, out: str | Path, stage: str, recipe: dict, inputs: dict[str, str | Path] | None = None,
                 seed: int | None = None, lock: bool = True):
        self.out = Path(out)
        self.stage, self.recipe, self.seed = stage, recipe, seed
        manifest = read_manifest(self.out) if self.out.is_dir() else None
        earlier = manifest.get("inputs") if isinstance(manifest, dict) else None
        earlier = earlier if isinstance(earlier, dict) else {}
        self.inputs = {}
        for name, p in (inputs or {}).items():  # (files unchanged since this dir's last run are not hashed again)
            prior = earlier.get(name) if isinstance(earlier.get(name), dict) else {}
            files: dict = {}
            sha = sha256_path(p, prior.get("files") if prior.get("path") == str(p) else None, files)
            self.inputs[name] = {"path": str(p), "sha256": sha, "files": files}
        self.started: float | None = None
        self.began = False
        self._products: list[str] = []
        self._refuse_foreign()
        self._lock = self._claim() if lock else None

    def _claim(self):
        """An exclusive lock on the directory for this process's lifetime (the OS drops it if the process dies),
        so a second run on the same directory is refused instead of interleaving its files with ours."""
        import fcntl

        self.out.mkdir(parents=True, exist_ok=True)
        f = open(self.out / LOCK, "a")  # noqa: SIM115 - held open until the process exits
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise BusyError(f"{self.out}: another mmctl process is using this output directory; nothing was "
                            "changed (retry when it has finished)") from None
        return f

    def _refuse_foreign(self) -> None:
        """Refuse a directory holding another stage's run (its products would be overwritten) or files that belong
        to no stage run (a home directory given as run.out)."""
        if not self.out.is_dir():
            return
        holder = stage_of(self.out)
        if holder is not None and holder != self.stage:
            raise UsageError(f"run.out: {self.out} holds a `mmctl {holder}` run; give this `mmctl {self.stage}` "
                             "run a directory of its own (nothing was changed)")
        if holder is None:
            strangers = sorted(p.name for p in self.out.iterdir() if not p.name.startswith("."))
            if strangers:
                raise UsageError(f"run.out: {self.out} holds files that are no mmctl run's ({', '.join(strangers[:3])}"
                                 f"{', …' if len(strangers) > 3 else ''}); choose a new or empty directory (nothing "
                                 "was changed)")

    def release(self) -> None:
        """Let go of the directory's lock (the process's exit does too)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def up_to_date(self) -> bool:
        """True if a finished run of this stage with the same resolved recipe and input hashes is here."""
        manifest = read_manifest(self.out)
        if manifest is None or manifest.get("stage") != self.stage:
            return False
        same_inputs = {k: v["sha256"] for k, v in manifest.get("inputs", {}).items()} == {
            k: v["sha256"] for k, v in self.inputs.items()}
        return _without_device(manifest.get("recipe")) == _without_device(self.recipe) and same_inputs

    def results(self) -> dict:
        """The results recorded by the finished run in this directory (after `up_to_date()` said so)."""
        return (read_manifest(self.out) or {}).get("results", {})

    def begin(self, keep_logs_through: int | None = None) -> None:
        """Start this attempt's record (see the class docstring). A resumed training run keeps the log records up
        to its checkpoint's step (and drops any logged after it, which the resumed run logs again), so each log
        reads as one uninterrupted run."""
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in [*self.out.glob(".*.tmp-*"), *self.out.glob(".*.old-*"), self.out / PENDING]:
            _remove(stale)  # what a killed run or publish left
        _copy_record(self.out, self.out / BACKUP)
        if (self.out / MANIFEST).is_file():  # a finished run: its record stays safe until this one finishes
            _copy_record(self.out, self.out / PREVIOUS)
        (self.out / MANIFEST).unlink(missing_ok=True)
        for name in LOGS:
            log = self.out / name
            if not log.exists() and name != "metrics.jsonl":
                continue
            kept = []
            if keep_logs_through is not None and log.exists():
                for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
                    try:
                        record = json.loads(line)
                    except ValueError:  # a line cut short by a kill
                        continue
                    step = record.get("step", 0) if isinstance(record, dict) else None
                    if isinstance(step, int | float) and step <= keep_logs_through:
                        kept.append(line + "\n")
            atomic_write_text(log, "".join(kept))
        atomic_write_text(self.out / "recipe.yaml", yaml.safe_dump(self.recipe, sort_keys=False, allow_unicode=True))
        self.started = time.time()
        self.began = True

    def log(self, record: dict, to: str = "metrics.jsonl") -> None:
        """Append one JSON object to one of the run's LOGS (a log; the manifest, not this file, marks completion)."""
        with open(self.out / to, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def product(self, name: str) -> Path:
        """Where to write product `name` (a file or a directory): a pending path that `finish` publishes as
        `<out>/<name>`. Names are plain (`name_problem`)."""
        problem = name_problem(name)
        if problem:
            raise UsageError(f"{self.out}: {problem}")
        if name not in self._products:
            self._products.append(name)
        (self.out / PENDING).mkdir(parents=True, exist_ok=True)
        return self.out / PENDING / name

    def finish(self, results: dict, device: str = "cpu") -> Path:
        """Publish the products, then write manifest.json, last and atomically; the older record copies go."""
        for name in self._products:
            pending = self.out / PENDING / name
            if pending.is_dir():
                publish_dir(pending, self.out / name)
            elif pending.exists():
                os.replace(pending, self.out / name)
        manifest = {
            "stage": self.stage,
            "mmctl_version": mmctl.__version__,
            "recipe": self.recipe,
            "inputs": self.inputs,
            "seed": self.seed,
            "git_commit": git_commit(),
            "versions": library_versions(),
            "device": device,
            "started": _iso(self.started or time.time()),
            "finished": _iso(time.time()),
            "results": results,
        }
        path = atomic_write_json(self.out / MANIFEST, manifest)
        for leftover in (PENDING, BACKUP, PREVIOUS):
            _remove(self.out / leftover)
        self.began = False
        return path

    def abandon(self, saved_progress: bool) -> bool:
        """After a failed attempt: put the record back as `begin` found it, unless the attempt saved resumable
        progress. Returns True when the last finished run's record is left in `previous/`."""
        if not self.began:
            return False
        self.began = False
        _remove(self.out / PENDING)
        if saved_progress:
            _remove(self.out / BACKUP)
            return (self.out / PREVIOUS).is_dir()
        backup = self.out / BACKUP
        for name in RECORD:
            _remove(self.out / name)
            if (backup / name).exists():
                os.replace(backup / name, self.out / name)
        _remove(backup)
        if (self.out / MANIFEST).is_file():  # the finished run is back in place: its copy is not needed
            _remove(self.out / PREVIOUS)
        return False


def stage_of(out: Path) -> str | None:
    """The stage whose run a directory holds (its manifest's or recipe.yaml's `stage`), or None."""
    manifest = read_manifest(out)
    if isinstance(manifest, dict) and isinstance(manifest.get("stage"), str):
        return manifest["stage"]
    for record in (out / "recipe.yaml", out / PREVIOUS / MANIFEST):
        try:
            data = yaml.safe_load(record.read_text(encoding="utf-8")) if record.suffix == ".yaml" else \
                json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError, RecursionError):
            continue
        if isinstance(data, dict) and isinstance(data.get("stage"), str):
            return data["stage"]
    return None


def _copy_record(out: Path, to: Path) -> None:
    """A fresh copy of the record files present in `out` into directory `to` (written whole, then renamed)."""
    tmp = to.with_name(f".{to.name.lstrip('.')}.tmp-{os.getpid()}")
    _remove(tmp)
    tmp.mkdir(parents=True)
    for name in RECORD:
        if (out / name).is_file():
            shutil.copy2(out / name, tmp / name)
    publish_dir(tmp, to)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _without_device(recipe):
    """A resolved recipe minus `run.device`: where a stage ran does not change what it made (the manifest records
    the device), so `--device cpu` after a finished run is still up to date."""
    if not isinstance(recipe, dict) or not isinstance(recipe.get("run"), dict):
        return recipe
    return {**recipe, "run": {k: v for k, v in recipe["run"].items() if k != "device"}}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
