"""`vgpt convert`: the authors' checkpoint layout <-> our export.

The tiny reference checkpoint is built here from the reference class's own
definition (LVM/model.py and the transformers Phi-3 names: every tensor name
and shape, and the pos_embed formula restated), never from our model's code,
so a wrong mapping in orchestration/convert.py cannot agree with itself.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from jobconfig.errors import ConfigError
from jobconfig.model import ModelConfig
from orchestration.cli import main as vgpt
from orchestration.convert import export_reference, import_reference
from pretrain.checkpoint.export import load_exported_model, read_export_metadata, save_export
from pretrain.model.videogpt import build_model

D, LAYERS, HEADS, MLP, VOCAB, C, P = 64, 2, 4, 172, 40, 4, 2
IDS = {"<|diffusion|>": 38, "<img>": 36, "</img>": 37}  # out of order on purpose
PHI3 = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": D, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "intermediate_size": MLP, "vocab_size": VOCAB,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
        "max_position_embeddings": 4096, "sliding_window": 2047, "torch_dtype": "bfloat16"}
SENTENCEPIECE = bytes(range(256))  # a binary tokenizer.model: must survive the trip byte for byte


def reference_pos_embed(dim: int, grid: int = 192, base: int = 64) -> torch.Tensor:
    """LVM's pos_embed buffer: coordinates i / (grid / base) in float32, w grid first; each half of the
    channels is [sin | cos] of one coordinate times 1e4^(-k / (dim/4)); [1, grid*grid, dim] float32."""
    coord = np.arange(grid, dtype=np.float32) / (grid / base)
    along_w, along_h = np.meshgrid(coord, coord)

    def axis(pos, d):
        freq = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        angle = np.outer(pos.reshape(-1), freq)
        return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)

    table = np.concatenate([axis(along_w, dim // 2), axis(along_h, dim // 2)], axis=1)
    return torch.from_numpy(table).float()[None]


def reference_state(dtype=torch.float32, pos_dtype=None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.05).to(dtype)

    sd = {"pos_embed": reference_pos_embed(D).to(pos_dtype or dtype), "llm.embed_tokens.weight": rand(VOCAB, D),
          "llm.norm.weight": rand(D), "final_layer.adaLN_modulation.1.weight": rand(2 * D, D),
          "final_layer.adaLN_modulation.1.bias": rand(2 * D), "final_layer.linear.weight": rand(P * P * C, D),
          "final_layer.linear.bias": rand(P * P * C)}
    for conv in ("x_embedder", "input_x_embedder"):
        sd.update({f"{conv}.proj.weight": rand(D, C, P, P), f"{conv}.proj.bias": rand(D)})
    for emb in ("time_token", "t_embedder"):
        sd.update({f"{emb}.mlp.0.weight": rand(D, 256), f"{emb}.mlp.0.bias": rand(D),
                   f"{emb}.mlp.2.weight": rand(D, D), f"{emb}.mlp.2.bias": rand(D)})
    for i in range(LAYERS):
        sd.update({f"llm.layers.{i}.self_attn.qkv_proj.weight": rand(3 * D, D),
                   f"llm.layers.{i}.self_attn.o_proj.weight": rand(D, D),
                   f"llm.layers.{i}.mlp.gate_up_proj.weight": rand(2 * MLP, D),
                   f"llm.layers.{i}.mlp.down_proj.weight": rand(D, MLP),
                   f"llm.layers.{i}.input_layernorm.weight": rand(D),
                   f"llm.layers.{i}.post_attention_layernorm.weight": rand(D)})
    return sd


def write_tokenizer(folder, ids=IDS):
    folder.mkdir(parents=True, exist_ok=True)
    added = [{"id": 0, "content": "<unk>", "special": True}] + [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True} for t, i in ids.items()]
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": added,
                                                       "model": {"type": "BPE", "vocab": {"a": 1}}}, indent=2))
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 4096}\n')
    (folder / "tokenizer.model").write_bytes(SENTENCEPIECE)


def write_reference(folder, sd=None, config=None, weights="model.safetensors"):
    """The directory the authors' scripts read; `weights` may sit in transformer/ (their --model_ckpt)."""
    sd = reference_state() if sd is None else sd
    write_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(config or PHI3, indent=2))
    path = folder / weights
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pt":
        torch.save(sd, path)
    else:
        save_file(sd, str(path), metadata={"format": "pt"})
    return folder


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(ints[a.dtype.itemsize]), b.reshape(-1).view(ints[b.dtype.itemsize])))


def assert_same_checkpoint(got_dir, sd):
    got = load_file(str(got_dir / "model.safetensors"))
    assert sorted(got) == sorted(sd)
    differing = [k for k in sd if not same_bits(got[k], sd[k])]
    assert not differing, differing


@pytest.mark.parametrize("dtype,pos_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                             (torch.bfloat16, torch.float32)])
def test_import_then_export_reproduces_the_source_bitwise(tmp_path, dtype, pos_dtype):
    sd = reference_state(dtype, pos_dtype)
    if pos_dtype:  # mixed: norms kept in float32 too, as some mixed-precision savers do
        sd.update({k: v.float() for k, v in sd.items() if "norm" in k})
    src = write_reference(tmp_path / "ckpt", sd)
    import_reference(src, tmp_path / "import.safetensors")
    written = export_reference(tmp_path / "import.safetensors", tmp_path / "back")
    assert {p.name for p, _ in written} == {"model.safetensors", "config.json", "tokenizer.json",
                                            "tokenizer_config.json", "tokenizer.model"}
    assert_same_checkpoint(tmp_path / "back", sd)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "model.safetensors"):
        assert (tmp_path / "back" / name).read_bytes() == (src / name).read_bytes(), name
    # a uniform source is stored in its own dtype; a mixed one in float32, which holds both exactly
    stored = load_file(str(tmp_path / "import.safetensors"))
    assert stored["special_tokens"].dtype == (torch.float32 if pos_dtype else dtype)


def test_imported_weights_sit_under_our_names(tmp_path):
    sd = reference_state()
    import_reference(write_reference(tmp_path / "ckpt", sd), tmp_path / "import.safetensors")
    ours = load_file(str(tmp_path / "import.safetensors"))
    for j, tok in enumerate(("<|diffusion|>", "<img>", "</img>")):
        assert same_bits(ours["special_tokens"][j], sd["llm.embed_tokens.weight"][IDS[tok]]), tok
    pairs = {"noisy_embedder.proj.weight": "x_embedder.proj.weight",
             "clean_embedder.proj.bias": "input_x_embedder.proj.bias",
             "time_token.mlp.2.weight": "time_token.mlp.2.weight", "final_time.mlp.0.weight": "t_embedder.mlp.0.weight",
             "backbone.layers.1.self_attn.qkv_proj.weight": "llm.layers.1.self_attn.qkv_proj.weight",
             "backbone.norm.weight": "llm.norm.weight"}
    for mine, theirs in pairs.items():
        assert same_bits(ours[mine], sd[theirs]), mine
    header = read_export_metadata(tmp_path / "import.safetensors")
    assert header["model_config"]["hidden_size"] == D and header["reference"]["token_ids"] == IDS


def test_import_loads_as_a_model_and_runs(tmp_path):
    import_reference(write_reference(tmp_path / "ckpt"), tmp_path / "import.safetensors")
    model = load_exported_model(tmp_path / "import.safetensors")
    assert model.cfg.num_layers == LAYERS and model.cfg.mlp_size == MLP
    x = torch.randn(1, 6, C, 4, 4)
    with torch.no_grad():
        out = model(x, x, torch.rand(1, 6), model.sequence([[[2, 1, 2, 1]]], (4, 4)))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("change,named", [
    (lambda sd: sd.pop("llm.layers.1.mlp.down_proj.weight"), "llm.layers.1.mlp.down_proj.weight"),
    (lambda sd: sd.update({"input_final_layer.weight": torch.zeros(16, D)}), "input_final_layer.weight"),
    (lambda sd: sd.update({"final_layer.linear.weight": torch.zeros(15, D)}), "final_layer.linear.weight"),
    (lambda sd: sd.update({"x_embedder.proj.weight": torch.zeros(D, 16, 1, 1)}), "x_embedder.proj.weight"),
    (lambda sd: sd.update({"pos_embed": reference_pos_embed(D, base=1)}), "pos_embed"),
    (lambda sd: sd.update({"llm.norm.weight": torch.zeros(D, dtype=torch.float64)}), "llm.norm.weight"),
])
def test_bad_tensors_are_refused_by_name(tmp_path, change, named):
    sd = reference_state()
    change(sd)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        import_reference(write_reference(tmp_path / "ckpt", sd), tmp_path / "import.safetensors")
    assert not (tmp_path / "import.safetensors").exists()


@pytest.mark.parametrize("key,value", [("rope_scaling", {"type": "longrope", "short_factor": [1.0]}),
                                       ("num_key_value_heads", 2), ("hidden_act", "gelu"),
                                       ("partial_rotary_factor", 0.5), ("attention_bias", True)])
def test_unsupported_backbone_configs_are_refused_by_key(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key):
        import_reference(write_reference(tmp_path / "ckpt", config={**PHI3, key: value}), tmp_path / "x.safetensors")


def test_model_pt_in_transformer_subdirectory(tmp_path):
    sd = reference_state(torch.bfloat16)
    src = write_reference(tmp_path / "ckpt", sd, weights="transformer/model.pt")
    got = import_reference(src, tmp_path / "import.safetensors")
    assert got["weights"] == src / "transformer" / "model.pt" and "v-prediction" in got["notes"][0]
    export_reference(tmp_path / "import.safetensors", tmp_path / "back")
    assert_same_checkpoint(tmp_path / "back", sd)


def test_a_pos_embed_one_ulp_off_is_accepted_and_carried(tmp_path):
    sd = reference_state()
    flat = sd["pos_embed"].view(-1)
    flat[[5, 70001]] = torch.nextafter(flat[[5, 70001]], torch.tensor(2.0))  # another numpy build's sin/cos
    got = import_reference(write_reference(tmp_path / "ckpt", sd), tmp_path / "import.safetensors")
    assert "2 values" in got["notes"][0]
    export_reference(tmp_path / "import.safetensors", tmp_path / "back")
    assert_same_checkpoint(tmp_path / "back", sd)


def test_special_token_ids_come_from_the_tokenizer(tmp_path):
    src = write_reference(tmp_path / "ckpt")
    write_tokenizer(src, {"<|diffusion|>": 38, "<img>": 36})
    with pytest.raises(ConfigError, match=r"tokenizer\.json.*'</img>'|'</img>'.*tokenizer\.json"):
        import_reference(src, tmp_path / "x.safetensors")
    (src / "tokenizer.json").unlink()
    (src / "added_tokens.json").write_text(json.dumps({"<|diffusion|>": 39, "<img>": 36, "</img>": 37}))
    import_reference(src, tmp_path / "x.safetensors")
    embed = reference_state()["llm.embed_tokens.weight"]
    assert same_bits(load_file(str(tmp_path / "x.safetensors"))["special_tokens"][0], embed[39])


def test_export_of_a_trained_model_needs_a_tokenizer_then_round_trips(tmp_path, capsys):
    cfg = ModelConfig()
    model = build_model(cfg, seed=1)
    save_export(model.state_dict(), tmp_path / "trained.safetensors", cfg, extra={"stage": "stage1"})
    rc = vgpt(["convert", "to-reference", str(tmp_path / "trained.safetensors"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("vgpt convert: ") and "--tokenizer DIR" in err
    write_tokenizer(tmp_path / "tok")
    assert vgpt(["convert", "to-reference", str(tmp_path / "trained.safetensors"), str(tmp_path / "out"),
                 "--tokenizer", str(tmp_path / "tok")]) == 0
    assert "special_tokens at rows <|diffusion|>=38, <img>=36, </img>=37" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (D, LAYERS, 32064)
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert same_bits(written["pos_embed"], reference_pos_embed(D))
    for j, tok in enumerate(("<|diffusion|>", "<img>", "</img>")):
        assert same_bits(written["llm.embed_tokens.weight"][IDS[tok]], model.special_tokens.detach()[j])
    # and what it wrote imports back to the same weights
    import_reference(tmp_path / "out", tmp_path / "again.safetensors")
    again, before = load_file(str(tmp_path / "again.safetensors")), model.state_dict()
    assert all(same_bits(again[k], before[k]) for k in before)
    assert vgpt(["convert", "to-reference", str(tmp_path / "trained.safetensors"), str(tmp_path / "out"),
                 "--tokenizer", str(tmp_path / "tok")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_export_after_training_takes_the_carried_data_from_base(tmp_path):
    sd = reference_state(torch.bfloat16)
    import_reference(write_reference(tmp_path / "ckpt", sd), tmp_path / "import.safetensors")
    model = load_exported_model(tmp_path / "import.safetensors")
    with torch.no_grad():
        model.special_tokens.add_(1.0)  # "trained"
    save_export(model.state_dict(), tmp_path / "trained.safetensors", model.cfg, dtype=torch.bfloat16)
    export_reference(tmp_path / "trained.safetensors", tmp_path / "back", base=tmp_path / "import.safetensors")
    got = load_file(str(tmp_path / "back" / "model.safetensors"))
    rows = list(IDS.values())
    others = [i for i in range(VOCAB) if i not in rows]
    assert same_bits(got["llm.embed_tokens.weight"][others], sd["llm.embed_tokens.weight"][others])
    assert not torch.equal(got["llm.embed_tokens.weight"][rows], sd["llm.embed_tokens.weight"][rows])
    assert same_bits(got["llm.norm.weight"], sd["llm.norm.weight"])


def test_export_of_a_curriculum_from_an_import_finds_the_carried_data_by_init_from(tmp_path):
    """Stage exports record init_from; to-reference walks it back to the import without --base.
    Export directories (what stages write) throughout."""
    sd = reference_state(torch.bfloat16)
    import_reference(write_reference(tmp_path / "ckpt", sd), tmp_path / "import")
    model = load_exported_model(tmp_path / "import")
    parent = tmp_path / "import"
    for stage in ("stage1", "stage2"):  # each stage starts from the previous one's export
        with torch.no_grad():
            model.special_tokens.add_(1.0)
        save_export(model.state_dict(), tmp_path / stage, model.cfg, dtype=torch.bfloat16,
                    extra={"stage": stage, "init_from": str(parent)}, max_shard_size=20_000)
        parent = tmp_path / stage
    export_reference(parent, tmp_path / "back")
    got = load_file(str(tmp_path / "back" / "model.safetensors"))
    others = [i for i in range(VOCAB) if i not in IDS.values()]
    assert same_bits(got["llm.embed_tokens.weight"][others], sd["llm.embed_tokens.weight"][others])
    for tok, i in IDS.items():
        assert torch.equal(got["llm.embed_tokens.weight"][i], sd["llm.embed_tokens.weight"][i] + 2.0), tok
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (tmp_path / "ckpt" / "tokenizer.json").read_bytes()


def test_cli_from_reference_prints_and_reports_bad_input(tmp_path, capsys):
    src = write_reference(tmp_path / "ckpt")
    assert vgpt(["convert", "from-reference", str(src), str(tmp_path / "import.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "<|diffusion|>=38" in out and "import.safetensors" in out
    assert vgpt(["convert", "from-reference", str(tmp_path / "nowhere"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vgpt convert: ") and "config.json: not found" in err


def test_a_model_the_reference_class_cannot_hold_is_not_exported(tmp_path):
    cfg = ModelConfig(patch_size=1)
    save_export(build_model(cfg).state_dict(), tmp_path / "p1.safetensors", cfg)
    write_tokenizer(tmp_path / "tok")
    with pytest.raises(ConfigError, match="model.patch_size=1"):
        export_reference(tmp_path / "p1.safetensors", tmp_path / "out", tokenizer=tmp_path / "tok")
