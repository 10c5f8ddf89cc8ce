"""One checkpoint component: the manager (save, resume, layout changes, retention), file integrity,
storage (local or object store), DeepSpeed's files (hashed writer, offline reader), the byte-range
reader of saved fragments (resumes on another layout, `vgpt ckpt reshard`), the portable form, and exports."""
