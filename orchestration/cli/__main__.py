"""`python -m orchestration.cli ...` is `vgpt ...`: what torchrun, the DeepSpeed launcher, the rendered
launch files and subprocesses run.

Under torchrun (which gives every rank a TORCHELASTIC_ERROR_FILE) `main` is wrapped in torch
elastic's `@record`: an exception that ends a rank is written to that file, so torchrun's failure
summary, and torchrun's own error file, name the root cause (exception and traceback) instead of
only an exit code. Bad input (ConfigError) stays one line and exit status 2 (`reports_bad_input`),
and is written to the error file too. A rank that fails only because a peer has gone is recorded as
the consequence it is (orchestration/launch/root_cause.py), so torchrun names the rank that failed
first. Elsewhere `@record` would only enable faulthandler, so the
import of torch's elastic package is skipped and `python -m orchestration.cli --help` stays fast.
"""
import gc
import os
import sys

from orchestration.cli import BAD_INPUT_HOOKS, main

if os.environ.get("TORCHELASTIC_ERROR_FILE"):
    from torch.distributed.elastic.multiprocessing.errors import record

    from orchestration.launch.root_cause import RootCauseErrorHandler

    _errors = RootCauseErrorHandler()
    BAD_INPUT_HOOKS.append(_errors.record_exception)
    main = record(main, error_handler=_errors)

code = main()
# Everything this command opened is closed by now; what is left is the interpreter's last garbage
# collection over torch's and DeepSpeed's module graph (~0.7 s on a 2-core machine, per process and
# rank). Frozen objects are skipped by it; refcounts and atexit still run as before.
gc.freeze()
sys.exit(code)
