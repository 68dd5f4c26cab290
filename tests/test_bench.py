"""A smoke run of bench/cl_benchmark.py on the tiny model and two tiny tasks: every stage, the outputs, and resuming."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from moram_cli.data.jsonl import Example


SCRIPT = Path(__file__).parent.parent / "bench" / "cl_benchmark.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cl_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_script(name: str, monkeypatch):
    """A script of bench/ loaded as a module, with bench/ on the path for its imports of cl_benchmark."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
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


def test_the_benchmark_scores_every_method_both_ways_and_resumes_from_its_stage_records_alone(bench, tmp_path, tasks_dir,
                                                                                            tiny_model_dir, monkeypatch):
    result = run(bench, tmp_path, tasks_dir, tiny_model_dir, "--no-tune")
    assert result["order"] == ["one", "two"] and (result["n_train"], result["n_test"]) == (8, 6)
    assert result["scorings"] == ["generate", "choice"]
    methods = result["methods"]
    assert set(methods) == {"moram", "lora", "inclora", "mtl", "zero_shot"}
    for name in ("moram", "lora", "inclora"):
        for scoring in ("generate", "choice"):
            record = methods[name]["scorings"][scoring]
            assert [len(row) for row in record["matrix"]] == [1, 2] and None not in record["matrix"][1]
            assert record["bwt"] == pytest.approx(record["matrix"][1][0] - record["matrix"][0][0])
        seconds = methods[name]["seeds"][0]["seconds"]
        assert {"train", "load", "generate", "choice"} <= set(seconds)
    for name in ("mtl", "zero_shot"):
        assert all(len(methods[name]["scorings"][s]["per_task"]) == 2 for s in ("generate", "choice"))
    chosen = result["settings"]["chosen"]
    assert result["settings"]["lora_rank"] == 4 and chosen["moram"]["lr"] == bench.LR_GRIDS["moram"][0]
    assert chosen["lora"]["later_lr"] == 5e-4 and "later_lr" not in chosen["mtl"]
    assert set(result["paired"]["generate"]) == {"moram - lora", "moram - inclora", "moram - mtl", "lora - inclora", "lora - mtl",
                                                 "inclora - mtl"}
    assert set(result["paired"]["choice"]["moram - inclora"]) == {"avg_acc", "bwt"}
    assert set(result["paired"]["choice"]["moram - mtl"]) == {"avg_acc"}
    report = (tmp_path / "results" / "cl-benchmark.md").read_text()
    assert "### Scoring: generate" in report and "| method | avg acc | sd | BWT | one | two |" in report
    assert (tmp_path / "results" / "cl-benchmark.png").stat().st_size > 0
    stages = tmp_path / "results" / "cl-benchmark-stages"
    assert (stages / "run.json").is_file() and (stages / "zero-shot.json").is_file()
    # What a commit keeps is the results folder: the work directory (stores, data slices) goes with the machine.
    shutil.rmtree(tmp_path / "work")
    monkeypatch.setattr(bench, "learn_task", lambda *a, **k: pytest.fail("a finished stage ran again"))
    monkeypatch.setattr(bench, "evaluate_examples", lambda *a, **k: pytest.fail("a finished stage scored again"))
    assert run(bench, tmp_path, tasks_dir, tiny_model_dir, "--no-tune")["methods"] == methods


def test_by_default_a_sequence_scores_the_diagonal_and_the_final_row_and_on_request_every_cell(bench, tmp_path, tasks_dir,
                                                                                              tiny_model_dir):
    flags = ("--no-tune", "--methods", "inclora", "--order", "one,two,three", "--scorings", "choice")
    sparse = run(bench, tmp_path, tasks_dir, tiny_model_dir, *flags)["methods"]["inclora"]["scorings"]["choice"]
    R = sparse["matrix"]
    assert R[1][0] is None and all(cell is not None for cell in (R[0][0], R[1][1], *R[2]))
    assert sparse["avg_acc"] == pytest.approx(sum(R[2]) / 3)
    assert sparse["bwt"] == pytest.approx((R[2][0] - R[0][0] + R[2][1] - R[1][1]) / 2)
    assert sparse["forgetting"][:2] == pytest.approx([R[0][0] - R[2][0], R[1][1] - R[2][1]])
    # The full matrix is another run (its stage records say so), and scores the cells the sparse one skipped alike.
    assert bench.main(bench_argv(tmp_path, tasks_dir, tiny_model_dir, *flags, "--full-matrix")) == 2
    assert bench.main(bench_argv(tmp_path, tasks_dir, tiny_model_dir, *flags, "--full-matrix", "--results-name", "full")) == 0
    full = json.loads((tmp_path / "results" / "full.json").read_text())
    assert full["matrix"] == "full"
    full_R = full["methods"]["inclora"]["scorings"]["choice"]["matrix"]
    assert full_R[1][0] is not None and full_R[2] == R[2] and full_R[0] == R[0]


def test_generated_answers_count_when_they_match_the_answer_once_trimmed(monkeypatch):
    from moram_cli.evaluation import evaluate, scoring

    examples = [Example(i + 1, prompt=f"q{i}", completion=" yes", source="t.jsonl") for i in range(11)]
    replies = iter(["yes", " yes\n", "Yes", "yes.", "no", "yes", "yes yes", "", "yes", "yes ", "ye"])
    batches = []

    def fake_generate_batch(model, tokenizer, prompts, max_new, max_length):
        batches.append(len(prompts))
        return [(next(replies).strip(), False) for _ in prompts]

    monkeypatch.setattr(scoring, "generate_batch", fake_generate_batch)
    monkeypatch.setattr(evaluate, "check_context", lambda tokenizer, max_length: None)
    monkeypatch.setattr(evaluate, "split_example", lambda ex, tokenizer: (ex.prompt, ex.completion))
    tokenizer = lambda text: SimpleNamespace(input_ids=text.split())  # noqa: E731
    result = evaluate.evaluate_examples(None, tokenizer, examples, Path("t.jsonl"), "generate")
    assert result["scoring"] == "generate" and result["correct"] == 5 and result["total"] == 11
    assert batches == [evaluate.GENERATE_BATCH, 11 - evaluate.GENERATE_BATCH]


def test_paired_statistics_difference_each_seed_and_count_who_was_ahead(bench):
    assert bench.paired([0.5, 0.7, 0.6], [0.4, 0.7, 0.5]) == {"mean": pytest.approx(0.2 / 3), "se": pytest.approx(0.1 / 3),
                                                              "ahead": 2, "pairs": 3}
    assert bench.paired([0.5], [0.4])["se"] is None

    def method(*runs):
        return {"seeds": [{"seed": seed, "scorings": {"generate": measures}} for seed, measures in runs]}

    methods = {"a": method((0, {"avg_acc": 0.6, "bwt": -0.1}), (1, {"avg_acc": 0.5, "bwt": 0.0}), (2, {"avg_acc": 0.9, "bwt": 0.0})),
               "b": method((0, {"avg_acc": 0.4, "bwt": -0.3}), (1, {"avg_acc": 0.6, "bwt": -0.2})),
               "mtl": method((1, {"avg_acc": 0.7})), "zero_shot": {"scorings": {}}}
    stats = bench.paired_statistics(methods, ["generate"])["generate"]
    assert set(stats) == {"a - b", "a - mtl", "b - mtl"}
    # Only the seeds both ran are paired: seed 2 of `a` has no partner in `b`.
    assert stats["a - b"]["avg_acc"] == {"mean": pytest.approx(0.05), "se": pytest.approx(0.15), "ahead": 1, "pairs": 2}
    assert stats["a - b"]["bwt"]["mean"] == pytest.approx(0.2) and stats["a - b"]["bwt"]["ahead"] == 2
    assert set(stats["a - mtl"]) == {"avg_acc"} and stats["a - mtl"]["avg_acc"]["mean"] == pytest.approx(-0.2)


def test_finals_repeat_at_each_seed_and_the_results_are_their_means(bench, tmp_path, tasks_dir, tiny_model_dir):
    result = run(bench, tmp_path, tasks_dir, tiny_model_dir, "--no-tune", "--methods", "moram,mtl", "--seed", "3", "--num-seeds", "2",
                 "--scorings", "choice")
    assert result["settings"]["final_seeds"] == [3, 4]
    moram, mtl = result["methods"]["moram"], result["methods"]["mtl"]
    assert [s["seed"] for s in moram["seeds"]] == [3, 4] and [s["seed"] for s in mtl["seeds"]] == [3, 4]
    first, second = (run_["scorings"]["choice"] for run_ in moram["seeds"])
    mean = moram["scorings"]["choice"]
    assert mean["matrix"][1][0] == pytest.approx((first["matrix"][1][0] + second["matrix"][1][0]) / 2)
    assert mean["bwt"] == pytest.approx((first["bwt"] + second["bwt"]) / 2)
    mtl_mean = mtl["scorings"]["choice"]
    assert mtl_mean["avg_acc"] == pytest.approx(sum(s["scorings"]["choice"]["avg_acc"] for s in mtl["seeds"]) / 2)
    assert mtl_mean["avg_acc_sd"] is not None
    stores = tmp_path / "work" / "stores"
    # Each seed is its own training run: its own store, seeded in full, and for multi-task its own shuffle of the union.
    for seed in (3, 4):
        store = next(stores.glob(f"final-moram-*-seed{seed}"))
        assert yaml.safe_load((store / "store.yaml").read_text())["training"]["seed"] == seed
    unions = [(tmp_path / "work" / "data" / f"union-one-two-seed{seed}.jsonl").read_text() for seed in (3, 4)]
    assert unions[0] != unions[1] and sorted(unions[0].splitlines()) == sorted(unions[1].splitlines())
    assert "| method | seed | choice | stage s |" in (tmp_path / "results" / "cl-benchmark.md").read_text()


def test_a_run_without_a_final_seed_or_with_an_unknown_scoring_is_refused(bench, tmp_path, tasks_dir, tiny_model_dir, capsys):
    assert bench.main(bench_argv(tmp_path, tasks_dir, tiny_model_dir, "--num-seeds", "0")) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --num-seeds 0: every method needs at least one final run; pass 1 or more"]
    assert bench.main(bench_argv(tmp_path, tasks_dir, tiny_model_dir, "--scorings", "generate,exact")) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --scorings generate,exact: name each of generate, choice at most once, the headline first"]
    assert not (tmp_path / "results").exists() and not (tmp_path / "work").exists()


def test_jobs_run_stages_in_processes_whose_records_a_rerun_reuses(bench, tmp_path, tasks_dir, tiny_model_dir, monkeypatch):
    # Spawned workers import the script by name, as a user's `python bench/cl_benchmark.py` does through __main__.
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    monkeypatch.setitem(sys.modules, "cl_benchmark", bench)
    flags = ("--no-tune", "--methods", "moram,inclora,mtl", "--scorings", "choice")
    result = run(bench, tmp_path, tasks_dir, tiny_model_dir, *flags, "--jobs", "2")
    assert set(result["methods"]) == {"moram", "inclora", "mtl", "zero_shot"} and result["settings"]["jobs"] == 2
    assert len(result["methods"]["inclora"]["scorings"]["choice"]["matrix"]) == 2
    finals = {name.split("-")[1] for name in result["settings"]["stage_wall_seconds"] if name.startswith("final-")}
    assert finals == {"moram", "inclora", "mtl"}
    monkeypatch.setattr(bench, "learn_task", lambda *a, **k: pytest.fail("a finished stage ran again"))
    again = run(bench, tmp_path, tasks_dir, tiny_model_dir, *flags)
    assert again["methods"] == result["methods"]


def test_chosen_settings_replace_a_methods_tuning(bench, tmp_path, tasks_dir, tiny_model_dir):
    chosen = tmp_path / "chosen.json"
    chosen.write_text(json.dumps({"inclora": {"lr": 3e-3, "later_lr": 1e-3}}))
    result = run(bench, tmp_path, tasks_dir, tiny_model_dir, "--methods", "inclora,mtl", "--chosen", str(chosen),
                 "--lr-grid", "mtl=1e-3,2e-3", "--scorings", "choice")
    tuning = result["settings"]["tuning"]
    assert tuning["inclora"] == {"chosen": {"lr": 3e-3, "later_lr": 1e-3}, "trials": [], "given": str(chosen)}
    # The multi-task run is tuned on every task's dev slice, not the first task's.
    assert tuning["mtl"]["tasks"] == ["one", "two"] and len(tuning["mtl"]["trials"]) == 2
    trial = json.loads(next((tmp_path / "results" / "cl-benchmark-stages").glob("tune-mtl-lr0.001*.json")).read_text())
    assert len(trial["scorings"]["choice"]["per_task"]) == 2


def test_a_second_arm_of_a_method_runs_under_its_own_label_and_pairs_with_the_first(bench, tmp_path, tasks_dir, tiny_model_dir,
                                                                                     capsys):
    chosen = tmp_path / "chosen.json"
    arms = {"inclora": {"lr": 3e-3, "later_lr": 1e-3}, "inclora_slow": {"lr": 1e-3, "later_lr": 1e-3}}
    chosen.write_text(json.dumps(arms))
    result = run(bench, tmp_path, tasks_dir, tiny_model_dir, "--methods", "inclora,inclora_slow=inclora", "--chosen", str(chosen),
                 "--scorings", "choice")
    assert result["settings"]["arms"] == {"inclora": "inclora", "inclora_slow": "inclora"}
    assert result["settings"]["chosen"] == arms
    assert "inclora - inclora_slow" in result["paired"]["choice"]
    # Records are named by method and settings: an arm with the settings of an earlier run reuses its records.
    stages = sorted(p.name for p in (tmp_path / "results" / "cl-benchmark-stages").glob("final-*"))
    assert stages == ["final-inclora-lr0.001-later_lr0.001-seed0.json", "final-inclora-lr0.003-later_lr0.001-seed0.json"]
    assert bench.main(bench_argv(tmp_path, tasks_dir, tiny_model_dir, "--methods", "inclora,fast=inclora")) == 2
    assert "arm 'fast' has no settings" in capsys.readouterr().err


def test_a_second_round_trial_whose_first_round_store_is_gone_learns_the_first_task_again(bench, tmp_path, tasks_dir,
                                                                                          tiny_model_dir):
    flags = ("--methods", "inclora", "--lr-grid", "inclora=1e-2", "--later-lr-grid", "3e-3", "--scorings", "choice")
    first = run(bench, tmp_path, tasks_dir, tiny_model_dir, *flags)
    work = tmp_path / "work"
    later = bench.stage_name("tune2", "inclora", {"lr": 1e-2, "later_lr": 3e-3})
    (tmp_path / "results" / "cl-benchmark-stages" / f"{later}.json").unlink()
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
                 "--target-modules", "q_proj,v_proj", "--scorings", "choice")
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
    stages = [p.name for p in (tmp_path / "results" / "cl-benchmark-stages").iterdir()]
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


def test_the_speed_benchmark_measures_every_figure_it_reports(tmp_path, tasks_dir, tiny_model_dir, monkeypatch):
    speed = bench_script("speed", monkeypatch)
    argv = ["--base-model", str(tiny_model_dir), "--banks", "1,3", "--frozen-banks", "2", "--batch", "2", "--tokens", "8", "--rounds", "1",
            "--eval-examples", "3", "--data", str(tasks_dir / "one" / "test.jsonl"), "--results-dir", str(tmp_path), "--quiet"]
    assert speed.main(argv) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    assert set(result["inference"]) == {"1", "3"} and set(result["inference"]["3"]["vs_bare"]) == {"moram", "moram_task_routed", "inclora"}
    assert result["layer"]["forward_vs_lora"] > 0 and set(result["train_step"]["vs_lora"]) == {"moram"}
    assert result["eval"]["examples"] == 3 and set(result["eval"]["vs_bare_forward"]) == {"choice", "generate"}
    assert "model inference, 3 bank(s)" in (tmp_path / "speed.md").read_text()


@pytest.mark.slow  # two fresh interpreters run `moram eval`
def test_eval_before_after_runs_both_versions_in_turn_and_reports_their_accuracy(tmp_path, tasks_dir, tiny_model_dir, monkeypatch):
    from test_cli import ok_json

    script = bench_script("eval_before_after", monkeypatch)
    store = tmp_path / "store"
    ok_json("init", store, "--base-model", tiny_model_dir)
    data = tasks_dir / "one" / "test.jsonl"
    argv = ["--store", str(store), "--data", str(data), "--before", "HEAD", "--scorings", "choice", "--rounds", "1",
            "--results-dir", str(tmp_path), "--quiet"]
    assert script.main(argv) == 0
    result = json.loads((tmp_path / "eval-before-after.json").read_text())["scorings"]["choice"]
    assert [len(v) for v in result["seconds"].values()] == [1, 1] and result["speed_up"] > 0
    assert result["accuracy"]["before"] == result["accuracy"]["after"]


def test_routing_depth_scores_every_depth_against_the_prompts_own_task(tmp_path, tasks_dir, tiny_model_dir, monkeypatch):
    from moram_cli.store.init import init_store
    from moram_cli.training.learn import learn_task
    from moram_cli.tuner import routing

    script = bench_script("routing_depth", monkeypatch)
    store = tmp_path / "store"
    init_store(store, base_model=str(tiny_model_dir), r=2)
    # The banks record block 0's prototypes alone; the script computes every block's.
    monkeypatch.setattr(routing, "ROUTING_BLOCKS", 1)
    for task in ("one", "two"):
        learn_task(store, tasks_dir / task / "train.jsonl", name=task, show_progress=False, max_steps=2, batch_size=4)
    assert script.main(["--store", str(store), "--data-dir", str(tasks_dir), "--depths", "1", "--results-dir", str(tmp_path), "--quiet"]) == 0
    result = json.loads((tmp_path / "routing-depth.json").read_text())
    assert set(result["by_blocks"]) == {"1", "2"} and result["by_blocks"]["2"]["as_every_block"] == 1.0
    assert result["prompts"] == sum(len((tasks_dir / t / "test.jsonl").read_text().splitlines()) for t in ("one", "two"))
