"""The one error type of bad configuration: a key or value is wrong, and the message names
the key path and what was expected. Everything that validates input raises it, so the
command line reports it in one way (orchestration/cli).
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key path."""


BAD_INPUT = 2  # exit status of every command for a ConfigError
# Set by a launcher agent that reports its ranks' bad input itself, once (orchestration/launch/
# local_torchrun.py): ranks then leave the one line to it instead of printing one each.
AGENT_REPORTS_BAD_INPUT = "VGPT_AGENT_REPORTS_BAD_INPUT"
