"""Token layout, position ids and attention mask against the authors' reference.

The reference is zhuangshaobin/Video-GPT @ fdcc939 (frame-block training):
  * LVM/train_helper/data.py `DatasetFromVideoBlockFrame.get_example` writes one
    instruction per clip partition `frame_blocks`: for every clip but the last,
    its frames as `<|diffusion|><|image_i|>` followed by the same frames as
    `<img><|image_j|></img>`; the last clip only as `<|diffusion|><|image_i|>`;
  * LVM/processor.py `process_multi_modal_prompt_frame_block_training` splits it
    at the `<|image_N|>` tags, tokenizes the chunks, and puts before every image
    the chunk in front of it, then a `[0]` time slot (noisy images only) and P
    patch slots. The `</img>` closing a clean image therefore lands in the chunk
    of the next image; cut into slots of L = P + 2 tokens the sequence is
    noisy `[<|diffusion|>][time][P]`, clean `[<img>][P][</img>]`;
  * `LVMCollator.create_position_frame_block_training`: one counter over the
    noisy slots, one over the clean slots, each slot gets L consecutive ids;
  * `LVMCollator.create_mask_frame_block_training`: rectangles per slot (see
    `reference_sample`).

This file re-tells that process on its own (a fake tokenizer in which the
three specials are single tokens, plain loops for positions and mask) and
compares `pretrain.model.sequence.build_sequence` / `ClipMeta.dense_mask` and
the attention backends to it token by token, for random packed layouts and for
three tables written out by hand. Nothing here is computed with our code.

Our batch convention differs from the reference's (batch 1 per device, left
padding, padding rows seeing everything): here samples are packed into a row,
positions restart at 0 per sample, rows are right-padded, packed samples never
see each other, real tokens never see padding and padding sees only padding.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from itertools import pairwise

import pytest
import torch

from pretrain.model.attention import ClipMeta, blockwise_attention, dense_attention, flex_attention
from pretrain.model.sequence import (
    SRC_CLEAN,
    SRC_IMG_CLOSE,
    SRC_IMG_OPEN,
    SRC_MARKER,
    SRC_NOISY,
    SRC_PAD,
    SRC_TIME,
    build_sequence,
)

# one character per token kind: marker, time, noisy patch, <img>, clean patch, </img>, padding
KIND = {SRC_MARKER: "M", SRC_TIME: "T", SRC_NOISY: "n", SRC_IMG_OPEN: "[", SRC_CLEAN: "c",
        SRC_IMG_CLOSE: "]", SRC_PAD: "."}
NOISY_KINDS = "MTn"
BIG = 10 ** 6  # max_tokens that never refuses

# ------------------------------------------------------------------ the reference, re-told

DIFFUSION, IMG_OPEN, IMG_CLOSE = "<|diffusion|>", "<img>", "</img>"
BOS = 1
VOCAB = {DIFFUSION: 32001, IMG_OPEN: 32002, IMG_CLOSE: 32003}
TOKEN_KIND = {VOCAB[DIFFUSION]: "M", VOCAB[IMG_OPEN]: "[", VOCAB[IMG_CLOSE]: "]"}
IMAGE_TAG = re.compile(r"<\|image_\d+\|>")


def instruction(frame_blocks: list[int]) -> str:
    """The prompt get_example writes for one clip partition."""
    text, noisy_id, clean_id = [], 0, 0
    for k, size in enumerate(frame_blocks):
        for _ in range(size):
            noisy_id += 1
            text.append(f"{DIFFUSION}<|image_{noisy_id}|>")
        if k != len(frame_blocks) - 1:
            for _ in range(size):
                clean_id += 1
                text.append(f"{IMG_OPEN}<|image_{clean_id}|>{IMG_CLOSE}")
    return "".join(text)


def fake_tokenize(text: str) -> list[int]:
    """A tokenizer that knows only the three specials, each one token; it prepends BOS as Phi-3's does."""
    ids, at = [BOS], 0
    while at < len(text):
        word = next((w for w in VOCAB if text.startswith(w, at)), None)
        assert word is not None, f"fake tokenizer: unexpected text {text[at:]!r}"
        ids.append(VOCAB[word])
        at += len(word)
    return ids


@dataclass
class RefSample:
    """One sample as the reference lays it out (no padding)."""
    kinds: str              # one KIND character per token
    frame: list[int]        # frame index within the sample (the image tag's number - 1)
    clip: list[int]         # clip index within the sample
    patch: list[int]        # patch index for patch tokens, else 0
    position: list[int]
    mask: list[list[bool]]  # [query][key]


def reference_sample(frame_blocks: list[int], P: int) -> RefSample:
    text = instruction(frame_blocks)
    # processor: chunks between the image tags, BOS dropped; tags -> image numbers
    chunks = [fake_tokenize(chunk) for chunk in IMAGE_TAG.split(text)]
    chunks = [c[1:] if c and c[0] == BOS else c for c in chunks]
    image_ids = [int(re.search(r"\d+", tag).group()) for tag in IMAGE_TAG.findall(text)]
    assert len(chunks) == len(image_ids) + 1 and chunks[-1] == [], "text after the last image"
    # which images are noisy (time slot in front) and which clip each belongs to, in the processor's order
    noisy_image, clip_of_image = [], []
    for k, size in enumerate(frame_blocks):
        noisy_image += [True] * size
        clip_of_image += [k] * size
        if k != len(frame_blocks) - 1:
            noisy_image += [False] * size
            clip_of_image += [k] * size
    assert len(noisy_image) == len(image_ids)

    # input ids: chunk, [time slot], P patch slots per image
    kinds, patch = [], []
    for n in range(len(image_ids)):
        for tok in chunks[n]:
            kinds.append(TOKEN_KIND[tok])
            patch.append(0)
        if noisy_image[n]:
            kinds.append("T")
            patch.append(0)
        kinds += ["n" if noisy_image[n] else "c"] * P
        patch += list(range(P))
    total = len(kinds)

    # collator: every image owns one slot of block_l tokens
    assert total % len(image_ids) == 0
    block_l = total // len(image_ids)
    assert block_l == P + 2
    for n in range(len(image_ids)):
        got = "".join(kinds[n * block_l:(n + 1) * block_l])
        want = "MT" + "n" * P if noisy_image[n] else "[" + "c" * P + "]"
        assert got == want, f"slot {n} of {frame_blocks}: {got!r}, expected {want!r}"
    frame = [image_ids[t // block_l] - 1 for t in range(total)]
    clip = [clip_of_image[t // block_l] for t in range(total)]

    # positions: one running counter for the noisy slots and one for the clean slots
    position, noisy_at, clean_at = [], 0, 0
    for k, size in enumerate(frame_blocks):
        for _ in range(size):
            position += range(noisy_at, noisy_at + block_l)
            noisy_at += block_l
        if k != len(frame_blocks) - 1:
            for _ in range(size):
                position += range(clean_at, clean_at + block_l)
                clean_at += block_l
    assert len(position) == total

    # mask, slot by slot
    mask = [[False] * total for _ in range(total)]
    slot = 0
    for k, size in enumerate(frame_blocks):
        clip_slots = range(slot, slot + size)
        for q_slot in clip_slots:        # the noisy copy of a clip: every frame sees every frame of the clip,
            for k_slot in clip_slots:    # key offset 0 (marker) from query offset 0, 1 (time) from 1, patches from 2
                for q_off in range(block_l):
                    for k_off in range(block_l):
                        if q_off >= min(k_off, 2):
                            mask[q_slot * block_l + q_off][k_slot * block_l + k_off] = True
        slot += size
        if k != len(frame_blocks) - 1:
            for k_slot in range(slot, slot + size):  # clean frames: a key is seen from its own row to the end
                start = k_slot * block_l
                for k_off in range(block_l):
                    first = start if k_off == 0 else start + 1 if k_off <= P else start + P + 1
                    for q in range(first, total):
                        mask[q][start + k_off] = True
            slot += size
    return RefSample("".join(kinds), frame, clip, patch, position, mask)


@dataclass
class RefBatch:
    """The reference layout mapped onto our batch convention ([B, L], packed, right-padded)."""
    kinds: list[str]
    frame: list[list[int]]
    patch: list[list[int]]
    position: list[list[int]]
    sample: list[list[int]]      # index of the packed sample in its row, -1 padding
    clip: list[list[int]]
    lengths: list[int]
    mask: list[list[list[bool]]] = field(repr=False)


def reference_batch(clips: list[list[list[int]]], P: int) -> RefBatch:
    rows = []
    for row in clips:
        kinds, frame, patch, position, sample, clip, blocks = "", [], [], [], [], [], []
        frames_before = 0
        for s, frame_blocks in enumerate(row):
            ref = reference_sample(frame_blocks, P)
            kinds += ref.kinds
            frame += [f + frames_before for f in ref.frame]
            patch += ref.patch
            position += ref.position
            sample += [s] * len(ref.kinds)
            clip += ref.clip
            blocks.append(ref.mask)
            frames_before += sum(frame_blocks)
        rows.append((kinds, frame, patch, position, sample, clip, blocks))
    L = max(len(r[0]) for r in rows)
    out = RefBatch([], [], [], [], [], [], [], [])
    for kinds, frame, patch, position, sample, clip, blocks in rows:
        n = len(kinds)
        pad = L - n
        out.kinds.append(kinds + "." * pad)
        out.frame.append(frame + [0] * pad)
        out.patch.append(patch + [0] * pad)
        out.position.append(position + [0] * pad)
        out.sample.append(sample + [-1] * pad)
        out.clip.append(clip + [0] * pad)
        out.lengths.append(n)
        mask = [[False] * L for _ in range(L)]
        at = 0
        for block in blocks:  # each sample's own block; nothing across samples
            for i, line in enumerate(block):
                mask[at + i][at:at + len(line)] = line
            at += len(block)
        for i in range(n, L):  # padding sees padding only
            mask[i][n:L] = [True] * pad
        out.mask.append(mask)
    return out


# ------------------------------------------------------------------ comparisons


def _token(ref: RefBatch, b: int, t: int) -> str:
    if ref.sample[b][t] < 0:
        return f"token {t} (padding)"
    return (f"token {t} ({ref.kinds[b][t]!r}, sample {ref.sample[b][t]}, clip {ref.clip[b][t]}, "
            f"row frame {ref.frame[b][t]}, patch {ref.patch[b][t]})")


def _compare_list(name, got, exp, ref: RefBatch, b: int, where: str):
    if got == exp:
        return
    t = next(i for i, (g, e) in enumerate(zip(got, exp)) if g != e) if len(got) == len(exp) else min(len(got), len(exp))
    lo = max(0, t - 6)
    at = _token(ref, b, t) if t < len(exp) else f"token {t}"
    pytest.fail(f"{where}: {name} differs, batch row {b}, first at {at}: "
                f"expected {exp[t] if t < len(exp) else '<end>'}, got {got[t] if t < len(got) else '<end>'}\n"
                f"  kinds     {ref.kinds[b]}\n"
                f"  expected[{lo}:] {exp[lo:lo + 16]}\n  got     [{lo}:] {got[lo:lo + 16]}")


def _mask_strings(mask) -> list[str]:
    return ["".join("1" if x else "0" for x in line) for line in mask]


def _compare_mask(got: torch.Tensor, ref: RefBatch, where: str):
    """got: [B, L, L] bool."""
    B, L = len(ref.kinds), len(ref.kinds[0])
    assert tuple(got.shape) == (B, L, L), f"{where}: mask shape {tuple(got.shape)}, expected {(B, L, L)}"
    exp = torch.tensor(ref.mask, dtype=torch.bool)
    bad = (got != exp).nonzero()
    if len(bad) == 0:
        return
    b, q, k = bad[0].tolist()
    sq, sk = ref.sample[b][q], ref.sample[b][k]
    kind = ("padding" if sq < 0 or sk < 0 else "across packed samples" if sq != sk else "within a sample")
    pytest.fail(f"{where}: mask differs ({len(bad)} entries), first: batch row {b}, query {_token(ref, b, q)} "
                f"-> key {_token(ref, b, k)} [{kind}]: expected {bool(exp[b, q, k])}, got {bool(got[b, q, k])}\n"
                f"  kinds              {ref.kinds[b]}\n"
                f"  expected query {q:3d} {_mask_strings(exp[b, q:q + 1].tolist())[0]}\n"
                f"  got      query {q:3d} {_mask_strings(got[b, q:q + 1].tolist())[0]}")


def check_layout(clips, P):
    """build_sequence and ClipMeta.dense_mask against the re-told reference, token by token."""
    where = f"clips={clips} P={P}"
    ref = reference_batch(clips, P)
    seq = build_sequence(clips, P, BIG)
    B, L = len(clips), len(ref.kinds[0])
    assert tuple(seq.src.shape) == (B, L), f"{where}: tables {tuple(seq.src.shape)}, expected {(B, L)}"
    assert list(seq.lengths) == ref.lengths, f"{where}: lengths {list(seq.lengths)}, expected {ref.lengths}"
    for b in range(B):
        kinds = "".join(KIND[int(s)] for s in seq.src[b])
        _compare_list("token kinds", list(kinds), list(ref.kinds[b]), ref, b, where)
        _compare_list("position", seq.position[b].tolist(), ref.position[b], ref, b, where)
        _compare_list("frame", seq.frame[b].tolist(), ref.frame[b], ref, b, where)
        _compare_list("patch", seq.patch[b].tolist(), ref.patch[b], ref, b, where)
        _compare_list("is_noisy", seq.is_noisy[b].tolist(), [k in NOISY_KINDS for k in ref.kinds[b]], ref, b, where)
        # sample_id: -1 on padding, one number per packed sample, distinct within the row
        sid = seq.sample_id[b].tolist()
        _compare_list("sample_id (padding)", [s < 0 for s in sid], [s < 0 for s in ref.sample[b]], ref, b, where)
        by_sample = {}
        for t, s in enumerate(ref.sample[b]):
            if s >= 0:
                assert by_sample.setdefault(s, sid[t]) == sid[t], \
                    f"{where}: row {b} sample {s} has sample_id {by_sample[s]} and {sid[t]} ({_token(ref, b, t)})"
        assert len(set(by_sample.values())) == len(by_sample), f"{where}: row {b} sample ids {by_sample} not distinct"
        # clip_id: within a sample, an order-preserving relabelling of the clip index
        cid = seq.clip_id[b].tolist()
        for s in by_sample:
            pairs = sorted({(ref.clip[b][t], cid[t]) for t in range(L) if ref.sample[b][t] == s})
            ours = [p[1] for p in pairs]
            assert len({p[0] for p in pairs}) == len(pairs) and ours == sorted(set(ours)), \
                f"{where}: row {b} sample {s}: (clip, clip_id) pairs {pairs} are not an ordered relabelling"
    _compare_mask(ClipMeta.of(seq).dense_mask()[:, 0], ref, where + " dense_mask")
    return ref, seq


# ------------------------------------------------------------------ layouts


def random_partition(rng: random.Random, frames: int) -> list[int]:
    style = rng.random()
    if style < 0.15:
        return [frames]                      # one clip: no clean copy at all
    if style < 0.3:
        return [1] * frames                  # stage-1 style: every clip one frame
    cuts = sorted(rng.sample(range(1, frames), rng.randint(0, frames - 1))) if frames > 1 else []
    bounds = [0, *cuts, frames]
    return [b - a for a, b in pairwise(bounds)]


def sample_tokens(frame_blocks: list[int], P: int) -> int:
    return (2 * sum(frame_blocks) - frame_blocks[-1]) * (P + 2)


def random_batch(rng: random.Random, max_frames: int = 6, max_row_tokens: int | None = None):
    P = rng.randint(1, 4)
    clips = []
    for _ in range(rng.randint(1, 3)):
        while True:
            row = [random_partition(rng, rng.randint(1, max_frames)) for _ in range(rng.randint(1, 3))]
            if max_row_tokens is None or sum(sample_tokens(s, P) for s in row) <= max_row_tokens:
                break
        clips.append(row)
    return clips, P


RANDOM_BATCHES = [random_batch(random.Random(seed)) for seed in range(150)]
FIXED_LAYOUTS = [
    ([[[1]]], 1), ([[[3]]], 2), ([[[1, 1, 1, 1]]], 2), ([[[2, 1, 3]]], 3),
    ([[[2, 1, 3]], [[1, 1], [2]]], 2),            # the example of the API: two rows, the second packs two
    ([[[1], [1], [1]], [[4, 2]], [[1, 3]]], 1),
]

# ------------------------------------------------------------------ hand-written tables
# Derived by hand from the reference rules (see reference_sample); kinds: M marker, T time, n noisy patch,
# [ <img>, c clean patch, ] </img>. Mask rows are queries, columns keys, "1" = may attend.

LITERAL = {
    "clips [1,1], P=2": (
        [1, 1], 2,
        "MTnn[cc]MTnn",
        [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7],
        ["100000000000",
         "110000000000",
         "111100000000",
         "111100000000",
         "000010000000",
         "000011100000",
         "000011100000",
         "000011110000",
         "000011111000",
         "000011111100",
         "000011111111",
         "000011111111"],
    ),
    "clips [2,1], P=1": (
        [2, 1], 1,
        "MTnMTn[c][c]MTn",
        [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 8],
        ["100100000000000",
         "110110000000000",
         "111111000000000",
         "100100000000000",
         "110110000000000",
         "111111000000000",
         "000000100000000",
         "000000110000000",
         "000000111000000",
         "000000111100000",
         "000000111110000",
         "000000111111000",
         "000000111111100",
         "000000111111110",
         "000000111111111"],
    ),
    "clips [1,2], P=1": (
        [1, 2], 1,
        "MTn[c]MTnMTn",
        [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8],
        ["100000000000",
         "110000000000",
         "111000000000",
         "000100000000",
         "000110000000",
         "000111000000",
         "000111100100",
         "000111110110",
         "000111111111",
         "000111100100",
         "000111110110",
         "000111111111"],
    ),
}


# ------------------------------------------------------------------ tests


def test_instruction_and_chunks_as_in_the_reference():
    """The re-told get_example/processor on [2, 1]: the prompt and where its chunks put the delimiters."""
    text = instruction([2, 1])
    assert text == ("<|diffusion|><|image_1|><|diffusion|><|image_2|>"
                    "<img><|image_1|></img><img><|image_2|></img>"
                    "<|diffusion|><|image_3|>")
    chunks = IMAGE_TAG.split(text)
    assert chunks == ["<|diffusion|>", "<|diffusion|>", "<img>", "</img><img>", "</img><|diffusion|>", ""]
    assert reference_sample([2, 1], 1).frame == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("name", list(LITERAL))
def test_literal_table(name):
    frame_blocks, P, kinds, positions, mask = LITERAL[name]
    ref = reference_sample(frame_blocks, P)  # the hand-written table and the re-told reference agree
    assert (ref.kinds, ref.position, _mask_strings(ref.mask)) == (kinds, positions, mask), name
    seq = build_sequence([[frame_blocks]], P, BIG)
    got_kinds = "".join(KIND[int(s)] for s in seq.src[0])
    assert got_kinds == kinds, f"{name}: kinds {got_kinds!r}, expected {kinds!r}"
    assert seq.position[0].tolist() == positions, f"{name}: positions {seq.position[0].tolist()}, expected {positions}"
    got_mask = _mask_strings(ClipMeta.of(seq).dense_mask()[0, 0].tolist())
    bad = [i for i, (g, e) in enumerate(zip(got_mask, mask)) if g != e]
    assert not bad, (f"{name}: mask row {bad[0]} ({kinds[bad[0]]!r}) is {got_mask[bad[0]]}, expected {mask[bad[0]]}\n"
                     + "\n".join(f"  {kinds[i]} {e}  {g}" for i, (e, g) in enumerate(zip(mask, got_mask))))


@pytest.mark.parametrize("clips,P", FIXED_LAYOUTS, ids=[f"{c}-P{p}" for c, p in FIXED_LAYOUTS])
def test_fixed_layouts_match_reference(clips, P):
    check_layout(clips, P)


def test_random_packed_layouts_match_reference():
    for clips, P in RANDOM_BATCHES:
        check_layout(clips, P)


def _read_back_mask(backend, seq) -> torch.Tensor:
    """Uniform scores (q = 0) and v = identity: output > 0 marks exactly the keys a query may attend."""
    B, L = seq.src.shape
    H, D = 2, max(16, L)
    q = torch.zeros(B, H, L, D)
    k = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(0))
    v = torch.zeros(B, H, L, D)
    v[:, :, torch.arange(L), torch.arange(L)] = 1.0
    out = backend(q, k, v, ClipMeta.of(seq))
    assert tuple(out.shape) == (B, H, L, D)
    allowed = out[..., :L] > 0
    assert torch.equal(allowed[:, 0], allowed[:, 1]), "heads disagree"
    return allowed[:, 0]


BACKEND_BATCHES = [random_batch(random.Random(1000 + seed), max_frames=4, max_row_tokens=60) for seed in range(12)]
BACKEND_BATCHES += [([[LITERAL[n][0]] for n in LITERAL], 1), ([[[2, 1, 3]], [[1, 1], [2]]], 2)]
BACKENDS = {
    "dense": dense_attention,
    "blockwise": blockwise_attention,
    "flex": lambda q, k, v, meta: flex_attention(q, k, v, meta, compile=False),
}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name", list(BACKENDS))
def test_backends_implement_the_reference_mask(name):
    for clips, P in BACKEND_BATCHES:
        ref = reference_batch(clips, P)
        seq = build_sequence(clips, P, BIG)
        assert max(ref.lengths) <= 60
        _compare_mask(_read_back_mask(BACKENDS[name], seq), ref, f"{name} backend, clips={clips} P={P}")
