"""The schema of every file we read from a checkpoint or an export, checked before anything else reads it.

What: small validators, one per file we write (trainer_state.json, engine.json,
optimizer.json, manifest.json, an export's config.json and index), a
safetensors header validator that parses the 8-byte length and the JSON header
itself, with bounds, before safetensors opens the file, and the checks across
the files of one checkpoint (structure.py: shapes in the headers against
the fragments, the fragments against each other, the module against the
fragments). Each refusal is a `RefusedFile` naming the file, the field and what
was expected: one line, exit 1 under `vgpt ckpt`, exit 2 and no restart under
`vgpt train`.

Why: the manifest's checksums catch corruption, not forgery. Whoever can write
a checkpoint folder can recompute the manifest, so without these checks a
crafted file ended in whatever the first reader to trip over it raised (a
safetensors error, a TypeError, a RecursionError), or worse, passed the offline
verbs and failed later, in a resume. The checks read only the JSON files and
the safetensors headers (kilobytes), never a tensor: a normal load costs no
second read of the data.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from jobconfig.errors import ConfigError
from jobconfig.loader import from_dict
from jobconfig.model import ModelConfig
from pretrain.checkpoint.integrity import CRC32, SHA256, RefusedFile

# the files we write and their format names: here, so that checking them imports none of their writers
TRAINER_STATE = "trainer_state.json"  # every checkpoint (storage.py)
RNG_FILE = "rng.safetensors"
ENGINE, SHARDED_FORMAT, META_KEY = "engine.json", "vgpt-sharded-1", "vgpt"  # sharded.py
OPTIMIZER, WEIGHTS, PORTABLE_FORMAT = "optimizer.json", "weights.safetensors", "vgpt-portable-1"  # portable.py
JSON_LIMIT = 256 << 20  # bytes: far above any JSON file we write (a manifest of a 10 TB checkpoint is ~2 MB)
MAX_DEPTH = 64  # levels of JSON nesting: ours have at most ~10
HEADER_LIMIT = 100 << 20  # bytes: safetensors' own bound on a header
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
FORMATS = ("deepspeed", "sharded", "portable")  # formats.Format's values (formats.py imports the readers)


def show(v: Any, limit: int = 60) -> str:
    """A value of a file in a message: repr (one line, whatever the value holds), shortened."""
    try:
        text = repr(v)
    except RecursionError:
        text = f"a deeply nested {type(v).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


def refuse(where: str | Path, field: str, expected: str, got: Any = ...) -> RefusedFile:
    tail = "" if got is ... else f", got {show(got)}"
    return RefusedFile(f"{where}: {field}: expected {expected}{tail}")


# ---------------------------------------------------------------- JSON
def parse_json(data: bytes | str, where: str | Path) -> Any:
    """JSON text of a file, refused (never a traceback) when it is too large, not UTF-8, not JSON, or
    nested deeper than MAX_DEPTH (whatever reads it next may recurse, and our files never are)."""
    if len(data) > JSON_LIMIT:
        raise RefusedFile(f"{where}: {len(data)} bytes, expected a JSON file of at most {JSON_LIMIT}")
    try:
        value = json.loads(data)
    except RecursionError:
        value = None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise RefusedFile(f"{where}: not valid JSON ({show(str(e), 120)})") from None
    else:
        if _depth(value) <= MAX_DEPTH:
            return value
    raise RefusedFile(f"{where}: JSON nested deeper than {MAX_DEPTH} levels, expected one of the files we write")


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (what reads it next may recurse)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                break
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if path.stat().st_size > JSON_LIMIT:
        raise RefusedFile(f"{path}: {path.stat().st_size} bytes, expected a JSON file of at most {JSON_LIMIT}")
    return parse_json(path.read_bytes(), path)


# ---------------------------------------------------------------- field validators
def obj(v: Any, where, field: str) -> dict:
    if not isinstance(v, dict):
        raise refuse(where, field, "a JSON object", v)
    return v


def integer(v: Any, where, field: str, lo: int | None = 0, hi: int | None = None) -> int:
    ok = _finite(v) and isinstance(v, int) and (lo is None or v >= lo) and (hi is None or v <= hi)
    if not ok:
        span = f" in {lo}..{hi}" if hi is not None else f" >= {lo}" if lo is not None else ""
        raise refuse(where, field, f"an integer{span}", v)
    return v


def _finite(v: Any) -> bool:
    """A JSON number that is not NaN or infinite, and an integer one that fits 64 bits (what reads it next
    may turn it into a float or a C integer; isfinite itself overflows on a larger one)."""
    return isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63 or \
        isinstance(v, float) and math.isfinite(v)


def number(v: Any, where, field: str, lo: float | None = None) -> float:
    ok = _finite(v) and (lo is None or v >= lo)
    if not ok:
        raise refuse(where, field, "a finite number" + (f" >= {lo}" if lo is not None else ""), v)
    return v


def string(v: Any, where, field: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(v, str) or (choices is not None and v not in choices):
        raise refuse(where, field, f"one of {list(choices)}" if choices else "a string", v)
    return v


def boolean(v: Any, where, field: str) -> bool:
    if not isinstance(v, bool):
        raise refuse(where, field, "true or false", v)
    return v


def shape(v: Any, where, field: str) -> list[int]:
    if not isinstance(v, list) or len(v) > 16 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                         for d in v):
        raise refuse(where, field, "a shape (a list of at most 16 non-negative integers)", v)
    return v


def _plain(v: Any, where, field: str) -> None:
    """A hyper-parameter or scheduler value: a number, a bool, null, or a list of those (a learning rate
    written as a string passes every offline verb and then fails inside the optimizer)."""
    if isinstance(v, list):
        for i, x in enumerate(v):
            _plain(x, where, f"{field}[{i}]")
    elif not (v is None or isinstance(v, bool) or _finite(v)):
        raise refuse(where, field, "a number, true/false, null or a list of those", v)


# ---------------------------------------------------------------- the JSON files of a checkpoint
def layout(v: Any, where, field: str = "layout") -> dict:
    """A parallel layout (trainer_state.json and engine.json `layout`, a portable one's `source`)."""
    lay = obj(v, where, field)
    if "format" in lay:
        string(lay["format"], where, f"{field}.format", FORMATS)
    for k in ("world_size", "dp", "tp", "sp"):
        if k in lay:
            integer(lay[k], where, f"{field}.{k}", 1)
    if "zero_stage" in lay:
        integer(lay["zero_stage"], where, f"{field}.zero_stage", 0, 3)
    if "precision" in lay:
        string(lay["precision"], where, f"{field}.precision", ("fp32", "bf16", "fp16"))
    if "tp_plan" in lay and lay["tp_plan"] is not None:
        plan = obj(lay["tp_plan"], where, f"{field}.tp_plan")
        for k, style in plan.items():
            string(style, where, f"{field}.tp_plan[{show(k)}]")
    if "source" in lay:
        layout(lay["source"], where, f"{field}.source")
    return lay


def trainer_state(v: Any, where, resumable: bool = False) -> dict:
    """trainer_state.json; `resumable`: also what a resume reads (loader state, config)."""
    st = obj(v, where, "the top level")
    if "step" not in st and resumable:
        raise refuse(where, "step", "the step the checkpoint was saved at")
    if "step" in st:
        integer(st["step"], where, "step")
    for k, lo in (("world_size", 1), ("consumed_samples", 0), ("global_batch", 1)):
        if k in st:
            integer(st[k], where, k, lo)
    if "stage" in st:
        string(st["stage"], where, "stage")
    if "layout" in st:
        layout(st["layout"], where)
    if "config" in st or resumable:
        config = obj(st.get("config"), where, "config")
        model = obj(config.get("model"), where, "config.model")
        try:
            from_dict(ModelConfig, dict(model), "model")
        except ConfigError as e:
            raise RefusedFile(f"{where}: config.model: {e}") from None
        for k in ("train", "parallel"):
            if k in config:
                obj(config[k], where, f"config.{k}")
        if "layout" not in st and "parallel" in config:  # older states: the layout is derived from it
            pc = config["parallel"]
            for k in ("tensor_parallel", "sequence_parallel"):
                if k in pc:
                    integer(pc[k], where, f"config.parallel.{k}", 1)
            if "zero_stage" in pc:
                integer(pc["zero_stage"], where, "config.parallel.zero_stage", 0, 3)
    if "loader" in st or resumable:
        obj(st.get("loader"), where, "loader")
    return st


def optimizer_info(v: Any, where, field: str = "optimizer") -> dict:
    """The optimizer's step, hyper-parameters, LR scheduler and engine counters (engine.json, optimizer.json)."""
    info = obj(v, where, field)
    number(info.get("step"), where, f"{field}.step", 0)
    for k, x in obj(info.get("hyper", {}), where, f"{field}.hyper").items():
        _plain(x, where, f"{field}.hyper.{k}")
    if info.get("lr_scheduler") is not None:
        for k, x in obj(info["lr_scheduler"], where, f"{field}.lr_scheduler").items():
            _plain(x, where, f"{field}.lr_scheduler.{k}")
    for k in ("global_steps", "global_samples", "skipped_steps"):
        if info.get(k) is not None:
            integer(info[k], where, f"{field}.{k}")
    return info


def source(v: Any, where) -> dict:
    src = obj(v, where, "source")
    for k, lo in (("zero_stage", 0), ("tp", 1), ("dp", 1)):
        if k in src:
            integer(src[k], where, f"source.{k}", lo, 3 if k == "zero_stage" else None)
    if "bf16" in src:
        boolean(src["bf16"], where, "source.bf16")
    return src


def _optimizer_meta(v: Any, where, expected_format: str) -> dict:
    """What engine.json and optimizer.json share: an object of the expected format with optimizer info."""
    meta = obj(v, where, "the top level")
    string(meta.get("format"), where, "format", (expected_format,))
    optimizer_info(meta.get("optimizer"), where)
    return meta


def engine_json(v: Any, where, expected_format: str) -> dict:
    """engine.json of a sharded checkpoint (sharded.py)."""
    meta = _optimizer_meta(v, where, expected_format)
    if "layout" in meta:
        layout(meta["layout"], where)
    if "source" in meta:
        source(meta["source"], where)
    return meta


def optimizer_json(v: Any, where, expected_format: str) -> dict:
    """optimizer.json of a portable checkpoint (portable.py): its `source` is the layout it came from."""
    meta = _optimizer_meta(v, where, expected_format)
    if "source" in meta:
        layout(meta["source"], where, "source")
    return meta


def manifest(v: Any, where) -> dict:
    """manifest.json (integrity.py): every entry a relative file name inside the checkpoint with its size
    and checksums."""
    m = obj(v, where, "the top level")
    if "step" in m:
        integer(m["step"], where, "step")
    files = obj(m.get("files"), where, "files")
    for rel, info in files.items():
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or "\\" in rel:
            raise refuse(where, f"files[{show(rel)}]", "a file name inside the checkpoint")
        field = f"files[{show(rel)}]"
        info = obj(info, where, field)
        integer(info.get("bytes"), where, f"{field}.bytes")
        if "block_bytes" in info:
            integer(info["block_bytes"], where, f"{field}.block_bytes", 1)
        kinds = [k for k in (CRC32, SHA256) if k in info]
        if kinds:
            blocks = info[kinds[0]]
            if not isinstance(blocks, list) or not all(isinstance(b, str) for b in blocks):
                raise refuse(where, f"{field}.{kinds[0]}", "a list of hex digests", blocks)
        else:
            string(info.get("sha256"), where, f"{field}.sha256")
    return m


# ---------------------------------------------------------------- safetensors
class Header:
    """A safetensors file's header, validated: its tensors' dtype and shape, and its string metadata."""

    def __init__(self, path: Path, tensors: dict[str, tuple[str, list[int]]], metadata: dict[str, str]):
        self.path, self.tensors, self.metadata = path, tensors, metadata

    def shape(self, name: str) -> list[int]:
        return self.tensors[name][1]

    def meta_json(self, key: str) -> Any:
        """A metadata entry that holds JSON (ours: sharded.META_KEY), parsed with the same bounds."""
        if key not in self.metadata:
            raise refuse(self.path, f"header __metadata__.{key}", "our metadata entry (a JSON object)")
        return parse_json(self.metadata[key], f"{self.path} (header __metadata__.{key})")


def safetensors_header(path: str | Path) -> Header:
    """Parse and check a safetensors header (bounded length, JSON, dtypes, shapes, offsets inside the file,
    neither overlapping nor leaving gaps) before safetensors itself touches the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise RefusedFile(f"{path}: {size} bytes, expected a safetensors file (8-byte header length first)")
        n = struct.unpack("<Q", head)[0]
        if n > min(HEADER_LIMIT, size - 8):
            raise refuse(path, "header length", f"at most {min(HEADER_LIMIT, size - 8)} bytes (the file holds "
                                                f"{size})", n)
        header = parse_json(f.read(n), f"{path} (header)")
    header = obj(header, path, "header")
    data = size - 8 - n
    tensors, spans, metadata = {}, [], {}
    for name, entry in header.items():
        if name == "__metadata__":
            metadata = obj(entry, path, "header __metadata__")
            for k, x in metadata.items():
                string(x, path, f"header __metadata__.{show(k)}")
            continue
        field = f"tensor {show(name)}"
        entry = obj(entry, path, field)
        dtype = string(entry.get("dtype"), path, f"{field} dtype", tuple(SAFETENSORS_DTYPES))
        dims = shape(entry.get("shape"), path, f"{field} shape")
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                        for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data):
            raise refuse(path, f"{field} data_offsets", f"[begin, end] with 0 <= begin <= end <= {data} (the data "
                                                        "size)", offsets)
        nbytes = math.prod(dims) * SAFETENSORS_DTYPES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise refuse(path, f"{field} data_offsets", f"{nbytes} bytes for {dtype} {dims}", offsets)
        tensors[name] = (dtype, dims)
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise refuse(path, f"tensor {show(name)} data_offsets",
                         f"to begin at byte {end}, where the tensor before it ends (no overlap, no gap)", [begin, stop])
        end = stop
    if end != data:
        raise refuse(path, "tensor data", f"to end at byte {data}, the end of the file", end)
    return Header(path, tensors, metadata)
