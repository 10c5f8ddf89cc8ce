"""`vgpt precompute --config F [--precompute.key=value ...]`: the latent-precompute Ray job
(orchestration/precompute/job.py): videos -> VAE latents -> WebDataset shards.
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
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides).precompute
    preflight.check_precompute(cfg)  # inputs, output root, VAE, credentials: before Ray starts
    try:
        run(cfg)
    except FileNotFoundError as e:  # an input or the VAE directory named by the config is not there
        raise ConfigError(str(e)) from None
    return 0
