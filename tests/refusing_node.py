"""A Ray runtime-env plugin that makes one node refuse a job, as a node whose disk is full or whose
package mirror is down refuses it: the node runs it (RAY_RUNTIME_ENV_PLUGINS in that node's
environment, tests/precompute_harness.py `RayNode(refuse_jobs=True)`), and a job whose runtime env
names the plugin (`REFUSE_ON_NODES`) fails to set up there and only there. Ray's own machinery then
raises RuntimeEnvSetupError for every task and actor of the job sent to that node."""
from __future__ import annotations

from ray._private.runtime_env.plugin import RuntimeEnvPlugin

# the runtime-env entry that this plugin refuses; a node without the plugin ignores it
REFUSE_ON_NODES = {"vgpt_test_refuse": {"why": "disk full"}}


class RefuseJobs(RuntimeEnvPlugin):
    name = "vgpt_test_refuse"

    async def create(self, uri, runtime_env, context, logger) -> int:
        raise RuntimeError(f"this node cannot set up the job: {runtime_env[self.name]['why']} (tests/refusing_node.py)")
