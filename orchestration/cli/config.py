"""`vgpt config --config FILE [--section.key=value ...]`: print the resolved config as YAML.

What a job would run with: the file, its model preset expanded, and the command-line overrides
applied, validated as `vgpt train` validates it.
"""
from __future__ import annotations

import yaml

from jobconfig.job import JobConfig
from jobconfig.loader import load_config, to_dict
from orchestration.cli import CONFIG_HELP, reports_bad_input, verb_parser


@reports_bad_input("config")
def main(argv: list[str]) -> int:
    parser = verb_parser("config", __doc__, JobConfig)
    parser.add_argument("--config", required=True, help=CONFIG_HELP)
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0
