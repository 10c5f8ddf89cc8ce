"""The deterministic plan of a precompute job: which input goes to which shard, generation by generation.

Inputs (a directory, a glob, or a list file of URIs; local or any fsspec URL)
are listed and de-duplicated. An output root grows in *generations*: the
first job plans every input; a later job over a superset plans only the
inputs no earlier generation planned (by input key), sorted, cut into
consecutive runs of `videos_per_shard`, and numbered after the existing
shards, so shard names keep their order (old shards first) and committed
shards are never touched. `plan.json` records, per generation, its inputs'
hash, their number and its shard range; each generation's inputs, in plan
order, are in `plan/generation-NNNNNN.tsv` (`key<TAB>uri` per line), written
before its first shard, so a resumed job rebuilds the same shards and redoes
only the uncommitted ones, and a rerun with nothing new plans nothing.

Rules: changed dataset settings (VAE, frames, resolution, shard sizing:
`settings_hash`, the config hash without the input listing, which may move,
e.g. to a longer list file) are refused; write to a new root. An input planned earlier that
the listing no longer has keeps its shard (append-only: nothing is deleted);
the job logs how many disappeared. A `plan.json` of before generations
(format 1) is adopted as generation 1 by a job whose inputs reproduce its
plan hash exactly; anything else is refused with what to do.

Memory (1M inputs): the listing is held once (a set, then one sorted list of
the same strings); earlier generations are read back as 16-byte key digests
(a sorted numpy array), never as a second list of strings.

Sample keys are stable ids derived from the source URI: a sanitized file stem
(readable) plus a short hash of the full URI (unique), with no dots
(WebDataset splits keys at the first dot). A video cut into several segments
(data/video.py, `segment_bounds`) gives one sample per segment, keyed
`<key>-s0000`, `<key>-s0001`, ...; a plain key never ends that way (it ends in
a hex hash), so `source_key` maps any sample key back to its input.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath

import numpy as np

from data.shard_format import check_key, get_fs, shard_stem
from jobconfig.errors import ConfigError
from jobconfig.precompute import InputsConfig, PrecomputeConfig

PLAN_FILE = "plan.json"
PLAN_FORMAT = 2
GENERATIONS_DIR = "plan"


class PlanError(ConfigError):
    """The inputs cannot be planned, or the output root belongs to another plan (bad input)."""


@dataclass(frozen=True)
class ShardPlan:
    index: int
    stem: str  # e.g. train-000003
    items: tuple[tuple[str, str], ...]  # (key, uri) in plan order


def make_key(uri: str) -> str:
    stem = PurePosixPath(uri.rstrip("/")).stem  # dots inside the name become '_' below
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:48] or "video"
    return check_key(f"{stem}-{hashlib.sha1(uri.encode()).hexdigest()[:10]}")


_SEGMENT = re.compile(r"-s\d{4,}$")


def segment_key(key: str, segment: int, num_segments: int) -> str:
    """The sample key of one segment: the input's key itself when the video is a single sample."""
    return key if num_segments == 1 else check_key(f"{key}-s{segment:04d}")


def source_key(sample_key: str) -> str:
    """The input key a sample came from (inverse of `segment_key`)."""
    return _SEGMENT.sub("", sample_key)


def _uri(fs, path: str) -> str:
    # Local files stay plain absolute paths; remote ones keep their protocol.
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


def list_inputs(cfg: InputsConfig) -> list[str]:
    """Sorted, de-duplicated input URIs. A list file is read line by line and an S3 directory page by
    page: only the set of URIs is ever held, then the sorted list of the same strings."""
    exts = {e.lower().lstrip(".") for e in cfg.extensions}
    if cfg.list_file:
        fs, path = get_fs(cfg.list_file, cfg.storage_options)
        if not fs.exists(path):
            raise PlanError(f"precompute.inputs.list_file: {cfg.list_file!r} does not exist")
        uris: set[str] = set()
        with fs.open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                line = raw.strip()
                if line and not line.startswith(b"#"):
                    try:
                        uris.add(line.decode())
                    except UnicodeDecodeError:
                        raise PlanError(f"precompute.inputs.list_file: {cfg.list_file!r} line {n}: not UTF-8 "
                                        "(expected one URI per line)") from None
                    if b"\t" in line:  # the generation files are key<TAB>uri
                        raise PlanError(f"precompute.inputs.list_file: {cfg.list_file!r} line {n}: a tab in "
                                        "a URI (expected one URI per line)")
    else:
        where = cfg.dir or cfg.glob
        fs, path = get_fs(where, cfg.storage_options)
        def wanted(p: str) -> bool:
            return PurePosixPath(p).suffix.lower().lstrip(".") in exts and not PurePosixPath(p).name.startswith(".")

        if cfg.dir:
            if not fs.isdir(path):
                raise PlanError(f"precompute.inputs.dir: {cfg.dir!r} is not a directory")
            if hasattr(fs, "_iterdir"):  # s3fs: page by page, only the kept names held
                uris = _s3_listing(fs, path, wanted)
            else:
                uris = {_uri(fs, p) for p in fs.find(path) if wanted(p)}
        else:
            uris = {_uri(fs, p) for p in fs.glob(path) if wanted(p)}
    return sorted(uris)


def _s3_listing(fs, path: str, wanted) -> set[str]:
    """Every object under `path`, read one page (1000 keys) at a time: s3fs's `find` would hold every
    object's info dict of a 1M-object prefix at once. (`_iterdir` is s3fs's own paginated iterator.)"""
    import fsspec.asyn

    bucket, key, _ = fs.split_path(path)

    async def collect() -> set[str]:
        out = set()
        async for info in fs._iterdir(bucket, delimiter="", prefix=f"{key.rstrip('/')}/" if key else ""):
            if info["type"] == "file" and wanted(info["name"]):
                out.add(_uri(fs, info["name"]))
        return out
    return fsspec.asyn.sync(fs.loop, collect)


def _cut(keyed: list[tuple[str, str]], shard_name: str, videos_per_shard: int, first: int) -> list[ShardPlan]:
    return [ShardPlan(first + i, shard_stem(shard_name, first + i), tuple(keyed[s:s + videos_per_shard]))
            for i, s in enumerate(range(0, len(keyed), videos_per_shard))]


def _keyed(uris: list[str]) -> list[tuple[str, str]]:
    keyed = [(make_key(u), u) for u in uris]
    if len({k for k, _ in keyed}) != len(keyed):
        seen: dict[str, str] = {}
        for key, uri in keyed:
            if key in seen:
                raise PlanError(f"inputs {seen[key]!r} and {uri!r} map to the same key {key!r}")
            seen[key] = uri
    return keyed


def build_plan(uris: list[str], shard_name: str, videos_per_shard: int) -> list[ShardPlan]:
    """Shards of one generation over `uris` (sorted), numbered from 0."""
    return _cut(_keyed(uris), shard_name, videos_per_shard, 0)


def config_hash(cfg: PrecomputeConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.dataset_dict(), sort_keys=True).encode()).hexdigest()[:16]


def settings_dict(cfg: PrecomputeConfig) -> dict:
    """What every generation of a root must share: the dataset settings without the input listing
    (which inputs there are is what the generations record; a later job may list them elsewhere)."""
    d = cfg.dataset_dict()
    d.pop("inputs")
    return d


def settings_hash(cfg: PrecomputeConfig) -> str:
    return hashlib.sha256(json.dumps(settings_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def plan_hash(plan: list[ShardPlan], cfg_hash: str) -> str:
    """The hash of a one-generation plan (format 1 plan.json, and every index before generations)."""
    body = json.dumps([[s.stem, [list(i) for i in s.items]] for s in plan] + [cfg_hash])
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _digests(keys) -> np.ndarray:
    """16-byte digests of keys (str or bytes), one array: 16 bytes per input, not a Python object each."""
    buf = bytearray()
    for k in keys:
        buf += hashlib.blake2b(k.encode() if isinstance(k, str) else k, digest_size=16).digest()
    return np.frombuffer(bytes(buf), dtype="S16")


def _tsv_chunks(items, lines: int = 65536):
    """A generation file's bytes, in chunks (1M inputs are ~70 MB: never built whole)."""
    for i in range(0, len(items), lines):
        yield "".join(f"{k}\t{u}\n" for k, u in items[i:i + lines]).encode()


def _tsv_hash(items) -> str:
    h = hashlib.sha256()
    for chunk in _tsv_chunks(items):
        h.update(chunk)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Generation:
    """One job's addition to the root: its `num_inputs` new inputs (its file, in plan order) -> shards
    [first_shard, first_shard + num_shards)."""
    generation: int
    inputs_hash: str  # sha256[:16] of its generation file
    num_inputs: int
    first_shard: int
    num_shards: int
    num_listed: int  # inputs the job that planned it listed (earlier ones included)

    @property
    def file(self) -> str:
        return f"{GENERATIONS_DIR}/generation-{self.generation:06d}.tsv"

    @property
    def shard_range(self) -> range:
        return range(self.first_shard, self.first_shard + self.num_shards)


@dataclass
class GrowthPlan:
    """The root's generations (the recorded ones, then this job's new one if it adds any)."""
    config_hash: str  # settings_hash: the same for every generation
    config: dict  # settings_dict
    shard_name: str
    videos_per_shard: int
    generations: list[Generation]
    new: list[ShardPlan] = field(default_factory=list)  # the shards of this job's new generation
    num_listed: int = 0
    num_gone: int = 0  # inputs planned earlier that the listing no longer has: their shards stay
    record: bool = False  # plan.json must be (re)written: a new generation, or a format-1 file adopted
    new_items: list[tuple[str, str]] = field(default_factory=list, repr=False)

    @property
    def num_shards(self) -> int:
        return sum(g.num_shards for g in self.generations)

    @property
    def num_inputs(self) -> int:
        return sum(g.num_inputs for g in self.generations)

    @property
    def stems(self) -> list[str]:
        return [shard_stem(self.shard_name, i) for i in range(self.num_shards)]

    @property
    def plan_hash(self) -> str:
        """Names the whole plan (settings and every generation's inputs); recorded in the index."""
        body = json.dumps([self.config_hash] + [g.inputs_hash for g in self.generations])
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, "plan_hash": self.plan_hash, "config_hash": self.config_hash,
                           "num_inputs": self.num_inputs, "num_shards": self.num_shards, "config": self.config,
                           "generations": [{**asdict(g), "file": g.file} for g in self.generations]},
                          sort_keys=True, indent=1)


def _read_plan_json(fs, path: str) -> dict | None:
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    if not fs.exists(path):
        return None
    try:
        return json.loads(fs.cat_file(path))
    except ValueError as e:
        raise PlanError(f"{path}: unreadable plan ({e}); it was written by this job: restore it or write to a new "
                        "precompute.output.root") from None


def _generation_lines(fs, root: str, g: Generation):
    """(key bytes, uri bytes) of a recorded generation, in plan order; its hash checked at the end."""
    path, h, n = f"{root}/{g.file}", hashlib.sha256(), 0
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise PlanError(f"{path}: missing; plan.json records generation {g.generation} "
                        f"({g.num_inputs} inputs) there") from None
    with f:
        for line in f:
            h.update(line)
            n += 1
            key, _, uri = line.rstrip(b"\n").partition(b"\t")
            yield key, uri
    if n != g.num_inputs or h.hexdigest()[:16] != g.inputs_hash:
        raise PlanError(f"{path}: {n} inputs hashing to {h.hexdigest()[:16]}, but plan.json records "
                        f"{g.num_inputs} hashing to {g.inputs_hash}: the file was changed")


def generation_shards(fs, root: str, plan: GrowthPlan, g: Generation) -> list[ShardPlan]:
    """The shards of a recorded generation, rebuilt from its file (to finish an interrupted one)."""
    items = [(k.decode(), u.decode()) for k, u in _generation_lines(fs, root, g)]
    return _cut(items, plan.shard_name, plan.videos_per_shard, g.first_shard)


def plan_growth(fs, root: str, uris: list[str], cfg: PrecomputeConfig) -> GrowthPlan:
    """The root's plan with this job's inputs: the recorded generations, plus a new one of the inputs
    none of them planned (by key). Reads plan.json and the generation files; writes nothing."""
    chash, path = settings_hash(cfg), f"{root}/{PLAN_FILE}"
    plan = GrowthPlan(chash, settings_dict(cfg), cfg.output.shard_name, cfg.output.videos_per_shard, [],
                      num_listed=len(uris))
    old = _read_plan_json(fs, path)
    if old is not None and old.get("format", 1) == 1:
        return _adopt(plan, uris, old, path, config_hash(cfg))
    if old is not None:
        if old.get("config_hash") != chash:
            one_draw = (isinstance(old.get("config"), dict) and "latents" not in old["config"]
                        and cfg.latents != "sample")
            raise PlanError(
                f"{path}: this output root holds plan {old.get('plan_hash')} ({old.get('num_inputs')} inputs, "
                f"config {old.get('config_hash')}), but this job's dataset settings hash to config {chash}: "
                "the inputs or the dataset settings changed; write to a new precompute.output.root"
                + ("; the root holds one posterior draw per frame (written before precompute.latents, or with "
                   "`sample`): grow it with --precompute.latents=sample" if one_draw else ""))
        try:
            plan.generations = [Generation(**{k: v for k, v in g.items() if k != "file"})
                                for g in old["generations"]]
        except (KeyError, TypeError) as e:
            raise PlanError(f"{path}: bad generations list ({e})") from None
    earlier = np.empty(0, dtype="S16")
    if plan.generations:
        earlier = np.sort(_digests(k for g in plan.generations for k, _ in _generation_lines(fs, root, g)))
    keyed = _keyed(uris)
    listed = _digests(k for k, _ in keyed)
    if len(earlier):
        at = np.minimum(np.searchsorted(earlier, listed), len(earlier) - 1)
        known = earlier[at] == listed
    else:
        known = np.zeros(len(keyed), dtype=bool)
    plan.num_gone = len(earlier) - int(known.sum())
    new = keyed if not known.any() else [keyed[i] for i in np.flatnonzero(~known).tolist()]
    del keyed
    bad = next((u for _, u in new if "\t" in u or "\n" in u), None)
    if bad is not None:  # a generation file holds key<TAB>uri lines
        raise PlanError(f"precompute.inputs: input {bad!r} has a tab or a line break in its name; rename it")
    if new:
        first = plan.num_shards
        plan.new = _cut(new, plan.shard_name, plan.videos_per_shard, first)
        plan.new_items = new
        plan.generations.append(Generation(len(plan.generations) + 1, _tsv_hash(new),
                                           len(new), first, len(plan.new), len(uris)))
        plan.record = True
    return plan


def _adopt(plan: GrowthPlan, uris: list[str], old: dict, path: str, chash: str) -> GrowthPlan:
    """A plan.json of before generations becomes generation 1 when these inputs give its plan hash."""
    shards = build_plan(uris, plan.shard_name, plan.videos_per_shard)
    one = plan_hash(shards, chash)
    if old.get("plan_hash") != one:
        raise PlanError(
            f"{path}: this output root holds plan {old.get('plan_hash')} ({old.get('num_inputs')} inputs, "
            f"config {old.get('config_hash')}), but this job plans {one} ({len(uris)} inputs, config "
            f"{chash}): the inputs or the dataset settings changed; write to a new "
            "precompute.output.root. (The plan predates dataset growth: to add inputs to it, run the job once "
            "with exactly its original inputs, which records them as generation 1, then with the new ones.)")
    items = [i for s in shards for i in s.items]
    plan.generations = [Generation(1, _tsv_hash(items), len(items), 0, len(shards),
                                   len(uris))]
    plan.new, plan.new_items, plan.record = shards, items, True
    return plan


def record_generation(fs, root: str, plan: GrowthPlan) -> None:
    """Pin the plan before any shard of its new generation is written: the generation file, then
    plan.json (replaced whole: a reader sees the old plan or the new one)."""
    if not plan.record:
        return
    fs.makedirs(f"{root}/{GENERATIONS_DIR}", exist_ok=True)
    g = plan.generations[-1]
    with fs.open(f"{root}/{g.file}", "wb") as f:  # complete before plan.json names it
        for chunk in _tsv_chunks(plan.new_items):
            f.write(chunk)
    tmp = f"{root}/{PLAN_FILE}.tmp"
    fs.pipe_file(tmp, plan.to_json().encode())
    fs.mv(tmp, f"{root}/{PLAN_FILE}")
    plan.record = False
