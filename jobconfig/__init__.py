"""The config base, at the bottom of the import order: it imports nothing else of ours.

errors.py (ConfigError), loader.py (the strict YAML loader, `--a.b=c`
overrides, model presets, errors naming the file or override), help.py (every key
documented for `--help`), curriculum.py (stage files merged over shared
sections), job.py (JobConfig, the one typed tree) and its sections, one file
per concern: model.py, train.py (objective and training loop), data.py
(loader, stage sampling, synthetic data), precompute.py, parallel.py, predict.py.
"""
