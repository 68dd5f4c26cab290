"""A smoke run of bench/cl_benchmark.py on the tiny model and two tiny tasks: every stage, the outputs, and resuming."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml


SCRIPT = Path(__file__).parent.parent / "bench" / "cl_benchmark.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cl_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_argv(tmp_path, tasks_dir, tiny_model_dir, *flags) -> list[str]:
    return ["--tasks-dir", str(tasks_dir), "--order", "one,two", "--base-model", str(tiny_model_dir), "--n-train", "8",
            "--n-dev", "4", "--n-test", "6", "--r", "2", "--batch-size", "4", "--work-dir", str(tmp_path / "work"),
            "--results-dir", str(tmp_path / "results"), "--quiet", "--num-seeds", "1", *flags]


def run(bench, tmp_path, tasks_dir, tiny_model_dir, *flags) -> dict:
    assert bench.main(bench_argv(tmp_path, tasks_dir, tiny_model_dir, *flags)) == 0
    return json.loads((tmp_path / "results" / "cl-benchmark.json").read_text())


def test_the_benchmark_runs_every_method_and_resumes_from_its_stages(bench, tmp_path, tasks_dir, tiny_model_dir, monkeypatch):
    result = run(bench, tmp_path, tasks_dir, tiny_model_dir, "--no-tune")
    assert result["order"] == ["one", "two"] and (result["n_train"], result["n_test"]) == (8, 6)
    methods = result["methods"]
    assert set(methods) == {"moram", "lora", "inclora", "mtl", "zero_shot"}
    for name in ("moram", "lora", "inclora"):
        assert len(methods[name]["matrix"]) == 2 and len(methods[name]["matrix"][1]) == 2 and "bwt" in methods[name]
    assert len(methods["mtl"]["per_task"]) == 2 and len(methods["zero_shot"]["per_task"]) == 2
    chosen = result["settings"]["chosen"]
    assert result["settings"]["lora_rank"] == 4 and chosen["moram"]["lr"] == bench.LR_GRIDS["moram"][0]
    assert chosen["lora"]["later_lr"] == 5e-4 and "later_lr" not in chosen["mtl"]
    assert "| method | avg acc | sd | BWT | FWT | one | two |" in (tmp_path / "results" / "cl-benchmark.md").read_text()
    assert (tmp_path / "results" / "cl-benchmark.png").stat().st_size > 0
    # The stage records alone resume a run: stores and data slices may be lost with the machine.
    for kept_only_here in ("stores", "data"):
        shutil.rmtree(tmp_path / "work" / kept_only_here)
    monkeypatch.setattr(bench, "learn_task", lambda *a, **k: pytest.fail("a finished stage ran again"))
    assert run(bench, tmp_path, tasks_dir, tiny_model_dir, "--no-tune")["methods"] == methods


def test_finals_repeat_at_each_seed_and_the_results_are_their_means(bench, tmp_path, tasks_dir, tiny_model_dir):
    result = run(bench, tmp_path, tasks_dir, tiny_model_dir, "--no-tune", "--methods", "moram,mtl", "--seed", "3", "--num-seeds", "2")
    assert result["settings"]["final_seeds"] == [3, 4]
    moram, mtl = result["methods"]["moram"], result["methods"]["mtl"]
    assert [s["seed"] for s in moram["seeds"]] == [3, 4] and [s["seed"] for s in mtl["seeds"]] == [3, 4]
    first, second = moram["seeds"]
    assert moram["matrix"][1][0] == pytest.approx((first["matrix"][1][0] + second["matrix"][1][0]) / 2)
    assert moram["bwt"] == pytest.approx((first["bwt"] + second["bwt"]) / 2)
    assert mtl["avg_acc"] == pytest.approx(sum(s["avg_acc"] for s in mtl["seeds"]) / 2) and mtl["avg_acc_sd"] is not None
    stores = tmp_path / "work" / "stores"
    # Each seed is its own training run: its own store, seeded in full, and for multi-task its own shuffle of the union.
    for seed in (3, 4):
        store = next(stores.glob(f"final-moram-*-seed{seed}"))
        assert yaml.safe_load((store / "store.yaml").read_text())["training"]["seed"] == seed
    unions = [(tmp_path / "work" / "data" / f"union-one-two-seed{seed}.jsonl").read_text() for seed in (3, 4)]
    assert unions[0] != unions[1] and sorted(unions[0].splitlines()) == sorted(unions[1].splitlines())
    assert "| method | seed | avg acc | BWT |" in (tmp_path / "results" / "cl-benchmark.md").read_text()


def test_a_run_without_a_final_seed_is_refused(bench, tmp_path, tasks_dir, tiny_model_dir, capsys):
    assert bench.main(bench_argv(tmp_path, tasks_dir, tiny_model_dir, "--num-seeds", "0")) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --num-seeds 0: every method needs at least one final run; pass 1 or more"]
    assert not (tmp_path / "results").exists() and not (tmp_path / "work").exists()


def test_jobs_run_the_methods_in_processes_whose_stages_a_rerun_reuses(bench, tmp_path, tasks_dir, tiny_model_dir, monkeypatch):
    # Spawned workers import the script by name, as a user's `python bench/cl_benchmark.py` does through __main__.
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    monkeypatch.setitem(sys.modules, "cl_benchmark", bench)
    result = run(bench, tmp_path, tasks_dir, tiny_model_dir, "--no-tune", "--methods", "moram,inclora,mtl", "--jobs", "2")
    assert set(result["methods"]) == {"moram", "inclora", "mtl", "zero_shot"} and result["settings"]["jobs"] == 2
    assert len(result["methods"]["inclora"]["matrix"]) == 2 and len(result["methods"]["mtl"]["per_task"]) == 2
    finals = {name.split("-")[1] for name in result["settings"]["stage_wall_seconds"] if name.startswith("final-")}
    assert finals == {"moram", "inclora", "mtl"}
    monkeypatch.setattr(bench, "learn_task", lambda *a, **k: pytest.fail("a finished stage ran again"))
    again = run(bench, tmp_path, tasks_dir, tiny_model_dir, "--no-tune", "--methods", "moram,inclora,mtl")
    assert again["methods"] == result["methods"]


def test_a_second_round_trial_whose_first_round_store_is_gone_learns_the_first_task_again(bench, tmp_path, tasks_dir,
                                                                                          tiny_model_dir):
    flags = ("--methods", "inclora", "--lr-grid", "inclora=1e-2", "--later-lr-grid", "3e-3")
    first = run(bench, tmp_path, tasks_dir, tiny_model_dir, *flags)
    work = tmp_path / "work"
    later = bench.stage_name("tune2", "inclora", {"lr": 1e-2, "later_lr": 3e-3})
    (work / "stages" / f"{later}.json").unlink()
    shutil.rmtree(work / "stores")
    again = run(bench, tmp_path, tasks_dir, tiny_model_dir, *flags)
    assert again["settings"]["tuning"] == first["settings"]["tuning"]
    assert [bank.name.split("-", 1)[1] for bank in sorted((work / "stores" / later / "banks").iterdir())] == ["one", "two"]


def first_round(setting: dict) -> dict:
    """A second-round setting without its later rate: the first-round setting it continued."""
    return {k: v for k, v in setting.items() if k != "later_lr"}


def test_tuning_tries_each_setting_on_the_dev_split_and_records_the_choice(bench, tmp_path, tasks_dir, tiny_model_dir):
    result = run(bench, tmp_path, tasks_dir, tiny_model_dir, "--methods", "moram", "--lr-grid", "moram=1e-2,2e-2",
                 "--temperature-grid", "0.05", "--k-grid", "2,3", "--threshold-grid", "0.1", "--later-lr-grid", "3e-3,5e-3",
                 "--target-modules", "q_proj,v_proj")
    tuning = result["settings"]["tuning"]["moram"]
    tried = [tuple(t["setting"][key] for key in ("lr", "temperature", "k", "threshold")) for t in tuning["trials"]]
    assert tried == [(1e-2, 0.05, 2, 0.1), (1e-2, 0.05, 3, 0.1), (2e-2, 0.05, 2, 0.1), (2e-2, 0.05, 3, 0.1)]
    assert tuning["tasks"] == ["one", "two"]
    # The second round continues the best first-round store of each k (k only acts once later tasks add ranks),
    # the first round's winner first, at every later rate.
    scores = [(t["setting"], t["dev_avg_acc"]) for t in tuning["trials"]]
    leaders = [first_round(t["setting"]) for t in tuning["later_trials"][::2]]
    assert [lead["k"] for lead in leaders] in ([2, 3], [3, 2])
    for lead in leaders:
        assert (lead, max(acc for setting, acc in scores if setting["k"] == lead["k"])) in scores
    assert (leaders[0], max(acc for _, acc in scores)) in scores
    later = [t["setting"] for t in tuning["later_trials"]]
    assert later == [lead | {"later_lr": rate} for lead in leaders for rate in (3e-3, 5e-3)]
    assert tuning["chosen"] in later
    first = first_round(tuning["chosen"])
    stages = [p.name for p in (tmp_path / "work" / "stages").iterdir()]
    assert sum(name.startswith("tune-moram-") for name in stages) == 4 and "zero-shot.json" in stages
    stores = tmp_path / "work" / "stores"
    # A later-rate trial continues its first-round store: its first bank is that store's, its second trained at the rate.
    for setting in later:
        banks = sorted((stores / bench.stage_name("tune2", "moram", setting) / "banks").iterdir())
        source = stores / bench.stage_name("tune", "moram", first_round(setting)) / "banks" / banks[0].name
        assert (banks[0] / "weights.safetensors").read_bytes() == (source / "weights.safetensors").read_bytes()
        assert yaml.safe_load((banks[1] / "bank.yaml").read_text())["hyperparameters"]["lr"] == setting["later_lr"]
    final = yaml.safe_load(next(stores.glob("final-moram-*")).joinpath("store.yaml").read_text())
    assert final["training"]["later_lr"] == tuning["chosen"]["later_lr"] and final["training"]["lr"] == first["lr"]
    assert final["adapter"]["threshold"] == 0.1 and final["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert result["settings"]["target_modules"] == "q_proj,v_proj"


def test_the_merge_benchmark_scores_every_task_from_its_own_and_each_merged_store(tmp_path, tasks_dir, tiny_model_dir):
    spec = importlib.util.spec_from_file_location("merge_benchmark", SCRIPT.parent / "merge_benchmark.py")
    merge_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_bench)
    argv = ["--tasks-dir", str(tasks_dir), "--tasks", "one,two", "--base-model", str(tiny_model_dir), "--epochs", "0.5",
            "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results")]
    assert merge_bench.main(argv) == 0
    result = json.loads((tmp_path / "results" / "merge.json").read_text())
    assert result["tasks"] == ["one", "two"] and set(result["own_store"]) == {"one", "two"}
    assert set(result["merged"]) == {"source", "token"} and all(set(m) == {"one", "two"} for m in result["merged"].values())
    stores = tmp_path / "work"
    assert yaml.safe_load((stores / "merged-source" / "store.yaml").read_text())["adapter"]["routing"] == "source"
    assert len(list((stores / "merged-token" / "banks").iterdir())) == 2
    assert "| task | own store | merged, routing token | merged, routing source |" in (tmp_path / "results" / "merge.md").read_text()
