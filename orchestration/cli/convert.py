"""`vgpt convert`: the authors' released checkpoint layout <-> our export.

    vgpt convert from-reference SRC_DIR OUT [--tokenizer DIR]
    vgpt convert to-reference   EXPORT OUT_DIR [--tokenizer DIR] [--base IMPORTED] [--dtype fp32|bf16]

from-reference reads the directory the authors' scripts read (config.json,
tokenizer files, model.safetensors or model.pt, here or in transformer/) and
writes one export (OUT, a from_pretrained directory; OUT.safetensors: the
older single file) that `vgpt train --train.init_from` and `vgpt predict`
load. to-reference writes OUT_DIR in their layout (config.json, model.safetensors, tokenizer files), for
`--model_name OUT_DIR --model_ckpt OUT_DIR`. An import exported back is
bitwise the source. The mapping and what is carried: orchestration/convert.py.
"""
from __future__ import annotations

import sys

import torch

from orchestration.cli import reports_bad_input, verb_parser
from orchestration.convert import export_reference, import_reference


@reports_bad_input("convert")
def main(argv: list[str]) -> int:
    parser = verb_parser("convert", __doc__)
    sub = parser.add_subparsers(dest="direction", required=True)
    imp = sub.add_parser("from-reference", help="the authors' checkpoint directory -> an export")
    imp.add_argument("src", help="directory with config.json, tokenizer files, and model.safetensors or model.pt "
                                 "(or transformer/model.*)")
    imp.add_argument("out", help="the export directory to write (a path ending in .safetensors: the older "
                                 "single-file export)")
    imp.add_argument("--tokenizer", help="take the tokenizer files from this directory instead of SRC")
    exp = sub.add_parser("to-reference", help="an export -> a directory in the authors' layout")
    exp.add_argument("export", help="an export: a directory with config.json (or an older .safetensors file)")
    exp.add_argument("out_dir", help="a new (or empty) directory")
    exp.add_argument("--tokenizer", help="directory with the tokenizer files (and the special-token ids) to use")
    exp.add_argument("--base", help="take config.json, the token table and the tokenizer from this export "
                                    "(written by from-reference) when EXPORT was trained from it")
    exp.add_argument("--dtype", choices=("fp32", "bf16"), help="write every tensor in this dtype "
                                                                "(default: the source's, as carried)")
    args = parser.parse_args(argv)

    if args.direction == "from-reference":
        got = import_reference(args.src, args.out, args.tokenizer)
        cfg = got["config"]
        print(f"read   {got['weights']}: hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads, "
              f"mlp {cfg.mlp_size} (preset {cfg.preset})")
        print("tokens " + ", ".join(f"{t}={i}" for t, i in got["token_ids"].items())
              + f" (from {', '.join(got['tokenizer_files'])})")
        print(f"wrote  {got['out']} ({str(got['dtype']).removeprefix('torch.')}; carries the token table, "
              "config.json and tokenizer for `vgpt convert to-reference`)")
        for note in got["notes"]:
            print(f"note: {note}", file=sys.stderr)
        return 0

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[args.dtype]
    written = export_reference(args.export, args.out_dir, args.tokenizer, args.base, dtype)
    for path, what in written:
        print(f"wrote  {path}: {what}")
    print(f"authors' inference: --model_name {args.out_dir} --model_ckpt {args.out_dir}")
    return 0
