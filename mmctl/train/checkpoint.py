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

from mmctl.errors import DataError

STEP_DIR = re.compile(r"^step-(\d{6,})$")
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


def step_dir(directory: Path, step: int) -> Path:
    return Path(directory) / f"step-{step:06d}"


def trainable(model) -> dict:
    """name → parameter for every parameter the run trains (a tied matrix once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save(directory: Path, step: int, model, optimizer, extra: dict, export=None) -> Path:
    """Save the training state after `step` optimizer steps; returns the published directory.

    `export(tmp_dir)`, if given, adds files before the directory is published (config.json, tokenizer)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    final = step_dir(directory, step)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = {name: p.detach().contiguous() for name, p in trainable(model).items()}
    save_file(params, tmp / "model.safetensors", metadata={"format": "pt"})
    opt = optimizer.state_dict()
    tensors = {"rng.torch": torch.get_rng_state()}
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"state.{index}.{key}"] = value.detach().contiguous() if torch.is_tensor(value) else \
                torch.tensor(value)
    save_file(tensors, tmp / "optimizer.safetensors")
    py_state = random.getstate()
    np_state = np.random.get_state()
    state = {
        "step": step,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
        "rng": {"python": [py_state[0], list(py_state[1]), py_state[2]],
                "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]},
        "extra": extra,
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
    return final


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint under `directory`, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    done = [p for p in directory.iterdir() if STEP_DIR.match(p.name) and all((p / f).is_file() for f in FILES)]
    return max(done, key=lambda p: int(STEP_DIR.match(p.name).group(1)), default=None)


def read_state(path: Path) -> dict:
    """A checkpoint's state.json (step, hyperparameters, RNG states, the caller's extra state)."""
    try:
        return json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable checkpoint state ({e})") from None


def load(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG states from a checkpoint; returns its state.json."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    state = read_state(path)
    try:
        params = load_file(path / "model.safetensors")
        tensors = load_file(path / "optimizer.safetensors")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable checkpoint ({e})") from None
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
            p.copy_(params[name])
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    # The moments come from the checkpoint; the hyperparameters (weight decay, betas, eps) from the recipe now
    # running, which the manifest records. The learning rate is set by the schedule at every step.
    optimizer.load_state_dict({"state": opt_state, "param_groups": optimizer.state_dict()["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    py = state["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["rng"]["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return state


def prune(directory: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and leftover temporary directories."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    done = sorted((p for p in directory.iterdir() if STEP_DIR.match(p.name)),
                  key=lambda p: int(STEP_DIR.match(p.name).group(1)))
    for old in done[:-keep] if keep else []:
        shutil.rmtree(old)
    for tmp in directory.glob(".step-*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
