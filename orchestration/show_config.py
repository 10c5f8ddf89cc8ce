"""`vgpt config --config FILE [--a.b=c ...]`: print the resolved config as YAML."""
from __future__ import annotations

import argparse
import sys

import yaml

from orchestration.config import ConfigError, load_config, to_dict


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vgpt config")
    parser.add_argument("--config", required=True)
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0
