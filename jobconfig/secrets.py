"""Credentials never live in configs, and nothing this project writes ever carries one.

Configs are logged, hashed, committed to git and copied into every
trainer_state.json, export header and launch file, so a key given there leaks.
Object-store credentials come from the environment instead: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (or AWS_PROFILE / an instance role),
which s3fs/fsspec read on their own.

`check_no_credentials(value, where)` refuses a credential-looking key at any
depth of a mapping (e.g. `storage_options.client_kwargs.aws_secret_access_key`)
with a `ConfigError` naming the key path. `redact(value)` is the defensive
counterpart for writers: a copy in which every credential-looking key's value,
and every occurrence of a credential environment variable's value, is '***'.
"""
from __future__ import annotations

import os
from typing import Any

from jobconfig.errors import ConfigError

REDACTED = "***"

# Environment variables whose values are secrets: never written anywhere.
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                  "FSSPEC_S3_KEY", "FSSPEC_S3_SECRET", "FSSPEC_S3_TOKEN", "HF_TOKEN", "WANDB_API_KEY")

# A key is a credential when, lower-cased with '-' as '_', it is one of these names ...
_EXACT = frozenset({"key", "secret", "token", "password", "passwd", "pwd", "credential", "credentials",
                    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "aws_security_token",
                    "access_key", "access_key_id", "secret_key", "secret_access_key", "session_token",
                    "security_token", "client_secret", "api_key", "apikey", "private_key", "auth",
                    "authorization", "sas_token", "account_key", "connection_string"})
# ... or has one of these words as an '_'-separated part (so max_tokens is not one) ...
_PARTS = frozenset({"secret", "password", "passwd", "token", "credential", "credentials", "apikey",
                    "authorization"})
# ... or contains one of these.
_PHRASES = ("access_key", "key_id", "api_key", "private_key", "account_key", "secret_key", "session_token")

_ENV_HINT = ("set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) in the environment, "
             "or use AWS_PROFILE / an instance role; s3fs and fsspec read them from there")


def is_credential_key(key: Any) -> bool:
    """True when a mapping key names a credential (case-insensitive)."""
    if not isinstance(key, str):
        return False
    k = key.strip().lower().replace("-", "_")
    return k in _EXACT or bool(_PARTS & set(k.split("_"))) or any(p in k for p in _PHRASES)


def find_credentials(value: Any, where: str = "") -> list[str]:
    """Key paths of every credential-looking key at any depth of mappings and lists."""
    found: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            path = f"{where}.{k}" if where else str(k)
            if is_credential_key(k):
                found.append(path)
            else:
                found += find_credentials(v, path)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found += find_credentials(v, f"{where}[{i}]")
    return found


def check_no_credentials(value: Any, where: str) -> None:
    """Raise ConfigError naming the first credential key found under `where`."""
    found = find_credentials(value, where)
    if found:
        raise ConfigError(f"{found[0]}: credentials are not allowed in configs (they would be written to "
                          f"logs, checkpoints and launch files); {_ENV_HINT}")


def _env_secrets() -> list[str]:
    # Very short values would redact innocent text; real credentials are long.
    return [v for v in (os.environ.get(n, "") for n in CREDENTIAL_ENV) if len(v) >= 4]


def redact(value: Any, _secrets: list[str] | None = None) -> Any:
    """A copy of `value` (mappings, lists, strings) with credential keys' values and every
    credential environment variable's value replaced by '***'. Other types pass unchanged."""
    secrets = _env_secrets() if _secrets is None else _secrets
    if isinstance(value, dict):
        return {k: (REDACTED if is_credential_key(k) and v not in (None, "", {}) else redact(v, secrets))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, secrets) for v in value]
    if isinstance(value, tuple):
        return tuple(redact(v, secrets) for v in value)
    if isinstance(value, str):
        for s in secrets:
            value = value.replace(s, REDACTED)
        return value
    return value


def redact_text(text: str) -> str:
    """`text` with every credential environment variable's value replaced by '***'."""
    return redact(text)
