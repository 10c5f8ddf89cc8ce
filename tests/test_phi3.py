"""The backbone is Phi-3: initialised from a local Phi-3 checkpoint it computes
what transformers' Phi-3 computes (a tiny Phi-3 made from a config, no download)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jobconfig.errors import ConfigError
from jobconfig.loader import load_config
from pretrain.model.videogpt import build_model


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=64, max_position_embeddings=512,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Phi3ForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("phi3")
    model.save_pretrained(path)
    return path, model


def causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_backbone_from_phi3_matches_transformers(phi3_dir):
    path, hf = phi3_dir
    cfg = load_config(None, [f"--model.phi3_checkpoint={path}"])
    ours = build_model(cfg.model).eval()
    x = torch.randn(2, 37, 64)
    pos = torch.arange(5, 42).expand(2, -1)  # offset positions: RoPE must use the ids, not the index
    with torch.no_grad():
        expected = hf.model(inputs_embeds=x, position_ids=pos).last_hidden_state
        got = ours.backbone(x, pos, causal)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_phi3_of_another_shape_is_refused(phi3_dir):
    path, _ = phi3_dir
    cfg = load_config(None, [f"--model.phi3_checkpoint={path}", "--model.preset=s1"])
    with pytest.raises(ConfigError, match=r"model.hidden_size: 128 but .*config.json has hidden_size=64"):
        build_model(cfg.model)
