"""Video-GPT model and next-clip diffusion objective: plain single-device PyTorch."""
