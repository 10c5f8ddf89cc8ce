"""A rank's error file under torchrun, written so that torchrun names the rank that failed first.

torchrun's agent reports as root cause the failure whose error file has the smallest `timestamp`,
a whole number of seconds, and among equal ones the lowest rank. When one rank raises, its peers
fail a moment later in their next collective ("Connection closed by peer" from gloo, a remote error
from NCCL): usually within the same second, so the lowest rank that merely noticed the loss was
named as root cause, with the transport's message instead of the exception that ended the job.

`RootCauseErrorHandler` is torch elastic's error handler, except that such a consequence of a
peer's failure is stamped one second later than it happened and marked `peer_failure: true`.
Every real failure before it then sorts first, whatever the ranks' order; a rank whose only error
is a lost peer (its peer was SIGKILLed, say, and left no file) is still reported, after the peer.
It works with any launcher (torchrun, the DeepSpeed launcher, Slurm) since it acts in the rank.
"""
from __future__ import annotations

import json
import time
import traceback

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors.error_handler import ErrorHandler

# What a collective raises in a rank whose peer has gone (process exited, socket closed).
PEER_LOSS_MARKERS = (
    "Connection closed by peer",  # gloo, the peer's process exited
    "Connection reset by peer",  # gloo and the TCP store
    "remote process exited or there was a network error",  # NCCL (ncclRemoteError)
    "NCCL communicator was aborted",
)


def is_peer_loss(error: BaseException) -> bool:
    """Whether ERROR says a peer rank went away, rather than what went wrong in this rank."""
    return isinstance(error, dist.DistNetworkError) or any(m in str(error) for m in PEER_LOSS_MARKERS)


class RootCauseErrorHandler(ErrorHandler):
    """torch elastic's ErrorHandler; a lost peer is recorded one second later, as a consequence."""

    def record_exception(self, e: BaseException) -> None:
        if not is_peer_loss(e):
            super().record_exception(e)
            return
        file = self._get_error_file_path()
        if file:
            info = {"py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()) + 1),
                    "peer_failure": True}
            with open(file, "w") as fp:
                json.dump({"message": {"message": f"{type(e).__name__}: {e}", "extraInfo": info}}, fp)
