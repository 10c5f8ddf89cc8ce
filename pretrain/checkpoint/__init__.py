"""One checkpoint component: the manager (save, resume, layout changes, retention), file integrity,
storage (local or object store), DeepSpeed's files (hashed writer, offline reader), the portable
form, and exports."""
