"""`vgpt plan`: will each stage fit, what peak it reaches, and how fast it runs, before a GPU is booked.

    vgpt plan --config configs/pretrain.yaml --device h100-80gb [--world-size 8] [--stage 4]
    vgpt plan --config configs/stages/stage4.yaml --cluster configs/cluster/h100-slurm.yaml
    vgpt plan --config configs/debug.yaml                       (the host: a CPU breakdown)

For every stage: the per-device memory at peak, by part (parameters, gradients,
fp32 masters and AdamW moments after ZeRO partitioning, activations traced
through the real model with the configured checkpointing, the attention
backend's workspace, DeepSpeed's buckets), the host's async-checkpoint buffers,
the verdict (fits with N GB to spare / does not fit) and, when it does not, the
cheapest change that does (SP, TP, ZeRO stage, offload, activation
checkpointing); and the step time and tokens/s from the step's FLOPs at
`plan.mfu` (pretrain/training/memory_plan.py). Devices: jobconfig/plan.py
DEVICES. With `--cluster`, the world size, device and layout are the ones
`vgpt launch` would use. A stage on latent data is planned for its dataset's
heaviest latent shape with that shape's batch (the loader's shape buckets,
read from its index as `vgpt train` does); where the dataset cannot be read,
for plan.latent_size (else the cluster's, else 40x40), said on stderr. Exit
status 1 when a stage does not fit.
"""
from __future__ import annotations

import json
import sys

from jobconfig.curriculum import plan_stages
from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig
from jobconfig.loader import load_config
from jobconfig.plan import DEVICES, device_spec
from orchestration.cli import CONFIG_HELP, reports_bad_input, verb_parser
from orchestration.launch.cluster import ClusterConfig
from orchestration.launch.layout import stage_layout
from orchestration.planning import launch_device
from orchestration.preflight import check_s3_credentials, check_stage_data
from pretrain.training.memory_plan import default_latent_size, format_plan, plan_stage


@reports_bad_input("plan")
def main(argv: list[str]) -> int:
    parser = verb_parser("plan", __doc__, JobConfig)
    parser.add_argument("--config", required=True, help=CONFIG_HELP)
    parser.add_argument("--cluster", default=None, help="a configs/cluster/*.yaml: its world size, device and "
                                                        "the layout `vgpt launch` derives per stage")
    parser.add_argument("--device", default=None, help=f"device kind, one of {sorted(DEVICES)} (plan.device); "
                                                       "none: the cluster's, else the host")
    parser.add_argument("--world-size", type=int, default=None, help="devices in the job (default: the "
                                                                     "cluster's, else 8 with a device, 1 on the host)")
    parser.add_argument("--stage", type=int, default=None, help="plan only this stage of a curriculum")
    parser.add_argument("--json", action="store_true", help="print the plans as JSON")
    args, overrides = parser.parse_known_args(argv)
    if args.device:
        device_spec(args.device, "--device")
        overrides.append(f"--plan.device={args.device}")
    cluster = load_config(args.cluster, cls=ClusterConfig, flag_prefix="cluster.") if args.cluster else None
    # one node of 8 devices unless told; a host plan (no device) is of this one process
    has_device = any(o.startswith("--plan.device=") for o in overrides)
    world = args.world_size or (cluster.world_size if cluster else 8 if has_device else 1)
    if world < 1:
        raise ConfigError(f"--world-size: got {world}, expected >= 1")
    plans, indexes = [], {}
    for i, (name, cfg) in enumerate(plan_stages(args.config, overrides, args.stage), start=1):
        if args.stage is not None and i != args.stage:
            continue
        latent = None
        if cluster is not None:
            lay = stage_layout(name, cfg, cluster)
            cfg.parallel.tensor_parallel, cfg.parallel.sequence_parallel = lay.tp, lay.sp
            latent = cluster.latent_size
            device = launch_device(cfg, cluster.device, cluster.accelerator)
        else:
            device = device_spec(cfg.plan.device) if cfg.plan.device else None
        if cfg.train.data == "latents" and not cfg.plan.latent_size:
            try:  # the heaviest latent shape of the stage's datasets, as `vgpt train` plans it
                check_s3_credentials(cfg.data, "data")
                latent = check_stage_data(name, cfg, indexes) or latent
            except ConfigError as e:  # planning away from the data: say what the plan assumes instead
                hw = latent or default_latent_size(cfg)
                print(f"vgpt plan: {name}: planned for latents of {hw[0]}x{hw[1]} (plan.latent_size sets it): "
                      f"the dataset cannot be read here: {e}", file=sys.stderr)
        plans.append(plan_stage(cfg, world, device, latent, stage=name))
    if args.json:
        print(json.dumps([p.to_dict() for p in plans], indent=2))
    else:
        print("\n\n".join(format_plan(p) for p in plans))
    return 1 if any(p.fits is False for p in plans) else 0
