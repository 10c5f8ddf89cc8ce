"""The one error type of bad configuration: a key or value is wrong, and the message names
the key path and what was expected. Everything that validates input raises it, so the
command line reports it in one way (orchestration/cli).
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key path."""
