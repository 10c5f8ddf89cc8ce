"""The strict YAML loader of every typed config tree: jobs, clusters, sweeps.

A job reads one YAML file into `JobConfig` (jobconfig/job.py, dataclasses all
the way down), then applies `--section.key=value` overrides. Unknown keys and
bad values are errors that name the full key path and what was allowed,
raised before any work starts. The sections are in this package next to it
(model.py, train.py, data.py, ...), one per concern; this module knows only
how to read, convert and validate a dataclass tree.

A `model:` section may name a preset from `configs/model/<preset>.yaml` (the
size registry); keys given next to the preset override it.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig

CONFIG_ROOT = Path(os.environ.get("VGPT_CONFIG_ROOT", Path(__file__).resolve().parents[1] / "configs"))


# ---------------------------------------------------------------- conversion
def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: got {value!r}, expected one of {list(allowed)}")
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            if type(None) in get_args(tp):
                return None
            raise ConfigError(f"{path}: got null, expected {_type_name(args[0])}")
        errors = []
        for a in args:
            try:
                return _convert(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: got {value!r}, expected a list")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {value!r}, expected a mapping")
        _, val_tp = get_args(tp)
        return {str(k): _convert(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{path}: got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{path}: got {value!r}, expected an integer")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{path}: got {value!r}, expected an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: got {value!r}, expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: got {value!r}, expected a number") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: got {value!r}, expected a string")
        return str(value)
    raise ConfigError(f"{path}: unsupported config type {tp!r}")


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, strictly. `path` prefixes error messages."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"unknown config key '{where}'; allowed keys here: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{path}.{name}" if path else name)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or '<root>'}: {e}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{path}.{e}" if path else str(e)) from None
    return obj


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------- loading
def model_presets() -> list[str]:
    return sorted(p.stem for p in (CONFIG_ROOT / "model").glob("*.yaml"))


def _expand_model_preset(raw: dict) -> dict:
    model = raw.get("model")
    if not isinstance(model, dict) or "preset" not in model:
        return raw
    preset = model["preset"]
    if not isinstance(preset, str) or not preset or "/" in preset or preset.startswith("."):
        raise ConfigError(f"model.preset: got {preset!r}, expected one of {model_presets()}")
    file = CONFIG_ROOT / "model" / f"{preset}.yaml"
    if not file.is_file():
        raise ConfigError(f"model.preset: got {preset!r}, expected one of {model_presets()}")
    try:
        base = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise _yaml_error(e, str(file)) from None
    return {**raw, "model": {**base, **model}}


def deep_merge(base: dict, override: dict) -> dict:
    """`override` deep-merged over `base` (new dicts; mappings merge, anything else replaces)."""
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_path(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override --{dotted}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """`--section.key=value` (value parsed as YAML) into (path, value) pairs."""
    out = []
    for a in args:
        if not a.startswith("--") or "=" not in a:
            raise ConfigError(f"override {a!r}: expected the form --section.key=value")
        key, value = a[2:].split("=", 1)
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {a!r}: expected the form --section.key=value")
        try:
            out.append((key, yaml.safe_load(value) if value != "" else ""))
        except yaml.YAMLError as e:
            raise _yaml_error(e, f"override --{key}") from None
    return out


def resolve_raw(raw: dict, overrides: list[tuple[str, Any]] = ()) -> dict:
    """Apply (path, value) overrides to a copy of a raw mapping, then expand the model preset."""
    raw = copy.deepcopy(raw)
    for key, value in overrides:
        _set_path(raw, key, value)
    return _expand_model_preset(raw)


def _yaml_error(e: yaml.YAMLError, where: str) -> ConfigError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    at = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    return ConfigError(f"{where}{at}: invalid YAML: {problem}")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory, expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _yaml_error(e, str(path)) from None
    if raw is None:
        raise ConfigError(f"{path}: empty config file (expected a mapping of sections such as model:, train:)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    bad = [k for k in raw if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{path}: config key {bad[0]!r} is not a string")
    return raw


# ---------------------------------------------------------------- provenance
_KEY_OF_ERROR = (re.compile(r"^unknown config key '([^']+)'"), re.compile(r"^([A-Za-z_][\w.\[\]-]*): "))


def _error_key(message: str) -> str | None:
    """The key path a ConfigError message starts with ('train.steps: got ...', "unknown config key 'x.y'")."""
    for pattern in _KEY_OF_ERROR:
        if m := pattern.match(message):
            return m.group(1)
    return None


def _overrides_of(key: str, pairs: list[tuple[str, Any]]) -> list[str]:
    """The override keys that set `key`: the key itself, a section holding it, or keys under it."""
    base = re.sub(r"\[\d+\]", "", key)
    return [k for k, _ in pairs if k == base or base.startswith(k + ".") or k.startswith(base + ".")]


def build(cls: type, raw: dict, pairs: list[tuple[str, Any]] = (), source: str | None = None,
          flag_prefix: str = "") -> Any:
    """`cls` from a raw mapping (a file's) with parsed `--a.b=c` overrides applied, strictly.

    A ConfigError says where the bad value came from: `(from the command line: --train.steps)`
    when an override set that key, `(<source>)` (e.g. `in configs/debug.yaml`) when the file did,
    and `(<source> with the command line's --a.b)` when each is valid alone but not together.
    `flag_prefix` is what the command line puts before these keys (`cluster.` for `vgpt launch`)."""
    pairs = list(pairs)
    try:
        return from_dict(cls, resolve_raw(raw, pairs))
    except ConfigError as e:
        if str(e).startswith("override "):  # names its override already
            raise
        key = _error_key(str(e))
        given = _overrides_of(key, pairs) if key else []
        if given:
            raise ConfigError(f"{e} (from the command line: {', '.join(f'--{flag_prefix}{k}' for k in given)})") \
                from None
        if not pairs:
            raise ConfigError(f"{e} ({source})" if source else str(e)) from None
        try:  # the file alone (or the defaults, without a file)
            from_dict(cls, resolve_raw(raw))
        except ConfigError:
            raise ConfigError(f"{e} ({source})" if source else str(e)) from None
        cli = ", ".join(f"--{flag_prefix}{k}" for k, _ in pairs)
        where = f"{source} with the command line's {cli}" if source else f"from the command line: {cli}"
        raise ConfigError(f"{e} ({where})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = (), cls: type = JobConfig,
                flag_prefix: str = "") -> Any:
    """Load a YAML job config with `--a.b=c` overrides into `cls`; strict. Errors name the file or
    the command-line override (given as `--{flag_prefix}a.b=c`) the bad value came from (`build`)."""
    pairs = parse_overrides(list(overrides))
    raw = read_yaml(path) if path is not None else {}
    return build(cls, raw, pairs, f"in {path}" if path is not None else None, flag_prefix)
