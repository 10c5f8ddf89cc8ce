"""Training: the next-clip diffusion objective, the optimizer and LR schedule, how this model is
parallelised (parallelize.py), throughput metrics, and the one Trainer of all four stages."""
