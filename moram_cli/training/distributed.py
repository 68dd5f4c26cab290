"""Running `learn-task` on several processes: the Accelerator, the batch split, and decisions only the main process makes.

Only the main process touches the store. Whatever it decides there (the
lock, the bank write, a checkpoint) is broadcast, so a failure it alone sees
ends every process with the same one-line error instead of leaving the others
waiting for it at the next collective operation.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, broadcast_object_list, parse_flag_from_env

from moram_cli.errors import MoramError
from moram_cli.store import TrainingSettings
from moram_cli.store.bank import BankTensors
from moram_cli.store.lock import store_lock
from moram_cli.training.collective_timeout import process_group_kwargs

T = TypeVar("T")


@dataclass(frozen=True)
class BatchSplit:
    """How one optimiser step's global batch is cut: `processes` x `grad_accum` micro-batches of `micro` examples."""

    global_batch: int
    processes: int
    grad_accum: int

    @property
    def micro(self) -> int:
        return self.global_batch // (self.processes * self.grad_accum)

    def slices(self, batch: list[int], process: int) -> list[list[int]]:
        """Process `process`'s `grad_accum` micro-batches of a global batch; a short last batch is cut as evenly as it allows."""
        parts = self.processes * self.grad_accum
        size, extra = divmod(len(batch), parts)
        bounds = [i * size + min(i, extra) for i in range(parts + 1)]
        mine = range(process * self.grad_accum, (process + 1) * self.grad_accum)
        return [batch[bounds[i] : bounds[i + 1]] for i in mine]

    def to_dict(self) -> dict:
        return {"global": self.global_batch, "processes": self.processes, "grad_accum": self.grad_accum, "micro": self.micro}


def batch_split(settings: TrainingSettings, processes: int) -> BatchSplit:
    """`--batch-size` is the global batch whatever the process count; refuse one that does not divide evenly."""
    parts = processes * settings.grad_accum
    if settings.batch_size % parts:
        raise MoramError(
            f"--batch-size {settings.batch_size} does not split into {processes} process(es) x --grad-accum {settings.grad_accum}; "
            f"use a multiple of {parts}"
        )
    return BatchSplit(settings.batch_size, processes, settings.grad_accum)


def make_accelerator(settings: TrainingSettings, collective_timeout: float) -> Accelerator:
    """The run's Accelerator, set up from `accelerate launch`'s environment (DDP, DeepSpeed) and `settings`; a collective
    operation that waits longer than `collective_timeout` seconds raises."""
    on_cpu = not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    handler = process_group_kwargs(collective_timeout)
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        if on_cpu:
            handler.backend = "gloo"  # DeepSpeed ignores cpu=True, and would ask for NCCL where only gloo works.
        with redirect_stdout(sys.stderr):  # where DeepSpeed prints the build of its CPU communication op, not into --json
            accelerator = Accelerator(kwargs_handlers=[handler])
    else:
        # Without cpu=True, processes on a CPU-only machine would not join one process group
        # (accelerate's multi-process launcher does not pass a config's use_cpu on).
        accelerator = Accelerator(cpu=on_cpu, kwargs_handlers=[handler])
    # A launch config's gradient_accumulation_steps would otherwise win over --grad-accum.
    accelerator.gradient_accumulation_steps = settings.grad_accum
    return accelerator


def is_main_process() -> bool:
    return PartialState().is_main_process


def resolve_precision(requested: str, accelerator: Accelerator) -> str:
    """"auto" is bf16 on a GPU that has it and fp32 elsewhere (CPU bf16 autocast is slow on most CPUs)."""
    if requested != "auto":
        return requested
    device = accelerator.device
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_deepspeed(accelerator: Accelerator, split: BatchSplit, max_grad_norm: float | None) -> None:
    """moram's batch split overrides the DeepSpeed config's: no dataloader goes through `prepare` to infer it. DeepSpeed
    clips gradients inside its own step, so `max_grad_norm` goes into its config too."""
    if uses_deepspeed(accelerator):
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        config |= {"train_micro_batch_size_per_gpu": split.micro, "gradient_accumulation_steps": split.grad_accum,
                   "train_batch_size": split.global_batch}
        if max_grad_norm is not None:
            config["gradient_clipping"] = max_grad_norm


def on_main(accelerator: Accelerator, work: Callable[[], T]) -> T:
    """Run `work` in the main process only; every process gets its result, or raises its MoramError."""
    outcome: list = [None, None]
    if accelerator.is_main_process:
        try:
            outcome = [work(), None]
        except MoramError as err:
            outcome = [None, str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise MoramError(outcome[1])
    return outcome[0]


def main_value(accelerator: Accelerator, value: T) -> T:
    """The main process's `value`, on every process (picklable values)."""
    if accelerator.num_processes > 1:
        box = [value]
        broadcast_object_list(box)
        value = box[0]
    return value


@contextmanager
def main_process_lock(accelerator: Accelerator, store_path: Path, break_lock: bool) -> Iterator[None]:
    """The store's writer lock, held by the main process (the only writer) around the body."""
    with ExitStack() as held:
        on_main(accelerator, lambda: held.enter_context(store_lock(store_path, "moram learn-task", break_lock)))
        yield


@contextmanager
def whole_model(accelerator: Accelerator, model: torch.nn.Module) -> Iterator[None]:
    """Every parameter whole on every process meanwhile: under ZeRO-3 a forward pass before training would meet shards."""
    if not (uses_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


def gathered_ranks(accelerator: Accelerator, model, params: list[torch.nn.Parameter]) -> tuple[BankTensors, dict[str, torch.Tensor]]:
    """The trained ranks and earlier-bank gains, whole, on every process: under ZeRO-3 each process holds only a shard of them."""
    inner = accelerator.unwrap_model(model)
    if not (uses_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3):
        return inner.task_ranks(), inner.task_gains()
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        # Copies: leaving the block re-partitions the parameters under these views.
        return ({module: (A.clone(), B.clone()) for module, (A, B) in inner.task_ranks().items()},
                {module: gains.clone() for module, gains in inner.task_gains().items()})
