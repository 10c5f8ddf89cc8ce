"""`python -m orchestration.cli ...` is `vgpt ...` (what torchrun and subprocesses run)."""
import sys

from orchestration.cli import main

sys.exit(main())
