"""Running jobs: every `vgpt` verb (cli/), the precompute Ray job (precompute/), launch files
(launch/), scaling-law sweeps (sweep/), the quickstart, and fault injection (faults.py)."""
