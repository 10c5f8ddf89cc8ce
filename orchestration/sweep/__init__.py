"""Scaling-law sweeps: the grid config, trials on Ray, and the L(N, D) fit."""
