"""`evaluate_suite`: standard benchmarks through lm-evaluation-harness, run on a store's model."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moram_cli.data.encode import check_context
from moram_cli.errors import MoramError
from moram_cli.models.cache import cache_dir
from moram_cli.models.memory import build_memory_model
from moram_cli.safe_text import one_line
from moram_cli.store import MemoryStore

# lm-eval's metric keys carry a filter suffix ("acc,none"); these are the scores reported.
SCORES = ("acc", "acc_norm")


def evaluate_suite(
    store_path: Path,
    suite: str | None = None,
    suite_path: Path | None = None,
    *,
    upto: int | None = None,
    base_only: bool = False,
    batch_size: int = 8,
    limit: int | None = None,
    max_length: int | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Run lm-eval task `suite` (or every task of the folder `suite_path`) on the store as of its first `upto` banks."""
    store = MemoryStore.open(store_path)
    harness = _import_harness()
    suite_path = None if suite_path is None else suite_path.resolve()
    manager, tasks = _suite_tasks(harness, suite, suite_path)
    upto = 0 if base_only else upto
    model, tokenizer = build_memory_model(store, upto, trust_remote_code)
    max_length = max_length or store.config.training.max_length
    check_context(tokenizer, max_length)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if store.config.adapter.routing != "token":
        # lm-eval pads a batch without an attention mask, and the padding would then count when a route is picked.
        batch_size = 1
    lm = harness.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device),
                                         max_length=max_length)
    with _data_errors(suite, suite_path), _working_directory(suite_path):
        out = harness.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, bootstrap_iters=0, limit=limit, log_samples=False)
    return {
        "store": str(store_path), "suite": suite, "suite_path": None if suite_path is None else str(suite_path),
        "banks": [b.path.name for b in store.banks()[:upto]], "limit": limit,
        "results": {task: task_scores(out, task) for task in out["results"]},
        "lm_eval_version": out.get("lm_eval_version"), "task_versions": out.get("versions", {}),
    }


def task_scores(out: dict, task: str) -> dict:
    """acc, acc_norm (where the task has it) and the number of documents scored, from lm-eval's result for `task`."""
    metrics = out["results"][task]
    scores = {name: metrics[key] for name in SCORES for key in metrics if key.split(",")[0] == name}
    n = out.get("n-samples", {}).get(task, {}).get("effective")
    return scores | {"n": n}


def _suite_tasks(harness, suite: str | None, suite_path: Path | None) -> tuple:
    """lm-eval's task manager (the folder's tasks only, with `suite_path`) and the tasks to run: `suite`, else the folder's."""
    if suite_path is not None and not suite_path.is_dir():
        raise MoramError(f"{suite_path}: --suite-path is not a folder; give a folder of lm-eval task YAMLs (see moram_cli/suites/tiny_topic)")
    manager = harness.tasks.TaskManager(include_path=str(suite_path), include_defaults=False) if suite_path else harness.tasks.TaskManager()
    if suite is not None and suite not in manager.all_tasks:
        where = f"{suite_path}: no lm-eval task {suite!r} in this folder" if suite_path else f"unknown lm-eval task {suite!r}"
        raise MoramError(f"{where}; give a task that `lm-eval ls tasks` lists, or --suite-path with a folder of task YAMLs")
    tasks = [suite] if suite is not None else sorted(manager.all_subtasks)
    if not tasks:
        raise MoramError(f"{suite_path}: no lm-eval task YAML in this folder; see moram_cli/suites/tiny_topic for one")
    return manager, tasks


def _import_harness():
    # datasets reads its cache location when imported: keep downloaded suites in moram's cache.
    os.environ.setdefault("HF_DATASETS_CACHE", str(cache_dir() / "datasets"))
    try:
        import lm_eval
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError:
        raise MoramError("--suite and --suite-path need lm-evaluation-harness; install it with: pip install 'moram[harness]'") from None
    return lm_eval


@contextmanager
def _working_directory(suite_path: Path | None) -> Iterator[None]:
    """lm-eval reads a task's relative data files from the working directory: make that the suite folder."""
    if suite_path is None:
        yield
        return
    previous = Path.cwd()
    os.chdir(suite_path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextmanager
def _data_errors(suite: str | None, suite_path: Path | None) -> Iterator[None]:
    """datasets reports an unreachable hub as ConnectionError and a missing local file as FileNotFoundError."""
    try:
        yield
    except (ConnectionError, OSError) as exc:
        if suite_path is None:
            raise MoramError(
                f"suite {suite}: cannot load its data ({one_line(str(exc), 120)}); offline, point --suite-path at a folder of "
                "lm-eval task YAMLs over local files (see moram_cli/suites/tiny_topic)"
            ) from None
        raise MoramError(f"{suite_path}: cannot load the suite's data ({one_line(str(exc), 120)}); check the data_files paths in its YAML (relative to the suite folder)") from None
