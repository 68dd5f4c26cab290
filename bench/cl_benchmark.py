"""The standard continual-learning benchmark end to end on CPU: MoRAM against SeqLoRA, IncLoRA, multi-task LoRA and zero-shot.

Protocol (the text-classification benchmark of O-LoRA and the MoRAM paper):
every method learns the tasks of one order with the same data, seeds and
training budget; after each task, every task learned so far is scored on its
test set (the accuracy matrix of `moram eval --suite cl`). Each method's
first-task learning rate (and MoRAM's temperature, k and threshold), then
its rate for later tasks, are tuned on dev splits carved from the training
files, never on a test file, with the same budget per trial. Every stage's
result is cached as JSON in the work directory, so a rerun resumes where the
last one stopped. Tuning runs at one seed; each method's final sequence then
runs at several, and the results are their means, because at this size one
seed moves a method's average by 7 to 18 points. The defaults take about
3 hours on 2 CPU cores (bench/README.md says why these sizes).

    python bench/cl_benchmark.py                        # dbpedia -> amazon -> yelp -> agnews, 128 train / 80 test
    python bench/cl_benchmark.py --order dbpedia,amazon --n-train 100 --no-tune --num-seeds 1
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

from moram_cli import __version__
from moram_cli.errors import MoramError
from moram_cli.evaluation.cl_metrics import mean, shown
from moram_cli.evaluation.continual import continual_report
from moram_cli.evaluation.evaluate import evaluate_store
from moram_cli.markdown import markdown_table
from moram_cli.store import MemoryStore
from moram_cli.store.init import init_store
from moram_cli.training.learn import learn_task

REPO = Path(__file__).resolve().parents[1]
# What a final run measures: a task sequence's accuracy matrix and its metrics, or the multi-task adapter's accuracy per task.
SEQUENCE_MEASURES = ("matrix", "avg_acc", "bwt", "fwt", "forgetting")
MULTITASK_MEASURES = ("avg_acc", "per_task")
# Rates bracket each method's best on a dev pilot (q, k, v and o adapted, the first task's 32 steps), so the chosen one
# has a worse neighbour on each side. The rank-32 adapters (lora and mtl share a grid) want the lowest: SeqLoRA scored
# 0.75 / 0.91 / 0.88 / 0.72 on dbpedia dev at 5e-4 / 1e-3 / 2e-3 / 4e-3. IncLoRA's rank 8 wants more (0.78 / 0.84 / 0.81
# at 2e-3 / 4e-3 / 8e-3), and MoRAM one doubling more again (tau 0.1, k 4: 0.72 / 0.91 / 0.75 at 4e-3 / 8e-3 / 1.6e-2):
# its gate weights sum to 1 over k experts, so a step moves its output a fraction of what the same step moves a LoRA's.
RANK_32_LRS = [5e-4, 1e-3, 2e-3, 4e-3]
LR_GRIDS = {"moram": [4e-3, 8e-3, 1.6e-2], "lora": RANK_32_LRS, "inclora": [2e-3, 4e-3, 8e-3], "mtl": RANK_32_LRS}
# MoRAM's gate settings that act across banks: k picks among the ranks of every task learned so far, and δ compares
# each rank's share of the norm over all of them. The first task alone cannot judge them (with r = 8, k = 8 keeps every
# rank, and each share shrinks as ranks accumulate), so the second round continues the best first-round setting of each
# combination of their values.
CROSS_BANK_KEYS = ("k", "threshold")
# What defines a run: a work directory holding stages of another run is refused rather than mixed in.
RUN_KEYS = ("tasks_dir", "order", "n_train", "n_dev", "n_test", "base_model", "r", "target_modules", "epochs", "batch_size",
            "max_length", "seed")


# How MoRAM's committed results ran (random keys, every token gated), whatever a new store's defaults: a run resuming
# from their stage records must measure the same thing.
COMMITTED_MORAM = {"key_init": "kaiming", "routing": "token"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks-dir", type=Path, default=REPO.parent / "shared" / "data" / "cl-benchmark",
                   help="folder of <task>/{train,test}.jsonl + labels.json (the CL benchmark pack's layout)")
    p.add_argument("--order", default="dbpedia,amazon,yelp,agnews", help="comma-separated task order")
    p.add_argument("--methods", default="moram,lora,inclora,mtl", help="any of moram, lora, inclora, mtl; zero-shot always runs")
    p.add_argument("--base-model", default=None, help="as for moram init; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--n-train", type=int, default=128, help="training examples per task (the head of its train.jsonl)")
    p.add_argument("--n-dev", type=int, default=32, help="dev examples per task for tuning, the lines after the training ones")
    p.add_argument("--n-test", type=int, default=80, help="test examples per task (the head of its test.jsonl)")
    p.add_argument("--r", type=int, default=8, help="ranks per task (moram, inclora); lora and mtl get r x tasks, the same total rank")
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj",
                   help="the adapted modules of every method (the paper's LLM runs); with q_proj,k_proj alone no baseline forgot")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=4, help="4: 32 optimiser steps per task at the default size")
    p.add_argument("--max-length", type=int, default=320, help="prompts are cut in the middle to fit; only yelp's longest reviews are")
    p.add_argument("--seed", type=int, default=0, help="the seed of every tuning trial and of the first final run")
    p.add_argument("--num-seeds", type=int, default=3,
                   help="each method's final run repeats at seeds --seed, --seed+1, ...; the results are the means over them, each "
                        "seed's numbers kept beside (each extra seed adds about 40 minutes on 2 cores)")
    p.add_argument("--later-lr-grid", default="5e-4,1e-3,2e-3",
                   help="rates to try for every task after the first (moram, lora, inclora): each continues the tuned first-task "
                        "store (MoRAM's best of each k and threshold) on the second task, and the best average dev accuracy over "
                        "both tasks wins")
    p.add_argument("--lr-grid", action="append", default=[], metavar="METHOD=LR,LR", help=f"learning rates to try; defaults {LR_GRIDS}")
    p.add_argument("--temperature-grid", default="0.03,0.1", help="MoRAM temperatures to try")
    p.add_argument("--k-grid", default="4,8", help="MoRAM activation budgets to try (judged again on the second task)")
    p.add_argument("--threshold-grid", default="0,0.2",
                   help="MoRAM inference thresholds to try (0.2: the paper's LLM runs; judged again on the second task)")
    p.add_argument("--no-tune", action="store_true", help="skip tuning: take the first value of every grid")
    p.add_argument("--work-dir", type=Path, default=REPO / "bench" / "work", help="stores, data samples and cached stages")
    p.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--jobs", type=int, default=1,
                   help="methods run side by side in this many processes, the CPU threads split between them: for machines with "
                        "more cores than one small model keeps busy (on 2 cores, 2 jobs gain about 10%%); progress bars need --jobs 1")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def grids(args: argparse.Namespace) -> dict[str, list[dict]]:
    """The settings each method tries: its learning rates, and for MoRAM every temperature, k and threshold with them."""
    lrs = dict(LR_GRIDS)
    for spec in args.lr_grid:
        method, _, values = spec.partition("=")
        if method not in LR_GRIDS:
            raise MoramError(f"--lr-grid {spec}: name one of {', '.join(LR_GRIDS)} before the '='")
        lrs[method] = _floats(values)
    moram = itertools.product(lrs["moram"], _floats(args.temperature_grid), _floats(args.k_grid), _floats(args.threshold_grid))
    out = {m: [{"lr": lr} for lr in lrs[m]] for m in ("lora", "inclora", "mtl")}
    out["moram"] = [{"lr": lr, "temperature": t, "k": int(k), "threshold": d} for lr, t, k, d in moram]
    return out


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


class Benchmark:
    """One run: its data samples, stores and cached stage results live under `args.work_dir`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.work = args, args.work_dir
        self.stages = getattr(args, "stages_dir", None) or self.work / "stages"
        self.order = args.order.split(",")
        self.methods = args.methods.split(",")
        unknown = set(self.methods) - set(LR_GRIDS)
        if unknown:
            raise MoramError(f"--methods: unknown method {sorted(unknown)[0]!r}; use any of {', '.join(LR_GRIDS)}")
        if args.num_seeds < 1:
            raise MoramError(f"--num-seeds {args.num_seeds}: every method needs at least one final run; pass 1 or more")
        self.wall: dict[str, float] = {}
        self.progress = not args.quiet and args.jobs == 1

    def stage(self, name: str, compute) -> dict:
        """`compute(store_dir)`'s result, from the cache when this stage finished before; a half-done store is started over."""
        cached = self.stages / f"{name}.json"
        if cached.is_file():
            result = json.loads(cached.read_text())
        else:
            store = self.work / "stores" / name
            shutil.rmtree(store, ignore_errors=True)
            store.parent.mkdir(parents=True, exist_ok=True)
            _say(self.args, f"stage {name}")
            started = time.time()
            result = compute(store) | {"wall_seconds": round(time.time() - started, 1)}
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(result, indent=1))
        self.wall[name] = result["wall_seconds"]
        return result

    def data(self, task: str, split: str) -> Path:
        return self.work / "data" / task / f"{split}.jsonl"

    def store_settings(self, method: str, setting: dict) -> dict:
        a = self.args
        r = a.r if method in ("moram", "inclora") else a.r * len(self.order)
        gate = {k: setting[k] for k in ("temperature", "k", "threshold", "key_init", "routing", "max_grad_norm") if k in setting}
        if method == "moram":
            gate = COMMITTED_MORAM | gate
        return {"base_model": a.base_model, "method": "lora" if method == "mtl" else method, "r": r,
                "target_modules": a.target_modules.split(","), "lr": setting["lr"],
                "later_lr": setting.get("later_lr"), "epochs": a.epochs, "batch_size": a.batch_size, "max_length": a.max_length,
                "seed": setting.get("seed", a.seed), **gate}

    def sequence(self, store: Path, method: str, setting: dict, tasks: list[str], split: str) -> dict:
        """Learn `tasks` in order, each scored with its `split` file; the accuracy matrix and its metrics."""
        init_store(store, **self.store_settings(method, setting))
        for task in tasks:
            self.learn(store, task, split)
        return self.summary(store, setting)

    def continue_sequence(self, store: Path, method: str, first: dict, setting: dict) -> dict:
        """The tuned first-task store (copied; learned again if it is gone) learning the second task at `setting`'s later_lr."""
        source = self.work / "stores" / stage_name("tune", method, first)
        if source.is_dir():
            shutil.copytree(source, store)
        else:
            self.sequence(store, method, first, self.order[:1], "dev")
        self.learn(store, self.order[1], "dev", lr=setting["later_lr"])
        return self.summary(store, setting)

    def learn(self, store: Path, task: str, split: str, **overrides) -> None:
        learn_task(store, self.data(task, "train"), name=task, eval_data=self.data(task, split), show_progress=self.progress,
                   **overrides)

    def summary(self, store: Path, setting: dict) -> dict:
        report = continual_report(store)
        return {"setting": setting, "matrix": report["matrix"], "avg_acc": report["average_accuracy"]["value"],
                "bwt": report["bwt"]["value"], "fwt": report["fwt"]["value"], "forgetting": report["forgetting"]}

    def multitask(self, store: Path, setting: dict, tasks: list[str], split: str) -> dict:
        """One LoRA adapter with the total rank of the sequence, trained once on the shuffled union of the tasks' training data."""
        settings = self.store_settings("mtl", setting)
        init_store(store, **settings)
        union = self.work / "data" / f"union-{'-'.join(tasks)}-seed{settings['seed']}.jsonl"
        lines = [line for task in tasks for line in self.data(task, "train").read_text(encoding="utf-8").splitlines()]
        random.Random(settings["seed"]).shuffle(lines)
        union.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        learn_task(store, union, name="mtl", show_progress=self.progress)
        per_task = [self.accuracy(store, task, split) for task in tasks]
        return {"setting": setting, "per_task": per_task, "avg_acc": sum(per_task) / len(per_task)}

    def accuracy(self, store: Path, task: str, split: str, base_only: bool = False) -> float:
        return evaluate_store(store, self.data(task, split), base_only=base_only, show_progress=self.progress)["accuracy"]

    def zero_shot(self, store: Path) -> dict:
        init_store(store, base_model=self.args.base_model)
        per_task = [self.accuracy(store, task, "test", base_only=True) for task in self.order]
        model = MemoryStore.open(store).config.base_model.source
        return {"per_task": per_task, "avg_acc": sum(per_task) / len(per_task), "model": model}

    def run(self, method: str, setting: dict, tasks: list[str], split: str) -> dict:
        name = stage_name("final" if split == "test" else "tune", method, setting)
        if method == "mtl":
            return self.stage(name, lambda store: self.multitask(store, setting, tasks, split))
        return self.stage(name, lambda store: self.sequence(store, method, setting, tasks, split))

    def tune(self, method: str, candidates: list[dict], later_rates: list[float]) -> dict:
        """Two rounds on dev splits, the best average dev accuracy winning each (the earlier on a tie).

        First every candidate learns the first task; then the winner's store
        (for MoRAM, the best store of each k and δ) learns the second task at
        each later rate, so the rate, k and δ are chosen for what the second
        task learns and what it makes the first forget.
        """
        has_later = method != "mtl" and len(self.order) > 1
        if self.args.no_tune:
            return {"chosen": candidates[0] | ({"later_lr": later_rates[0]} if has_later else {}), "trials": []}
        trials = [{"setting": s, "dev_avg_acc": self.run(method, s, self.order[:1], "dev")["avg_acc"]} for s in candidates]
        if not has_later:
            return {"chosen": _best(trials), "trials": trials, "tasks": self.order[:1]}
        later = []
        for first, rate in itertools.product(_leaders(trials), later_rates):
            setting = first | {"later_lr": rate}
            trial = self.stage(stage_name("tune2", method, setting), lambda store: self.continue_sequence(store, method, first, setting))
            later.append({"setting": setting, "dev_avg_acc": trial["avg_acc"]})
        return {"chosen": _best(later), "trials": trials, "later_trials": later, "tasks": self.order[:2]}


def stage_name(phase: str, method: str, setting: dict) -> str:
    return f"{phase}-{method}-" + "-".join(f"{k}{v:g}" for k, v in setting.items())


def _best(trials: list[dict]) -> dict:
    return max(trials, key=lambda t: t["dev_avg_acc"])["setting"]


def _leaders(trials: list[dict]) -> list[dict]:
    """The best setting of each combination of CROSS_BANK_KEYS values (one for the baselines, which have none), best
    first, so the first round's winner comes first and a tie in the second round goes to it."""
    groups: dict[tuple, list[dict]] = {}
    for trial in trials:
        groups.setdefault(tuple(trial["setting"].get(key) for key in CROSS_BANK_KEYS), []).append(trial)
    return [_best(group) for group in sorted(groups.values(), key=lambda group: -max(t["dev_avg_acc"] for t in group))]


def prepare_data(args: argparse.Namespace, order: list[str]) -> None:
    """Per task: train = the first n_train lines of train.jsonl, dev = the n_dev after them, test = the first n_test of test.jsonl.

    The pack's files are class-balanced by round robin, so these slices stay
    close to balanced; labels.json goes beside them for ranked-choice scoring.
    """
    for task in order:
        source, target = args.tasks_dir / task, args.work_dir / "data" / task
        train = _lines(source / "train.jsonl")
        test = _lines(source / "test.jsonl")
        if len(train) < args.n_train + args.n_dev or len(test) < args.n_test:
            raise MoramError(f"{source}: has {len(train)} train / {len(test)} test lines; --n-train + --n-dev and --n-test ask for more")
        target.mkdir(parents=True, exist_ok=True)
        for split, lines in (("train", train[: args.n_train]), ("dev", train[args.n_train: args.n_train + args.n_dev]), ("test", test[: args.n_test])):
            (target / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        shutil.copyfile(source / "labels.json", target / "labels.json")


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise MoramError(f"{path}: missing; --tasks-dir needs <task>/train.jsonl, test.jsonl and labels.json per task")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_work_dir(args: argparse.Namespace) -> None:
    """Refuse to resume a work directory that holds a run with other data, model or budget."""
    run = {key: str(getattr(args, key)) for key in RUN_KEYS}
    marker = args.work_dir / "run.json"
    if marker.is_file() and json.loads(marker.read_text()) != run:
        raise MoramError(f"{marker}: the work directory holds a run with other settings; pass another --work-dir or remove it")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(run, indent=1))


def benchmark(args: argparse.Namespace) -> dict:
    """Run (or resume) every stage; returns the results record."""
    started = time.time()
    bench = Benchmark(args)
    check_work_dir(args)
    prepare_data(args, bench.order)
    candidates, tuning, methods = grids(args), {}, {}
    for method, outcome in zip(bench.methods, _each_method(args, bench.methods, candidates)):
        tuning[method] = outcome["tuning"]
        bench.wall |= outcome["wall"]
        methods[method] = over_seeds(outcome["finals"], final_seeds(args), MULTITASK_MEASURES if method == "mtl" else SEQUENCE_MEASURES)
    zero = bench.stage("zero-shot", bench.zero_shot)
    methods["zero_shot"] = {"per_task": zero["per_task"], "avg_acc": zero["avg_acc"]}
    settings = {key: getattr(args, key) for key in ("r", "target_modules", "epochs", "batch_size", "max_length", "seed", "num_seeds", "n_dev",
                                                    "later_lr_grid", "jobs")}
    settings |= {"final_seeds": final_seeds(args), "tasks_dir": str(args.tasks_dir), "tool_version": __version__}
    settings |= {"lora_rank": args.r * len(bench.order), "grids": {m: candidates[m] for m in bench.methods}, "tuning": tuning,
                 "chosen": {m: t["chosen"] for m, t in tuning.items()}, "stage_wall_seconds": bench.wall}
    return {"model": zero["model"], "order": bench.order, "n_train": args.n_train, "n_test": args.n_test, "settings": settings,
            "wall_seconds": round(sum(bench.wall.values()), 1), "elapsed_seconds": round(time.time() - started, 1), "methods": methods}


def final_seeds(args: argparse.Namespace) -> list[int]:
    return list(range(args.seed, args.seed + args.num_seeds))


def tune_and_run(args: argparse.Namespace, method: str, candidates: list[dict]) -> dict:
    """One method's tuning and its final run at each seed: what a worker of `--jobs` does."""
    bench = Benchmark(args)
    tuning = bench.tune(method, candidates, _floats(args.later_lr_grid))
    finals = [bench.run(method, tuning["chosen"] | {"seed": seed}, bench.order, "test") for seed in final_seeds(args)]
    return {"tuning": tuning, "finals": finals, "wall": bench.wall}


def over_seeds(finals: list[dict], seeds: list[int], measures: tuple[str, ...]) -> dict:
    """Each measure's mean over the seeds' final runs (cell by cell for a row or matrix), the spread of the average
    accuracy (sample standard deviation), and each seed's own numbers so every mean can be recomputed."""
    record = {key: _mean_of([final[key] for final in finals]) for key in measures}
    record["avg_acc_sd"] = statistics.stdev(final["avg_acc"] for final in finals) if len(finals) > 1 else None
    record["seeds"] = [{"seed": seed} | {key: final[key] for key in measures} for seed, final in zip(seeds, finals)]
    return record


def _mean_of(values: list):
    if isinstance(values[0], list):
        return [_mean_of(list(cells)) for cells in zip(*values)]
    return mean(values)["value"]


def _each_method(args: argparse.Namespace, methods: list[str], candidates: dict[str, list[dict]]) -> list[dict]:
    """`tune_and_run` for every method, in order, or in `args.jobs` spawned processes (a forked torch can hang)."""
    if args.jobs <= 1:
        return [tune_and_run(args, m, candidates[m]) for m in methods]
    threads = max(1, len(os.sched_getaffinity(0)) // args.jobs)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_start_worker, initargs=(args, threads)) as pool:
        return list(pool.map(tune_and_run, [args] * len(methods), methods, [candidates[m] for m in methods]))


def _start_worker(args: argparse.Namespace, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if args.quiet:
        _quiet_transformers()


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its weight-loading bar, once per store the run opens


def markdown_report(result: dict) -> str:
    """A summary table of the means over seeds (one row per method: average accuracy and its spread, BWT, FWT, final
    accuracy per task), each seed's average accuracy and BWT, and each method's mean matrix."""
    order, methods = result["order"], result["methods"]
    rows = []
    for name, m in methods.items():
        final = m["matrix"][-1] if "matrix" in m else m["per_task"]
        rows.append([name, shown(m["avg_acc"]), shown(m.get("avg_acc_sd")), shown(m.get("bwt")), shown(m.get("fwt")), *map(shown, final)])
    seeds = [[name, str(s["seed"]), shown(s["avg_acc"]), shown(s.get("bwt"))] for name, m in methods.items() for s in m.get("seeds", [])]
    parts = [f"Means over the final runs at seeds {', '.join(map(str, result['settings']['final_seeds']))}; "
             f"tuning ran at seed {result['settings']['seed']}.", markdown_table(["method", "avg acc", "sd", "BWT", "FWT", *order], rows),
             "Each seed's final run:", markdown_table(["method", "seed", "avg acc", "BWT"], seeds)]
    for name, m in methods.items():
        if "matrix" in m:
            matrix = [[f"after {order[i]}", *map(shown, row), *[""] * (len(order) - len(row))] for i, row in enumerate(m["matrix"])]
            parts.append(f"{name}: mean accuracy on each task (columns) after each task (rows)\n\n" + markdown_table(["", *order], matrix))
    return "\n\n".join(parts) + "\n"


def plot(result: dict, path: Path) -> None:
    """Accuracy on each task over the sequence, one panel per task and one line per sequential method; MTL and zero-shot dashed."""
    from matplotlib.figure import Figure

    order, methods = result["order"], result["methods"]
    figure = Figure(figsize=(3.2 * len(order), 3.2), layout="constrained")
    for j, ax in enumerate(figure.subplots(1, len(order), squeeze=False)[0]):
        for name, m in methods.items():
            if "matrix" in m:
                ax.plot(range(j + 1, len(order) + 1), [row[j] for row in m["matrix"][j:]], marker="o", label=name)
            else:
                ax.axhline(m["per_task"][j], linestyle="--", color="grey" if name == "zero_shot" else "black", label=name)
        ax.set(title=order[j], xlabel="after task", ylim=(0, 1), xticks=range(1, len(order) + 1))
    figure.axes[0].set_ylabel("accuracy")
    figure.suptitle(f"means over seeds {', '.join(map(str, result['settings']['final_seeds']))}", fontsize="medium")
    figure.axes[-1].legend(fontsize="small")
    figure.savefig(path)


def write_results(result: dict, results_dir: Path) -> list[Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = [results_dir / f"cl-benchmark.{suffix}" for suffix in ("json", "md", "png")]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown_report(result))
    plot(result, paths[2])
    return paths


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def script_main(args: argparse.Namespace, compute, write) -> int:
    """A bench script's run: `compute(args)`, its results written by `write(result, args)` and their paths printed, or
    a problem as one line and exit code 2."""
    if args.quiet:
        _quiet_transformers()
    try:
        result = compute(args)
    except MoramError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in write(result, args):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(parse_args(argv), benchmark, lambda result, args: write_results(result, args.results_dir))


if __name__ == "__main__":
    sys.exit(main())
