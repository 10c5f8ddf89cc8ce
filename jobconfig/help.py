"""Every key of a typed config tree, documented from the dataclasses themselves: `vgpt <verb> --help`.

`config_keys(JobConfig)` walks the tree (nested dataclasses become sections)
and returns one `KeyDoc` per leaf key: its dotted path, its type as the
loader accepts it, its default, and a one-line description. The description
is the field's own comment in the source, the trailing `# ...` on its line or
the comment lines right above it, read with `tokenize`/`ast` from the class's
source, so the documentation cannot drift from the code: a new field shows up
in `--help` the moment it is added, and its comment is its help text.
`format_keys` lays them out for an argparse epilog, one line per key, grouped
by section. Nothing here imports torch: `vgpt train --help` stays fast.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import shutil
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin

OVERRIDE_FORM = "--section.key=value"


class KeyDoc(NamedTuple):
    key: str        # dotted path, e.g. train.steps
    type: str       # as the loader accepts it: int, float, str, bool, a choice, a list, a mapping
    default: str    # the default, written as it would be in YAML
    doc: str        # one line from the field's comment ('' when it has none)


def type_name(tp: Any) -> str:
    """A config type as a user writes the value: `int`, `{auto,cpu}`, `str|null`, `[float, float]`."""
    origin = get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in get_args(tp)) + "}"
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        names = [type_name(a) for a in args if a is not type(None)]
        return "|".join(names + (["null"] if type(None) in args else []))
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in get_args(tp) if a is not Ellipsis) + "]"
    if origin is list:
        (item,) = get_args(tp) or (Any,)
        return f"[{type_name(item)}, ...]"
    if origin is dict or tp is dict:
        return "mapping"
    if tp is Any:
        return "any"
    if dataclasses.is_dataclass(tp):  # an item of a list of mappings (data.sources): its keys
        return "{" + ",".join(f.name for f in dataclasses.fields(tp) if f.init) + "}"
    return getattr(tp, "__name__", str(tp))


def yaml_value(value: Any) -> str:
    """A default as it is written in YAML (null, true, [0.9, 0.95], {})."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return repr(value) if value == "" or value.strip() != value else value
    return str(value)


@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment}: the trailing comment of the field's line(s), else the comment
    lines right above it. Fields without either are left out."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined interactively: no source to read
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[str, str] = {}
    (node,) = ast.parse(source).body
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments
                    and not lines[n - 1].lstrip().startswith("#")]
        above, n = [], stmt.lineno - 1
        while n in comments and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        text = " ".join(trailing or above)
        if text:
            out[stmt.target.id] = text
    return out


def section_doc(cls: type) -> str:
    """The first line of a section class's own docstring ('' for the one dataclass generates)."""
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(cls.__name__ + "("):
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def config_keys(cls: type, prefix: str = "", instance: Any = None) -> list[KeyDoc]:
    """One KeyDoc per leaf key of the dataclass tree `cls`, in declaration order. Defaults come from
    an instance built with no arguments, so a section's default factory (e.g. inputs.dir) is shown."""
    instance = cls() if instance is None else instance
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    out: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp, value = f"{prefix}{f.name}", hints[f.name], getattr(instance, f.name)
        if dataclasses.is_dataclass(tp):
            out += config_keys(tp, key + ".", value)
        else:
            out.append(KeyDoc(key, type_name(tp), yaml_value(value), comments.get(f.name, "")))
    return out


def sections(cls: type, prefix: str = "") -> dict[str, str]:
    """{dotted section: its one-line doc} for every nested dataclass of the tree, in order."""
    hints = typing.get_type_hints(cls)
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out[prefix + f.name] = section_doc(tp)
            out.update(sections(tp, f"{prefix}{f.name}."))
    return out


def format_keys(cls: type, flag_prefix: str = "", only: tuple[str, ...] = (), title: str = "",
                width: int | None = None) -> str:
    """The keys of `cls` as help text: a line per key (`--key=TYPE  [default] description`), grouped by
    section. `flag_prefix` goes before every key (`cluster.` for `vgpt launch`); `only` keeps the
    sections named (top-level names)."""
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 120)
    keys = [k for k in config_keys(cls) if not only or k.key.split(".")[0] in only]
    docs = sections(cls)
    left = [f"  --{flag_prefix}{k.key}={k.type}" for k in keys]
    col = min(max((len(s) for s in left), default=0) + 2, 48)
    lines = [title or f"config keys, set with {OVERRIDE_FORM} (the value is read as YAML):"]
    current = None
    for k, head in zip(keys, left):
        section = k.key.rsplit(".", 1)[0] if "." in k.key else ""
        if section != current:
            current = section
            name = f"{flag_prefix}{section}" if section else (flag_prefix.rstrip(".") or "top level")
            about = docs.get(section, "")
            lines.append(f" {name}:" + (f" {about}" if about else ""))
        text = f"[{k.default}]" + (f" {k.doc}" if k.doc else "")
        if len(head) + 2 > col:  # a long key: its text on the lines below
            lines.append(head)
            head = ""
        wrapped = textwrap.wrap(text, max(width - col, 30)) or [""]
        lines.append(head.ljust(col) + wrapped[0])
        lines += [" " * col + w for w in wrapped[1:]]
    return "\n".join(lines)
