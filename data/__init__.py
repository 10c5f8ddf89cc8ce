"""Data: videos -> latents -> shards -> batches, and the batch contract the trainer consumes.

batch.py (the contract and its token count), sources.py (what the trainer reads:
latents or synthetic), loader.py with order.py, buckets.py, shards.py,
shard_format.py, stage.py and batching.py (the streaming loader), video.py, vae.py, vae_fit.py
and precompute_plan.py (the pieces of the precompute farm), synthetic/ (every
synthetic generator: latents, mp4 videos, toy shards).
"""
