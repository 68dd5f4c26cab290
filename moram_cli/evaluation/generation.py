"""`generate_completions`: the `moram generate` command, greedy continuations of prompts by a store's model."""

from __future__ import annotations

from pathlib import Path

from moram_cli.data.encode import check_context, split_example
from moram_cli.data.jsonl import read_examples
from moram_cli.errors import MoramError
from moram_cli.evaluation.scoring import generate_batch
from moram_cli.models.memory import build_memory_model
from moram_cli.progress import phase_progress
from moram_cli.store import MemoryStore


def generate_completions(
    store_path: Path,
    *,
    prompt: str | None = None,
    data: Path | None = None,
    upto: int | None = None,
    max_new_tokens: int = 64,
    max_length: int | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
    trust_remote_code: bool = False,
) -> dict:
    """Greedy continuations of `prompt`, or of the prompt of every example of `data`, by the store as of its first `upto` banks."""
    if (prompt is None) == (data is None):
        raise MoramError("give exactly one of --prompt TEXT or --data FILE.jsonl")
    check_sizes(max_new_tokens, batch_size)
    store = MemoryStore.open(store_path)
    # Read before the model loads, so a bad file fails in a second, not after a minute of loading.
    examples = read_examples(data, allow_text=False) if data is not None else None
    model, tokenizer = build_memory_model(store, upto, trust_remote_code)
    max_length = max_length or store.config.training.max_length
    check_context(tokenizer, max_length)
    if max_new_tokens >= max_length:
        raise MoramError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt within --max-length {max_length}; lower it or raise --max-length")
    prompts = [prompt] if examples is None else [split_example(example, tokenizer)[0] for example in examples]
    outputs = generate_in_batches(model, tokenizer, prompts, max_new_tokens, max_length, batch_size, show_progress)
    return {
        "store": str(store_path),
        **({"data": str(data)} if data is not None else {}),
        "banks": [bank.path.name for bank in store.banks()[:upto]],
        "max_new_tokens": max_new_tokens,
        "truncated_prompts": sum(cut for _, cut in outputs),
        "completions": [{"prompt": text, "completion": completion} for text, (completion, _) in zip(prompts, outputs)],
    }


def check_sizes(max_new_tokens: int, batch_size: int) -> None:
    if max_new_tokens < 1:
        raise MoramError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if batch_size < 1:
        raise MoramError(f"--batch-size {batch_size} must be at least 1")


def generate_in_batches(
    model, tokenizer, prompts: list[str], max_new_tokens: int, max_length: int, batch_size: int, show_progress: bool
) -> list[tuple[str, bool]]:
    """`generate_batch` over `prompts`, `batch_size` at a time, in order; the bar goes to stderr, away from the results."""
    outputs: list[tuple[str, bool]] = []
    with phase_progress(show_progress, transient=True) as progress:
        task = progress.add_task("generating", total=len(prompts))
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            outputs += generate_batch(model, tokenizer, batch, max_new_tokens, max_length)
            progress.advance(task, len(batch))
    return outputs
