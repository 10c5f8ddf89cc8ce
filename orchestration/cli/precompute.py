"""`vgpt precompute --config F [--precompute.key=value ...]`: the latent-precompute Ray job
(orchestration/precompute/job.py): videos -> VAE latents -> WebDataset shards.

`--plan-only`: list the inputs, plan (new generation, if any) and compare with the committed shards,
then print the plan's size, the time taken and the driver's peak memory: no Ray, nothing decoded or
written (e.g. to see what adding a list of new videos to a dataset would encode).
"""
from __future__ import annotations

from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig
from jobconfig.loader import load_config
from orchestration import preflight
from orchestration.cli import reports_bad_input, verb_parser
from orchestration.precompute.job import run


@reports_bad_input("precompute")
def main(argv: list[str]) -> int:
    parser = verb_parser("precompute", __doc__, JobConfig, only=("precompute",))
    parser.add_argument("--config", required=True, help="a job YAML with a precompute: section (e.g. "
                                                        "configs/precompute/tiny.yaml); --precompute.section.key="
                                                        "value arguments override its keys (listed below)")
    parser.add_argument("--plan-only", action="store_true",
                        help="plan and compare with the committed shards, print size, time and peak memory; "
                             "no Ray, nothing written")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides).precompute
    preflight.check_precompute(cfg)  # inputs, output root, VAE, credentials: before Ray starts
    try:
        run(cfg, plan_only=args.plan_only)
    except FileNotFoundError as e:  # an input or the VAE directory named by the config is not there
        raise ConfigError(str(e)) from None
    return 0
