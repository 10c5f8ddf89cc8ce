"""`vgpt launch`: write the launch files for one curriculum stage on one cluster.

    vgpt launch --stage 4 --cluster configs/cluster/h100-slurm.yaml --target slurm --out launch/s4
    vgpt launch --stage 1 --cluster configs/cluster/local-cpu.yaml --target torchrun --out DIR
        [--config configs/pretrain.yaml] [--cluster.key=value ...] [--section.key=value ...]

Replaces the reference's hand-edited per-stage bash scripts: the stage's config
comes from the curriculum (`plan_stages`), the cluster's shape from
`configs/cluster/*.yaml`, and the parallel layout (DP x TP x SP) is derived and
checked for every node count of the elastic range before anything is written.
The stage's memory is planned on the cluster's device (`device`, else its
accelerator's usual kind) and a layout that does not fit is refused, naming the
shortfall and the smallest fix (`--plan.ignore=true` writes it anyway); the
plan is written next to the files (plan.txt, plan.json).
`--cluster.x=y` overrides edit the cluster description; other `--a.b=c`
overrides go to the training job (and into the rendered command).
"""
from __future__ import annotations

from jobconfig.job import JobConfig
from orchestration.cli import CONFIG_HELP, reports_bad_input, verb_parser
from orchestration.launch.cluster import ClusterConfig
from orchestration.launch.plan import plan_launch, render
from orchestration.launch.targets import TARGETS
from orchestration.planning import write_plan


@reports_bad_input("launch")
def main(argv: list[str]) -> int:
    parser = verb_parser("launch", __doc__, JobConfig, more=((ClusterConfig, "cluster."),))
    parser.add_argument("--stage", type=int, required=True, help="the curriculum stage to launch (1-based)")
    parser.add_argument("--cluster", required=True, help="a configs/cluster/*.yaml description; "
                                                         "--cluster.key=value overrides its keys (listed below)")
    parser.add_argument("--target", required=True, choices=sorted(TARGETS),
                        help="; ".join(f"{name}: {TARGETS[name].__doc__.splitlines()[0].rstrip('.')}"
                                       for name in sorted(TARGETS)))
    parser.add_argument("--out", required=True, help="directory for the rendered files")
    parser.add_argument("--config", default="configs/pretrain.yaml",
                        help=f"(default configs/pretrain.yaml, as seen from the cluster's workdir) {CONFIG_HELP}")
    args, rest = parser.parse_known_args(argv)
    cluster_ov = ["--" + a[len("--cluster."):] for a in rest if a.startswith("--cluster.")]
    overrides = [a for a in rest if not a.startswith("--cluster.")]
    spec = plan_launch(args.stage, args.cluster, args.config, overrides, cluster_ov)
    files = render(spec, args.target, args.out)
    if spec.memory_plans:  # planned on the cluster's device (none for a CPU cluster)
        files += write_plan(args.out, spec.memory_plans)
        p = spec.memory_plans[0]
        assumed = "" if spec.cluster.device or "--plan.device" in " ".join(overrides) else \
            " (assumed: the cluster names no `device`)"
        print(f"  memory plan on {p.device.kind}{assumed}: {p.verdict()}")
    lay = spec.layout
    print(f"stage {args.stage} on {spec.cluster.name}: {lay.world_size} devices = DP {lay.dp} x TP {lay.tp} "
          f"x SP {lay.sp}")
    for f in files:
        print(f"  wrote {f}")
    return 0
