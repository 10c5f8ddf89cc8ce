"""torchrun whose rendezvous store listens on loopback only when its address is loopback.

`python -m orchestration.launch.local_torchrun [torch.distributed.run] ARGS` is
`python -m torch.distributed.run ARGS` (the optional module word keeps rendered commands readable),
except that a store server the agent hosts on a loopback address (--master_addr=127.0.0.1,
--rdzv-endpoint=127.0.0.1:PORT, --standalone) is bound to that address: torch's TCPStore
otherwise listens on every interface ([::]:PORT, no authentication) whatever host it is told.
Non-loopback addresses (multi-node: the interface the user names) are left to torch.
The rendered single-node torchrun runs it as a module; `vgpt train --nproc N` runs the agent inside
its own process (`run_agent`), which has torch imported already: one interpreter fewer per launch.
"""
from __future__ import annotations

import gc
import sys

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

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


def patch() -> None:
    """Route the elastic agent's store servers through `_store` (idempotent)."""
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, dynamic_rendezvous, static_tcp_rendezvous
    static_tcp_rendezvous.TCPStore = _store_kw
    c10d_rendezvous_backend.TCPStore = _store_kw

    def _server(self, master_addr, master_port):
        return _store_kw(master_addr, master_port, is_master=True, multi_tenant=True)
    dynamic_rendezvous.DynamicRendezvousHandler._create_tcp_store_server = _server


def run_agent(argv: list[str]) -> int:
    """torchrun ARGV in this process, until its workers end: 0, or 1 when they failed for good (after
    torchrun's failure summary, and the root cause copied to this process's TORCHELASTIC_ERROR_FILE
    as torchrun's own `@record` does)."""
    patch()
    from torch.distributed.run import parse_args, run
    try:
        record(run)(parse_args(argv))
    except ChildFailedError as e:
        print(e.format_msg(), file=sys.stderr, flush=True)
        return 1
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
