"""Videos -> latents -> shards -> batches."""
