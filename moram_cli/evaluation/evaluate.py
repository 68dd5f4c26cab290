"""`evaluate_store`: accuracy of a store (or of a prefix of it) on a JSONL test set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from moram_cli.data.encode import check_context, split_example
from moram_cli.data.jsonl import Example, read_examples
from moram_cli.errors import MoramError
from moram_cli.progress import phase_progress
from moram_cli.safe_text import one_line
from moram_cli.store import MemoryStore

SCORINGS = ("auto", "choice", "generate")
MAX_LABELS = 50
GENERATE_BATCH = 8
LABELS_FILE = "labels.json"
LABELS_FIX = 'make it a JSON list of every answer of the test file, e.g. ["World", "Sports"], or remove it'


def label_set(examples: list[Example], data: Path, tokenizer) -> list[str] | None:
    """The candidate answers when the completions form a label set, else None.

    A `labels.json` next to the data file wins (the benchmark layout) and
    must list every answer of the file; otherwise the distinct completions count as labels when there are few
    of them and most repeat.
    """
    completions = [split_example(ex, tokenizer)[1].strip() for ex in examples]
    labels_file = data.parent / LABELS_FILE
    if labels_file.exists():
        return declared_labels(labels_file, examples, completions)
    distinct = list(Counter(completions))
    return distinct if len(distinct) <= min(MAX_LABELS, len(completions) / 2) else None


def declared_labels(path: Path, examples: list[Example], completions: list[str]) -> list[str]:
    """The labels a `labels.json` lists, once proved to hold every answer of the test file.

    A broken one is an error, not a reason to fall back to generation: that
    fallback scored a label task as 0.000 with no warning, and a CI gate then
    failed on a number that measured the wrong thing.
    """
    where = one_line(str(path), limit=200)
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        # ValueError covers bad JSON and bad UTF-8 alike; OSError, a directory or a file without read permission.
        raise MoramError(f"{where}: cannot be read ({one_line(str(err))}); {LABELS_FIX}") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(label, str) for label in labels):
        raise MoramError(f"{where}: is not a non-empty JSON list of strings; {LABELS_FIX}")
    known = set(labels)
    for example, answer in zip(examples, completions):
        if answer not in known:
            raise MoramError(f"{where}: lacks the answer {one_line(answer)!r} of {example.where}; {LABELS_FIX}")
    return labels


def evaluate_examples(
    model, tokenizer, examples: list[Example], data: Path, scoring: str = "auto", max_length: int = 512, show_progress: bool = False,
    label: str = "eval",
) -> dict:
    """Accuracy of `model` on `examples`: ranked choice over the label set, or exact match of greedy generation.

    The progress reads `{label} on {folder}/{file} ({scoring})`: learn-task runs several evaluations in a row.
    """
    from moram_cli.evaluation.scoring import choose, generate_batch  # torch: imported once a model is built (see evaluate_store)

    check_context(tokenizer, max_length)
    labels = label_set(examples, data, tokenizer) if scoring != "generate" else None
    if scoring == "choice" and labels is None:
        labels = sorted({split_example(ex, tokenizer)[1].strip() for ex in examples})
    used = "choice" if labels is not None else "generate"
    max_new = max(len(tokenizer(split_example(ex, tokenizer)[1]).input_ids) for ex in examples) + 4
    pairs = [split_example(ex, tokenizer) for ex in examples]
    correct = cut = 0
    with phase_progress(show_progress, transient=True) as progress:
        task = progress.add_task(f"{label} on {data.parent.name}/{data.name} ({used})", total=len(pairs))
        # Generation decodes a batch at once (a greedy step costs about what a whole batch's costs); ranked choice
        # already batches each example's candidates.
        step = 1 if labels is not None else GENERATE_BATCH
        for start in range(0, len(pairs), step):
            batch = pairs[start:start + step]
            if labels is not None:
                pick, was_cut = choose(model, tokenizer, batch[0][0], labels, max_length)
                answers = [(labels[pick], was_cut)]
            else:
                answers = generate_batch(model, tokenizer, [prompt for prompt, _ in batch], max_new, max_length)
            for (answer, was_cut), (_, gold) in zip(answers, batch):
                correct += answer == gold.strip()
                cut += was_cut
            progress.advance(task, len(batch))
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
    # Imported only now, so a wrong flag, store or data file fails without waiting seconds for torch to load.
    from moram_cli.models.memory import build_memory_model

    model, tokenizer = build_memory_model(store, upto, trust_remote_code)
    banks = store.banks()[:upto]
    result = evaluate_examples(model, tokenizer, examples, data, scoring, max_length or store.config.training.max_length, show_progress)
    return {"store": str(store_path), "data": str(data), "banks": [b.path.name for b in banks], **result}
