"""Loading a base model and tokenizer; GGUF files are converted once into the cache."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from moram_cli.errors import MoramError
from moram_cli.models.cache import cache_dir
from moram_cli.models.reference import BaseModelRef, current_fingerprint, embedded_gguf_path, loader_failure
from moram_cli.quiet_deepspeed import import_deepspeed_quietly
from moram_cli.store.config import DTYPES

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


def load_base_model(
    ref: BaseModelRef, dtype: str = "float32", trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model a store was built on, refusing one whose files changed since."""
    now = current_fingerprint(ref)
    if now != ref.fingerprint:
        raise MoramError(
            f"base model {ref.source} changed since the store was created (fingerprint {ref.fingerprint[:12]} -> {now[:12]}); "
            "restore the original model or create a new store"
        )
    source, revision = _loadable_source(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=TORCH_DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # every loader failure gets the same one-line advice
        raise MoramError(f"cannot load base model {ref.source}: {loader_failure(exc)}; check the model files or re-create the store") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The model's context, where --max-length is checked (data.encode.check_context): a tokenizer's own limit is often unset.
    tokenizer.model_max_length = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    model.eval()
    return model, tokenizer


def _loadable_source(ref: BaseModelRef) -> tuple[str, str | None]:
    if ref.kind == "hub":
        return ref.source, None if ref.fingerprint == "unknown" else ref.fingerprint
    if ref.kind == "local":
        return ref.source, None
    gguf = embedded_gguf_path() if ref.kind == "embedded" else Path(ref.source)
    return str(converted_gguf(gguf, ref.fingerprint)), None


def converted_gguf(gguf: Path, fingerprint: str) -> Path:
    """A plain fp32 transformers directory for a GGUF file, converted on first use (~20 s) and cached."""
    target = cache_dir() / "models" / fingerprint[:16]
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    print(f"converting {gguf.name} into {target} (once, ~20 s)", file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with gguf_reader_without_bar():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model keeps its quantizer, which makes it unsaveable and untrainable.
        model.hf_quantizer.remove_quantization_config(model)
        import_deepspeed_quietly()  # saving imports it
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target) if not target.exists() else shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


@contextmanager
def gguf_reader_without_bar() -> Iterator[None]:
    """transformers' GGUF reader draws a tqdm bar of its own, deaf to transformers' progress-bar switch.

    It went to stderr raw, in the middle of moram's output, and into logs as a
    line of carriage returns; the message before the conversion says what runs.
    """
    from transformers import modeling_gguf_pytorch_utils as reader

    bar = reader.tqdm
    reader.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar
