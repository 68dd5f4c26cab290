"""`evaluate_store`: accuracy of a store (or of a prefix of it) on a JSONL test set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rich.progress import Progress

from moram_cli.data.encode import split_example
from moram_cli.data.jsonl import Example, read_examples
from moram_cli.errors import MoramError
from moram_cli.evaluation.scoring import choose, generate
from moram_cli.models.memory import build_memory_model
from moram_cli.store import MemoryStore

SCORINGS = ("auto", "choice", "generate")
MAX_LABELS = 50


def label_set(examples: list[Example], data: Path, tokenizer) -> list[str] | None:
    """The candidate answers when the completions form a label set, else None.

    A `labels.json` next to the data file wins (the benchmark layout);
    otherwise the distinct completions count as labels when there are few
    of them and most repeat.
    """
    completions = [split_example(ex, tokenizer)[1].strip() for ex in examples]
    labels_file = data.parent / "labels.json"
    if labels_file.is_file():
        try:
            labels = json.loads(labels_file.read_text(encoding="utf-8"))
        except ValueError:
            labels = None
        if isinstance(labels, list) and all(isinstance(x, str) for x in labels) and set(completions) <= set(labels):
            return labels
    distinct = list(Counter(completions))
    return distinct if len(distinct) <= min(MAX_LABELS, len(completions) / 2) else None


def evaluate_examples(
    model, tokenizer, examples: list[Example], data: Path, scoring: str = "auto", max_length: int = 512, show_progress: bool = False
) -> dict:
    """Accuracy of `model` on `examples`: ranked choice over the label set, or exact match of greedy generation."""
    labels = label_set(examples, data, tokenizer) if scoring != "generate" else None
    if scoring == "choice" and labels is None:
        labels = sorted({split_example(ex, tokenizer)[1].strip() for ex in examples})
    used = "choice" if labels is not None else "generate"
    max_new = max(len(tokenizer(split_example(ex, tokenizer)[1]).input_ids) for ex in examples) + 4
    correct = cut = 0
    with Progress(transient=True, disable=not show_progress) as progress:
        for ex in progress.track(examples, description=f"evaluating ({used})"):
            prompt, gold = split_example(ex, tokenizer)
            if labels is not None:
                pick, was_cut = choose(model, tokenizer, prompt, labels, max_length)
                answer = labels[pick]
            else:
                answer, was_cut = generate(model, tokenizer, prompt, max_new, max_length)
            correct += answer == gold.strip()
            cut += was_cut
    result = {"scoring": used, "accuracy": correct / len(examples), "correct": correct, "total": len(examples), "truncated_prompts": cut}
    return result | ({"labels": labels} if labels is not None else {})


def evaluate_store(
    store_path: Path,
    data: Path,
    *,
    upto: int | None = None,
    base_only: bool = False,
    scoring: str = "auto",
    max_length: int | None = None,
    show_progress: bool = True,
    trust_remote_code: bool = False,
) -> dict:
    """Evaluate the store as it was after its first `upto` banks (`base_only`: none) on `data`."""
    if scoring not in SCORINGS:
        raise MoramError(f"unknown --scoring {scoring!r}; use one of {', '.join(SCORINGS)}")
    store = MemoryStore.open(store_path)
    examples = read_examples(data, allow_text=False)
    upto = 0 if base_only else upto
    model, tokenizer = build_memory_model(store, upto, trust_remote_code)
    banks = store.banks()[:upto]
    result = evaluate_examples(model, tokenizer, examples, data, scoring, max_length or store.config.training.max_length, show_progress)
    return {"store": str(store_path), "data": str(data), "banks": [b.path.name for b in banks], **result}
