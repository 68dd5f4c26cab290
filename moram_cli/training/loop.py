"""The optimisation loop: global batches cut into micro-batches over processes and accumulation steps, checkpoints, stops.

Each micro-batch's loss is weighted by its share of the global batch's
labelled tokens, so one step computes the same gradient — the mean loss over
every labelled token of the global batch — whether it runs as one batch on
one process or as micro-batches on several processes and accumulation steps.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext

import torch
from accelerate import Accelerator

from moram_cli.data.batching import collate
from moram_cli.data.encode import IGNORE_INDEX, Encoded
from moram_cli.store import TrainingSettings
from moram_cli.training.checkpoint import Checkpoint, ResumeData, TrainState, restore_params, restore_training, save_checkpoint
from moram_cli.training.distributed import BatchSplit, configure_deepspeed
from moram_cli.training.interrupts import StopRequest, stop_requests
from moram_cli.training.loss import completion_loss
from moram_cli.training.progress import training_progress
from moram_cli.training.sampler import StepBatches


class Stopped(KeyboardInterrupt):
    """Training stopped on Ctrl-C or SIGTERM after a complete step; the message says how to go on."""


def total_steps(settings: TrainingSettings, steps_per_epoch: int) -> int:
    total = max(1, math.ceil(settings.epochs * steps_per_epoch))
    return min(total, settings.max_steps) if settings.max_steps else total


class TrainingLoop:
    """One task's training run on the processes of `accelerator`."""

    def __init__(self, accelerator: Accelerator, model, params: list[torch.nn.Parameter], encoded: list[Encoded], pad_id: int,
                 settings: TrainingSettings, split: BatchSplit, precision: str) -> None:
        self.accelerator, self.model, self.params, self.encoded, self.pad_id = accelerator, model, params, encoded, pad_id
        self.settings, self.split, self.precision = settings, split, precision
        self.batches = StepBatches([len(e.input_ids) for e in encoded], settings.batch_size, settings.seed)
        # Labels that a next-token prediction targets: every labelled position but the first.
        self.labelled = [sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in encoded]
        self.total = total_steps(settings, self.batches.per_epoch)

    def run(self, show: bool, resume: ResumeData | None, checkpoint: Checkpoint | None) -> TrainState:
        """Train to the last step, from `checkpoint` when given; `resume` (None: off) says where checkpoints go."""
        if self.settings.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        if checkpoint is not None:
            restore_params(checkpoint, self.params)
        optimizer = torch.optim.AdamW(self._param_groups(), lr=self.settings.lr, weight_decay=self.settings.weight_decay)
        # Not prepared: accelerate would step it once per process, and the schedule counts optimiser steps.
        scheduler = lr_schedule(optimizer, self.settings.lr_schedule, self.total)
        configure_deepspeed(self.accelerator, self.split, self.settings.max_grad_norm)
        self.model, optimizer = self.accelerator.prepare(self.model, optimizer)
        state = restore_training(self.accelerator, checkpoint, optimizer, scheduler) if checkpoint else TrainState()
        self.model.train()
        with stop_requests() as stop:
            self._steps(state, optimizer, scheduler, stop, show, resume)
        return state

    def _param_groups(self) -> list[dict]:
        """The ranks at the task's rate; earlier-bank gains (gate scope weighted) at `gain_lr` and without decay, which
        would pull them toward switching the earlier banks off."""
        gains = {id(p) for p in self.model.gain_parameters()}
        groups = [{"params": [p for p in self.params if id(p) not in gains]}]
        if gains:
            groups.append({"params": [p for p in self.params if id(p) in gains], "lr": self.settings.gain_lr, "weight_decay": 0.0})
        return groups

    def _steps(self, state: TrainState, optimizer, scheduler, stop: StopRequest, show: bool, resume: ResumeData | None) -> None:
        start_tokens, started = state.tokens, time.time()
        with training_progress(show and self.accelerator.is_main_process) as progress:
            bar = progress.add_task("training", total=self.total, completed=state.step, loss=None, tps=0.0)
            while state.step < self.total:
                batch = self.batches[state.step]
                loss, stopping = self._step(batch, optimizer, stop)
                if self.settings.max_grad_norm is not None:
                    self.accelerator.clip_grad_norm_(self.params, self.settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.losses.append(loss)
                state.tokens += sum(len(self.encoded[i].input_ids) for i in batch)
                progress.update(bar, advance=1, loss=loss, tps=(state.tokens - start_tokens) / (time.time() - started))
                if resume is not None and (stopping or self._checkpoint_due(state.step)):
                    save_checkpoint(self.accelerator, resume, state, self.params, optimizer, scheduler)
                if stopping:
                    saved = f"progress saved at step {state.step}/{self.total}; continue with --resume" if resume else "no resume data under DeepSpeed"
                    raise Stopped(saved)

    def _checkpoint_due(self, step: int) -> bool:
        """Every `checkpoint_every` steps but the last: the bank follows it at once."""
        every = self.settings.checkpoint_every
        return every > 0 and step % every == 0 and step < self.total

    def _step(self, batch: list[int], optimizer, stop: StopRequest) -> tuple[float, bool]:
        """Forward and backward over this process's micro-batches; returns the step's loss and whether any process must stop."""
        accelerator = self.accelerator
        labelled = sum(self.labelled[i] for i in batch)
        parts = self.split.processes * self.split.grad_accum
        loss_share = torch.zeros((), device=accelerator.device)
        for micro in self.split.slices(batch, accelerator.process_index):
            with accelerator.accumulate(self.model):
                # An empty slice (a short last batch) still joins every collective, with a zero weight.
                loss = self._forward(micro or batch[:1])
                share = sum(self.labelled[i] for i in micro)
                # accelerate (or DeepSpeed) divides by the accumulation steps and DDP averages over processes: undo both.
                accelerator.backward(loss * (share * parts / labelled))
                loss_share += loss.detach().float() * (share / labelled)
        totals = accelerator.reduce(torch.stack([loss_share, torch.tensor(float(stop.requested), device=accelerator.device)]), "sum")
        return totals[0].item(), bool(totals[1] > 0)

    def _forward(self, indices: list[int]) -> torch.Tensor:
        """The mean loss over the labelled tokens of these examples, under bf16 autocast when asked."""
        device = self.accelerator.device
        inputs = {k: v.to(device) for k, v in collate([self.encoded[i] for i in indices], self.pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext():
            return completion_loss(self.model, inputs)

    def _enable_gradient_checkpointing(self) -> None:
        with warnings.catch_warnings():
            # Renamed activation_checkpointing_enable in later 5.x; the old name works across the range moram supports.
            warnings.simplefilter("ignore", FutureWarning)
            self.model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """"constant", or "cosine": half a cosine from the full rate down to zero at the last step."""
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
