"""Running jobs: config tree, CLI, precompute job, launch configs, sweeps, checkpoint tools."""
