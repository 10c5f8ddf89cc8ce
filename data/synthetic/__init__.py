"""Synthetic data, all of it: moving-square latents (training without a dataset), mp4 videos
written with PyAV (precompute, quickstart, tests), and toy latent shards in the real format (loader tests)."""
