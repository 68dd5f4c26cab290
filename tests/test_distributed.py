"""learn-task on several processes: DDP over gloo, DeepSpeed ZeRO-2/3 on the CPU, and `--launch`.

Two processes are started with `accelerate.notebook_launcher` (forked from
this test process, so monkeypatches apply in them); learn-task's own
Accelerator takes them up as it would under `accelerate launch`. The
`--launch` tests start real launches, some with one process paused at a
point of test_fault_injection's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import PartialState, notebook_launcher
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file, save_file
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure
from typer.testing import CliRunner

import moram_cli.training.key_init as key_init
import moram_cli.training.learn as learn_module
from conftest import snapshot
from moram_cli.cli import app
from moram_cli.errors import STATUS_ENV, MoramError
from moram_cli.store import MemoryStore
from moram_cli.store.bank import flatten
from moram_cli.store.init import init_store
from moram_cli.training.collective_timeout import process_group_kwargs
from moram_cli.training.launch import RECIPES_DIR, launch_argv, launch_config, launch_env, launch_failure, relaunch, shipped_recipes
from moram_cli.training.learn import learn_task
from moram_cli.training.loop import Stopped

# Each process sums its half of the batch before the processes add the halves: another order of float32
# additions than one process summing the whole batch. Over six AdamW steps that stays below 1e-6.
SPLIT_TOLERANCE = 1e-5
SETTINGS = {"epochs": 2, "batch_size": 8, "lr": 1e-2}


@pytest.fixture
def gathered(tmp_path, monkeypatch):
    """Every process saves the ranks it gathered for the bank, and what it held before gathering; returns the folder."""
    folder = tmp_path / "gathered"
    folder.mkdir()
    real = learn_module.gathered_ranks

    def record(accelerator, model, params):
        held = {"distributed_type": str(accelerator.distributed_type), "elements_held": [p.data.numel() for p in params]}
        ranks, gains = real(accelerator, model, params)
        save_file(flatten(ranks), str(folder / f"rank{accelerator.process_index}.safetensors"))
        (folder / f"rank{accelerator.process_index}.json").write_text(json.dumps(held))
        return ranks, gains

    monkeypatch.setattr(learn_module, "gathered_ranks", record)
    return folder


def on_two_processes(function) -> None:
    """Run `function` on two CPU processes; the test process's own Accelerator state would stop the launcher.

    The processes are forked from this one, whose OpenMP threads do not come
    along: DeepSpeed's CPU ops then hung on their first parallel region. With
    one thread per process (two processes on two cores) OpenMP runs inline.
    `accelerate launch` starts fresh processes and is not affected.
    """
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        notebook_launcher(function, num_processes=2, use_port=str(free_port()))
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    """A port nothing listens on now, so parallel test runs on one machine do not meet in one process group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bank_of(store, name: str = "t") -> dict[str, torch.Tensor]:
    return load_file(store / "banks" / f"001-{name}" / "weights.safetensors")


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def check_gathered(folder, store, reference, distributed_type: str) -> list[dict]:
    """Both processes gathered the same ranks, the bank holds them, they were trained, and they match one process's run."""
    ranks = [load_file(folder / f"rank{i}.safetensors") for i in range(2)]
    bank = bank_of(store)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) and torch.equal(ranks[0][k], bank[k]) for k in ranks[0])
    assert all(bank[k].abs().sum() > 0 for k in bank if k.endswith(".B"))
    assert max_difference(bank, reference) < SPLIT_TOLERANCE
    held = [json.loads((folder / f"rank{i}.json").read_text()) for i in range(2)]
    assert {h["distributed_type"] for h in held} == {distributed_type}
    return held


def test_ddp_on_two_processes_matches_one_process(new_store, tiny_task, gathered):
    reference = new_store("one")
    assert learn_task(reference, tiny_task.train, name="t", show_progress=False, **SETTINGS)["batch"]["processes"] == 1
    store = new_store("two")

    def train():
        summary = learn_task(store, tiny_task.train, name="t", show_progress=False, **SETTINGS)
        assert summary["batch"] == {"global": 8, "processes": 2, "grad_accum": 1, "micro": 4}

    on_two_processes(train)
    check_gathered(gathered, store, bank_of(reference), "DistributedType.MULTI_CPU")
    assert yaml.safe_load((store / "banks" / "001-t" / "bank.yaml").read_text())["batch"]["processes"] == 2


def test_when_the_main_process_cannot_lock_the_store_every_process_stops_with_its_message(new_store, tiny_task, tmp_path):
    store = new_store("locked")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": "2025-01-02T03:04:05+00:00", "command": "moram learn-task"}
    (store / ".lock").write_text(yaml.safe_dump(holder))

    def train():
        with pytest.raises(MoramError) as refused:
            learn_task(store, tiny_task.train, name="t", show_progress=False, **SETTINGS)
        (tmp_path / f"refused{PartialState().process_index}").write_text(str(refused.value))

    on_two_processes(train)
    messages = {(tmp_path / f"refused{i}").read_text() for i in range(2)}
    assert len(messages) == 1 and messages.pop().endswith("(moram learn-task); wait for it to finish")


def test_learn_task_ends_its_process_group_whether_it_trains_or_refuses(new_store, tiny_task, monkeypatch):
    # A gloo group left for the interpreter's exit aborted a launched process in CI; one destroyed
    # while the DDP model still held it deadlocked (the two-process tests here run that path).
    calls, real = [], learn_module.make_accelerator

    def spied(*args):
        accelerator = real(*args)
        monkeypatch.setattr(accelerator, "free_memory", lambda: calls.append("model freed"))
        monkeypatch.setattr(accelerator, "end_training", lambda: calls.append("group ended"))
        return accelerator

    monkeypatch.setattr(learn_module, "make_accelerator", spied)
    store = new_store("ends")
    learn_task(store, tiny_task.train, name="t", show_progress=False, **SETTINGS)
    with pytest.raises(MoramError, match="does not split"):
        learn_task(store, tiny_task.train, name="u", show_progress=False, **SETTINGS | {"batch_size": 3, "grad_accum": 2})
    assert calls == ["model freed", "group ended"] * 2


def test_a_stop_on_one_process_stops_both_and_they_resume_bitwise(new_store, tiny_task, tmp_path, monkeypatch):
    import moram_cli.training.loop as loop

    settings = SETTINGS | {"checkpoint_every": 2}
    whole, store = new_store("whole"), new_store("stopped")
    on_two_processes(lambda: learn_task(whole, tiny_task.train, name="t", show_progress=False, **settings))
    calls, real = [0], loop.completion_loss

    def ctrl_c_on_the_second_process(model, batch):
        calls[0] += 1
        if calls[0] == 4 and PartialState().process_index == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, batch)

    def train_until_stopped():
        with pytest.raises(Stopped, match="progress saved at step 4/6"):
            learn_task(store, tiny_task.train, name="t", show_progress=False, **settings)
        (tmp_path / f"stopped{PartialState().process_index}").touch()

    monkeypatch.setattr(loop, "completion_loss", ctrl_c_on_the_second_process)
    on_two_processes(train_until_stopped)
    monkeypatch.setattr(loop, "completion_loss", real)
    assert (tmp_path / "stopped0").exists() and (tmp_path / "stopped1").exists()
    state = yaml.safe_load((store / ".staging" / "resume-t" / "step-00000004" / "state.yaml").read_text())
    assert state["run"]["processes"] == 2 and len(state["rng"]) == 2
    on_two_processes(lambda: learn_task(store, tiny_task.train, name="t", resume=True, show_progress=False))
    assert all(torch.equal(a, b) for a, b in zip(bank_of(store).values(), bank_of(whole).values()))


@pytest.fixture
def deepspeed_env(monkeypatch):
    """What `accelerate launch` with a DeepSpeed recipe puts in the processes' environment."""
    pytest.importorskip("deepspeed")

    def stage(zero_stage: int, config_file=None) -> None:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(zero_stage))
        if config_file:
            monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config_file))

    return stage


@pytest.mark.slow  # DeepSpeed compiles a communication op on its first run (~1 min); later runs take seconds
def test_zero2_on_two_processes_writes_the_trained_bank(new_store, tiny_task, gathered, deepspeed_env):
    reference = new_store("one")
    learn_task(reference, tiny_task.train, name="t", show_progress=False, **SETTINGS)
    store = new_store("zero2")
    deepspeed_env(2)
    on_two_processes(lambda: learn_task(store, tiny_task.train, name="t", show_progress=False, grad_accum=2, **SETTINGS))
    check_gathered(gathered, store, bank_of(reference), "DistributedType.DEEPSPEED")
    assert not (store / ".staging" / "resume-t").exists()


@pytest.mark.slow
def test_zero3_gathers_the_sharded_ranks_before_writing_the_bank(new_store, tiny_task, gathered, deepspeed_env, tmp_path):
    reference = new_store("one")
    learn_task(reference, tiny_task.train, name="t", show_progress=False, **SETTINGS)
    store = new_store("zero3")
    # Parameters this small are normally kept whole on every process; threshold 0 shards them like large ones.
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                                  "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                  "train_batch_size": "auto"}))
    deepspeed_env(3, config)
    on_two_processes(lambda: learn_task(store, tiny_task.train, name="t", show_progress=False, grad_accum=2, **SETTINGS))
    held = check_gathered(gathered, store, bank_of(reference), "DistributedType.DEEPSPEED")
    assert all(elements == 0 for h in held for elements in h["elements_held"])
    # A later task runs the model before training (data keys, task prototype) and routes its evaluation: on shards too.
    on_two_processes(lambda: learn_task(store, tiny_task.train, name="u", eval_data=tiny_task.test, show_progress=False, grad_accum=2,
                                        **SETTINGS))
    second = MemoryStore.open(store).banks()[1]
    assert {f"{m}.A" for m in second.prototypes()} == {k for k in bank_of(reference) if k.endswith(".A")}
    assert second.metadata()["cl"]["row"].keys() == {"u"}


def test_launch_argv_is_accelerate_launch_of_the_same_command_on_a_free_port():
    args = ["learn-task", "s", "--data", "d.jsonl", "--launch", "cpu-ddp", "--num-processes", "2", "--launch=x", "--json"]
    recipe = RECIPES_DIR / "cpu-ddp.yaml"
    assert launch_argv(args, recipe, yaml.safe_load(recipe.read_text()), 2) == [
        sys.executable, "-m", "moram_cli.training.launch", "--config_file", str(recipe),
        "--num_processes", "2", "--main_process_port", "0", "-m", "moram_cli", "learn-task", "s", "--data", "d.jsonl", "--json"]
    # A port the config names is kept, and machines of one run must agree on theirs.
    assert "--main_process_port" not in launch_argv(args, recipe, {"main_process_port": 29600}, 2)
    assert "--main_process_port" not in launch_argv(args, recipe, {"num_machines": 2}, 2)


def test_launch_takes_a_config_file_and_names_the_recipes_it_ships(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_processes: 4\n")
    assert launch_config(str(config)) == config
    assert shipped_recipes() == ["cpu-ddp", "ddp", "zero2", "zero3"]
    with pytest.raises(MoramError, match="^--launch nope: no such launch recipe or file; the shipped recipes are cpu-ddp, ddp, zero2, zero3$"):
        launch_config("nope")


@pytest.mark.parametrize("recipe", ["cpu-ddp", "ddp", "zero2", "zero3"])
def test_shipped_recipes_are_accelerate_configs(recipe):
    config = load_config_from_file(str(RECIPES_DIR / f"{recipe}.yaml"))
    assert config.mixed_precision == "no" and config.num_machines == 1
    assert config.num_processes == (2 if recipe == "cpu-ddp" else -1)


def test_relaunch_checks_first_then_replaces_the_process(monkeypatch):
    checked, executed = [], []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: executed.append((argv, env)))
    relaunch(["learn-task", "s", "--launch", "cpu-ddp"], "cpu-ddp", None, checked.append)
    argv, env = executed[0]
    # accelerate does not pass the recipe's use_cpu on to its processes; moram does.
    assert checked == [2] and argv[-2:] == ["learn-task", "s"] and env["ACCELERATE_USE_CPU"] == "1"
    assert os.path.isdir(env[STATUS_ENV]) and STATUS_ENV not in os.environ
    os.rmdir(env[STATUS_ENV])
    with pytest.raises(MoramError, match="process count is left open or below 1; pass --num-processes"):
        relaunch(["learn-task"], "zero3", None, checked.append)
    with pytest.raises(MoramError, match="^--num-processes needs --launch"):
        relaunch(["learn-task"], None, 2, checked.append)
    assert len(executed) == 1


@pytest.mark.slow  # three Python processes start (~20 s on 2 cores)
def test_learn_task_launch_cpu_ddp_through_the_cli(new_store, tiny_task):
    reference, store = new_store("one"), new_store("launched")
    learn_task(reference, tiny_task.train, name="t", show_progress=False, **SETTINGS)
    command = [sys.executable, "-m", "moram_cli", "learn-task", str(store), "--data", str(tiny_task.train), "--name", "t",
               "--epochs", "2", "--lr", "1e-2", "--launch", "cpu-ddp", "--num-processes", "2", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # one summary: only the main process prints
    assert summary["batch"] == {"global": 8, "processes": 2, "grad_accum": 1, "micro": 4}
    assert max_difference(bank_of(store), bank_of(reference)) < SPLIT_TOLERANCE
    refused = subprocess.run(command[:-5] + ["--batch-size", "3", "--launch", "cpu-ddp", "--json"], capture_output=True, text=True,
                             env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "error: --batch-size 3 does not split into 2 process(es) x --grad-accum 1; use a multiple of 2")


@pytest.mark.slow  # three Python processes start
def test_a_failure_in_the_launched_processes_is_one_line_and_exit_2(tmp_path, tiny_model_dir, tiny_task):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    store = tmp_path / "store"
    init_store(store, base_model=str(model), r=2)
    # The check before launching reads the store and the data, not the model: each process finds the change itself.
    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    command = [sys.executable, "-m", "moram_cli", "learn-task", str(store), "--data", str(tiny_task.train), "--launch", "cpu-ddp"]
    temp = tmp_path / "temp"
    temp.mkdir()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "TMPDIR": str(temp)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: base model {model} changed since the store was created") and done.stderr.count("\n") == 1
    # The processes' reports are gone with the launch, and so is the lock.
    assert not list(temp.glob("moram-launch-*")) and not (store / ".lock").exists()


def test_data_keys_are_identical_on_every_process(new_store, tiny_task, tmp_path, monkeypatch):
    store = new_store("keys")
    learn_task(store, tiny_task.train, name="one", show_progress=False, batch_size=8, max_steps=2)
    real = learn_module.initial_keys

    def record(*args, **kwargs):
        keys = real(*args, **kwargs)
        save_file({m: A.contiguous() for m, A in keys.items()}, str(tmp_path / f"keys{PartialState().process_index}.safetensors"))
        return keys

    monkeypatch.setattr(learn_module, "initial_keys", record)
    # Each process computes keys of its own (as floating-point sums on GPUs can differ); the main process's must win.
    own = key_init.data_keys
    monkeypatch.setattr(key_init, "data_keys", lambda *a: own(*a) + PartialState().process_index)
    on_two_processes(lambda: learn_task(store, tiny_task.train, name="two", show_progress=False, batch_size=8, max_steps=1))
    first, second = (load_file(tmp_path / f"keys{i}.safetensors") for i in range(2))
    assert first.keys() == second.keys() and all(torch.equal(first[m], second[m]) for m in first)


# DeepSpeed creates its own process group, with the timeout accelerate passes it; slow: it compiles an op on its first run.
@pytest.mark.parametrize("zero_stage", [None, pytest.param(2, marks=pytest.mark.slow)], ids=["ddp", "zero2"])
def test_a_process_stalled_past_the_collective_timeout_ends_each_process_in_one_line(new_store, tiny_task, tmp_path, monkeypatch,
                                                                                     request, zero_stage):
    if zero_stage:
        request.getfixturevalue("deepspeed_env")(zero_stage)
    store = new_store("stalled")
    before = snapshot(store)
    real = learn_module.encode_dataset

    def stall_the_second_process(*args):
        # Until the first one gave up waiting for it at the next collective; a minute at most, so that a timeout
        # that never comes fails the test instead of hanging it.
        deadline = time.time() + 60
        while PartialState().process_index == 1 and not (tmp_path / "failed0").exists() and time.time() < deadline:
            time.sleep(0.1)
        return real(*args)

    def train():
        with pytest.raises(MoramError) as failed:
            learn_task(store, tiny_task.train, name="t", show_progress=False, collective_timeout=3, **SETTINGS)
        (tmp_path / f"failed{PartialState().process_index}").write_text(f"{type(failed.value).__name__}: {failed.value}")

    monkeypatch.setattr(learn_module, "encode_dataset", stall_the_second_process)
    on_two_processes(train)
    assert (tmp_path / "failed0").read_text().startswith(
        "MoramError: process 0 waited 3 s for the other processes at a collective operation; one of them is stuck or that far behind")
    # The late one finds the other gone: a failure that only follows the first, which a launch does not print.
    assert (tmp_path / "failed1").read_text() == (
        "FollowsAnotherProcess: process 1 lost the other processes at a collective operation: one of them ended or gave up waiting")
    assert snapshot(store) == before


def test_collective_timeout_takes_seconds_above_zero(new_store, tiny_task):
    store = new_store("refused")
    done = CliRunner().invoke(app, ["learn-task", str(store), "--data", str(tiny_task.train), "--collective-timeout", "0"])
    assert done.exit_code == 2 and done.stderr == "error: --collective-timeout 0: need a number of seconds above 0 and at most 1e+09\n"
    assert process_group_kwargs(90).to_kwargs() == {"timeout": timedelta(seconds=90)}
    # accelerate passes on only what differs from its defaults: a timeout equal to its 600 s must still get through.
    assert process_group_kwargs(600).to_kwargs()["timeout"].total_seconds() == pytest.approx(600)


def ended(exit_codes: dict[int, int]) -> dict[int, ProcessFailure]:
    """torchrun's account of the processes that ended with an error, in the order it saw them end."""
    return {process: ProcessFailure(local_rank=process, pid=1000 + process, exitcode=code, error_file="<N/A>")
            for process, code in exit_codes.items()}


def test_a_failed_launch_prints_the_one_failure_the_others_followed():
    waited = {"message": "error: process 1 waited 3 s ...", "code": 2, "follows": False}
    lost = {"message": "error: process 0 lost the other processes ...", "code": 2, "follows": True}
    interrupted = {"message": "interrupted; the store is unchanged", "code": 130, "follows": True}
    # Process 1 gave up waiting; torchrun then stopped process 0.
    assert launch_failure(ended({1: 2, 0: 130}), {0: interrupted, 1: waited}) == (waited["message"], 2)
    # Process 1 was killed: process 0, which lost it, only followed, even when torchrun saw it end first.
    assert launch_failure(ended({0: 2, 1: -9}), {0: lost}) == (
        "error: process 1 died of SIGKILL (killed, or out of memory), and the launch stopped the others; "
        "rerun learn-task, with --resume if it saved a checkpoint", 2)
    # A crash reports nothing: torchrun's account and the process's traceback stand.
    assert launch_failure(ended({1: 1, 0: 2}), {0: lost}) is None
    # Ctrl-C reaches every process, and torchrun reports no failure of its own.
    assert launch_failure({}, {0: interrupted, 1: interrupted}) == (interrupted["message"], 130)


FAULT_SCRIPT = Path(__file__).parent / "test_fault_injection.py"


def launch_with_pause(store: Path, data: Path, pause: str, process: int, marker: Path, *options: str) -> subprocess.Popen:
    """`learn-task --launch cpu-ddp` as moram launches it, but launched process `process` pauses at `pause` (one of
    test_fault_injection's PAUSES) and writes its pid to `marker`."""
    recipe = launch_config("cpu-ddp")
    config = yaml.safe_load(recipe.read_text())
    argv = launch_argv(["learn-task", str(store), "--data", str(data), "--name", "t", "--json", *options], recipe, config, None)
    module = argv.index("moram_cli")
    argv[module - 1 : module + 1] = [str(FAULT_SCRIPT), "--rank", str(process), pause, str(marker)]
    return subprocess.Popen(argv, env=launch_env(config) | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # three Python processes start, and one waits out the 10 s timeout
def test_a_launched_process_waiting_past_the_collective_timeout_ends_the_run_in_one_line(new_store, tiny_task, tmp_path):
    store = new_store("stalled")
    before = snapshot(store)
    # The main process stalls where it writes the bank, alone, while the other waits to hear how that went.
    launched = launch_with_pause(store, tiny_task.train, "bank: before its weights are written", 0, tmp_path / "paused",
                                 "--collective-timeout", "10")
    _, stderr = launched.communicate(timeout=300)
    assert launched.returncode == 2, stderr
    assert stderr.startswith("error: process 1 waited 10 s for the other processes at a collective operation;"), stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    # The stalled process, stopped by torchrun, removed its half-written bank and the lock.
    assert (tmp_path / "paused").exists() and snapshot(store) == before


@pytest.mark.slow  # three Python processes start
def test_a_launched_process_that_is_killed_ends_the_run_in_one_line(new_store, tiny_task, tmp_path):
    store = new_store("killed")
    before = snapshot(store)
    marker = tmp_path / "paused"
    launched = launch_with_pause(store, tiny_task.train, "model loaded, encoding the data", 1, marker)
    deadline = time.time() + 300
    while launched.poll() is None and not (marker.exists() and marker.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    _, stderr = launched.communicate(timeout=300)
    assert launched.returncode == 2, stderr
    assert stderr == ("error: process 1 died of SIGKILL (killed, or out of memory), and the launch stopped the others; "
                      "rerun learn-task, with --resume if it saved a checkpoint\n")
    assert snapshot(store) == before
