"""Hugging Face checkpoint directories as files: safetensors weights and JSON, read and written safely.

This module knows the directory layout, not any model: `read_tensors` reads `model.safetensors` or a sharded
`model.safetensors.index.json` against the names and shapes a model expects, `write_dir` publishes a directory
atomically. Each model owns its config.json mapping (the decoder's in mmctl/models/config.py); tokenizer files
belong to mmctl/tokenizer.

Safety: pickle weights (`.bin`, `.pt`, … — loading them can run code) are refused, never read; shard paths and
weight files are resolved and must stay inside the checkpoint dir (a symlink pointing out is refused, except a
hub cache snapshot's links into its own repository's blobs); only
regular files are read (a FIFO would hang). Integer tensors (int8 weights, packed int4, zero points) keep their
dtype; only floating tensors are cast to the dtype asked for.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from mmctl.artifacts import atomic_write_json, publish_dir, regular_file, save_tensors
from mmctl.errors import DataError, UnsafeInputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


def read_json(path: str | Path) -> dict:
    """A JSON object from a regular file; DataError naming the file otherwise."""
    path = regular_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read JSON: {e}") from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def confined(directory: Path, name: str, named_in: Path) -> Path:
    """`directory / name`, resolved (symlinks followed), which must still lie inside `directory` — or, for a
    Hugging Face hub cache snapshot (`<repo>/snapshots/<revision>/`, whose files link to `<repo>/blobs/<hash>`),
    inside that repository's blobs."""
    roots = [directory.resolve()]
    if directory.resolve().parent.name == "snapshots":
        roots.append(directory.resolve().parent.parent / "blobs")
    target = (directory / name).resolve()
    if not any(target.parent == root or root in target.parents for root in roots):
        raise UnsafeInputError(f"{named_in}: {name!r} is outside the checkpoint dir {directory}")
    return target


def weight_files(path: Path, weights: str = WEIGHTS) -> dict[Path, list[str] | None]:
    """The safetensors files of a checkpoint dir, each with its tensor names (None: all of them). `weights` is
    the single-file name to look for (a PEFT adapter dir holds adapter_model.safetensors)."""
    if (path / weights).exists() or (path / weights).is_symlink():
        return {regular_file(confined(path, weights, path / weights)): None}
    if weights != WEIGHTS:
        raise DataError(f"{path}: no {weights}")
    if (path / INDEX).is_file():
        weight_map = read_json(path / INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise DataError(f"{path / INDEX}: no weight_map")
        files: dict[Path, list[str]] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str):
                raise DataError(f"{path / INDEX}: weight_map[{name!r}] is not a file name")
            shard = confined(path, file, path / INDEX)
            if not shard.exists():
                raise DataError(f"{shard}: shard named in {INDEX} not found")
            regular_file(shard)
            files.setdefault(shard, []).append(name)
        return files
    pickled = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise UnsafeInputError(f"{pickled[0]}: refusing a pickle checkpoint (loading it can run arbitrary code); "
                               "convert it to model.safetensors")
    raise DataError(f"{path}: no {WEIGHTS} or {INDEX}")


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in checkpoint dir `path`, from the safetensors headers (no data read)."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for file, names in weight_files(Path(path)).items():
        try:
            with safe_open(file, framework="pt") as f:
                for name in names or f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except (SafetensorError, OSError) as e:
            raise DataError(f"{file}: cannot read safetensors: {e}") from None
    return shapes


def read_tensors(path: str | Path, expected: dict[str, tuple[int, ...]], *, dtype=None, device="cpu",
                 skip: Iterable[str] = (), weights: str = WEIGHTS) -> dict:
    """Every tensor `expected` names, checked against its shape, from checkpoint dir `path`.

    Names in `skip` are ignored (derived tensors old checkpoints stored); any other unexpected name is an error,
    as is a missing one. Floating tensors are cast to `dtype` (if given); integer tensors keep theirs.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    skip = set(skip)
    tensors = {}
    for file, names in weight_files(path, weights).items():
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in names or f.keys():
                    if name in skip or name.endswith("rotary_emb.inv_freq"):
                        continue  # derived, not learned
                    if name not in expected:
                        raise DataError(f"{file}: unexpected tensor {name} (not in this model's config.json)")
                    t = f.get_tensor(name)
                    tensors[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except (SafetensorError, OSError) as e:
            raise DataError(f"{file}: cannot read safetensors: {e}") from None
    for name, shape in expected.items():
        if name not in tensors:
            raise DataError(f"{path}: tensor {name} is missing (expected shape {list(shape)})")
        if tuple(tensors[name].shape) != tuple(shape):
            raise DataError(f"{path}: tensor {name} has shape {list(tensors[name].shape)}, config.json implies "
                            f"{list(shape)}")
    return tensors


def write_dir(out: str | Path, tensors: dict, json_files: dict[str, dict], copies: Iterable[Path] = ()) -> Path:
    """Publish checkpoint dir `out`: `model.safetensors` from `tensors`, each of `json_files`, and `copies` of
    other files (tokenizer files) — written to a temp dir beside `out` and renamed into place, so a killed save
    leaves the old dir or the new one, never half of one."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_files(tmp, tensors, json_files, copies)
        return publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_files(directory: Path, tensors: dict | None, json_files: dict[str, dict], copies: Iterable[Path] = ()
                ) -> None:
    """Write weights (if any), JSON files and copies into an existing, not yet published directory."""
    if tensors is not None:
        save_tensors(tensors, directory / WEIGHTS)
    for name, obj in json_files.items():
        atomic_write_json(directory / name, obj)
    for f in copies:
        shutil.copyfile(f, directory / Path(f).name)
        _fsync(directory / Path(f).name)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def eos_token_ids(path: str | Path) -> list[int]:
    """The ids that end generation for checkpoint dir `path`: generation_config.json's eos_token_id, else
    config.json's (an int or a list in either)."""
    path = Path(path)
    for name in ("generation_config.json", "config.json"):
        if (path / name).is_file():
            eos = read_json(path / name).get("eos_token_id")
            if eos is None:
                continue
            ids = [eos] if isinstance(eos, int) else eos
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise DataError(f"{path / name}: eos_token_id must be a token id or a list of them, got {eos!r}")
            return list(ids)
    return []


def checkpoint_dir(path: str | Path, field: str | None = None) -> Path:
    """`path`, which must be a checkpoint dir (holding config.json); otherwise a DataError (naming `field`) that
    says what it is instead: a stage's run dir (its model is inside), a Hugging Face hub id (mmctl reads local
    dirs), or nothing."""
    import re

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    name = f"{field}: {path}" if field else str(path)
    if (path / "model" / "config.json").is_file():
        raise DataError(f"{name}: a run directory; its model is {path / 'model'}")
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        raise DataError(f"{name}: not found here; mmctl reads local directories — for a Hugging Face model, download "
                        f"it first: `hf download {path} --local-dir models/{path.name}`")
    raise DataError(f"{name}: not a checkpoint directory (" + ("no config.json)" if path.exists() else
                                                                 "it does not exist)"))


# A checkpoint of mmctl's own packed quantized layers (rtn, gptq) says so in its model_type, so that transformers
# refuses it with an error instead of loading a Llama with those weights missing — random ones in their place —
# as it would with the family's own model_type; `model_config` gives mmctl (and account) the family back.
QUANTIZED_MODEL_TYPE = "mmctl_quantized"


def model_config(config: dict) -> dict:
    """config.json's fields as the model family's: a QUANTIZED_MODEL_TYPE config with its `base_model_type`."""
    if isinstance(config, dict) and config.get("model_type") == QUANTIZED_MODEL_TYPE:
        return {**config, "model_type": config.get("base_model_type")}
    return config
