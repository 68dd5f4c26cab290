"""The continual-learning record: each bank keeps its row of the accuracy matrix, and `--suite cl` reports over them.

A task learned with `--eval-data` gets a `cl` entry in its bank: its test
set (path, sha256, scoring), the accuracy on it before the task was learned
(the store as it stood, and the bare base model), and the row: the accuracy
on every recorded task so far, measured on the model just trained. It is
written with the bank, so the matrix is as atomic as the store.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moram_cli import __version__
from moram_cli.data.jsonl import Example, read_examples
from moram_cli.errors import MoramError
from moram_cli.evaluation.cl_metrics import average_accuracy, backward_transfer, forgetting, forward_transfer
from moram_cli.hashing import sha256_file
from moram_cli.store import Bank, MemoryStore

CL_KEY = "cl"


def measure_before_learning(
    store: MemoryStore, model, tokenizer, eval_data: Path | None, examples: list[Example] | None, max_length: int, show_progress: bool
) -> dict | None:
    """A new task's test accuracy before it is learned: on the store as it stands (R[j-1][j]) and on the bare base model.

    Call it before the task's ranks are added (fresh MoRAM ranks already join
    the gate); None without a test set.
    """
    if examples is None:
        return None
    # Scoring is imported where a model is at hand: `eval --suite cl` imports this module and reads records only.
    from moram_cli.evaluation.evaluate import evaluate_examples

    before = evaluate_examples(model, tokenizer, examples, eval_data, max_length=max_length, show_progress=show_progress,
                               label="eval before learning")["accuracy"]
    if not store.banks():
        return {"before": before, "zero_shot": before}
    model.disable_adapter_layers()
    try:
        zero_shot = evaluate_examples(model, tokenizer, examples, eval_data, max_length=max_length, show_progress=show_progress,
                                      label="eval of the base model")["accuracy"]
    finally:
        model.enable_adapter_layers()
    return {"before": before, "zero_shot": zero_shot}


def accuracy_row(store: MemoryStore, model, tokenizer, summary: dict, baseline: dict, max_length: int, show_progress: bool) -> dict:
    """The new bank's `cl` entry (plus `warnings`), from the model just trained and scored on its own test set (`summary["eval"]`).

    Earlier recorded tasks are scored again with their recorded scoring; a
    test set that is gone or changed gives a one-line warning and a null cell.
    """
    row, warnings = {}, []
    for bank in store.banks():
        test = bank.metadata().get(CL_KEY, {}).get("test")
        if test:
            row[bank.name], problem = _rescore(bank, test, model, tokenizer, max_length, show_progress)
            warnings += [problem] if problem else []
    own = summary["eval"]
    row[summary["task"]] = own["accuracy"]
    test = {"data": str(Path(own["data"]).resolve()), "data_sha256": own["data_sha256"], "scoring": own["scoring"], "examples": own["total"]}
    return {CL_KEY: {"test": test, **baseline, "row": row}} | ({"warnings": warnings} if warnings else {})


def _rescore(bank: Bank, test: dict, model, tokenizer, max_length: int, show_progress: bool) -> tuple[float | None, str | None]:
    path = Path(test["data"])
    problem = "is gone" if not path.is_file() else "has changed since the task was learned" if sha256_file(path) != test["data_sha256"] else None
    if problem:
        message = f"{bank.path}: test set {path} {problem}; its cell in this row of the accuracy matrix is null (restore the file to measure it)"
        print(f"warning: {message}", file=sys.stderr)
        return None, message
    from moram_cli.evaluation.evaluate import evaluate_examples  # as in measure_before_learning

    result = evaluate_examples(model, tokenizer, read_examples(path, allow_text=False), path, test["scoring"], max_length, show_progress,
                               label=f"eval of earlier task {bank.name}")
    return result["accuracy"], None


def continual_report(store_path: Path, upto: int | None = None) -> dict:
    """The accuracy matrix of the store's first `upto` banks (all by default), with average accuracy, BWT, FWT and forgetting.

    Everything comes from the banks' records, so nothing is loaded or run,
    and every number can be recomputed from the returned record alone.
    """
    store = MemoryStore.open(store_path)
    banks = store.banks()
    if upto is not None and not 0 < upto <= len(banks):
        raise MoramError(f"{store.path}: --upto {upto} is out of range for --suite cl; the store has {len(banks)} bank(s)")
    metadata = [(bank, bank.metadata()) for bank in banks[:upto]]
    recorded = [(bank, meta) for bank, meta in metadata if CL_KEY in meta]
    if not recorded:
        raise MoramError(f"{store.path}: no bank has an accuracy record; learn tasks with --eval-data TEST.jsonl to build the matrix")
    merged = next((bank for bank, meta in recorded if "merged_from" in meta), None)
    if merged is not None:
        raise MoramError(f"{merged.path}: merged from another store, so its accuracy row belongs to that store's sequence; run --suite cl on the source store")
    return _report(store, metadata, recorded)


def _report(store: MemoryStore, metadata: list[tuple[Bank, dict]], recorded: list[tuple[Bank, dict]]) -> dict:
    tasks = [bank.name for bank, _ in recorded]
    records = [meta[CL_KEY] for _, meta in recorded]
    R = [[record["row"].get(task) for task in tasks[: i + 1]] for i, record in enumerate(records)]
    before, zero_shot = [r["before"] for r in records], [r["zero_shot"] for r in records]
    per_task = forgetting(R)
    return {
        "store": str(store.path), "method": store.config.method, "base_model": store.config.base_model.to_dict(),
        "tasks": [{"task": bank.name, "bank": bank.path.name, "metric": "accuracy", **record["test"], "tool_version": meta.get("tool_version")}
                  for (bank, meta), record in zip(recorded, records)],
        "unrecorded_banks": [bank.path.name for bank, meta in metadata if CL_KEY not in meta],
        "matrix": R, "before": before, "zero_shot": zero_shot,
        "average_accuracy": average_accuracy(R), "bwt": backward_transfer(R), "fwt": forward_transfer(before, zero_shot),
        "forgetting": per_task, "max_forgetting": max((f for f in per_task if f is not None), default=None),
        "tool_version": __version__,
    }

