"""Recipes: YAML files → strict, typed, nested dataclasses (DESIGN §4).

A stage declares its recipe as dataclasses whose fields are made with `option(default, doc, ...)`. `load()` reads
the YAML (safe loader only), applies `--set a.b=value` overrides, and builds the dataclasses, collecting every
problem before failing: unknown keys (with a did-you-mean), wrong types, missing required values, bad choices,
out-of-range values, duplicate keys, and the cross-field rules a config states in its `check()` method. Each
problem is one line naming the recipe file, the line, and the field path in CLI spelling (`train.optim.lr`);
together they raise one `UsageError` (exit code 2).

Type rules, chosen so a recipe means exactly one thing: an int field takes only integers (never `true` or
`2.5`); a float field takes integers too; a string field takes only strings. YAML 1.1 reads `1e-3` as a string,
a classic trap, so the loader here reads it as the float it looks like.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mmctl.errors import UsageError


class RecipeLoader(yaml.SafeLoader):
    """The safe loader, plus floats written without a dot (`1e-3`, `3E8`)."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


MAX_VALUES = 100_000  # values a YAML document may expand to; aliases of aliases grow exponentially


def safe_load(text: str) -> Any:
    """`yaml.safe_load` with RecipeLoader's float rule and the alias budget: plain data only, never Python
    objects, never a "billion laughs"."""
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node, "YAML")
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def _check_expansion(node: yaml.Node, file: str) -> None:
    """Refuse a document whose aliases expand to more than MAX_VALUES values (counted without expanding)."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) not in sizes:
            sizes[id(n)] = -1  # a cycle (an alias inside its own anchor) is refused as too large
            children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else \
                n.value if isinstance(n, yaml.SequenceNode) else []
            sizes[id(n)] = min(1 + sum(size(c) for c in children), MAX_VALUES + 1)
        if sizes[id(n)] < 0:
            return MAX_VALUES + 1
        return sizes[id(n)]

    if size(node) > MAX_VALUES:
        raise UsageError(f"{file}: expands to more than {MAX_VALUES:,} values (aliases nested in aliases?); "
                         "write the values out")


def option(default: Any = None, doc: str = "", *, required: bool = False, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A recipe field: its default, a one-line doc with units, and optional range limits.

    `required=True` means the recipe must set it (the default is then None). Mutable defaults (dataclass
    sections, lists, dicts) are passed as a factory: `option(ModelConfig, "...")`, or as a value to copy (a list,
    or a section instance whose values are this field's defaults: `option(RunConfig("out/sft"), "...")`).
    """
    meta = {"doc": doc, "required": required, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if callable(default) and (dataclasses.is_dataclass(default) or default in (list, dict)):
        return dataclasses.field(default_factory=default, metadata=meta)
    if dataclasses.is_dataclass(default):  # a section whose defaults differ from its class's: `RunConfig("out/x")`
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    if isinstance(default, list | dict):  # a non-empty default list or mapping: each config gets its own copy
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class Source:
    """Where each value came from, to point errors at a file and line or at a `--set` flag."""

    file: str
    lines: dict[str, int]  # field path → 1-based line in the file
    overridden: set[str]  # field paths set by --set (or by a command-line flag)
    flags: dict[str, str] = dataclasses.field(default_factory=dict)  # field path → the flag that set it (`--gpu`)

    def where(self, path: str) -> str:
        for p in self.overridden:
            if path == p or path.startswith(p + "."):
                return self.flags.get(p, "--set")
        parts = re.sub(r"\[\d+\]", "", path).split(".")  # list items point at their list's line
        while parts:  # fall back to the nearest enclosing section that has a line
            line = self.lines.get(".".join(parts))
            if line is not None:
                return f"{self.file}:{line}"
            parts.pop()
        return self.file


def load(path: str | Path, cls: type, overrides: list[str] | tuple[str, ...] = (), *, stage: str | None = None):
    """Read recipe `path` into an instance of dataclass `cls`, applying `--set` overrides.

    If the recipe names its `stage:` it must be `stage`. Raises UsageError listing every problem.
    """
    data, source = parse(read(path), str(path))
    return build(cls, data, source, overrides, stage=stage)


def read(path: str | Path) -> str:
    """A recipe file's text; UsageError (exit 2) naming it if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: recipe not found" if not path.exists() else f"{path}: not a file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read recipe: {e}") from None


def parse(text: str, file: str) -> tuple[dict, Source]:
    """YAML text → (plain data, Source with the line of every key). Duplicate keys are errors."""
    loader = None
    try:
        loader = RecipeLoader(text)  # the reader refuses control characters here
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node, file)
    except yaml.YAMLError as e:
        if loader is not None:
            loader.dispose()
        raise UsageError(f"{_where(e, file)}: YAML syntax error: {_problem(e)}") from None
    except RecursionError:
        loader.dispose()
        raise UsageError(f"{file}: nested too deeply") from None
    try:
        lines: dict[str, int] = {}
        problems: list[str] = []
        if node is None:
            return {}, Source(file, lines, set())
        if not isinstance(node, yaml.MappingNode):
            raise UsageError(f"{file}:{node.start_mark.line + 1}: the recipe must be a mapping of sections, "
                             f"got {_yaml_kind(node)}")
        data = _to_data(loader, node, "", lines, problems, file)
        if problems:
            raise UsageError(*problems)
        return data, Source(file, lines, set())
    except RecursionError:
        raise UsageError(f"{file}: nested too deeply") from None
    finally:
        loader.dispose()


def _where(e: yaml.YAMLError, file: str) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f"{file}:{mark.line + 1}" if mark else file


def _problem(e: yaml.YAMLError) -> str:
    return getattr(e, "problem", None) or str(e).splitlines()[0]


def _construct(loader: RecipeLoader, node: yaml.Node, path: str, problems: list, file: str) -> Any:
    """A scalar (or key) as plain data; a tag the safe loader does not know (`!!python/name:…`, `!foo`) is a
    problem naming its line, never constructed."""
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as e:
        problems.append(f"{file}:{node.start_mark.line + 1}: {path or 'recipe'}: {_problem(e)}")
    except ValueError:  # an integer of thousands of digits (Python refuses to convert those)
        problems.append(f"{file}:{node.start_mark.line + 1}: {path or 'recipe'}: a number too long to read")
    return _BAD


PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def _to_data(loader: RecipeLoader, node: yaml.Node, path: str, lines: dict, problems: list, file: str) -> Any:
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in PLAIN_TAGS:
        problems.append(f"{file}:{node.start_mark.line + 1}: {path or 'recipe'}: the tag {node.tag!r} is not "
                        "allowed (a recipe holds plain values)")
        return _BAD
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for key_node, value_node in node.value:
            key = _construct(loader, key_node, path, problems, file)
            if key is _BAD:
                continue
            if not isinstance(key, str):
                problems.append(f"{file}:{key_node.start_mark.line + 1}: {path or 'recipe'}: keys must be "
                                f"strings, got {key!r}")
                continue
            sub = f"{path}.{key}" if path else key
            if key in out:
                problems.append(f"{file}:{key_node.start_mark.line + 1}: {sub}: duplicate key (first on line "
                                f"{lines[sub]})")
                continue
            lines[sub] = key_node.start_mark.line + 1
            out[key] = _to_data(loader, value_node, sub, lines, problems, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_data(loader, item, path, lines, problems, file) for item in node.value]
    return _construct(loader, node, path, problems, file)


def _yaml_kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    return f"the value {node.value!r}"


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` → ("a.b", value parsed as a YAML scalar)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UsageError(f"--set {item}: expected KEY.PATH=VALUE, e.g. --set optim.lr=1e-3")
    try:
        value = safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):
        raise UsageError(f"--set {key}: cannot read the value ({raw[:40]!r}{'…' if len(raw) > 40 else ''})") from None
    return key, value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...], source: Source) -> dict:
    """Merge `--set` overrides into the recipe data (in order; the last one wins). A path part `name[i]` is the
    i-th item of a list the recipe already has (`--set phases[1].train.steps=500`). An override may come as
    (text, flag): what a command-line flag set, named by its flag in errors."""
    for item in overrides:
        item, flag = item if isinstance(item, tuple) else (item, None)
        key, value = parse_override(item)
        if flag:
            source.flags[key] = flag
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts):
            name, index = _indexed(part, item)
            last = i == len(parts) - 1
            if index is not None:
                items = node.get(name)
                if not isinstance(items, list) or not -len(items) <= index < len(items):
                    raise UsageError(f"--set {item}: {'.'.join(parts[:i] + [name])} has no item {index}")
                if last:
                    items[index] = value
                elif not isinstance(items[index], dict):
                    raise UsageError(f"--set {item}: {'.'.join(parts[:i + 1])} is not a section")
                node = items[index]
            elif last:
                node[name] = value
            else:
                if not isinstance(node.get(name), dict):
                    if name in node and node[name] is not None:
                        raise UsageError(f"--set {item}: {'.'.join(parts[:i + 1])} is not a section")
                    node[name] = {}
                node = node[name]
        source.overridden.add(key)
    return data


def _indexed(part: str, item: str) -> tuple[str, int | None]:
    """`name[3]` → ("name", 3); `name` → ("name", None)."""
    if not part.endswith("]"):
        return part, None
    name, _, index = part[:-1].partition("[")
    if not name or not index.lstrip("-").isdigit():
        raise UsageError(f"--set {item}: {part!r} is not NAME or NAME[INDEX]")
    return name, int(index)


def build(cls: type, data: dict, source: Source, overrides: list[str] | tuple[str, ...] = (), *,
          stage: str | None = None):
    """Plain data (+ overrides) → an instance of `cls`, or UsageError with every problem."""
    data = apply_overrides(dict(data), overrides, source)
    problems: list[str] = []
    declared = data.pop("stage", None)
    if stage is not None and declared is not None and declared != stage:
        problems.append(f"{source.where('stage')}: stage: this recipe is for `mmctl {declared}`, not `mmctl {stage}`")
    cfg = _build(cls, data, "", source, problems)
    if not problems:
        _check(cfg, "", source, problems)
    if problems:
        raise UsageError(*problems)
    return cfg


def _build(cls: type, data: Any, path: str, source: Source, problems: list[str], defaults: Any = None) -> Any:
    """`defaults`: an instance whose values replace the class's defaults (a section declared with one)."""
    if not isinstance(data, dict):
        problems.append(f"{source.where(path)}: {path or 'recipe'}: expected a mapping of fields, got "
                        f"{_describe(data)}")
        return copy.deepcopy(defaults) if defaults is not None else cls()
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    allowed = set(known) | ({"stage"} if not path else set())
    for key in data:
        if key not in known:
            sub = f"{path}.{key}" if path else key
            hint = difflib.get_close_matches(str(key), sorted(allowed), n=1, cutoff=0.6)
            suffix = f"; did you mean `{hint[0]}`?" if hint else f"; expected one of: {', '.join(sorted(known))}"
            problems.append(f"{source.where(sub)}: {sub}: unknown key{suffix}")
    values = {}
    for name, f in known.items():
        sub = f"{path}.{name}" if path else name
        typ = hints[name]
        default = getattr(defaults, name) if defaults is not None else (
            f.default_factory() if f.default_factory is not MISSING else f.default)
        if dataclasses.is_dataclass(typ):  # absent sections are built too, so their required fields are checked
            section = data.get(name)
            value = _build(typ, {} if section is None else section, sub, source, problems, default)
        elif name in data and not (data[name] is None and f.metadata.get("required")):
            value = _convert(data[name], typ, sub, source, problems)
            _check_range(value, f, sub, source, problems)
        else:
            value = copy.deepcopy(default)
        if f.metadata.get("required") and value is None:
            problems.append(f"{source.where(sub)}: {sub}: missing required value ({f.metadata['doc']})")
        values[name] = value
    return cls(**values)


_BAD = object()


def _convert(value: Any, typ: Any, path: str, source: Source, problems: list[str]) -> Any:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    where = f"{source.where(path)}: {path}"
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # e.g. int | Literal["auto"]: the first alternative that takes the value
            for alternative in inner:
                trial: list[str] = []
                converted = _convert(value, alternative, path, source, trial)
                if not trial:
                    return converted
            names = [" | ".join(map(str, typing.get_args(a))) if typing.get_origin(a) is Literal else
                     {int: "an integer", float: "a number", str: "a string"}.get(a, getattr(a, "__name__", str(a)))
                     for a in inner]
            problems.append(f"{where}: expected {' or '.join(names)}, got {_describe(value)}")
            return _BAD
        typ = inner[0]
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.6)
        suffix = f"; did you mean `{hint[0]}`?" if hint else ""
        problems.append(f"{where}: {value!r} is not one of {', '.join(str(a) for a in args)}{suffix}")
        return _BAD
    if dataclasses.is_dataclass(typ):  # an item of a list of sections (e.g. data.sources)
        return _build(typ, value, path, source, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {_describe(value)}")
            return _BAD
        return [_convert(v, args[0] if args else Any, f"{path}[{i}]", source, problems)
                for i, v in enumerate(value)]
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {_describe(value)}")
            return _BAD
        return value
    if typ is Any:
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{where}: expected true or false, got {_describe(value)}")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{where}: expected an integer, got {_describe(value)}")
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float
                number = math.inf
            if math.isfinite(number):
                return number
            problems.append(f"{where}: expected a finite number, got {_describe(value)}")
            return _BAD
        problems.append(f"{where}: expected a number, got {_describe(value)}")
    elif typ is str:
        if isinstance(value, str) and _is_text(value):
            return value
        problems.append(f"{where}: expected a string, got {_describe(value)}" if not isinstance(value, str) else
                        f"{where}: holds a lone UTF-16 surrogate, which is not text")
    else:  # pragma: no cover - a config declared a type this module does not know
        raise TypeError(f"recipe field {path} has unsupported type {typ!r}")
    return _BAD


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_range(value: Any, f: dataclasses.Field, path: str, source: Source, problems: list[str]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    m = f.metadata
    for key, ok, words in (("ge", lambda a, b: a >= b, "≥"), ("gt", lambda a, b: a > b, ">"),
                           ("le", lambda a, b: a <= b, "≤"), ("lt", lambda a, b: a < b, "<")):
        bound = m.get(key)
        if bound is not None and not ok(value, bound):
            shown = f"{bound:,}" if isinstance(bound, int) and abs(bound) >= 10_000 else f"{bound:g}"
            problems.append(f"{source.where(path)}: {path}: {_short(value)} is out of range (must be {words} {shown})")


def _check(cfg: Any, path: str, source: Source, problems: list[str]) -> None:
    """Run each section's cross-field rules: `check()` returns (field, message) pairs, field relative."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        sub = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(value):
            _check(value, sub, source, problems)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check(item, f"{sub}[{i}]", source, problems)
    if hasattr(cfg, "check"):
        for name, message in cfg.check():
            sub = f"{path}.{name}" if path else name
            problems.append(f"{source.where(sub)}: {sub}: {message}")


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {_short(value)}"


def _short(value: Any) -> str:
    """repr(value), cut to a readable length (a 5,000-digit number is not worth printing; Python may refuse to)."""
    try:
        text = repr(value)
    except ValueError:
        return "(a number too long to print)"
    return text if len(text) <= 60 else text[:57] + "…"


def to_dict(cfg: Any, stage: str | None = None) -> dict:
    """The resolved recipe as plain data (what manifest.json and recipe.yaml record)."""
    data = dataclasses.asdict(cfg)
    return {"stage": stage, **data} if stage else data


def dump(cfg: Any, stage: str | None = None) -> str:
    """The resolved recipe as YAML."""
    return yaml.safe_dump(to_dict(cfg, stage), sort_keys=False, allow_unicode=True)


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, Any, str]]:
    """Every field of a recipe class as (path, type, default, doc), for `--help`-style listings and tests."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        typ = hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else (
            f.default_factory() if f.default_factory is not MISSING else f.default)
        if dataclasses.is_dataclass(typ):
            rows.extend(describe(typ, path + ".", default))
        else:
            rows.append((path, _type_name(typ), default, f.metadata.get("doc", "")))
    return rows


def _type_name(typ: Any) -> str:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return getattr(typ, "__name__", str(typ))


def field(cls: type, path: str) -> tuple[Any, Any, str]:
    """(type, default, doc) of the field at `path` (`train.seq_len`) of recipe class `cls`: what a command-line flag
    that sets the field is made from (mmctl/cli.py), so the flag's help is the field's doc."""
    defaults = None
    *sections, name = path.split(".")
    for part in [*sections, name]:
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls)}
        if part not in known:
            raise KeyError(f"{cls.__name__} has no field {part!r} ({path})")
        f = known[part]
        default = getattr(defaults, part) if defaults is not None else (
            f.default_factory() if f.default_factory is not MISSING else f.default)
        if part == name:
            return hints[part], default, f.metadata.get("doc", "")
        cls, defaults = hints[part], default
    raise KeyError(path)  # pragma: no cover
