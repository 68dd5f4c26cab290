"""Training one task's new ranks (`learn-task`) on Accelerate."""

import contextlib
import importlib.util
import os
import sys

if importlib.util.find_spec("deepspeed") is not None and "deepspeed" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        # Its CPU backend, chosen outright: detecting it costs a warning on every run.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed logs to stdout from its import on (accelerate imports it whenever it is installed), which would
    # corrupt `--json`; its log handler keeps the stream that sys.stdout is at import time.
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401
