"""DeepSpeed imported with its log on stderr, so that `--json` output on stdout stays parseable."""

import contextlib
import importlib.util
import os
import sys


def import_deepspeed_quietly() -> None:
    """Import DeepSpeed, when installed and not yet imported, before anything else does: accelerate imports it during
    training and transformers when it saves a model (the GGUF conversion), and from its import on it logs to the stream
    sys.stdout is then."""
    if importlib.util.find_spec("deepspeed") is None or "deepspeed" in sys.modules:
        return
    import torch

    if not torch.cuda.is_available():
        # Its CPU backend, chosen outright: detecting it costs a warning on every run.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401
