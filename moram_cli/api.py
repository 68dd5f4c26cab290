"""The Python API: a learned store as a transformers model, for applications."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moram_cli.models.memory import build_memory_model
from moram_cli.store import MemoryStore


def load(store: str | PathLike, upto: int | None = None, trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The store's model and tokenizer: a transformers causal LM carrying the experts of its first `upto` banks (all by default; 0: the bare base model).

    The model is the one `moram eval` scores: frozen, in eval mode (so the
    store's inference threshold applies), on the CPU (`model.to("cuda")` moves
    it). A missing store, a bad `upto`, or a base model that changed since the
    store was made raise `moram_cli.errors.MoramError` with a one-line message.

    Example:

        import moram_cli

        model, tokenizer = moram_cli.load("store/")
        inputs = tokenizer("Title: Lake Geneva\\nText: A lake on the north side of the Alps.\\n\\nAnswer:", return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        print(tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip())
    """
    memory, tokenizer = build_memory_model(MemoryStore.open(Path(store)), upto, trust_remote_code)
    # The adapter layers sit inside the transformers model itself, so it needs no wrapper to carry them.
    model = memory.model
    model.requires_grad_(False)
    # Without it, every generate() call warns and guesses a pad token.
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
