"""The latent-precompute farm as a Ray job: the driver (job.py), its workers and progress."""
