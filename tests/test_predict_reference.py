"""Acceptance (issue 29): `vgpt predict` generates what the authors' own inference pipeline generates.

The authors' code runs here unchanged (tests/reference_pipeline.py: their LVMPipeline's
`prompt_condition_frame_block_autoregressive_inference`, processor, scheduler, LVM model class and
Phi3Transformer, from tests/data/videogpt_reference/, sha256-checked; transformers' Phi-3 layers under
the 4.47 interface, a fake tokenizer and torchvision's two transforms stubbed) on a tiny random-weight
checkpoint of their layout (tests/test_convert_reference.py `reference_state`) and a tiny random-weight
diffusers AutoencoderKL. Ours is `VideoPredictor` (what `vgpt predict` runs per video, in process) on
the same checkpoint converted by `vgpt convert`'s importer, with the same uint8 context, seed, steps,
guidance, clip sizes and window, in fp32 on both sides (their `dtype=torch.float32`).

Two clips of two frames from three context frames in a window of five: the second clip's window drops
the two oldest context frames, and its history is the decoded-then-re-encoded one. Their posterior
draws come from torch's global RNG (interleaved with other draws), ours from per-frame seeds, which
cannot be matched call for call; so the VAE's posterior is made deterministic: its quant_conv writes a
log-variance of -100 (clamped by diffusers to -30: std 3e-7 before scaling), and every draw is the mean.
Their noise generator is re-seeded with the seed for every clip and draws frame by frame: ours draws
the same numbers. Their settings otherwise are their script's (use_kv_cache=False, prediction_type x1,
clean_image_noise_level 0); ours keeps its KV cache. Measured (float32, CPU): per clip max
|ours - theirs| of the generated latents 1.8e-7 and 2.1e-7 (tolerance 1e-5; the same run with the
history kept as latents is 7.7e-3 off in clip 2, with a rounding instead of truncating uint8
quantiser 8e-6 off and half the history's uint8 values one level off); decoded frames identical.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data.vae import tiny_vae_kwargs
from jobconfig.errors import ConfigError
from jobconfig.loader import load_config
from jobconfig.precompute import VaeConfig, VideoConfig
from jobconfig.predict import PredictConfig
from orchestration.convert import import_reference
from pretrain.inference.pipeline import Recipe, VideoPredictor, compute_dtypes, reference_uint8
import tests.reference_pipeline as rp
from tests.reference_pipeline import FakeTokenizer, Reference
from tests.test_convert_reference import IDS, PHI3, reference_state, write_reference

H, W = 32, 48                  # pixels: a 4x6 latent, 2x3 patches (not square: rows and columns stay apart)
CONTEXT, CLIP, CLIPS = 3, 2, 2
WINDOW, STEPS, SEED, GUIDANCE = 5, 3, 42, 1.5
LATENT_TOL = 1e-5              # max |ours - theirs| of a generated latent (measured about 2e-7)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_reference")
    ref = Reference()
    sd = reference_state()
    # clean patches strong next to the 2D position table (values of order 1): the history weighs on the clip
    sd["input_x_embedder.proj.weight"] *= 20
    their_model = ref.build_model(PHI3, sd)  # strict: every tensor name of their class
    export = root / "export.safetensors"
    import_reference(write_reference(root / "ckpt", sd), export)
    from diffusers import AutoencoderKL

    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKL(**tiny_vae_kwargs())
    with torch.no_grad():  # the posterior's log-variance channels: -100 (clamped to -30), whatever the input
        c = vae.config.latent_channels
        vae.quant_conv.weight[c:] = 0
        vae.quant_conv.bias[c:] = -100
    vae.save_pretrained(root / "vae", safe_serialization=True)
    frames = np.random.default_rng(0).integers(0, 256, (CONTEXT, H, W, 3), dtype=np.uint8)
    return {"ref": ref, "model": their_model, "export": export, "vae_dir": root / "vae", "frames": frames,
            "runs": {}}


def run_theirs(setup, guidance: float):
    """(their output frames, uint8 [T, H, W, 3]; the latents their scheduler returned, one [n, C, h, w] per clip).
    The latents are read off LVMScheduler.__call__'s return value (their first half: the conditional
    samples, which the pipeline keeps), without changing what it computes."""
    if guidance in setup["runs"]:
        return setup["runs"][guidance]
    from diffusers import AutoencoderKL

    lvm = setup["ref"].lvm
    returned = []
    call = lvm.LVMScheduler.__call__

    def recording(self, *args, **kwargs):
        z = call(self, *args, **kwargs)
        returned.append(torch.cat([x.float() for x in z]))
        return z

    pipe = lvm.LVMPipeline(AutoencoderKL.from_pretrained(setup["vae_dir"], low_cpu_mem_usage=False), setup["model"],
                           lvm.LVMProcessor(FakeTokenizer(IDS), max_image_size=max(H, W)), device="cpu")
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng():
        mp.setattr(lvm.LVMScheduler, "__call__", recording)
        images = pipe.prompt_condition_frame_block_autoregressive_inference(
            input_images=[Image.fromarray(f) for f in setup["frames"]], use_input_image_size_as_output=True,
            gen_nums=[CLIP] * CLIPS, max_input_image_size=max(H, W), img_guidance_scale=guidance,
            use_img_guidance=True, num_inference_steps=STEPS, use_kv_cache=False, prediction_type="x1",
            seed=SEED, clean_image_noise_level=0.0, max_frame_window=WINDOW, dtype=torch.float32)
    out = np.stack([np.asarray(im) for im in images]), [z[:len(z) // 2] if guidance != 1 else z for z in returned]
    setup["runs"][guidance] = out
    return out


def ours(setup, **cfg) -> VideoPredictor:
    cfg = {"steps": STEPS, "guidance": GUIDANCE, "clip_frames": CLIP, "max_frame_window": WINDOW, "seed": SEED,
           "dtype": "fp32", **cfg}
    recipe = Recipe(VaeConfig(path=str(setup["vae_dir"]), dtype="bf16"), VideoConfig(), 1)  # bf16: overridden
    return VideoPredictor(setup["export"], PredictConfig(**cfg), recipe, device="cpu")


def max_diff(a, b) -> float:
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())


def assert_same_uint8(ours_u8: np.ndarray, theirs_u8: np.ndarray) -> None:
    """Equal but for a value that float32 rounding moved across a level (their truncation, not rounding:
    a rounding quantiser moves about half the values by one)."""
    assert ours_u8.shape == theirs_u8.shape and ours_u8.dtype == theirs_u8.dtype == np.uint8
    moved = np.abs(ours_u8.astype(int) - theirs_u8.astype(int))
    assert moved.max() <= 1 and moved.mean() < 0.01, (moved.max(), moved.mean())


def test_generation_matches_the_authors_pipeline(setup):
    their_frames, their_latents = run_theirs(setup, GUIDANCE)
    runner = ours(setup)
    got = runner.predict_latents(setup["frames"], CLIP * CLIPS, key="clip")
    assert runner.vae.dtype == torch.float32 and runner.model.pos_table.dtype == torch.float32
    # their output: the context as decoded from the first clip's latents, then every generated frame
    assert their_frames.shape == (CONTEXT + CLIP * CLIPS, H, W, 3) and len(their_latents) == CLIPS
    per_clip = [max_diff(got[k * CLIP:(k + 1) * CLIP], their_latents[k]) for k in range(CLIPS)]
    print(f"max |ours - theirs| of the generated latents per clip: {per_clip}; frames: "
          f"{max_diff(reference_uint8(runner.vae.decode(got)), their_frames[CONTEXT:])} uint8 levels")
    assert max(per_clip) < LATENT_TOL, per_clip
    assert got.abs().mean() > 0.05  # a real prediction, not a constant
    assert_same_uint8(reference_uint8(runner.vae.decode(got)), their_frames[CONTEXT:])
    # the second clip saw the re-encoded window: context frame 2 as decoded after clip 1, then clip 1's frames
    history = runner.last_history
    assert sorted(history.frames) == [2, 3, 4] and (history.decoded, history.encoded) == (3, 3)
    assert_same_uint8(np.stack([history.frames[i] for i in (2, 3, 4)]), their_frames[2:5])


def test_the_comparison_sees_the_history_and_the_noise(setup):
    """The departures the options allow are far outside the tolerance: the test can fail."""
    _, their_latents = run_theirs(setup, GUIDANCE)
    latent = ours(setup, history="latent").predict_latents(setup["frames"], CLIP * CLIPS, key="clip")
    assert max_diff(latent[:CLIP], their_latents[0]) < LATENT_TOL       # the first clip has no history to refresh
    print(f"history: latent, clip 2: {max_diff(latent[CLIP:], their_latents[1])}")
    assert max_diff(latent[CLIP:], their_latents[1]) > 100 * LATENT_TOL
    per_clip = ours(setup, noise_seed="per_clip").predict_latents(setup["frames"], CLIP * CLIPS, key="clip")
    assert max_diff(per_clip[:CLIP], their_latents[0]) > 100 * LATENT_TOL


def test_guidance_one_returns_every_frame_where_the_authors_keep_half(setup):
    their_frames, their_latents = run_theirs(setup, 1.0)
    assert len(their_frames) == CONTEXT + CLIPS * CLIP // 2  # their bug: samples[:len // 2] without guidance
    got = ours(setup, guidance=1.0).predict_latents(setup["frames"], CLIP * CLIPS, key="clip")
    assert got.shape[0] == CLIP * CLIPS and all(f.abs().mean() > 0.05 for f in got)
    # the first clip, before their history loses a frame, is the same computation: all of it agrees
    assert their_latents[0].shape[0] == CLIP and max_diff(got[:CLIP], their_latents[0]) < LATENT_TOL


def test_dtypes_are_picked_by_device():
    assert compute_dtypes("auto", "cuda") == (torch.bfloat16, "fp32")       # the reference's: bf16 model, fp32 VAE
    assert compute_dtypes("auto", torch.device("cuda", 0)) == (torch.bfloat16, "fp32")
    assert compute_dtypes("auto", "cpu") == (torch.float32, "fp32")
    assert compute_dtypes("fp32", "cuda") == (torch.float32, "fp32")
    assert compute_dtypes("bf16", "cpu") == (torch.bfloat16, "fp32")


def test_bf16_model_and_fp32_vae_generate_close_to_fp32(setup):
    """The GPU's dtypes, forced on the CPU: the model in bf16 (weights and activations), the VAE in fp32
    although the recipe's encoder dtype says bf16; the Euler state stays float32."""
    runner = ours(setup, dtype="bf16")
    assert runner.model.pos_table.dtype == torch.bfloat16 and next(runner.model.parameters()).dtype == torch.bfloat16
    assert runner.vae.dtype == torch.float32
    got = runner.predict_latents(setup["frames"], CLIP * CLIPS, key="clip")
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    _, their_latents = run_theirs(setup, GUIDANCE)
    off = max_diff(got, torch.cat(their_latents))
    print(f"bf16 model: max |ours - theirs (fp32)| {off}")
    assert 0 < off < 0.1  # bf16 rounding, not another computation


@pytest.mark.parametrize("override,named", [("--predict.history=pixels", "predict.history"),
                                            ("--predict.noise_seed=fresh", "predict.noise_seed"),
                                            ("--predict.dtype=fp16", "predict.dtype")])
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])
    cfg = PredictConfig()
    setattr(cfg, named.split(".")[1], "nonsense")  # set in code, not read from YAML: validate() names it too
    with pytest.raises(ConfigError, match=named.split(".")[1]):
        cfg.validate()


def test_every_history_frame_is_decoded_once_and_the_cache_rebuilt_per_clip(setup):
    """Four one-frame clips in a window of three: each refresh decodes only the frame generated since the
    last one and re-encodes the whole window; each clip's Euler steps share one cache, rebuilt per clip."""
    runner = ours(setup, clip_frames=1, max_frame_window=3)
    got = runner.predict_latents(setup["frames"], 4, key="clip")
    history, stats = runner.last_history, runner.predictor.stats
    assert got.shape[0] == 4 and sorted(history.frames) == [4, 5]
    assert (history.decoded, history.encoded) == (4, 2 + 2 + 2)
    assert (stats.cache_rebuilds, stats.cache_appends, stats.model_calls) == (4, 0, 4 * STEPS)


def test_a_changed_vendored_file_is_refused(tmp_path, monkeypatch):
    shutil.copytree(rp.REFERENCE, tmp_path / "ref")
    rp.check_files()  # the vendored files as committed
    monkeypatch.setattr(rp, "REFERENCE", tmp_path / "ref")
    with open(tmp_path / "ref" / "LVM" / "scheduler.py", "a") as f:
        f.write("\n")
    with pytest.raises(AssertionError, match="LVM/scheduler.py: sha256"):
        rp.check_files()
