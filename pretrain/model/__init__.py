"""Video-GPT as plain single-device PyTorch: the clip attention, the Phi-3-architecture backbone, the
token sequence of a batch and the model around them. No parallelism: pretrain/training/parallelize.py
applies it from outside."""
