"""Resumable training state: `checkpoints/step-000200/` with everything needed to continue bit-exactly.

    model.safetensors      the trainable parameters by name (a tied matrix stored once); frozen ones (a LoRA
                           run's base) are not rewritten every checkpoint — the loop fingerprints them instead
    optimizer.safetensors  AdamW moments and step counts, and torch's CPU RNG state
    state.json             step, optimizer hyperparameters (for reference), Python/NumPy RNG states, and the
                           caller's extra state (what the run was trained with, its last metrics) — written
                           last. The data cursor is the step itself: batches are a function of (seed, step).

A checkpoint is written into a hidden temporary directory and renamed into place, so `latest()` only ever
sees complete ones; a killed save leaves a `.step-*.tmp` directory that is ignored and cleaned up later
(the failure HF Trainer #35782 shipped). Only safetensors and JSON: nothing is unpickled on resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

from mmctl.artifacts import save_tensors, sha256_file
from mmctl.errors import DataError

STEP_DIR = re.compile(r"^step-(\d{6,})$")
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


def step_dir(directory: Path, step: int) -> Path:
    return Path(directory) / f"step-{step:06d}"


def trainable(model) -> dict:
    """name → parameter for every parameter the run trains (a tied matrix once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def snapshot(model, optimizer, keep: bool = True) -> tuple[dict, dict, list]:
    """(trainable tensors by name, optimizer tensors by `state.<name>.<key>`, parameter groups without their
    parameters): what a checkpoint holds.

    Sharded (FSDP) tensors are gathered to full size one at a time — a collective, so under FSDP every process
    takes the snapshot and only the one that saves it `keep`s them, moved to the CPU as they come: a device holds
    one gathered tensor at a time, never the whole model and its AdamW moments."""
    import torch

    from mmctl.train.fsdp import is_sharded

    def take(t):
        if not is_sharded(t):
            return t.detach()
        whole = t.detach().full_tensor()
        return whole.cpu() if keep else None

    params = {name: take(p) for name, p in trainable(model).items()}
    opt = optimizer.state_dict()
    tensors = {}
    names = _names_by_index(model, optimizer)
    for index, state in opt["state"].items():  # by parameter name: groups may be ordered otherwise on resume
        for key, value in state.items():
            tensors[f"state.{names[index]}.{key}"] = take(value) if torch.is_tensor(value) else torch.tensor(value)
    return params, tensors, [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]


def save(directory: Path, step: int, model, optimizer, extra: dict, export=None, snap=None) -> Path:
    """Save the training state after `step` optimizer steps; returns the published directory.

    `export(tmp_dir)`, if given, adds files before the directory is published (config.json, tokenizer).
    `snap`: a `snapshot` taken already (FSDP), else it is taken here."""
    import numpy as np
    import torch

    params, tensors, groups = snap or snapshot(model, optimizer)
    directory = Path(directory)
    final = step_dir(directory, step)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_tensors(params, tmp / "model.safetensors")
        save_tensors({**tensors, "rng.torch": torch.get_rng_state()}, tmp / "optimizer.safetensors")
        files = {name: sha256_file(tmp / name) for name in FILES[:2]}
        py_state = random.getstate()
        np_state = np.random.get_state()
        state = {
            "step": step,
            "param_groups": groups,
            "rng": {"python": [py_state[0], list(py_state[1]), py_state[2]],
                    "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]},
            "extra": extra,
            "files": files,
        }
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        if export is not None:
            export(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:  # a failed or interrupted save leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def complete(directory: Path) -> list[Path]:
    """The complete checkpoints under `directory` (every file present), newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    done = [p for p in directory.iterdir() if STEP_DIR.match(p.name) and all((p / f).is_file() for f in FILES)]
    return sorted(done, key=lambda p: -int(STEP_DIR.match(p.name).group(1)))


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint under `directory`, or None."""
    return next(iter(complete(directory)), None)


def problem(path: Path) -> str | None:
    """Why checkpoint `path` cannot be resumed (corrupt, truncated, tampered), or None if it can.

    The tensors files are checked against the sha256 recorded at save time, state.json against the directory's
    step, and the RNG states for their shape — without loading anything into the model."""
    try:
        state = read_state(path)
    except DataError as e:
        return str(e)
    step = int(STEP_DIR.match(Path(path).name).group(1))
    if not isinstance(state, dict) or state.get("step") != step or isinstance(state.get("step"), bool):
        return f"{path / 'state.json'}: its step is not {step}, the directory's"
    rng = state.get("rng")
    if not (isinstance(rng, dict) and isinstance(rng.get("python"), list) and len(rng["python"]) == 3
            and isinstance(rng.get("numpy"), list) and len(rng["numpy"]) == 5
            and isinstance(rng["numpy"][1], list) and len(rng["numpy"][1]) == 624):
        return f"{path / 'state.json'}: the random number generator states are malformed"
    extra, files = state.get("extra", {}), state.get("files") or {}
    if not isinstance(extra, dict) or not isinstance(extra.get("fingerprint", {}), dict) or \
            not isinstance(extra.get("last", {}), dict) or not isinstance(extra.get("tokens", 0), int):
        return f"{path / 'state.json'}: extra (fingerprint, last metrics, tokens) is malformed"
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        return f"{path / 'state.json'}: files is not a mapping of sha256 digests"
    for name, digest in files.items():
        if name not in FILES or sha256_file(Path(path) / name) != digest:
            return f"{path / name}: does not match the sha256 recorded when it was saved (truncated or changed)"
    return None


def read_state(path: Path) -> dict:
    """A checkpoint's state.json (step, hyperparameters, RNG states, the caller's extra state)."""
    try:
        state = json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"{path}: unreadable checkpoint state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise DataError(f"{path / 'state.json'}: expected a JSON object")
    return state


def load(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG states from a checkpoint; returns its state.json."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from mmctl.train.fsdp import like

    path = Path(path)
    state = read_state(path)
    try:
        params = load_file(path / "model.safetensors")
        tensors = load_file(path / "optimizer.safetensors")
    except Exception as e:  # safetensors raises its own error type, OSError or ValueError for a corrupt file
        raise DataError(f"{path}: unreadable checkpoint ({e})") from None
    if "rng.torch" not in tensors:
        raise DataError(f"{path / 'optimizer.safetensors'}: no rng.torch (the torch random state)")
    opt_state = _optimizer_state(tensors, {name: i for i, name in _names_by_index(model, optimizer).items()}, path)
    named = trainable(model)
    if set(params) != set(named):
        missing, unexpected = sorted(set(named) - set(params)), sorted(set(params) - set(named))
        raise DataError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    with torch.no_grad():
        for name, p in named.items():
            if params[name].shape != p.shape:
                raise DataError(f"{path}: {name} has shape {tuple(params[name].shape)}, the model "
                                f"{tuple(p.shape)}")
            p.copy_(like(params[name], p))  # (FSDP: this process's shard of it)
    order = [p for group in optimizer.param_groups for p in group["params"]]
    opt_state = {i: {k: like(v, order[i]) for k, v in s.items()} for i, s in opt_state.items()}
    # The moments come from the checkpoint; the hyperparameters (weight decay, betas, eps) from the recipe now
    # running, which the manifest records. The learning rate is set by the schedule at every step.
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": optimizer.state_dict()["param_groups"]})
    except (ValueError, KeyError) as e:
        raise DataError(f"{path / 'optimizer.safetensors'}: does not fit the optimizer ({e})") from None
    try:
        torch.set_rng_state(tensors["rng.torch"])
        py = state["rng"]["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        np_state = state["rng"]["numpy"]
        np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"{path}: cannot restore the random number generators ({type(e).__name__}: {e})") from None
    return state


def _names_by_index(model, optimizer) -> dict[int, str]:
    """The optimizer's parameter index (its order over all groups) → the parameter's name."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: name_of[id(p)] for i, p in enumerate(params)}


def _optimizer_state(tensors: dict, index_of: dict[str, int], path: Path) -> dict:
    """`state.<parameter name>.<key>` tensors → the optimizer's per-parameter state, by its current indices."""
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            if "." not in key[len("state."):]:
                raise DataError(f"{path / 'optimizer.safetensors'}: malformed optimizer state key {key!r}")
            name, field = key[len("state."):].rsplit(".", 1)
            if name not in index_of:
                raise DataError(f"{path / 'optimizer.safetensors'}: optimizer state for {name!r}, which the run "
                                "does not train")
            state.setdefault(index_of[name], {})[field] = value
    return state


def prune(directory: Path, keep: int, upto: int | None = None) -> None:
    """Keep the newest `keep` checkpoints; remove older ones and leftover temporary directories. With `upto`
    (the step just saved), checkpoints after it are removed too: they were skipped as corrupt on resume, or
    belong to a longer run this one is not."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    done = sorted((p for p in directory.iterdir() if STEP_DIR.match(p.name)),
                  key=lambda p: int(STEP_DIR.match(p.name).group(1)))
    if upto is not None:
        for later in [p for p in done if int(STEP_DIR.match(p.name).group(1)) > upto]:
            shutil.rmtree(later)
        done = [p for p in done if int(STEP_DIR.match(p.name).group(1)) <= upto]
    for old in done[:-keep] if keep else done:  # keep=0: all of them (--fresh)
        shutil.rmtree(old)
    for tmp in directory.glob(".step-*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
