"""`learn_task`: add one bank of rank-1 experts to a store, trained on one task's data."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from moram_cli import __version__
from moram_cli.data.batching import collate
from moram_cli.data.encode import Encoded, encode_dataset
from moram_cli.data.jsonl import read_examples
from moram_cli.errors import MoramError
from moram_cli.evaluation.evaluate import evaluate_examples
from moram_cli.models.fingerprint import sha256_file
from moram_cli.models.memory import build_memory_model
from moram_cli.store import MemoryStore, TrainingSettings
from moram_cli.training.loss import completion_loss
from moram_cli.training.progress import training_progress
from moram_cli.training.sampler import BucketBatchSampler


LR_SCHEDULES = ("constant", "cosine")


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
    **overrides,
) -> dict:
    """Train `r` new ranks per adapted module on `data` and append them to the store as a bank.

    `overrides` are TrainingSettings fields (epochs, lr, batch_size,
    max_length, seed, weight_decay); None keeps the store's default. Returns
    the summary that `--json` prints.
    """
    store = MemoryStore.open(store_path)
    name = name or default_task_name(data)
    store.check_new_task(name)
    settings = checked_settings(replace(store.config.training, **{k: v for k, v in overrides.items() if v is not None}))
    examples = read_examples(data)
    eval_examples = read_examples(eval_data, allow_text=False) if eval_data else None
    started = time.time()
    accelerator = Accelerator()
    torch.manual_seed(settings.seed)
    model, tokenizer = build_memory_model(store)
    params = model.add_task_ranks(store.config.adapter.r, settings.seed)
    encoded, n_cut = encode_dataset(examples, tokenizer, settings.max_length)
    losses, tokens = _train(accelerator, model, params, encoded, tokenizer.pad_token_id, settings, show_progress)
    summary = {
        "task": name, "data": str(data), "data_sha256": sha256_file(data), "examples": len(examples),
        "truncated_examples": n_cut, "new_ranks_per_module": store.config.adapter.r,
        "trainable_parameters": sum(p.numel() for p in params), "hyperparameters": asdict(settings),
        "steps": len(losses), "tokens": tokens, "loss": _loss_summary(losses),
    }
    if eval_examples is not None:
        model.eval()
        result = evaluate_examples(model, tokenizer, eval_examples, eval_data, max_length=settings.max_length)
        summary["eval"] = {"data": str(eval_data), "data_sha256": sha256_file(eval_data), **result}
    summary |= {"wall_seconds": round(time.time() - started, 1), "tool_version": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if accelerator.is_main_process:
        summary["bank"] = str(store.add_bank(name, accelerator.unwrap_model(model).task_ranks(), summary).path)
    accelerator.wait_for_everyone()
    return summary


def checked_settings(settings: TrainingSettings) -> TrainingSettings:
    """Refuse settings that cannot train, before the model is loaded."""
    if settings.epochs <= 0 or settings.lr <= 0 or settings.batch_size < 1 or settings.max_length < 2 or settings.weight_decay < 0 \
            or settings.lr_schedule not in LR_SCHEDULES:
        raise MoramError(
            f"invalid training settings (epochs={settings.epochs}, lr={settings.lr}, batch_size={settings.batch_size}, "
            f"max_length={settings.max_length}, lr_schedule={settings.lr_schedule!r}); need epochs > 0, lr > 0, "
            f"batch_size >= 1, max_length >= 2, lr_schedule one of {', '.join(LR_SCHEDULES)}"
        )
    return settings


def _train(accelerator: Accelerator, model, params, encoded: list[Encoded], pad_id: int, settings: TrainingSettings, show: bool):
    """The optimisation loop; returns the per-step losses and the number of tokens seen."""
    sampler = BucketBatchSampler([len(e.input_ids) for e in encoded], settings.batch_size, settings.seed)
    loader = DataLoader(encoded, batch_sampler=sampler, collate_fn=partial(collate, pad_id=pad_id))
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    total = max(1, math.ceil(settings.epochs * len(loader)))
    scheduler = lr_schedule(optimizer, settings.lr_schedule, total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    losses, tokens, started = [], 0, time.time()
    model.train()
    with training_progress(show and accelerator.is_main_process) as progress:
        bar = progress.add_task("training", total=total, loss=float("nan"), tps=0.0)
        for epoch in range(math.ceil(total / len(loader))):
            loader.set_epoch(epoch)
            for batch in loader:
                if len(losses) == total:
                    break
                loss = completion_loss(model, batch)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                tokens += int(batch["attention_mask"].sum())
                progress.update(bar, advance=1, loss=losses[-1], tps=tokens / (time.time() - started))
    return losses, tokens


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """"constant", or "cosine": half a cosine from the full rate down to zero at the last step."""
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _loss_summary(losses: list[float]) -> dict:
    tail = losses[-max(1, len(losses) // 10):]
    return {"first": round(losses[0], 4), "last": round(sum(tail) / len(tail), 4), "mean": round(sum(losses) / len(losses), 4)}
