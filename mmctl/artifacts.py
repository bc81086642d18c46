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
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

import mmctl
from mmctl.errors import BusyError, DataError

MANIFEST = "manifest.json"
LOGS = ("metrics.jsonl", "samples.jsonl")  # what a training run appends to: JSON lines, each with its step
LOCK = ".lock"  # held (flock) by the process writing the directory
# Libraries whose versions a manifest records when they are installed.
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "bitsandbytes", "datasets", "numpy")


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory as the hash of its files' relative names and hashes."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: input not found")
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path).as_posix()}\0{sha256_file(p)}\n".encode())
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


def save_tensors(tensors: dict, path: str | Path) -> Path:
    """Write tensors as safetensors, flushed to disk, with the permissions every other file gets (safetensors
    itself creates files readable by their owner only, ignoring the umask)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, path, metadata={"format": "pt"})
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


class Run:
    """One stage's output directory: up-to-date check, recipe.yaml, metrics.jsonl and the final manifest.

    Usage in a stage: `run = Run(out, "pretrain", recipe_dict, inputs={"shards": path}, seed=cfg.run.seed)`;
    `if run.up_to_date(): return`; `run.start()`; ... `run.log({"step": ..., "loss": ...})`; `run.finish(results)`.
    """

    def __init__(self, out: str | Path, stage: str, recipe: dict, inputs: dict[str, str | Path] | None = None,
                 seed: int | None = None, lock: bool = True):
        self.out = Path(out)
        self.stage, self.recipe, self.seed = stage, recipe, seed
        self.inputs = {name: {"path": str(p), "sha256": sha256_path(p)} for name, p in (inputs or {}).items()}
        self.started: float | None = None
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

    def start(self, keep_metrics_through: int | None = None) -> None:
        """Claim the directory: drop any old manifest first, so a half-done re-run never looks finished.

        A resumed training run keeps the records logged up to its checkpoint's step (and drops any logged after
        it, which the resumed run will log again), so each log reads as one uninterrupted run.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / MANIFEST).unlink(missing_ok=True)
        for stale in [*self.out.glob(".*.tmp-*"), *self.out.glob(".*.old-*")]:  # a killed publish's leftovers
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        for name in LOGS:
            log = self.out / name
            if not log.exists() and name != "metrics.jsonl":
                continue
            kept = []
            if keep_metrics_through is not None and log.exists():
                for line in log.read_text(encoding="utf-8").splitlines():
                    try:
                        record = json.loads(line)
                    except ValueError:  # a line cut short by a kill
                        continue
                    if record.get("step", 0) <= keep_metrics_through:
                        kept.append(line + "\n")
            atomic_write_text(log, "".join(kept))
        atomic_write_text(self.out / "recipe.yaml", yaml.safe_dump(self.recipe, sort_keys=False, allow_unicode=True))
        self.started = time.time()

    def log(self, record: dict, to: str = "metrics.jsonl") -> None:
        """Append one JSON object to one of the run's LOGS (a log; the manifest, not this file, marks completion)."""
        with open(self.out / to, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def finish(self, results: dict, device: str = "cpu") -> Path:
        """Write manifest.json, last and atomically."""
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
        return atomic_write_json(self.out / MANIFEST, manifest)


def _without_device(recipe):
    """A resolved recipe minus `run.device`: where a stage ran does not change what it made (the manifest records
    the device), so `--device cpu` after a finished run is still up to date."""
    if not isinstance(recipe, dict) or not isinstance(recipe.get("run"), dict):
        return recipe
    return {**recipe, "run": {k: v for k, v in recipe["run"].items() if k != "device"}}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
