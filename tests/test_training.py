"""The training loop's settings: how the global batch is split, accumulation, --max-steps, precision, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from moram_cli.cli import app
from moram_cli.errors import MoramError
from moram_cli.store import TrainingSettings
from moram_cli.training.distributed import BatchSplit, batch_split, resolve_precision
from moram_cli.training.learn import learn_task

runner = CliRunner()
# Float32 sums taken in another order (micro-batches, processes) differ in the last bits; six AdamW steps keep that near 1e-7.
SPLIT_TOLERANCE = 1e-5


def trained_bank(store, data, **settings) -> dict[str, torch.Tensor]:
    summary = learn_task(store, data, name="t", show_progress=False, **settings)
    return load_file(f"{summary['bank']}/weights.safetensors") | {"summary": summary}


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a if k != "summary")


def test_the_global_batch_is_cut_evenly_even_when_the_last_batch_is_short():
    split = BatchSplit(global_batch=8, processes=2, grad_accum=2)
    assert split.micro == 2 and split.slices(list(range(8)), 0) == [[0, 1], [2, 3]] and split.slices(list(range(8)), 1) == [[4, 5], [6, 7]]
    assert [split.slices([10, 11, 12], p) for p in (0, 1)] == [[[10], [11]], [[12], []]]
    assert split.to_dict() == {"global": 8, "processes": 2, "grad_accum": 2, "micro": 2}


def test_a_batch_that_does_not_split_is_refused():
    with pytest.raises(MoramError, match=r"--batch-size 8 does not split into 3 process\(es\) x --grad-accum 1; use a multiple of 3"):
        batch_split(TrainingSettings(batch_size=8), processes=3)
    with pytest.raises(MoramError, match="use a multiple of 6"):
        batch_split(TrainingSettings(batch_size=8, grad_accum=3), processes=2)


@pytest.mark.parametrize("grad_accum", [2, 4])
@pytest.mark.parametrize("examples", [24, 17])  # 17: the last global batch holds one example, so some micro-batches are empty
def test_accumulation_gives_the_parameters_of_one_big_batch(new_store, tiny_task, tmp_path, examples, grad_accum):
    lines = tiny_task.train.read_text().splitlines()[:examples]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    whole = trained_bank(new_store("whole"), data, batch_size=8, epochs=2, lr=1e-2)
    accumulated = trained_bank(new_store("accumulated"), data, batch_size=8, grad_accum=grad_accum, epochs=2, lr=1e-2)
    assert accumulated["summary"]["batch"] == {"global": 8, "processes": 1, "grad_accum": grad_accum, "micro": 8 // grad_accum}
    assert accumulated["summary"]["steps"] == whole["summary"]["steps"] == -(-examples // 8) * 2
    assert max_difference(whole, accumulated) < SPLIT_TOLERANCE
    assert whole["summary"]["loss"] == accumulated["summary"]["loss"]


def test_max_steps_caps_the_epochs(new_store, tiny_task):
    summary = learn_task(new_store("s"), tiny_task.train, show_progress=False, epochs=5, batch_size=4, max_steps=3)
    assert summary["steps"] == 3 and summary["hyperparameters"]["max_steps"] == 3


def test_gradient_checkpointing_changes_memory_not_results(new_store, tiny_task):
    plain = trained_bank(new_store("plain"), tiny_task.train, batch_size=4, lr=1e-2)
    recomputed = trained_bank(new_store("recomputed"), tiny_task.train, batch_size=4, lr=1e-2, gradient_checkpointing=True)
    assert recomputed["summary"]["hyperparameters"]["gradient_checkpointing"]
    assert max_difference(plain, recomputed) < SPLIT_TOLERANCE


def test_auto_precision_is_fp32_on_the_cpu_and_bf16_on_a_gpu_that_has_it(new_store, tiny_task, monkeypatch):
    assert learn_task(new_store("auto"), tiny_task.train, show_progress=False, epochs=0.2)["precision"] == "fp32"

    class OnGpu:
        device = torch.device("cuda", 0)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", OnGpu()) == "bf16" and resolve_precision("fp32", OnGpu()) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto", OnGpu()) == "fp32"


def test_bf16_autocast_trains_too(new_store, tiny_task):
    bf16 = trained_bank(new_store("bf16"), tiny_task.train, batch_size=4, lr=1e-2, precision="bf16")
    assert bf16["summary"]["precision"] == "bf16" and all(bf16[k].dtype == torch.float32 for k in bf16 if k != "summary")
    assert all(bf16[k].abs().sum() > 0 for k in bf16 if k.endswith(".B"))


@pytest.mark.parametrize("flag, value", [("--grad-accum", "0"), ("--precision", "fp16"), ("--max-steps", "0"), ("--checkpoint-every", "-1")])
def test_settings_that_cannot_train_are_refused_in_one_line(new_store, tiny_task, flag, value):
    result = runner.invoke(app, ["learn-task", str(new_store("s")), "--data", str(tiny_task.train), flag, value])
    setting = flag.lstrip("-").replace("-", "_")
    assert result.exit_code == 2 and result.stderr.startswith(f"error: invalid training settings: {setting}="), result.output
