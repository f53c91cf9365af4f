"""YAML recipes -> typed dataclass configs.

A recipe is a YAML mapping validated against a dataclass schema (nested dataclasses for
components). Rules, all enforced here so no stage has to repeat them:

- ``base: other.yaml`` (a path relative to the recipe, or a list of them) is loaded first and the
  recipe is merged over it, mappings key by key, everything else replaced;
- dotted overrides ``train.max_steps=100`` are parsed as YAML scalars and type-checked like the
  file itself;
- an unknown key is a :class:`ConfigError` naming the key, the file it came from and the closest
  valid key; a value of the wrong type names the expected type;
- a field marked with :func:`path_field` holds a filesystem path: a relative value is relative to
  the file that names it (a recipe, its base, a pipeline file) or, on the command line, to the
  current folder, and is stored absolute, so a config means the same from any working folder;
  values with a scheme (``stage:x``, ``models:/x@y``, ``s3://...``) are references, kept as written;
- :func:`config_hash` is a stable hash of the resolved values (not of the files' text), so two
  recipes that resolve to the same config share it; a field marked with :func:`unhashed_field`
  (how a run may continue, not what it computes) is left out of it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.atomic import write_text_atomic

T = TypeVar("T")
COMMAND_LINE = "<command line>"
PATH_METADATA = "path"
UNHASHED_METADATA = "unhashed"
# "stage:name", "models:/name@alias", "s3://bucket" are references, not paths; two letters at
# least, so that a Windows drive ("C:") is not taken for a scheme.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


class ConfigError(ValueError):
    """A recipe or override that does not fit its schema; the message says where and how to fix."""


def path_field(**kwargs: Any) -> Any:
    """A dataclass field holding a filesystem path (see the module docstring for how a relative
    value is resolved). Takes ``dataclasses.field``'s keyword arguments (``default=None``...)."""
    return dataclasses.field(metadata={PATH_METADATA: True}, **kwargs)


def unhashed_field(**kwargs: Any) -> Any:
    """A dataclass field left out of :func:`config_hash`: a setting of how an interrupted run
    may continue (``train.elastic_resume``), so that switching it on to resume keeps the run
    folder instead of archiving it as another config's."""
    return dataclasses.field(metadata={UNHASHED_METADATA: True}, **kwargs)


def resolve_path(value: str, base: str | Path) -> str:
    """``value`` made absolute against the folder ``base``; references and "" are kept."""
    if not value or _SCHEME.match(value):
        return value
    path = os.path.expanduser(value)
    # normpath, not resolve(): a symlinked data folder keeps the name the user gave it.
    return os.path.normpath(os.path.join(os.fspath(base), path))


def _origin_folder(origin: str) -> Path | None:
    """The folder a relative path from ``origin`` is relative to (None: leave it as written)."""
    if origin == COMMAND_LINE:
        return Path.cwd()
    if origin.startswith("<"):  # a mapping built in code ("<dict>"): no file to be relative to
        return None
    return Path(origin).absolute().parent


def _schema_field(schema: Any, dotted: str) -> dataclasses.Field | None:
    """The dataclass field that a dotted key names (through nested and Optional dataclasses)."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        schema = _dataclass_of(_field_types(schema).get(part))
        if schema is None:
            return None
    fields = {f.name: f for f in dataclasses.fields(schema)} if schema else {}
    return fields.get(leaf)


def _field_types(schema: Any) -> dict[str, Any]:
    return typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}


def _dataclass_of(tp: Any) -> Any:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):  # Optional[SomeConfig]
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def absolutize_overrides(overrides: list[str], schema: type, base: str | Path) -> list[str]:
    """Overrides with the relative values of path fields made absolute against ``base``.

    For overrides written in a file (a pipeline's ``overrides:``), which would otherwise be read
    as command-line ones (relative to the current folder) wherever the stage is loaded again.
    """
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        field = _schema_field(schema, key.strip()) if sep else None
        try:
            value = yaml.safe_load(raw) if field is not None and raw.strip() else None
        except yaml.YAMLError:
            value = None  # load_config reports it with the key
        if field is not None and field.metadata.get(PATH_METADATA) and isinstance(value, str):
            item = f"{key.strip()}={resolve_path(value, base)}"
        out.append(item)
    return out


def read_recipe(path: str | Path) -> tuple[dict, dict[str, str]]:
    """Read a recipe and its ``base:`` chain -> (merged mapping, dotted key -> file it came from)."""
    return _read_with_bases(Path(path).resolve(), seen=())


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> tuple[dict, dict[str, str]]:
    if path in seen:
        raise ConfigError(f"{path}: 'base:' cycle through {' -> '.join(map(str, seen))}")
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    merged: dict = {}
    origins: dict[str, str] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_data, base_origins = _read_with_bases((path.parent / base).resolve(), (*seen, path))
        merged = deep_merge(merged, base_data)
        origins.update(base_origins)
    origins.update({key: str(path) for key in _dotted_keys(data)})
    return deep_merge(merged, data), origins


def _one_line(err: Exception) -> str:
    """YAML's messages span lines (with a caret under the column); the CLI prints one."""
    return " ".join(str(err).split())


def deep_merge(base: dict, update: dict) -> dict:
    """Mappings merge key by key; any other value in ``update`` replaces the one in ``base``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _dotted_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys.extend(_dotted_keys(value, dotted + "."))
    return keys


def apply_overrides(data: dict, overrides: list[str], origins: dict[str, str]) -> dict:
    """Apply ``a.b.c=value`` strings; values are YAML scalars (``1e-4``, ``[480, 512]``, ``null``)."""
    data = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key = key.strip()
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a mapping")
        try:
            node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML "
                              f"({_one_line(err)})") from None
        origins[key] = COMMAND_LINE
    return data


def load_config(path: str | Path, schema: type[T], overrides: list[str] | None = None,
                ignore_keys: tuple[str, ...] = ()) -> T:
    """Read a recipe (with its bases), apply overrides and build the ``schema`` dataclass.

    ``ignore_keys`` are top-level keys that belong to the caller (e.g. ``stage``), not the schema.
    """
    data, origins = read_recipe(path)
    data = apply_overrides(data, list(overrides or []), origins)
    for key in ignore_keys:
        data.pop(key, None)
    return from_dict(schema, data, origins=origins, default_origin=str(path))


def from_dict(schema: type[T], data: dict, origins: dict[str, str] | None = None,
              default_origin: str = "<dict>", prefix: str = "") -> T:
    """Build a dataclass from a plain mapping, checking keys and types recursively."""
    origins = origins or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(prefix.rstrip('.'), origins, default_origin)}: expected a mapping "
                          f"for {schema.__name__}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    hints = typing.get_type_hints(schema)
    for key in data:
        if key not in fields:
            raise _unknown_key(prefix + key, list(fields), origins, default_origin)
    kwargs = {}
    for name, value in data.items():
        dotted = prefix + name
        kwargs[name] = _convert(hints[name], value, dotted, origins, default_origin)
        if fields[name].metadata.get(PATH_METADATA) and isinstance(kwargs[name], str):
            folder = _origin_folder(_where(dotted, origins, default_origin))
            if folder is not None:
                kwargs[name] = resolve_path(kwargs[name], folder)
    try:
        return schema(**kwargs)
    except TypeError as err:  # a required field without default is missing
        raise ConfigError(f"{default_origin}: {prefix.rstrip('.') or schema.__name__}: {err}") from None
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        where = prefix.rstrip(".") or schema.__name__
        raise ConfigError(f"{default_origin}: invalid '{where}': {err}") from None


def _unknown_key(dotted: str, valid: list[str], origins: dict[str, str], default: str) -> ConfigError:
    leaf = dotted.rsplit(".", 1)[-1]
    parent = dotted[: -len(leaf)]
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{parent}{close[0]}'?" if close else f"; valid keys here: {', '.join(valid)}"
    return ConfigError(f"{_where(dotted, origins, default)}: unknown key '{dotted}'{hint}")


def _where(dotted: str, origins: dict[str, str], default: str) -> str:
    return origins.get(dotted, default)


def _convert(tp: Any, value: Any, dotted: str, origins: dict[str, str], default: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert (lists to tuples, dicts to
    dataclasses, ints to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, dotted, origins, default)
            except ConfigError as err:
                errors.append(str(err))
        raise _type_error(dotted, tp, value, origins, default)
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{_where(dotted, origins, default)}: '{dotted}' must be one of "
                              f"{choices}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, origins, default, prefix=dotted + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(dotted, tp, value, origins, default)
        item_type = args[0] if args else Any
        items = [_convert(item_type, v, f"{dotted}[{i}]", origins, default) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(dotted, tp, value, origins, default)
        value_type = args[1] if len(args) == 2 else Any
        return {k: _convert(value_type, v, f"{dotted}.{k}", origins, default) for k, v in value.items()}
    return _convert_scalar(tp, value, dotted, origins, default)


def _convert_scalar(tp: Any, value: Any, dotted: str, origins: dict[str, str], default: str) -> Any:
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(float(value), dotted, origins, default)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            return _finite(number, dotted, origins, default)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    if tp is type(None) and value is None:
        return None
    raise _type_error(dotted, tp, value, origins, default)


def _finite(number: float, dotted: str, origins: dict[str, str], default: str) -> float:
    """NaN and inf are never meant (a learning rate of nan trains nothing, silently)."""
    if not math.isfinite(number):
        raise ConfigError(f"{_where(dotted, origins, default)}: '{dotted}' must be a finite "
                          f"number, got {number}")
    return number


def _type_error(dotted: str, tp: Any, value: Any, origins: dict[str, str], default: str) -> ConfigError:
    name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    return ConfigError(f"{_where(dotted, origins, default)}: '{dotted}' expects {name}, "
                       f"got {value!r} ({type(value).__name__})")


def to_dict(cfg: Any) -> Any:
    """Dataclass -> plain YAML/JSON-friendly data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def _hashed_values(cfg: Any) -> Any:
    """`to_dict` without the fields marked with `unhashed_field`."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: _hashed_values(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                if not f.metadata.get(UNHASHED_METADATA)}
    if isinstance(cfg, (list, tuple)):
        return [_hashed_values(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): _hashed_values(v) for k, v in cfg.items()}
    return to_dict(cfg)


def config_hash(cfg: Any, length: int = 12) -> str:
    """Stable hash of the resolved values: key order and int/float spelling do not matter."""
    canonical = json.dumps(_hashed_values(cfg), sort_keys=True, separators=(",", ":"),
                           default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def dump_yaml(cfg: Any, extra: dict | None = None) -> str:
    """The resolved config as YAML, with derived values (``extra``) under ``derived:``."""
    data = to_dict(cfg)
    if extra:
        data = {**data, "derived": to_dict(extra)}
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def write_resolved(cfg: Any, path: str | Path, extra: dict | None = None) -> Path:
    """Write the resolved config (and its hash) next to the outputs, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"# config_hash: {config_hash(cfg)}\n" + dump_yaml(cfg, extra)
    return write_text_atomic(path, text)
