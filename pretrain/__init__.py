"""Video-GPT and everything done with it: the model, training, checkpoints, inference, evaluation.

Sub-packages, each importing only those listed before it:
  model/       the plain single-device model (no distributed imports)
  checkpoint/  one checkpoint component: manager, integrity, storage, DeepSpeed files, portable form, export
  training/    the next-clip objective, optimizer and schedule, this model's parallelize.py, the Trainer
  evaluation/  video metrics, scores against baselines, held-out loss, figures
  inference/   the next-clip sampler (KV cache, guidance) and the video-in, video-out pipeline
"""
