"""A Ray that a command starts on this box listens on loopback only.

Ray decides when it is imported (`ray._private.ray_constants.ENABLE_RAY_CLUSTER`, from
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER) whether a node started here is a box of its own, addressed as
127.0.0.1 with every server bound there, or a cluster member, addressed by the routable interface
with its servers on the wildcard address (measured with Ray 2.60: the GCS, raylet, dashboard and
runtime-env agents, workers and the driver on `[::]`, `0.0.0.0` or the routable address). Setting the
variable after `import ray` changes nothing in this process, and a module that imports Ray at its top
(the precompute workers) makes any later setting too late; so `start_local_ray` sets it for the
processes Ray starts (they import Ray afresh) and sets the decision in this process too. It is a Ray
of its own (`address="local"`): a `ray start` cluster on the same machine is never joined by it.
`vgpt precompute` without a cluster and `vgpt sweep run` without `resources.address` use it; the
quickstart runs both.
"""
from __future__ import annotations

import os

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

# `ray start` flags for a node that shares its machine with another node (the tests' and the bench's
# loopback clusters): workers bind a port the kernel picks. By default every raylet hands its workers
# ports 10002-19999 in order, checking each with a bind it then releases, so two raylets starting
# workers at once can give out the same port, and the worker that loses the bind crashes at start
# (ray-project/ray#19336). `ray.init` already picks random worker ports; a machine of its own needs none.
SHARED_HOST_WORKER_PORTS = ("--min-worker-port", "0", "--max-worker-port", "0")


def start_local_ray(**init_kwargs):
    """`ray.init(**init_kwargs)` of a new one-box Ray (no dashboard) on loopback only; returns the module."""
    os.environ.update(LOOPBACK_ENV)
    import ray
    from ray._private import ray_constants

    # this process may have imported Ray before the variable was set: its decision, made then, is set here
    ray_constants.ENABLE_RAY_CLUSTER = False
    # address="local": a Ray of its own, even where another (a `ray start` cluster) runs on this machine
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", **init_kwargs)
    return ray
