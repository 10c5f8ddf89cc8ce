"""torchrun whose rendezvous store listens on loopback only when its address is loopback.

`python -m orchestration.launch.local_torchrun [torch.distributed.run] ARGS` is
`python -m torch.distributed.run ARGS` (the optional module word keeps rendered commands readable),
except that a store server the agent hosts on a loopback address (--master_addr=127.0.0.1,
--rdzv-endpoint=127.0.0.1:PORT, --standalone) is bound to that address: torch's TCPStore
otherwise listens on every interface ([::]:PORT, no authentication) whatever host it is told.
Non-loopback addresses (multi-node: the interface the user names) are left to torch.
The rendered single-node torchrun runs it as a module; `vgpt train --nproc N` runs the agent inside
its own process (`run_agent`), which has torch imported already: one interpreter fewer per launch.

Its agent does not restart a worker group whose failed ranks all exited with BAD_INPUT: a ConfigError
(bad input, a refused resume) that no restart can fix would otherwise spend the restart budget
(`--max-restarts`), restarting the same refusal, and end in torchrun's error dump. The job ends at
once with exit status BAD_INPUT and one line, the first rank's message (the ranks leave it to the
agent: jobconfig.errors.AGENT_REPORTS_BAD_INPUT).
"""
from __future__ import annotations

import gc
import logging
import os
import sys

import torch.distributed as dist
from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure, record

from jobconfig.errors import AGENT_REPORTS_BAD_INPUT, BAD_INPUT
from parallel.device import is_loopback, loopback_store

_TCPStore = dist.TCPStore


def _store(host_name: str, port: int, world_size: int | None = None, is_master: bool = False,
           timeout=None, wait_for_workers: bool = True, multi_tenant: bool = False, **kw):
    from datetime import timedelta
    if is_master and is_loopback(host_name) and not kw:
        return loopback_store(host_name, port, world_size, True, timeout or timedelta(minutes=5),
                              multi_tenant=multi_tenant)
    return _TCPStore(host_name, port, world_size, is_master, timeout or dist.constants.default_pg_timeout,
                     wait_for_workers=wait_for_workers, multi_tenant=multi_tenant, **kw)


def _store_kw(host=None, port=None, *args, host_name=None, **kw):
    return _store(host_name if host_name is not None else host, port, *args, **kw)


def refusal(failures: dict[int, ProcessFailure]) -> str | None:
    """The message of the first rank that exited with BAD_INPUT, if any did: a refusal, which a restart
    would only repeat. (Its peers may fail otherwise, e.g. on the connection it left; that is its doing.)"""
    refused = [f for f in failures.values() if f.exitcode == BAD_INPUT]
    if not refused:
        return None
    message = min(refused, key=lambda f: f.timestamp).message  # the rank's error file (__main__.py's hook)
    if isinstance(message, dict):
        message = str(message.get("message", ""))
    return message.partition(": ")[2] or message  # without its "<ExceptionClass>: "


class _QuietRefusals(logging.Filter):
    """Drops the agent's log lines about a refusal (its one line is printed by `run_agent`): the peers
    it stops ("closing signal", logged first), the rank that exited with BAD_INPUT, and the note that
    this process has no error file of its own to copy the root cause to. The peers' lines are held
    until the failure's line says whether it was a refusal; any other failure gets them back."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "closing signal" in text:
            self.held.append(record)
            return False
        if text.startswith("failed (exitcode: ") and f"(exitcode: {BAD_INPUT})" in text:
            self.held = []
            return False
        self.release()  # not a refusal: the held lines as torch logged them, before this one
        return "no error file defined for parent" not in text

    def release(self) -> None:
        held, self.held = self.held, []
        for r in held:
            logging.getLogger(r.name).callHandlers(r)


_QUIET = _QuietRefusals()
_QUIET_LOGGERS = ("torch.distributed.elastic.multiprocessing.api",
                  "torch.distributed.elastic.multiprocessing.errors.error_handler")


class RefusalStopsAgent(LocalElasticAgent):
    """torchrun's local agent, except that a refused worker group is not restarted."""

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        result = super()._monitor_workers(worker_group)
        if result.state == WorkerState.FAILED and refusal(result.failures) is not None:
            self._remaining_restarts = 0
        return result


def patch() -> None:
    """Route the elastic agent's store servers through `_store`, and launch RefusalStopsAgent (idempotent)."""
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, dynamic_rendezvous, static_tcp_rendezvous
    from torch.distributed.launcher import api as launcher
    launcher.LocalElasticAgent = RefusalStopsAgent
    for name in _QUIET_LOGGERS:
        if _QUIET not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_QUIET)
    static_tcp_rendezvous.TCPStore = _store_kw
    c10d_rendezvous_backend.TCPStore = _store_kw

    def _server(self, master_addr, master_port):
        return _store_kw(master_addr, master_port, is_master=True, multi_tenant=True)
    dynamic_rendezvous.DynamicRendezvousHandler._create_tcp_store_server = _server


def run_agent(argv: list[str]) -> int:
    """torchrun ARGV in this process, until its workers end: 0; BAD_INPUT when they refused (one line);
    or 1 when they failed for good (after torchrun's failure summary). Either way the root cause is
    copied to this process's TORCHELASTIC_ERROR_FILE, as torchrun's own `@record` does."""
    patch()
    from torch.distributed.run import parse_args, run
    args = parse_args(argv)
    os.environ[AGENT_REPORTS_BAD_INPUT] = "1"  # inherited by the workers
    try:
        record(run)(args)
    except ChildFailedError as e:
        message = refusal(e.failures)
        if message is not None:
            verb = args.training_script_args[:1] if args.module and args.training_script == "orchestration.cli" else []
            print(f"{' '.join(['vgpt', *verb])}: {message}", file=sys.stderr, flush=True)
            return BAD_INPUT
        print(e.format_msg(), file=sys.stderr, flush=True)
        return 1
    finally:
        os.environ.pop(AGENT_REPORTS_BAD_INPUT, None)
        _QUIET.release()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["torch.distributed.run"]:
        argv = argv[1:]
    return run_agent(argv)


if __name__ == "__main__":
    code = main()
    gc.freeze()  # see orchestration/cli/__main__.py: skip the final collection over torch's modules
    sys.exit(code)
