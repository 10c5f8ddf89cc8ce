"""Where the precompute driver sends decode work on a multi-node Ray cluster, and how much.

Each decode task is pinned (soft node affinity) to the live node that holds the
decode resources (`precompute.ray.decode_resources`, CPUs) and has the fewest
segments in flight, at most `decode_in_flight` per node: a segment counts
against its node from its decode until its encoder is done with it, because
its frames sit in that node's object store until then. Soft affinity means a
task whose node died runs elsewhere (Ray's retry) instead of waiting for it.
The node list is re-read every few seconds: nodes that join get work, nodes
that died get no more, and neither does a node that refused the job (it could
not set up the job's runtime env; the driver requeues what it was given).
Per-node counts of decodes and encodes are kept for the job log (and the
multi-node test: both nodes did work).
"""
from __future__ import annotations

import time

from jobconfig.precompute import PrecomputeRayConfig

_BUILTIN = ("CPU", "GPU", "memory", "object_store_memory")


def node_label(resources: dict) -> str:
    """The node's custom resources (what the config places work by), e.g. 'video_decode,gpu_box'."""
    names = [r for r in resources if r not in _BUILTIN and not r.startswith(("node:", "accelerator_type:"))]
    return ",".join(sorted(names))


class NodeSlots:
    def __init__(self, ray, cfg: PrecomputeRayConfig, refresh_s: float = 2.0, clock=time.monotonic):
        self.ray, self.cfg, self.refresh_s, self.clock = ray, cfg, refresh_s, clock
        self.alive: list[str] = []
        self.labels: dict[str, str] = {}
        self.in_flight: dict[str, int] = {}
        self.decoded: dict[str, int] = {}
        self.encoded: dict[str, int] = {}
        self.refused: dict[str, str] = {}  # node -> why it cannot run this job
        self.last = -float("inf")
        self.refresh(force=True)

    def _fits(self, resources: dict) -> bool:
        need = {"CPU": self.cfg.decode_cpus, **self.cfg.decode_resources}
        return all(resources.get(r, 0) >= amount for r, amount in need.items() if amount > 0)

    def refresh(self, force: bool = False) -> None:
        if not force and self.clock() - self.last < self.refresh_s:
            return
        self.last = self.clock()
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        for n in nodes:
            self.labels.setdefault(n["NodeID"], node_label(n.get("Resources", {})))
        self.alive = sorted(n["NodeID"] for n in nodes
                            if self._fits(n.get("Resources", {})) and n["NodeID"] not in self.refused)

    def refuse(self, node: str, why: str) -> bool:
        """`node` cannot run this job: no more decode work goes there. True the first time."""
        first = node not in self.refused
        self.refused.setdefault(node, why)
        self.alive = [n for n in self.alive if n != node]
        return first

    def pick(self) -> str | None:
        """The live decode node with the fewest segments in flight, if it has room."""
        self.refresh()
        free = [n for n in self.alive if self.in_flight.get(n, 0) < self.cfg.decode_in_flight]
        return min(free, key=lambda n: self.in_flight.get(n, 0)) if free else None

    def take(self, node: str) -> None:
        self.in_flight[node] = self.in_flight.get(node, 0) + 1

    def release(self, node: str) -> None:
        self.in_flight[node] -= 1

    def count(self, kind: str, node: str | None) -> None:
        if node:
            table = self.decoded if kind == "decode" else self.encoded
            table[node] = table.get(node, 0) + 1

    def report(self) -> dict:
        """node id -> its custom resources, decodes and encodes so far, and whether it is a decode node now."""
        nodes = sorted(set(self.decoded) | set(self.encoded) | set(self.alive) | set(self.refused))
        return {n: {"resources": self.labels.get(n, ""), "decoded": self.decoded.get(n, 0),
                    "encoded": self.encoded.get(n, 0), "alive": n in self.alive,
                    **({"refused": self.refused[n]} if n in self.refused else {})} for n in nodes}

    def line(self) -> str:
        return "; ".join(f"{n[:8]}[{r['resources']}] decoded {r['decoded']} encoded {r['encoded']}"
                         + (f" (refused the job: {r['refused']})" if "refused" in r else "" if r["alive"] else " (gone)")
                         for n, r in self.report().items())
