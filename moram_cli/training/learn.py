"""`learn_task`: add one bank of rank-1 experts to a store, trained on one task's data."""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import Accelerator

from moram_cli import __version__
from moram_cli.data.encode import Encoded, encode_dataset
from moram_cli.data.jsonl import read_examples
from moram_cli.errors import MoramError
from moram_cli.evaluation.continual import accuracy_row, measure_before_learning
from moram_cli.evaluation.evaluate import evaluate_examples
from moram_cli.hashing import sha256_file
from moram_cli.models.memory import bank_prototypes, build_memory_model, route_by_task
from moram_cli.store import MemoryStore, TrainingSettings
from moram_cli.store.bank import GAINS, PROTOTYPE, BankTensors, Extras, check_task_name
from moram_cli.store.lock import lock_message, stale_lock
from moram_cli.training.checkpoint import (
    Checkpoint, ResumeData, check_resumable, checkpoint_to_resume, finished_bank, latest_step_dir, remove_resume_data,
    resume_dir, run_identity,
)
from moram_cli.training.collective_timeout import checked_timeout, collective_failures
from moram_cli.training.distributed import (
    BatchSplit, batch_split, gathered_ranks, main_process_lock, make_accelerator, on_main, resolve_precision, uses_deepspeed, whole_model,
)
from moram_cli.training.key_init import initial_keys, task_prototypes
from moram_cli.training.loop import TrainingLoop

LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")


def default_task_name(data: Path) -> str:
    """`yelp.jsonl` -> "yelp"; `dbpedia/train.jsonl` -> "dbpedia" (a split name says nothing)."""
    stem = data.stem
    if stem in {"train", "training", "data"} and data.parent.name:
        stem = data.resolve().parent.name
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).lstrip("._-")[:64] or "task"


def learn_task(
    store_path: Path,
    data: Path,
    *,
    name: str | None = None,
    eval_data: Path | None = None,
    show_progress: bool = True,
    break_lock: bool = False,
    resume: bool = False,
    trust_remote_code: bool = False,
    collective_timeout: float | None = None,
    **overrides,
) -> dict:
    """Train `r` new ranks per adapted module on `data` and append them to the store as a bank.

    `overrides` are TrainingSettings fields (epochs, lr, batch_size, ...);
    None keeps the store's default. Runs on every process `accelerate launch`
    started; only the main process writes. The store's writer lock is held
    throughout; `break_lock` first clears a stale one. `resume` continues the
    task's interrupted run from its last checkpoint, with its settings, and
    clears its lock when its process is gone from this machine. A process
    that waits for the others at a collective operation longer than
    `collective_timeout` seconds (None: 30 minutes) stops with a MoramError.
    Returns the summary that `--json` prints.
    """
    store, name, checkpoint, settings = _run_plan(store_path, data, name, resume, overrides)
    timeout = checked_timeout(collective_timeout)
    with collective_failures(timeout):
        accelerator = make_accelerator(settings, timeout)
        try:
            if checkpoint and uses_deepspeed(accelerator):
                raise MoramError("--resume does not work under DeepSpeed: its sharded optimiser state has no format but DeepSpeed's "
                                 "pickles, which moram never writes; rerun without --resume")
            split = batch_split(settings, accelerator.num_processes)
            with main_process_lock(accelerator, store.path, break_lock or (resume and stale_lock(store.path))):
                return _learn(store, accelerator, data, name=name, eval_data=eval_data, show_progress=show_progress,
                              trust_remote_code=trust_remote_code, settings=settings, split=split, checkpoint=checkpoint)
        except BaseException as err:
            # The failed run's frames hold its DDP model; its reducer must go before the process group (see below).
            traceback.clear_frames(err.__traceback__)
            raise
        finally:
            # A gloo process group left for the interpreter's exit to tear down aborts the process
            # now and then ("terminate called without an active exception"), so it ends here. The
            # DDP model goes first: a reducer holding the group's last reference would destroy it
            # with the GIL held, and gloo's worker thread, waiting for the GIL, would never join.
            accelerator.free_memory()
            accelerator.end_training()


def check_before_launch(
    store_path: Path, data: Path, processes: int, *, name: str | None = None, eval_data: Path | None = None,
    break_lock: bool = False, resume: bool = False, trust_remote_code: bool = False, collective_timeout: float | None = None,
    **overrides,
) -> None:
    """Fail now, in one line, where `processes` launched processes would each fail at once (followed by the launcher's report)."""
    store, name, _, settings = _run_plan(store_path, data, name, resume, overrides)
    checked_timeout(collective_timeout)
    batch_split(settings, processes)
    for path in (data, eval_data) if eval_data else (data,):
        read_examples(path, allow_text=path == data)
    locked = lock_message(store.path)
    if locked and not break_lock and not (resume and stale_lock(store.path)):
        raise MoramError(locked)


def _run_plan(store_path: Path, data: Path, name: str | None, resume: bool, overrides: dict
              ) -> tuple[MemoryStore, str, Checkpoint | None, TrainingSettings]:
    """The store, task name, checkpoint to resume (or None) and settings of a run: a resumed run keeps its own settings."""
    store = MemoryStore.open(store_path)
    if store.config.adapter.routing == "source":
        raise MoramError(f"{store.path}: this merged store answers each input with one source store's banks (routing source), so a new "
                         "task has no place in it; learn the task in a source store and merge again, or merge with --routing token")
    name = check_task_name(name or default_task_name(data))
    checkpoint = checkpoint_to_resume(store.path, name) if resume else None
    base = checkpoint.settings() if checkpoint else store.config.training
    # A resumed run's settings already hold the lr it started with.
    later_task = checkpoint is None and bool(store.banks())
    return store, name, checkpoint, checked_settings(task_settings(base, later_task, overrides))


def task_settings(defaults: TrainingSettings, later_task: bool, overrides: dict) -> TrainingSettings:
    """The store's defaults under the command's overrides; a later task trains at `later_lr` unless `lr` is given."""
    chosen = {k: v for k, v in overrides.items() if v is not None}
    if later_task and defaults.later_lr is not None:
        chosen.setdefault("lr", defaults.later_lr)
    return replace(defaults, **chosen)


def _learn(
    store: MemoryStore, accelerator: Accelerator, data: Path, *, name: str, eval_data: Path | None,
    show_progress: bool, trust_remote_code: bool, settings: TrainingSettings, split: BatchSplit, checkpoint: Checkpoint | None,
) -> dict:
    """`learn_task` once the store is locked."""
    finished = finished_bank(store, checkpoint) if checkpoint else None
    if finished is not None:
        on_main(accelerator, lambda: remove_resume_data(checkpoint.directory))
        return {**finished.metadata(), "bank": str(finished.path)}
    store.check_new_task(name)
    examples = read_examples(data)
    eval_examples = read_examples(eval_data, allow_text=False) if eval_data else None
    data_sha256 = sha256_file(data)
    resume = _resume_data(store, accelerator, run_identity(name, data_sha256, accelerator.num_processes, store.banks(), settings),
                          settings, checkpoint)
    started = time.time()
    torch.manual_seed(settings.seed)
    model, tokenizer = build_memory_model(store, trust_remote_code=trust_remote_code)
    # Every process evaluates (see below); one shows the progress.
    show_eval = show_progress and accelerator.is_main_process
    with whole_model(accelerator, model):
        baseline = measure_before_learning(store, model, tokenizer, eval_data, eval_examples, settings.max_length, show_eval)
    encoded, n_cut = encode_dataset(examples, tokenizer, settings.max_length)
    params = _new_ranks(store, model, encoded, tokenizer.pad_token_id, settings, accelerator, show_progress)
    routed = store.config.adapter.routing == "task"
    prototypes = task_prototypes(model, encoded, tokenizer.pad_token_id, settings.batch_size, settings.seed, accelerator,
                                 show_progress) if routed else None
    precision = resolve_precision(settings.precision, accelerator)
    loop = TrainingLoop(accelerator, model, params, encoded, tokenizer.pad_token_id, settings, split, precision)
    state = loop.run(show_progress, resume, checkpoint)
    if routed:
        _route_with_new_bank(store, model, prototypes)
    summary = {
        "task": name, "data": str(data), "data_sha256": data_sha256, "examples": len(examples),
        "truncated_examples": n_cut, "new_ranks_per_module": store.config.adapter.r, "key_init": store.config.adapter.key_init,
        "trainable_parameters": sum(p.numel() for p in params), "hyperparameters": asdict(settings),
        "batch": split.to_dict(), "precision": precision,
        "steps": len(state.losses), "tokens": state.tokens, "loss": _loss_summary(state.losses),
    }
    if checkpoint is not None:
        summary["resumed_from_step"] = checkpoint.step
    if eval_examples is not None:
        # Every process evaluates: under ZeRO-3 each forward pass needs all of them (each holds a shard of the weights).
        model.eval()
        result = evaluate_examples(model, tokenizer, eval_examples, eval_data, max_length=settings.max_length, show_progress=show_eval,
                                   label="eval after learning")
        summary["eval"] = {"data": str(eval_data), "data_sha256": sha256_file(eval_data), **result}
        summary |= accuracy_row(store, model, tokenizer, summary, baseline, settings.max_length, show_eval)
    summary |= {"wall_seconds": round(time.time() - started, 1), "tool_version": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    ranks, gains = gathered_ranks(accelerator, loop.model, params)
    if gains:
        summary["earlier_bank_gains"] = mean_gains(gains, [bank.path.name for bank in store.banks()])
    extras = {suffix: tensors for suffix, tensors in ((PROTOTYPE, prototypes), (GAINS, gains)) if tensors}
    summary["bank"] = on_main(accelerator, lambda: _write_bank(store, name, ranks, summary, extras))
    return summary


def _new_ranks(store: MemoryStore, model, encoded: list[Encoded], pad_id: int, settings: TrainingSettings, accelerator: Accelerator,
               show_progress: bool) -> list[torch.nn.Parameter]:
    """The task's trainable ranks, added to the model; a lora store's adapter has neither new ranks nor new keys."""
    seed = rank_init_seed(settings.seed, len(store.banks()))
    if store.config.method == "lora":
        return model.add_task_ranks(store.config.adapter.r, seed)
    keys = initial_keys(store, model, encoded, pad_id, settings.batch_size, settings.seed, accelerator, show_progress)
    return model.add_task_ranks(store.config.adapter.r, seed, keys)


def _route_with_new_bank(store: MemoryStore, model, prototypes: dict[str, torch.Tensor]) -> None:
    """Route the trained model as the store will answer once its bank is written, so that the task's own test set and
    the earlier ones are scored that way."""
    route_by_task(model, bank_prototypes(store.banks()) + [prototypes])


def _resume_data(store: MemoryStore, accelerator: Accelerator, run: dict, settings: TrainingSettings,
                 checkpoint: Checkpoint | None) -> ResumeData | None:
    """Where this run's checkpoints go (None under DeepSpeed: no checkpoints), once it may resume or start."""
    directory = resume_dir(store.path, run["task"])
    if checkpoint is not None:
        check_resumable(checkpoint, run)
    elif latest_step_dir(directory) is not None:
        raise MoramError(f"{directory}: holds an interrupted run of task {run['task']!r}; continue it with --resume, "
                         "or delete that directory to start over")
    return None if uses_deepspeed(accelerator) else ResumeData(directory, run, asdict(settings))


def _write_bank(store: MemoryStore, name: str, ranks: BankTensors, summary: dict, extras: Extras) -> str:
    """Append the bank, then drop the run's resume data: from here on the bank is the result."""
    bank = store.add_bank(name, ranks, summary, extras)
    remove_resume_data(resume_dir(store.path, name))
    return str(bank.path)


def mean_gains(gains: dict[str, torch.Tensor], banks: list[str]) -> dict[str, float]:
    """Each earlier bank's gain averaged over the modules: how much of it the task kept (1: all, 0: none)."""
    means = torch.stack(list(gains.values())).mean(0)
    return {bank: round(float(mean), 4) for bank, mean in zip(banks, means)}


def rank_init_seed(seed: int, task_index: int) -> int:
    """The seed of task `task_index`'s fresh keys.

    Every task draws different keys: with the bare seed, the new keys of task
    t would start as copies of task 1's initial keys and compete with them for
    the very tokens those were trained on, which measurably increased forgetting.
    """
    return seed * 1_000_003 + task_index


SETTING_RULES = (
    ("epochs", lambda s: s.epochs > 0, "> 0"),
    ("lr", lambda s: s.lr > 0, "> 0"),
    ("later_lr", lambda s: s.later_lr is None or s.later_lr > 0, "> 0 (or none)"),
    ("gain_lr", lambda s: s.gain_lr > 0, "> 0"),
    ("batch_size", lambda s: s.batch_size >= 1, ">= 1"),
    ("max_length", lambda s: s.max_length >= 2, ">= 2"),
    ("weight_decay", lambda s: s.weight_decay >= 0, ">= 0"),
    ("lr_schedule", lambda s: s.lr_schedule in LR_SCHEDULES, f"one of {', '.join(LR_SCHEDULES)}"),
    ("grad_accum", lambda s: s.grad_accum >= 1, ">= 1"),
    ("precision", lambda s: s.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    ("max_steps", lambda s: s.max_steps is None or s.max_steps >= 1, ">= 1 (or none)"),
    ("checkpoint_every", lambda s: s.checkpoint_every >= 0, ">= 0 (0: never)"),
    ("max_grad_norm", lambda s: s.max_grad_norm is None or s.max_grad_norm > 0, "> 0 (or none)"),
)


def checked_settings(settings: TrainingSettings) -> TrainingSettings:
    """Refuse settings that cannot train, before the model is loaded."""
    for name, ok, need in SETTING_RULES:
        if not ok(settings):
            raise MoramError(f"invalid training settings: {name}={getattr(settings, name)!r}; need {need}")
    return settings


def _loss_summary(losses: list[float]) -> dict:
    tail = losses[-max(1, len(losses) // 10):]
    return {"first": round(losses[0], 4), "last": round(sum(tail) / len(tail), 4), "mean": round(sum(losses) / len(losses), 4)}
