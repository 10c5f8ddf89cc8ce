"""Opening storage that rides out throttling: one place for every fsspec URL the project reads or writes
(latent shards, precompute outputs, checkpoints).

An object store answers a request-rate burst with throttling (S3: HTTP 503
`SlowDown`) and expects clients to back off; a run must lose time there, not
stop. Two layers do that, both with exponential backoff, full jitter and a
bounded total time, both counted (`retry_count()`) and logged one line per
retry, e.g.

    [storage] throttled: 503 SlowDown on GetObject s3://bucket/key (attempt 2/10); retrying in 0.13s

1. Per request, for s3:// and s3a:// (`open_fs`): botocore retries every API
   call; `storage_options` asks for botocore's standard retry mode with a
   bounded number of attempts through s3fs `config_kwargs`, and `RetryingS3FileSystem` installs a `needs-retry` hook on
   the botocore client s3fs creates (again whenever s3fs re-creates it) that
   takes the retry decision for throttling, 5xx and connection errors with the
   `Backoff` below (so one dataclass sets the backoff everywhere), counts and
   logs it, and stops when the attempts or the total time are spent. Other
   errors keep botocore's own decision. s3fs's own whole-call retry layer is
   set to one attempt so the two do not multiply.
2. Per operation (`retrying`): what surfaces past that (a body stream cut
   mid-read, s3fs's OSError(EBUSY) once botocore has given up, any other fsspec
   backend) is retried around a whole operation (a shard read, a checkpoint
   file, a precompute commit); errors that say something about the data
   (FileNotFoundError, PermissionError, ...) are raised at once.

The backoff is `Backoff`'s defaults unless the caller passes one or the
environment variable VGPT_STORAGE_BACKOFF overrides fields ("base_s=0.5,total_s=600").

The options stay plain, picklable dicts (Ray ships them to remote tasks): the
hook lives in the filesystem class, installed when `open_fs` opens it, never
in the options. User options win over ours, key by key. Logged lines name the
operation, the object URL and the server's error code, never credentials.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.asyn import sync_wrapper
from fsspec.implementations.local import LocalFileSystem
from s3fs import S3FileSystem

log = logging.getLogger(__name__)
T = TypeVar("T")

S3_PROTOCOLS = ("s3", "s3a")
BACKOFF_ENV = "VGPT_STORAGE_BACKOFF"
# botocore "standard": its own decisions for what the hook leaves to it. Not "adaptive": its client-side
# token bucket drops a throttled client to ~0.5 requests/s and recovers slowly, for all threads sharing the
# client (a loader's prefetch); measured here, 1-2 s between attempts on top of the backoff. A user who
# wants it sets config_kwargs={"retries": {"mode": "adaptive"}} (user options win).
RETRY_MODE = "standard"
THROTTLING_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException", "LimitExceededException", "SlowDownException",
})
TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException"})
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
TRANSIENT_ERRNO = frozenset({errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                             errno.ECONNABORTED, errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH,
                             errno.ENETDOWN, getattr(errno, "EREMOTEIO", 121)})
# exceptions raised past botocore/s3fs by name (aiohttp, http.client, botocore) so none need importing here
TRANSIENT_TYPES = frozenset({"ClientPayloadError", "ServerDisconnectedError", "ClientConnectionError",
                             "IncompleteRead", "ResponseParserError", "HTTPClientError", "ConnectionError",
                             "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError"})


@dataclass(frozen=True)
class Backoff:
    """Retry n waits uniform(0, min(cap_s, base_s * 2**(n-1))) s (full jitter); at most `max_attempts`
    attempts, and no retry that would end past `total_s` after the first attempt began."""
    base_s: float = 0.1
    cap_s: float = 10.0
    total_s: float = 120.0
    max_attempts: int = 10

    def __post_init__(self):
        if not (self.base_s > 0 and self.cap_s >= self.base_s and self.total_s >= 0 and self.max_attempts >= 1):
            raise ValueError(f"Backoff: need base_s > 0, cap_s >= base_s, total_s >= 0, max_attempts >= 1; "
                             f"got {self}")

    @classmethod
    def from_env(cls) -> "Backoff":
        """The defaults, overridden field by field by BACKOFF_ENV ("base_s=0.5,total_s=600"), which reaches
        every process of a job (Ray workers, `vgpt` subprocesses) where no config is passed down."""
        spec = os.environ.get(BACKOFF_ENV, "").strip()
        if not spec:
            return cls()
        kinds = {f.name: (int if f.name == "max_attempts" else float) for f in fields(cls)}
        try:
            items = dict(item.split("=", 1) for item in spec.split(","))
            return cls(**{k.strip(): kinds[k.strip()](v) for k, v in items.items()})
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{BACKOFF_ENV}={spec!r}: expected comma-separated name=value with names "
                             f"{', '.join(kinds)} ({e})") from None

    def delay(self, retry: int) -> float:
        return random.random() * min(self.cap_s, self.base_s * 2 ** (retry - 1))


# ------------------------------------------------------------------ counting and logging
_lock = threading.Lock()
_retries = 0


def retry_count() -> int:
    """Retries taken in this process so far, both layers together (callers report deltas)."""
    with _lock:
        return _retries


def _note_retry(reason: str, what: str, attempt: int, max_attempts: int, delay: float) -> None:
    global _retries
    with _lock:
        _retries += 1
    log.warning("[storage] %s on %s (attempt %d/%d); retrying in %.2fs", reason, what, attempt, max_attempts, delay)


def _give_up(reason: str, what: str, attempts: int, elapsed: float) -> None:
    log.warning("[storage] giving up: %s on %s after %d attempt(s) in %.1fs", reason, what, attempts, elapsed)


# ------------------------------------------------------------------ options and filesystems
def protocol_of(url: str) -> str:
    return fsspec.core.split_protocol(str(url))[0] or "file"


def storage_options(url: str, user_options: dict | None = None, backoff: Backoff | None = None) -> dict:
    """fsspec options for `url`: the user's, plus (for S3) botocore retries in RETRY_MODE bounded by
    `backoff.max_attempts`; the user's config_kwargs (and their `retries` entries) win. A new plain dict."""
    opts = dict(user_options or {})
    if protocol_of(url) not in S3_PROTOCOLS:
        return opts
    b = backoff or Backoff.from_env()
    user_config = dict(opts.get("config_kwargs") or {})
    user_retries = dict(user_config.get("retries") or {})
    retries = {"mode": RETRY_MODE} if "max_attempts" in user_retries else {"mode": RETRY_MODE,
                                                                             "total_max_attempts": b.max_attempts}
    opts["config_kwargs"] = {**user_config, "retries": {**retries, **user_retries}}
    return opts


def open_fs(url: str, user_options: dict | None = None, backoff: Backoff | None = None
            ) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol or trailing '/') for `url`, retrying as the module doc says.
    A drop-in for `fsspec.core.url_to_fs(url, **user_options)`."""
    opts = storage_options(url, user_options, backoff)
    if protocol_of(url) in S3_PROTOCOLS:
        fs = RetryingS3FileSystem(retry_backoff=backoff or Backoff.from_env(), **opts)
        return fs, fs._strip_protocol(url).rstrip("/")
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs, path.rstrip("/")


class RetryingS3FileSystem(S3FileSystem):
    """s3fs with the retry hook of this module on every botocore client it creates. Picklable like any
    fsspec filesystem (rebuilt from its options, `retry_backoff` included); cached per options like them."""

    retries = 1  # s3fs's own whole-call retries: botocore (hooked) is the one retry layer for API calls
    _hooked = None

    def __init__(self, *args, retry_backoff: Backoff | None = None, **kwargs):
        self.retry_backoff = retry_backoff or Backoff.from_env()
        super().__init__(*args, **kwargs)

    async def set_session(self, refresh=False, kwargs={}):  # noqa: B006 (s3fs's signature)
        s3 = await super().set_session(refresh=refresh, kwargs=kwargs)
        if s3 is not self._hooked:  # a new client (first use, or s3fs re-created it): hook it
            hooks = _RetryHook(self.retry_backoff)
            if self.session is not None:  # clients s3fs makes later from this session (per-region) copy it
                hooks.install(self.session, first=False)
            hooks.install(s3.meta.events, first=True)
            self._hooked = s3
        return s3

    _connect = set_session
    connect = sync_wrapper(set_session)


class _RetryHook:
    """botocore event handlers: remember what a call is about, then decide and count its retries."""

    TARGET_ID, RETRY_ID = "vgpt-storage-target", "vgpt-storage-retry"

    def __init__(self, backoff: Backoff):
        self.backoff = backoff

    def install(self, events: Any, first: bool) -> None:
        """On a client's event emitter (ahead of botocore's retry handler) or a session (copied into the
        clients it creates later). Idempotent: unique ids."""
        events.register("before-parameter-build.s3", self.note_call, unique_id=self.TARGET_ID)
        register = events.register_first if first else events.register
        register("needs-retry.s3", self.needs_retry, unique_id=self.RETRY_ID)

    @staticmethod
    def note_call(params: dict, model: Any, context: dict, **kwargs) -> None:
        where = params.get("Key", params.get("Prefix", ""))
        target = f"s3://{params['Bucket']}/{where}" if "Bucket" in params else ""
        context["vgpt_storage"] = {"what": f"{model.name} {target}".strip(), "t0": time.monotonic()}

    def needs_retry(self, response: Any, attempts: int, caught_exception: Any, request_dict: dict,
                    operation: Any, **kwargs) -> float | bool | None:
        """The wait before the next attempt, False to stop, None to leave it to botocore (not ours)."""
        reason = _request_failure(response, caught_exception)
        if reason is None:
            return None
        call = request_dict.get("context", {}).setdefault("vgpt_storage", {"what": operation.name,
                                                                         "t0": time.monotonic()})
        b, elapsed = self.backoff, time.monotonic() - call["t0"]
        delay = b.delay(attempts)
        if attempts >= b.max_attempts or elapsed + delay > b.total_s:
            _give_up(reason, call["what"], attempts, elapsed)
            return False
        _note_retry(reason, call["what"], attempts + 1, b.max_attempts, delay)
        return delay


def _request_failure(response: Any, caught_exception: Any) -> str | None:
    """'throttled: 503 SlowDown', 'server error: 500 InternalError', 'connection error: ...' or None."""
    if caught_exception is not None:
        if any(c.__name__ in TRANSIENT_TYPES for c in type(caught_exception).__mro__):
            return f"connection error: {type(caught_exception).__name__}"
        return None
    if response is None:
        return None
    http, parsed = response
    status = http.status_code
    code = str(((parsed or {}).get("Error") or {}).get("Code") or "")
    label = f"{status} {code}" if code and code != str(status) else str(status)  # HEAD errors carry no code
    if code in THROTTLING_CODES or status == 429 or (status == 503 and code in ("", "503")):
        return f"throttled: {label}"
    if status in RETRY_STATUS or code in TRANSIENT_CODES:
        return f"server error: {label}"
    return None


# ------------------------------------------------------------------ whole operations
def is_transient(exc: BaseException) -> bool:
    """Worth retrying: throttling, server and network errors; never what says something about the data."""
    if isinstance(exc, PERMANENT):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno in TRANSIENT_ERRNO
    response = getattr(exc, "response", None)  # a botocore ClientError that s3fs did not translate
    if isinstance(response, dict):
        code = str((response.get("Error") or {}).get("Code") or "")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return code in THROTTLING_CODES or code in TRANSIENT_CODES or status in RETRY_STATUS
    return any(c.__name__ in TRANSIENT_TYPES for c in type(exc).__mro__)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.EBUSY:
        return f"throttled: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def retrying(fn: Callable[[], T], what: str, backoff: Backoff | None = None,
             transient: Callable[[BaseException], bool] = is_transient) -> T:
    """fn(), retried on transient errors with `backoff`, each retry counted and logged as being about
    `what` (name the object: 'shard s3://b/x.tar'). Non-transient errors are raised as they are; when
    the attempts or the time run out, OSError('<what>: failed N time(s) over Ts: <last error>'), with the
    last error's errno, chained to it. `fn` must be safe to run again from the start."""
    b = backoff or Backoff.from_env()
    t0 = time.monotonic()
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as e:
            if not transient(e):
                raise
            elapsed, delay = time.monotonic() - t0, b.delay(attempt)
            if attempt >= b.max_attempts or elapsed + delay > b.total_s:
                _give_up(_describe(e), what, attempt, elapsed)
                code = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
                raise OSError(code, f"{what}: failed {attempt} time(s) over {elapsed:.1f}s: {e}") from e
            _note_retry(_describe(e), what, attempt + 1, b.max_attempts, delay)
            time.sleep(delay)
            attempt += 1


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Readers see the old file or the new one, never part of it (a writer killed mid-write leaves at
    most a hidden temp file): a local file is renamed into place; an object store PUT is atomic."""
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fs.pipe_file(path, data)
