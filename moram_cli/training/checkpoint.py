"""Resume data: an interrupted learn-task's progress, kept in the store's staging area until the task's bank is written.

`<store>/.staging/resume-<task>/step-<N>/` holds `tensors.safetensors` (the
new ranks, the optimiser's moments, every process's RNG state) and
`state.yaml` (the step, the losses so far, scheduler and optimiser scalars,
and the run it belongs to). Each step directory is written under a temporary
name and renamed when complete, and older ones are removed only after that,
so a kill at any instant leaves a complete checkpoint or none. Never pickle.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from moram_cli import __version__
from moram_cli.errors import MoramError
from moram_cli.safe_text import one_line
from moram_cli.store import Bank, MemoryStore, TrainingSettings
from moram_cli.store.store import RESUME_PREFIX, STAGING_DIR
from moram_cli.store.yamlio import read_yaml, write_yaml
from moram_cli.training.distributed import on_main

STATE_FILE = "state.yaml"
TENSORS_FILE = "tensors.safetensors"
STEP_PATTERN = re.compile(r"step-([0-9]{8})")
TENSOR_REF = "safetensors_key"


@dataclass
class TrainState:
    """How far training got: optimiser steps done, the loss of each, and the tokens seen."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0


@dataclass(frozen=True)
class ResumeData:
    """Where one task's resume data lives, and the run it belongs to.

    `run` is what a resuming command must share with the interrupted one;
    `settings` are all its training settings, so `--resume` needs no flags.
    """

    directory: Path
    run: dict
    settings: dict


@dataclass(frozen=True)
class Checkpoint:
    """The newest checkpoint of a resume directory: `state.yaml`, and the tensors its references name."""

    directory: Path
    state: dict
    tensors: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return self.state["step"]

    def settings(self) -> TrainingSettings:
        try:
            return TrainingSettings(**self.state["settings"])
        except TypeError:
            raise MoramError(f"{self.directory}: resume data holds settings this moram does not know; delete it and run learn-task without --resume") from None


def resume_dir(store_path: Path, task: str) -> Path:
    return store_path / STAGING_DIR / f"{RESUME_PREFIX}{task}"


def run_identity(task: str, data_sha256: str, processes: int, banks: list[Bank], settings: TrainingSettings) -> dict:
    """What shapes a run's result, so a resuming command must match it; how often it checkpoints does not."""
    return {"task": task, "data_sha256": data_sha256, "processes": processes, "banks": [bank.path.name for bank in banks],
            **{key: value for key, value in asdict(settings).items() if key != "checkpoint_every"}}


def checkpoint_to_resume(store_path: Path, task: str) -> Checkpoint:
    """The task's newest checkpoint, or a one-line error when its run left none."""
    directory = resume_dir(store_path, task)
    checkpoint = read_checkpoint(directory)
    if checkpoint is None:
        raise MoramError(f"{store_path}: no interrupted run of task {task!r} to resume (no checkpoint in {directory}); run learn-task without --resume")
    return checkpoint


def finished_bank(store: MemoryStore, checkpoint: Checkpoint) -> Bank | None:
    """The bank of a run killed after writing it but before removing its resume data: that run is complete."""
    run = checkpoint.state["run"]
    bank = next((bank for bank in store.banks() if bank.name == run["task"]), None)
    return bank if bank is not None and bank.metadata().get("data_sha256") == run["data_sha256"] else None


def latest_step_dir(directory: Path) -> Path | None:
    """The newest complete checkpoint under `directory`: temporary directories never match the pattern."""
    steps = sorted(p for p in directory.iterdir() if STEP_PATTERN.fullmatch(p.name)) if directory.is_dir() else []
    return steps[-1] if steps else None


def read_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest checkpoint in a resume directory, or None when there is none."""
    step_dir = latest_step_dir(directory)
    if step_dir is None:
        return None
    fix = f"delete {directory} and run learn-task without --resume"
    state = read_yaml(step_dir / STATE_FILE, "resume data", fix)
    try:
        tensors = load_file(step_dir / TENSORS_FILE)
    except (SafetensorError, OSError) as exc:
        raise MoramError(f"{step_dir}: resume data cannot be read ({one_line(str(exc), 120)}); {fix}") from None
    if not {"run", "settings", "step", "losses", "tokens", "optimizer", "scheduler", "rng"} <= set(state):
        raise MoramError(f"{step_dir / STATE_FILE}: resume data is incomplete; {fix}")
    return Checkpoint(directory, state, tensors)


def check_resumable(checkpoint: Checkpoint, run: dict) -> None:
    """The interrupted run and this command must agree on everything that shapes the result."""
    for key, value in run.items():
        had = checkpoint.state["run"].get(key)
        if had != value:
            raise MoramError(
                f"{checkpoint.directory}: the interrupted run had {key}={one_line(repr(had), 80)}, this command "
                f"{one_line(repr(value), 80)}; resume with the same data and settings, or delete that directory to start over"
            )


def save_checkpoint(accelerator: Accelerator, resume: ResumeData, state: TrainState, params: list[torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Write the resume data of step `state.step` (a collective call: every process contributes its RNG state)."""
    rng = gather_object([_rng_state()])

    def write() -> None:
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
        data = {"run": resume.run, "settings": resume.settings, "step": state.step, "losses": state.losses,
                "tokens": state.tokens, "optimizer": _tensors_out(optimizer.state_dict(), "optimizer", tensors),
                "scheduler": scheduler.state_dict(), "rng": _tensors_out(rng, "rng", tensors), "tool_version": __version__}
        _write_step(resume.directory, state.step, data, tensors)

    on_main(accelerator, write)


def restore_params(checkpoint: Checkpoint, params: list[torch.nn.Parameter]) -> None:
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(checkpoint.tensors[f"param.{i}"])


def restore_training(accelerator: Accelerator, checkpoint: Checkpoint, optimizer: torch.optim.Optimizer, scheduler) -> TrainState:
    """Optimiser, scheduler and this process's RNG as they were after the checkpoint's step; returns the progress."""
    state = checkpoint.state
    optimizer.load_state_dict(_tensors_in(state["optimizer"], checkpoint.tensors))
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(_tensors_in(state["rng"], checkpoint.tensors)[accelerator.process_index])
    return TrainState(step=state["step"], losses=list(state["losses"]), tokens=state["tokens"])


def remove_resume_data(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def _write_step(directory: Path, step: int, data: dict, tensors: dict[str, torch.Tensor]) -> None:
    final = directory / f"step-{step:08d}"
    if final.exists():  # a stop request right after a periodic checkpoint: nothing new to save
        return
    tmp = directory / f".tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir(parents=True)
        with open(tmp / TENSORS_FILE, "wb") as fh:
            fh.write(save(tensors))
            fh.flush()
            os.fsync(fh.fileno())
        write_yaml(tmp / STATE_FILE, data)
        os.replace(tmp, final)
    except OSError as exc:
        raise MoramError(f"{directory}: cannot write resume data ({exc.strerror}); check free space; the store's banks are unchanged") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for older in directory.iterdir():
        if older != final:
            shutil.rmtree(older, ignore_errors=True)


def _tensors_out(tree, key: str, tensors: dict[str, torch.Tensor]):
    """`tree` (nested dicts and lists, like a state_dict) with each tensor moved into `tensors` and replaced by a reference."""
    if isinstance(tree, torch.Tensor):
        tensors[key] = tree.detach().cpu().contiguous()
        return {TENSOR_REF: key}
    if isinstance(tree, dict):
        return {k: _tensors_out(v, f"{key}.{k}", tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_tensors_out(v, f"{key}.{i}", tensors) for i, v in enumerate(tree)]
    return tree


def _tensors_in(tree, tensors: dict[str, torch.Tensor]):
    """The inverse of `_tensors_out` (tuples come back as lists)."""
    if isinstance(tree, dict):
        if set(tree) == {TENSOR_REF}:
            return tensors[tree[TENSOR_REF]]
        return {k: _tensors_in(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_tensors_in(v, tensors) for v in tree]
    return tree


def _rng_state() -> dict:
    """This process's random generators: dropout draws from torch's, and any library may draw from Python's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
