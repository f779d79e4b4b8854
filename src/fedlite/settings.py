"""TOML configuration read into dataclasses, with an error that names the bad key and why.

A numeric setting declares the values it may take next to its type, and the loader enforces it:

    learning_rate: Annotated[float, Range(gt=0)] = 1.0
    port: Annotated[int, PORT] = 1883
    max_update_norm: Annotated[float, Range(gt=0, special=0, means="no bound")] = 0.0

A section whose dataclass lives elsewhere (a protocol message, an agent component) gets its fields'
ranges from the configuration that holds it: `plan: Annotated[TrainingPlan, FieldRanges(epochs=...)]`.
A section may hold sub-tables whose names and dataclasses are looked up when a file is read, e.g. one
`[server.<strategy>]` per registered strategy: `strategies: Annotated[dict[str, Any], Tables(...)]`.
Every float must be finite: TOML's nan, inf and -inf are refused for every key.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or value that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: ge/gt a lower bound (inclusive/exclusive), le/lt an upper one,
    and optionally one special value outside them with its meaning (0: off, -1: unseeded, ...)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    special: float | None = None
    means: str = ""

    def __post_init__(self) -> None:
        if self.ge is not None and self.gt is not None or self.le is not None and self.lt is not None:
            raise TypeError("give ge or gt, and le or lt, not both")
        if (self.special is None) != (not self.means):
            raise TypeError("a special value needs `means`, and `means` a special value")

    def allows(self, value: float) -> bool:
        if self.special is not None and value == self.special:
            return True
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self, integer: bool = False, finite: bool = False) -> str:
        """E.g. "> 0", "1-65535", "in [0, 0.5)", "> 0 and finite (or 0 for no bound)"."""
        low, high = _first(self.ge, self.gt), _first(self.le, self.lt)
        if low is not None and high is not None:
            if integer and self.ge is not None and self.le is not None and low >= 0:
                text = f"{_num(low)}-{_num(high)}"
            else:
                opening, closing = "[" if self.ge is not None else "(", "]" if self.le is not None else ")"
                text = f"in {opening}{_num(low)}, {_num(high)}{closing}"
        elif low is not None:
            text = f"{'>=' if self.ge is not None else '>'} {_num(low)}"
        elif high is not None:
            text = f"{'<=' if self.le is not None else '<'} {_num(high)}"
        else:
            text = "a number"
        if finite:
            text += " and finite"
        if self.special is not None:
            text += f" (or {_num(self.special)} for {self.means})"
        return text


PORT = Range(ge=1, le=65535)
SEED = Range(ge=0)


class FieldRanges(dict[str, Range]):
    """Ranges for the fields of a section whose dataclass is declared outside the configuration."""

    def __init__(self, **ranges: Range) -> None:
        super().__init__(ranges)


@dataclasses.dataclass(frozen=True, eq=False)
class Tables:
    """Declares a `dict[str, Any]` field as its section's sub-tables: ``[section.<name>]`` for each name of
    `types()` (called when a file is read, so names registered at run time count), read into that name's
    dataclass; the field itself is not a key, and holds the tables the file gives. A table for another name
    is refused as an unknown `what`. `set_by` maps a field of those dataclasses to the section's key that sets
    it for all of them: it is not a key of the tables (the section fills it in, e.g. in ``__post_init__``)."""

    types: Callable[[], Mapping[str, type]]
    what: str = "table"
    set_by: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _tables(cls: type, hints: Mapping[str, Any]) -> tuple[str, Tables] | None:
    """(the field, its declaration) of the sub-tables of `cls`, if it has them."""
    found = [(f.name, m) for f in dataclasses.fields(cls) for m in _unwrap(hints[f.name])[1] if isinstance(m, Tables)]
    if len(found) > 1:
        raise TypeError(f"{cls.__name__} declares sub-tables in more than one field")
    return found[0] if found else None


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def _num(value: float) -> str:
    return f"{value:g}"


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file's tables; ConfigError naming the file if it is missing or not TOML."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except OSError as exc:  # not readable by the service's user, a directory, ...
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not valid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def load_toml(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, read_toml(path), str(path))


def from_dict(cls: type[T], raw: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a mapping, refusing unknown keys, wrong types and values out of range.

    Errors read `<where>: <section>.<key> must be ...`. A section's validate() runs last; a message of
    it that starts with one of the section's keys is reported as `section.key ...` too.
    """
    return _build(cls, raw, where, "", {})


def _build(cls: type[T], raw: Any, where: str, prefix: str, extra: Mapping[str, Range],
           set_by: Mapping[str, str] | None = None) -> T:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix or 'the configuration'} must be a table, not {raw!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    misplaced = sorted(set(extra) - set(names))
    if misplaced:
        raise TypeError(f"ranges for {cls.__name__} name unknown fields {misplaced}")
    set_by = set_by or {}
    refused = sorted(set(raw) & set(set_by))
    if refused:
        name = refused[0]
        raise ConfigError(f"{where}: {_key(prefix, name)} is not a key of [{prefix}]: {set_by[name]} sets it")
    tables = _tables(cls, hints)
    subtables = dict(tables[1].types()) if tables else {}
    if set(subtables) & set(names):
        raise TypeError(f"{cls.__name__}: sub-tables {sorted(set(subtables) & set(names))} are named like its fields")
    keys = [n for n in names if n not in set_by and (not tables or n != tables[0])]
    unknown = sorted(set(raw) - set(keys) - set(subtables))
    if tables:
        for name in unknown:
            if isinstance(raw[name], dict):
                raise ConfigError(f"{where}: [{_key(prefix, name)}]: unknown {tables[1].what} {name!r}; "
                                  f"known: {', '.join(sorted(subtables))}")
    if unknown:
        known = f"known in [{prefix}]" if prefix else "known"
        listed = ", ".join(_key(prefix, k) + _elsewhere(k, prefix, subtables, tables) for k in unknown)
        raise ConfigError(f"{where}: unknown key(s) {listed}; {known}: {', '.join(sorted(keys))}")
    values = {}
    for f in dataclasses.fields(cls):
        if tables and f.name == tables[0]:
            inner = {field: _key(prefix, key) for field, key in tables[1].set_by.items()}
            values[f.name] = {name: _build(kind, raw[name], where, _key(prefix, name), {}, inner)
                              for name, kind in subtables.items() if name in raw}
        elif f.name in raw:
            values[f.name] = _coerce(hints[f.name], raw[f.name], where, _key(prefix, f.name), extra.get(f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: {_key(prefix, f.name)} is required")
    try:
        obj = cls(**values)
        check = getattr(obj, "validate", None)
        if check:
            check()
    except ValueError as exc:
        raise ConfigError(f"{where}: {_qualify(str(exc), prefix, names)}") from None
    return obj


def _elsewhere(key: str, prefix: str, subtables: Mapping[str, type], tables: tuple[str, Tables] | None) -> str:
    """The hint " (a key of [server.fedadam])" for a key that belongs in sub-tables of the section, else ""."""
    skip = tables[1].set_by if tables else {}
    owners = [f"[{_key(prefix, name)}]" for name, kind in subtables.items()
              if key not in skip and key in {f.name for f in dataclasses.fields(kind)}]
    return f" (a key of {', '.join(owners)})" if owners else ""


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _qualify(message: str, prefix: str, names: list[str]) -> str:
    if not prefix:
        return message
    if message.split(" ", 1)[0] in names:
        return f"{prefix}.{message}"
    return f"[{prefix}] {message}"


def _unwrap(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    """(the type, its Annotated metadata)."""
    if typing.get_origin(hint) is Annotated:
        return hint.__origin__, hint.__metadata__
    return hint, ()


def _coerce(hint: Any, value: Any, where: str, key: str, bound: Range | None = None) -> Any:
    hint, meta = _unwrap(hint)
    bound = bound or next((m for m in meta if isinstance(m, Range)), None)
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        nested = next((m for m in meta if isinstance(m, FieldRanges)), FieldRanges())
        return _build(hint, value, where, key, nested)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(options[0], value, where, key, bound)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, not {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a table, not {value!r}")
        return dict(value)
    if hint in (int, float, str, bool):
        written = value
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: {key} must be {hint.__name__}, not {written!r}")
        if hint is float and not math.isfinite(value):
            what = bound.describe(finite=True) if bound else "finite"
            raise ConfigError(f"{where}: {key} must be {what}, not {written!r}")
        if bound and not bound.allows(value):
            raise ConfigError(f"{where}: {key} must be {bound.describe(integer=hint is int)}, not {written!r}")
    return value


def numeric_keys(cls: type, prefix: str = "", extra: Mapping[str, Range] | None = None, skip: Collection[str] = ()
                 ) -> dict[str, tuple[type, Range | None]]:
    """Every int and float key of configuration `cls` ("server.learning_rate", lists as "model.input_shape[]",
    sub-tables' as "server.fedadam.beta1"), with its type and declared range (None: none declared)."""
    found: dict[str, tuple[type, Range | None]] = {}
    hints = typing.get_type_hints(cls, include_extras=True)
    tables = _tables(cls, hints)
    for f in dataclasses.fields(cls):
        if f.name in skip or tables and f.name == tables[0]:
            continue
        key, (hint, meta) = _key(prefix, f.name), _unwrap(hints[f.name])
        bound = (extra or {}).get(f.name) or next((m for m in meta if isinstance(m, Range)), None)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint, meta = _unwrap(next(a for a in typing.get_args(hint) if a is not type(None)))
        if dataclasses.is_dataclass(hint):
            nested = next((m for m in meta if isinstance(m, FieldRanges)), None)
            found |= numeric_keys(hint, key, nested)
        elif typing.get_origin(hint) is list:
            item, item_meta = _unwrap(typing.get_args(hint)[0])
            if item in (int, float):
                found[f"{key}[]"] = (item, next((m for m in item_meta if isinstance(m, Range)), None))
        elif hint in (int, float):
            found[key] = (hint, bound)
    if tables:
        for name, kind in tables[1].types().items():
            found |= numeric_keys(kind, _key(prefix, name), skip=tables[1].set_by)
    return found


def read_secret(value: str, file: str, what: str) -> str | None:
    """A secret given inline or, preferably, in a file of its own (first line, stripped)."""
    if file:
        try:
            return Path(file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {what}: {exc}") from None
    return value or None


def require(condition: bool, message: str) -> None:
    """For validate() methods: raise ValueError(message) unless `condition`."""
    if not condition:
        raise ValueError(message)


def dump_toml(tables: dict[str, dict[str, Any]]) -> str:
    """Write simple configuration (tables of scalars, lists and inline tables) as TOML."""
    lines: list[str] = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
