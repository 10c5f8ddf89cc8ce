"""Inference: the next-clip sampler (sampler.py) and the video-in, video-out pipeline (pipeline.py)."""
