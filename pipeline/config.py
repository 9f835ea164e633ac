"""Job files: TOML -> nested config dataclasses, with dotted `--set` overrides.

Resolution order is defaults <- job file <- overrides:

    cfg = load_job(ExtractArgs, "jobs/demo/extract.toml", ["data.batch_size=8"])

A job file may start with `extends = "other.toml"` (a path relative to it): the other file
is read first and this one's tables are merged over it, so an ablation job states only what
it changes.

Every key must name a field of the dataclass it lands in; an unknown key, a value of the
wrong type or a malformed override raises `ConfigError` (one line, naming the key) before
any model is loaded. `to_dict` gives back the resolved config so every output can carry it.

A stage's config class may list its input paths as dotted keys in a plain class attribute
`INPUT_PATHS` (not a field); `load_job(..., check_paths=True)`, which the commands use, then
checks that each non-empty one exists (a key ending in "shards" must name at least one shard),
so a wrong path is a one-line ConfigError before a model is loaded, not an error from deep
inside a worker or, for an evaluation split, after the training it follows:

    @dataclass
    class TrainArgs:
        INPUT_PATHS = ("student.path", "data.shards", "cache", "teacher", "eval.shards")
        URL_PATHS = ("cache",)   # these may also be fsspec URLs ("s3://bucket/cache")
        ...

A URL is not looked up here (that needs the network and credentials; whoever opens it says
what is missing), but its scheme's client must be installed (alignkd.cache.remote.filesystem).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

__all__ = ["ConfigError", "from_dict", "to_dict", "apply_overrides", "load_job", "read_job", "read_toml",
           "check_input_paths"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A job file or override that does not fit the config dataclasses."""


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"job file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def read_job(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A job file with its `extends` chain resolved (later files win, tables merge)."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: `extends` forms a cycle")
    raw = read_toml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must be a file name")
    return _merge(read_job(path.parent / parent, (*_seen, path.resolve())), raw)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = _deep_copy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_value(text: str) -> Any:
    """An override value is read as a TOML value; bare words fall back to strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict (a copy; the input is untouched)."""
    out = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(text.strip())
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def from_dict(cls: type[T], raw: dict[str, Any], *, where: str = "") -> T:
    """Build dataclass `cls` from a nested dict, checking keys and types on the way."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]} (known in {where or 'top level'}: {', '.join(sorted(fields))})"
        )
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field without default that the job did not give
        raise ConfigError(f"{where or 'config'}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:
            raise ConfigError(f"{where or 'config'}: {e}") from None
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=key)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _coerce(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def to_dict(obj: Any) -> Any:
    """The resolved config as plain TOML/JSON-friendly data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_job(cls: type[T], job: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *,
             check_paths: bool = False) -> T:
    """Defaults <- job file <- overrides, as one validated dataclass; with `check_paths`, its
    INPUT_PATHS must exist (check_input_paths)."""
    raw = read_job(job) if job is not None else {}
    cfg = from_dict(cls, apply_overrides(raw, list(overrides)))
    if check_paths:
        check_input_paths(cfg)
    return cfg


def check_input_paths(cfg: Any) -> None:
    """ConfigError naming the key for the first path in `type(cfg).INPUT_PATHS` that does not
    exist; empty values are optional inputs left unset and are skipped."""
    urls = getattr(type(cfg), "URL_PATHS", ())
    for dotted in getattr(type(cfg), "INPUT_PATHS", ()):
        value = cfg
        for part in dotted.split("."):
            value = getattr(value, part)
        if not value:
            continue
        if dotted in urls and "://" in str(value):
            from alignkd.cache.remote import filesystem

            try:
                filesystem(str(value))
            except ValueError as e:
                raise ConfigError(f"{dotted}: {e}") from None
        elif dotted.split(".")[-1] == "shards":
            from alignkd.data.shards import expand_shards  # imported here: PIL and webdataset

            try:
                expand_shards(value)
            except FileNotFoundError as e:
                raise ConfigError(f"{dotted}: {e}") from None
        elif not Path(value).exists():
            raise ConfigError(f"{dotted}: {value} does not exist")
