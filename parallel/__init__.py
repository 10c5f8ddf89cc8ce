"""Generic distributed machinery, applied from outside to a plain model: devices and the process
group (device.py), DP x TP x SP dimensions and groups (dims.py), tensor and sequence parallel
mechanics that take a plan or a target from the model family (tensor_parallel.py,
sequence_parallel.py), the DeepSpeed engine (engine.py), and rank-aware logging (logs.py).
Nothing here knows Video-GPT."""
