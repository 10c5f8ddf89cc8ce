"""The authors' inference code, runnable in a test process (tests/test_predict_reference.py).

The files under tests/data/videogpt_reference/ are zhuangshaobin/Video-GPT at commit
fdcc939c296a4a2fd251f7e491d38b186dca401c, unchanged (MIT, their LICENSE beside them); `Reference()`
checks each against the sha256 in that folder's README.md before importing it. What runs is
theirs: LVM/pipeline.py (`LVMPipeline.prompt_condition_frame_block_autoregressive_inference`:
the clip loop, the window, the noise generator, the decode -> uint8 -> crop -> encode of the
history), LVM/processor.py (prompt, crop, token layout, position ids, attention mask),
LVM/scheduler.py (Euler steps and guidance), LVM/model.py (`LVM`: embedders, position table,
time tokens, `frame_block_forward`, head) and OmniGen/transformer.py (`Phi3Transformer`: the
boolean mask made additive, the layer loop, the final norm).

Not theirs, and why:
  * transformers' `Phi3Model` as of 4.47, which `Phi3Transformer` extends: the installed
    transformers is 5.x, whose decoder layers take RoPE's cos/sin from the caller and return a
    tensor. `Phi3Model447` is the 4.47 shape (embed_tokens, layers, norm; layers called with
    position_ids, returning a tuple, the decoder layer's residual layout written out) around the
    installed `Phi3Attention`, `Phi3MLP`, `Phi3RMSNorm` and `Phi3RotaryEmbedding`: transformers'
    Phi-3 arithmetic, none of ours.
  * their inference script's `replace_attention` (DeepSpeed Ulysses SDPA for sequence
    parallelism) is not applied: one rank, transformers' eager attention with the same mask.
  * the tokenizer: a fake in which `<|diffusion|>`, `<img>` and `</img>` are single tokens (ids of
    tests/test_convert_reference.py) and BOS (1) comes first, as Phi-3's does.
  * torchvision's ToTensor and Normalize (not installed): the same two lines of arithmetic.
  * imports nothing here calls: peft, timm's ViT blocks, transformers' OffloadedCache (gone in
    5.x), their sequence-parallel state (one rank: world_size 1, rank 0) and LVM/utils.py; the
    OmniGen package is the two vendored files alone (its __init__, the image model, is not run).
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

REFERENCE = Path(__file__).resolve().parent / "data" / "videogpt_reference"
COMMIT = "fdcc939c296a4a2fd251f7e491d38b186dca401c"
FILES = ["LICENSE", "LVM/__init__.py", "LVM/model.py", "LVM/pipeline.py", "LVM/processor.py", "LVM/scheduler.py",
         "OmniGen/transformer.py", "OmniGen/utils.py"]
BOS = 1


def recorded_sha256() -> dict[str, str]:
    """file -> sha256, from the table in the folder's README.md."""
    rows = re.findall(r"^\| `([^`]+)` \| ([0-9a-f]{64}) \|$", (REFERENCE / "README.md").read_text(), re.M)
    return dict(rows)


def check_files() -> None:
    recorded = recorded_sha256()
    assert sorted(recorded) == sorted(FILES), f"README.md lists {sorted(recorded)}"
    for name in FILES:
        got = hashlib.sha256((REFERENCE / name).read_bytes()).hexdigest()
        assert got == recorded[name], f"{name}: sha256 {got}, README.md records {recorded[name]}: not the authors' file"


class FakeTokenizer:
    """What LVMProcessor asks of a tokenizer: `tok(text).input_ids`, BOS first."""

    def __init__(self, ids: dict[str, int]):
        self.ids = ids

    def __call__(self, text: str):
        out, at = [BOS], 0
        while at < len(text):
            word = next((w for w in self.ids if text.startswith(w, at)), None)
            assert word is not None, f"fake tokenizer: unexpected text {text[at:]!r}"
            out.append(self.ids[word])
            at += len(word)
        return types.SimpleNamespace(input_ids=out)


def _transforms() -> types.ModuleType:
    """torchvision.transforms as LVMProcessor uses it."""
    mod = types.ModuleType("torchvision.transforms")

    class Compose:
        def __init__(self, fns):
            self.fns = fns

        def __call__(self, x):
            for f in self.fns:
                x = f(x)
            return x

    class Lambda:
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, x):
            return self.fn(x)

    class ToTensor:  # a uint8 HWC image -> float CHW / 255
        def __call__(self, pic):
            return torch.from_numpy(np.array(pic)).permute(2, 0, 1).contiguous().float().div(255)

    class Normalize:
        def __init__(self, mean, std, inplace=False):
            self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

        def __call__(self, x):
            return x.sub(self.mean).div(self.std)

    mod.Compose, mod.Lambda, mod.ToTensor, mod.Normalize = Compose, Lambda, ToTensor, Normalize
    return mod


def _phi3_model_447():
    from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3MLP, Phi3RMSNorm, Phi3RotaryEmbedding

    class Layer447(nn.Module):
        """4.47's Phi3DecoderLayer: pre-norm attention and MLP with residuals, RoPE from position_ids
        inside the layer, a tuple returned; transformers' own attention, MLP and norm modules."""

        def __init__(self, config, layer_idx):
            super().__init__()
            self.self_attn = Phi3Attention(config, layer_idx)
            self.mlp = Phi3MLP(config)
            self.input_layernorm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.post_attention_layernorm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.rotary = Phi3RotaryEmbedding(config)  # non-persistent buffers: not in the state dict

        def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                    output_attentions=False, use_cache=False, cache_position=None):
            assert past_key_value is None and not use_cache  # their inference script: use_kv_cache=False
            residual = hidden_states
            hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                              position_embeddings=self.rotary(hidden_states, position_ids),
                                              attention_mask=attention_mask)
            hidden_states = residual + hidden_states
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
            return (hidden_states,)

    class Phi3Model447(nn.Module):
        """transformers 4.47's Phi3Model as Phi3Transformer uses it (its own forward replaces this one's)."""

        def __init__(self, config):
            super().__init__()
            config._attn_implementation = "eager"
            self.config, self.padding_idx = config, config.pad_token_id
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
            self.layers = nn.ModuleList(Layer447(config, i) for i in range(config.num_hidden_layers))
            self.norm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.gradient_checkpointing = False

    return Phi3Model447


class _Unused:
    """What the stubbed imports name: never called on the inference path."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("a stubbed import of the reference was called")


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def _package(name: str, path: Path | None = None) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)] if path else []
    return mod


class Reference:
    """The authors' LVM package, imported from the vendored files with the stubs above in place.

    The stubs, transformers' patched attributes and the LVM/OmniGen modules live in sys.modules
    only while their files are imported (their names are bound by then): nothing leaks into the
    rest of the test session. diffusers is imported first, since it probes whether peft and
    torchvision are installed.
    """

    def __init__(self):
        check_files()
        import diffusers.loaders  # noqa: F401
        import diffusers.models  # noqa: F401
        import transformers
        import transformers.cache_utils as cache_utils
        import transformers.modeling_outputs  # noqa: F401
        import transformers.modeling_utils  # noqa: F401

        transformers.Phi3Model  # noqa: B018  the lazy module replaces itself in sys.modules on first use
        transformers = sys.modules["transformers"]

        comm = types.SimpleNamespace(group=None, world_size=1, rank=0)
        stubs = {
            "peft": _module("peft", LoraConfig=_Unused, PeftModel=_Unused),
            "timm": _package("timm"), "timm.models": _package("timm.models"),
            "timm.models.vision_transformer": _module("timm.models.vision_transformer", PatchEmbed=_Unused,
                                                      Attention=_Unused, Mlp=_Unused),
            "torchvision": _package("torchvision"), "torchvision.transforms": _transforms(),
            "OmniGen": _package("OmniGen", REFERENCE / "OmniGen"),  # its __init__ (the image model) not run
            "LVM.acceleration": _package("LVM.acceleration"),
            "LVM.acceleration.parallel_states": _module("LVM.acceleration.parallel_states", hccl_info=comm),
            "LVM.utils": _module("LVM.utils", gather_output_to_rank0=_Unused),
        }
        before = set(sys.modules)
        with pytest.MonkeyPatch.context() as mp:
            for name, mod in stubs.items():
                mp.setitem(sys.modules, name, mod)
            mp.setattr(transformers, "Phi3Model", _phi3_model_447(), raising=False)
            mp.setattr(cache_utils, "OffloadedCache", cache_utils.DynamicCache, raising=False)
            spec = importlib.util.spec_from_file_location("LVM", REFERENCE / "LVM" / "__init__.py",
                                                          submodule_search_locations=[str(REFERENCE / "LVM")])
            lvm = importlib.util.module_from_spec(spec)
            mp.setitem(sys.modules, "LVM", lvm)
            try:
                spec.loader.exec_module(lvm)
            finally:
                for name in set(sys.modules) - before:
                    if name.split(".")[0] in ("LVM", "OmniGen"):
                        del sys.modules[name]
        self.lvm = lvm

    def build_model(self, phi3: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        """Their `LVM` of a Phi3Config, loaded strictly with a state dict of their layout."""
        from transformers import Phi3Config

        kwargs = {k: v for k, v in phi3.items() if k not in ("architectures", "model_type", "torch_dtype")}
        config = Phi3Config(**kwargs, pad_token_id=2, bos_token_id=BOS, eos_token_id=None)
        model = self.lvm.LVM(config)
        model.load_state_dict(state_dict, strict=True)
        return model.eval()
