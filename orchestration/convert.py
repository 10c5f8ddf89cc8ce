"""The authors' released checkpoint layout <-> our export (`vgpt convert`).

Why: to start from the released Video-GPT weights, and to run weights we
trained with the authors' own scripts. Their layout (LVM/model.py,
LVM/inference/*.py): a directory with `config.json` (a transformers
Phi3Config), tokenizer files, and class `LVM`'s state dict in
`model.safetensors` or `model.pt`, beside them or in `transformer/` (their
inference script's `--model_ckpt ckpt/transformer`).

What our model does not hold is carried in the export, so that an import
exported back is bitwise the source: the whole token table (we keep three of
its rows, `special_tokens`; the rest is text vocabulary) as the extra tensor
CARRIED_EMBED, which `load_export` ignores; and under the provenance key
`reference` (in the export's config.json, or the older single file's header):
config.json and the tokenizer files (binary ones in base64), the special-token
ids, each source tensor's dtype, the source's safetensors header.
The export is in the source's dtype when its stored tensors share one, else
float32 (exact for bf16 and fp16). `pos_embed` is recomputed, not stored;
import checks the file's. float64 sin/cos may differ by an ulp between libm
and SIMD builds of numpy, so a table within one unit of the file's dtype is
accepted and its differing values are carried as fixups.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from jobconfig.errors import ConfigError
from jobconfig.loader import CONFIG_ROOT, from_dict, model_presets
from jobconfig.model import ModelConfig
from pretrain.checkpoint.export import (
    ExportTensors,
    check_export_shape,
    export_exists,
    read_export_metadata,
    save_export,
    write_safetensors,
)
from pretrain.model.backbone import phi3_fields
from pretrain.model.videogpt import SPECIAL_TOKENS, VideoGPT, sincos_2d_table

FORMAT = "videogpt-reference-1"
EMBED, POS = "llm.embed_tokens.weight", "pos_embed"
CARRIED_EMBED = "reference/" + EMBED
WEIGHT_FILES = ("model.safetensors", "model.pt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt")
# what class LVM hard-codes (LVM.from_pretrained passes only the Phi3Config): a model with other values
# is not loadable by the authors' scripts, so it is refused both ways
FIXED = {"patch_size": 2, "latent_channels": 4, "pos_embed_max_size": 192, "pos_embed_base_size": 64,
         "time_freq_dim": 256, "partial_rotary_factor": 1.0}
# our state-dict prefix -> theirs
PREFIXES = (("noisy_embedder.", "x_embedder."), ("clean_embedder.", "input_x_embedder."),
            ("time_token.", "time_token."), ("final_time.", "t_embedder."), ("final_layer.", "final_layer."),
            ("backbone.", "llm."))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# config.json for a model that carries none: Phi-3-mini-4k's, as the authors' OmniGen-v1 base
PHI3_MINI = {"architectures": ["Phi3ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
             "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "max_position_embeddings": 4096,
             "model_type": "phi3", "original_max_position_embeddings": 4096, "pad_token_id": 32000,
             "resid_pdrop": 0.0, "rope_scaling": None, "tie_word_embeddings": False, "use_cache": True,
             "vocab_size": 32064, "transformers_version": "4.47.1"}  # the version their env scripts pin
MAX_FIXUPS = 100_000


def reference_name(ours: str) -> str:
    for mine, theirs in PREFIXES:
        if ours.startswith(mine):
            return theirs + ours[len(mine):]
    raise KeyError(f"{ours}: no counterpart in the reference layout (extend PREFIXES in {__name__})")


def model_tensors(cfg: ModelConfig) -> dict[str, tuple]:
    """Our state dict's names and shapes, from a model on `meta` (no memory even at 3.8B)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in VideoGPT(cfg).state_dict().items()}


def config_to_model(hf: dict, where: str) -> ModelConfig:
    """A Phi3Config (config.json) -> our ModelConfig (backbone.phi3_fields), with what class LVM fixes;
    what the authors' Phi-3 or ours cannot run is refused."""
    fields = phi3_fields(hf, where)
    partial = fields["partial_rotary_factor"]
    if partial != 1.0:  # the authors' transformers 4.47.1 has no partial rotary for Phi-3: ambiguous weights
        raise ConfigError(f"{where}: partial_rotary_factor={partial}, expected 1.0 (the authors' Phi-3)")
    cfg = ModelConfig(**{**fields, **FIXED})
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    cfg.preset = _preset_of(cfg)
    return cfg


def _preset_of(cfg: ModelConfig) -> str:
    """The configs/model preset of this shape, so an imported model reads as, e.g., phi3-mini."""
    for name in model_presets():
        keys = yaml.safe_load((CONFIG_ROOT / "model" / f"{name}.yaml").read_text()) or {}
        if all(getattr(cfg, k, None) == v for k, v in keys.items()):
            return name
    return "custom"


def check_reference_model(cfg: ModelConfig, where: str) -> None:
    for key, value in FIXED.items():
        if getattr(cfg, key) != value:
            raise ConfigError(f"{where}: model.{key}={getattr(cfg, key)}, but the reference class LVM is built "
                              f"with {key}={value}; the authors' scripts could not run this model")


def model_to_config(cfg: ModelConfig, vocab_size: int, dtype: torch.dtype) -> dict:
    return {**PHI3_MINI, "hidden_size": cfg.hidden_size, "initializer_range": cfg.init_std,
            "intermediate_size": cfg.mlp_size, "num_attention_heads": cfg.num_heads,
            "num_hidden_layers": cfg.num_layers, "num_key_value_heads": cfg.num_heads, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "sliding_window": None,  # Video-GPT attends over ~35k tokens
            "torch_dtype": str(dtype).removeprefix("torch."), "vocab_size": vocab_size}


# ---------------------------------------------------------------- files
def read_files(folder: Path, names) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}


def encode_files(files: dict[str, bytes]) -> dict[str, dict]:
    """JSON-able: UTF-8 text as is, binary files (tokenizer.model, sentencepiece) in base64."""
    def one(data):
        try:
            return {"text": data.decode("utf-8")}
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(data).decode("ascii")}
    return {name: one(data) for name, data in files.items()}


def decode_files(files: dict[str, dict]) -> dict[str, bytes]:
    return {n: v["text"].encode("utf-8") if "text" in v else base64.b64decode(v["base64"]) for n, v in files.items()}


def special_token_ids(files: dict[str, bytes], where: Path | str) -> dict[str, int]:
    """Ids of <|diffusion|>, <img>, </img>: tokenizer.json added_tokens, added_tokens.json, or
    tokenizer_config.json added_tokens_decoder (sources that disagree are refused)."""
    sources = {}
    for name in ("tokenizer.json", "added_tokens.json", "tokenizer_config.json"):
        if name not in files:
            continue
        try:
            doc = json.loads(files[name])
            if name == "tokenizer.json":
                pairs = [(t["content"], t["id"]) for t in doc.get("added_tokens") or []]
            elif name == "added_tokens.json":
                pairs = list(doc.items())
            else:
                pairs = [(t["content"], int(i)) for i, t in (doc.get("added_tokens_decoder") or {}).items()]
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ConfigError(f"{where}/{name}: unreadable ({type(e).__name__}: {e})") from None
        sources[name] = {content: i for content, i in pairs if content in SPECIAL_TOKENS}
        if not all(isinstance(i, int) for i in sources[name].values()):
            raise ConfigError(f"{where}/{name}: expected integer ids, got {sources[name]}")
    if not sources:
        raise ConfigError(f"{where}: no tokenizer (tokenizer.json, added_tokens.json or tokenizer_config.json); "
                          f"the ids of {', '.join(SPECIAL_TOKENS)} give their rows of {EMBED}")
    ids = {}
    for tok in SPECIAL_TOKENS:
        found = {name: got[tok] for name, got in sources.items() if tok in got}
        if not found:
            raise ConfigError(f"{where}: {tok!r} is not an added token of {' or '.join(sources)} "
                              f"(Video-GPT uses it as one row of {EMBED})")
        if len(set(found.values())) > 1:
            raise ConfigError(f"{where}: the files disagree on the id of {tok!r}: {found}")
        ids[tok] = next(iter(found.values()))
    if len(set(ids.values())) < len(ids):
        raise ConfigError(f"{where}: two special tokens share an id: {ids}")
    return ids


def find_weights(src: Path) -> Path:
    """transformer/ first (what their inference script loads as --model_ckpt), then the directory itself;
    in a directory, model.safetensors before model.pt (as LVM.from_pretrained)."""
    for folder in (src / "transformer", src):
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                return folder / name
    raise ConfigError(f"{src}: no {' or '.join(WEIGHT_FILES)} in it or in {src / 'transformer'}")


def open_weights(path: Path):
    """(name -> shape, a loader of all tensors, safetensors header or None), without loading a safetensors file."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                header = f.metadata()
        except Exception as e:  # noqa: BLE001 safetensors raises its own error types
            raise ConfigError(f"{path}: not a safetensors file ({e})") from None

        def load():
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        return shapes, load, header
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code runs
    except Exception as e:  # noqa: BLE001 any unpickling failure is bad input here
        raise ConfigError(f"{path}: not loadable with torch.load(weights_only=True) ({e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{path}: expected a flat state dict {{name: tensor}} (what LVM.load_state_dict takes)")
    # tensors saved as views of one storage would be refused by safetensors
    seen, flat = set(), {}
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr()
        flat[k] = v.clone() if ptr in seen or not v.is_contiguous() else v
        seen.add(ptr)
    return {k: tuple(v.shape) for k, v in flat.items()}, lambda: flat, None


def check_tensors(shapes: dict[str, tuple], expected: dict[str, tuple], where) -> None:
    missing, extra = [k for k in expected if k not in shapes], sorted(set(shapes) - set(expected))
    if missing:
        raise ConfigError(f"{where}: lacks tensor {missing[0]} (shape {expected[missing[0]]}; "
                          f"{len(missing)} missing in all)")
    if extra:
        raise ConfigError(f"{where}: unexpected tensor {extra[0]} (shape {shapes[extra[0]]}; {len(extra)} in all), "
                          "not part of the reference class LVM")
    for k, shape in expected.items():
        if shapes[k] != shape:
            raise ConfigError(f"{where}: tensor {k} has shape {shapes[k]}, expected {shape}")


def pos_table(cfg: ModelConfig) -> torch.Tensor:
    """The reference's `pos_embed` buffer [1, G*G, D], float32."""
    g = cfg.pos_embed_max_size
    return sincos_2d_table(cfg.hidden_size, g, cfg.pos_embed_base_size).reshape(1, g * g, cfg.hidden_size)


def pos_fixups(found: torch.Tensor, cfg: ModelConfig, where) -> list:
    """[[flat index, value], ...] where the file's pos_embed differs from ours by at most one unit of its
    dtype (sin/cos of another numpy build); anything larger is another table and refused."""
    ours = pos_table(cfg)
    if bitwise_equal(ours.to(found.dtype), found):
        return []
    worst = (found.float() - ours).abs().max().item()
    index = torch.nonzero(ours.to(found.dtype).reshape(-1) != found.reshape(-1)).view(-1)
    if not worst <= torch.finfo(found.dtype).eps or len(index) > MAX_FIXUPS:  # NaN fails too
        raise ConfigError(f"{where}: tensor {POS} is not the reference's 2D sin-cos table "
                          f"(get_2d_sincos_pos_embed(hidden_size, {cfg.pos_embed_max_size}, base_size="
                          f"{cfg.pos_embed_base_size})): {len(index)} values differ, by up to {worst:.3g}; "
                          "this model would run with another position code")
    return [[i, found.reshape(-1)[i].item()] for i in index.tolist()]


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.dtype.itemsize]
    return (a.dtype == b.dtype and a.shape == b.shape  # torch.equal alone takes -0.0 for 0.0
            and torch.equal(a.contiguous().view(-1).view(bits), b.contiguous().view(-1).view(bits)))


def export_dtype(dtypes: dict[str, torch.dtype], where) -> torch.dtype:
    """The source's dtype if all stored tensors (pos_embed is not) share one, else float32 (exact for all)."""
    for k, d in dtypes.items():
        if d not in DTYPES.values():
            raise ConfigError(f"{where}: tensor {k} is {d}, expected one of {', '.join(DTYPES)}")
    kinds = {d for k, d in dtypes.items() if k != POS}
    return kinds.pop() if len(kinds) == 1 else torch.float32


# ---------------------------------------------------------------- the two directions
def import_reference(src: str | Path, out: str | Path, tokenizer: str | Path | None = None) -> dict:
    """The authors' checkpoint directory -> our export at `out`; returns what was read, for the CLI."""
    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{cfg_path}: not found (expected the authors' checkpoint directory: config.json, "
                          "tokenizer files, model.safetensors or model.pt here or in transformer/)")
    raw_config = cfg_path.read_bytes()
    try:
        hf = json.loads(raw_config)
    except ValueError:
        hf = None
    if not isinstance(hf, dict):
        raise ConfigError(f"{cfg_path}: not a JSON object (expected a transformers Phi3Config)")
    cfg = config_to_model(hf, str(cfg_path))
    tok_dir = Path(tokenizer) if tokenizer is not None else src
    tok_files = read_files(tok_dir, TOKENIZER_FILES)
    ids = special_token_ids(tok_files, tok_dir)
    vocab, D, G = hf["vocab_size"], cfg.hidden_size, cfg.pos_embed_max_size
    for tok, i in ids.items():
        if not 0 <= i < vocab:
            raise ConfigError(f"{tok_dir}: {tok!r} has id {i}, outside {cfg_path.name} vocab_size={vocab}")

    path = find_weights(src)
    if Path(out).resolve() == path.resolve():
        raise ConfigError(f"{out}: is the source weights file; give another path for the export")
    shapes, load, header = open_weights(path)
    ours = model_tensors(cfg)
    expected = {reference_name(k): s for k, s in ours.items() if k != "special_tokens"}
    expected.update({EMBED: (vocab, D), POS: (1, G * G, D)})
    check_tensors(shapes, expected, path)
    tensors = load()
    dtypes = {k: v.dtype for k, v in tensors.items()}
    stored_dtype = export_dtype(dtypes, path)
    fixups = pos_fixups(tensors.pop(POS), cfg, path)
    embed = tensors.pop(EMBED)
    sd = {"special_tokens": embed[[ids[t] for t in SPECIAL_TOKENS]]}
    sd.update({k: tensors[reference_name(k)] for k in ours if k != "special_tokens"})
    sd[CARRIED_EMBED] = embed
    ref = {"format": FORMAT, "source": str(path), "token_ids": ids, "safetensors_metadata": header,
           "dtypes": {k: str(d).removeprefix("torch.") for k, d in dtypes.items()}, "pos_embed_fixups": fixups,
           "files": encode_files({"config.json": raw_config, **tok_files})}
    written = save_export(sd, out, cfg, dtype=stored_dtype, extra={"reference": ref})
    notes = []
    if path.suffix == ".pt":  # LVM_video_frameblock_autoregressive_inference.py: model.pt -> prediction_type "v"
        notes.append(f"{path.name}: the authors' inference script treats a model.pt checkpoint as v-prediction; "
                     "Video-GPT here predicts the clean frame (x1): use these weights only if they were trained so")
    if fixups:
        notes.append(f"{POS}: {len(fixups)} values differ from our table by one unit in the last place "
                     "(another build's sin/cos); carried, so the export back is bitwise the source")
    return {"out": written, "weights": path, "config": cfg, "token_ids": ids, "dtype": stored_dtype,
            "tokenizer_files": sorted(tok_files), "notes": notes}


def follow_init_from(export: Path, meta: dict, hops: int = 16) -> tuple[Path, dict | None]:
    """(the export, its reference data) of the nearest export up the `init_from` chain (a stage starts
    from the previous stage's export, the first from an import) that carries reference data."""
    path = export
    for _ in range(hops):
        if meta.get("reference") or not meta.get("init_from") or not export_exists(meta["init_from"]):
            break
        path = Path(meta["init_from"])
        meta = read_export_metadata(path)
    return path, meta.get("reference")


def export_reference(export: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None,
                     base: str | Path | None = None, dtype: torch.dtype | None = None) -> list[tuple[Path, str]]:
    """Our export -> the authors' layout in `out_dir` (flat: their `--model_name` and `--model_ckpt` both
    point at it); returns (file, what it holds) for the CLI.

    Carried data (config.json, token table, tokenizer, dtypes) comes from the export, or from `base`
    (an export `import_reference` wrote) for a model trained on from one, which carries none;
    `tokenizer` (a directory) replaces the carried tokenizer and its ids.
    """
    export, out_dir = Path(export), Path(out_dir)
    meta = read_export_metadata(export)
    cfg = from_dict(ModelConfig, meta["model_config"], "model")
    check_reference_model(cfg, str(export))
    carrier, ref = export, meta.get("reference")
    if ref is None and base is None and tokenizer is None:
        carrier, ref = follow_init_from(export, meta)
    if base is not None:
        carrier, base_meta = Path(base), read_export_metadata(base)
        check_export_shape(base_meta["model_config"], cfg, base)
        if not (ref := base_meta.get("reference")):
            raise ConfigError(f"--base {base}: carries no reference data (not written by `vgpt convert from-reference`)")
    if ref and ref.get("format") != FORMAT:
        raise ConfigError(f"{carrier}: reference data of format {ref.get('format')!r}, expected {FORMAT!r}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir}: exists and is not empty; give a new directory (the authors' scripts "
                          "would also read what is left there, e.g. a model.pt before model.safetensors)")

    carried = decode_files(ref["files"]) if ref else {}
    if tokenizer is not None:
        tok_files = read_files(Path(tokenizer), TOKENIZER_FILES)
        ids = special_token_ids(tok_files, tokenizer)
    elif ref:
        tok_files = {n: b for n, b in carried.items() if n != "config.json"}
        ids = ref["token_ids"]
    else:
        raise ConfigError(
            f"{export}: carries no tokenizer (not written by `vgpt convert from-reference`), and the authors' "
            "scripts need one: LVMProcessor loads it from the checkpoint directory (AutoTokenizer.from_pretrained), "
            f"and the ids of {', '.join(SPECIAL_TOKENS)} choose the rows of {EMBED}. Pass --tokenizer DIR (a "
            "directory with tokenizer.json, e.g. the released Video-GPT checkpoint), or --base IMPORTED "
            "(the export `vgpt convert from-reference` wrote, if this model was trained from it; found without "
            "--base when the exports' init_from chain leads to it on this machine)")

    ours = model_tensors(cfg)
    with ExportTensors(export) as f:
        names = set(f.keys())
        check_tensors({k: f.shape(k) for k in ours if k in names}, ours, export)
        sd = {k: f.get(k) for k in ours}
    table = None
    if ref:
        with ExportTensors(carrier) as f:
            if CARRIED_EMBED not in set(f.keys()):
                raise ConfigError(f"{carrier}: lacks tensor {CARRIED_EMBED} (its header says it was imported)")
            table = f.get(CARRIED_EMBED).clone()
    weights_dtype = dtype or sd["special_tokens"].dtype

    if "config.json" in carried:
        config_bytes = carried["config.json"]
        theirs = config_to_model(json.loads(config_bytes), f"{carrier} (its carried config.json)")
        for key in ("hidden_size", "num_layers", "num_heads", "mlp_size", "rope_theta", "norm_eps"):
            if getattr(theirs, key) != getattr(cfg, key):
                raise ConfigError(f"{export}: model.{key}={getattr(cfg, key)}, but the carried config.json of "
                                  f"{carrier} gives {getattr(theirs, key)}")
        vocab = json.loads(config_bytes)["vocab_size"]
    else:
        vocab = max(PHI3_MINI["vocab_size"], max(ids.values()) + 1)
        config_bytes = (json.dumps(model_to_config(cfg, vocab, weights_dtype), indent=2) + "\n").encode()
    if table is None:  # rows Video-GPT never reads: initialised as transformers does (normal, padding row zero)
        table = torch.randn(vocab, cfg.hidden_size, generator=torch.Generator().manual_seed(0)) * cfg.init_std
        table[PHI3_MINI["pad_token_id"]] = 0.0
        table = table.to(weights_dtype)
    if tuple(table.shape) != (vocab, cfg.hidden_size):
        raise ConfigError(f"{carrier}: tensor {CARRIED_EMBED} has shape {tuple(table.shape)}, expected "
                          f"{(vocab, cfg.hidden_size)} (config.json vocab_size, hidden_size)")
    for tok, i in ids.items():
        if not 0 <= i < vocab:
            raise ConfigError(f"{tokenizer or carrier}: {tok!r} has id {i}, outside the token table's {vocab} rows")
    table[[ids[t] for t in SPECIAL_TOKENS]] = sd["special_tokens"].to(table.dtype)

    tensors = {reference_name(k): v for k, v in sd.items() if k != "special_tokens"}
    tensors[EMBED] = table
    tensors[POS] = pos_table(cfg)
    if dtype is not None:
        target = {k: dtype for k in tensors}
    elif ref:
        target = {k: DTYPES[ref["dtypes"][k]] for k in tensors}
    else:
        target = {**{k: v.dtype for k, v in tensors.items()}, POS: weights_dtype}
    final = {k: v.to(target[k]).contiguous() for k, v in tensors.items()}
    for i, value in (ref or {}).get("pos_embed_fixups", []):
        final[POS].view(-1)[i] = value

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model.safetensors"
    write_safetensors(final, weights, metadata=(ref or {}).get("safetensors_metadata") or {"format": "pt"})
    (out_dir / "config.json").write_bytes(config_bytes)
    for name, data in tok_files.items():
        (out_dir / name).write_bytes(data)
    kinds = "/".join(sorted({str(t.dtype).removeprefix("torch.") for t in final.values()}))
    rows = ", ".join(f"{t}={ids[t]}" for t in SPECIAL_TOKENS)
    return [(weights, f"{len(final)} tensors ({kinds}); special_tokens at rows {rows} of {EMBED}"
             + ("" if ref else f", its other rows fresh normal({cfg.init_std}), never read")),
            (out_dir / "config.json", "carried" if ref else "generated: Phi-3-mini defaults, this model's shape"),
            *[(out_dir / n, f"tokenizer, from {tokenizer or carrier}") for n in sorted(tok_files)]]
