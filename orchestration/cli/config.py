"""`vgpt config --config FILE [--a.b=c ...]`: print the resolved config as YAML."""
from __future__ import annotations

import argparse

import yaml

from jobconfig.loader import load_config, to_dict
from orchestration.cli import reports_bad_input


@reports_bad_input("config")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vgpt config")
    parser.add_argument("--config", required=True)
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0
