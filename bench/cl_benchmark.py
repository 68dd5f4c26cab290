"""The standard continual-learning benchmark end to end on CPU: MoRAM against SeqLoRA, IncLoRA, multi-task LoRA and zero-shot.

Protocol (the text-classification benchmark of O-LoRA and the MoRAM paper):
every method learns the tasks of one order with the same data, seeds and
training budget; each task's test set is scored right after it is learned
and every task's after the last (the diagonal and final row of the accuracy
matrix; --full-matrix for every cell), each cell both by the generated
answer (greedy, exact match, the paper's headline) and by ranked choice over
the task's labels. Each method's first-task learning rate (and MoRAM's
temperature, k and threshold), then its rate for later tasks, are tuned on
dev splits carved from the training files, never on a test file, with the
same budget per trial. Every finished stage writes one small JSON record
under bench/results/NAME-stages/, to be committed, so a run resumes from
them in a later session on another machine. Tuning runs at one seed; each
method's final sequence then runs at several, and the results are their
means with paired differences between methods, because at this size one
seed moves a method's average by 7 to 18 points.

    python bench/cl_benchmark.py                        # dbpedia -> amazon -> yelp -> agnews, 128 train / 80 test
    python bench/cl_benchmark.py --order long --n-train 64 --n-dev 16 --n-test 32 --num-seeds 5 \
        --methods moram,moram_gate_all=moram,lora,inclora,mtl --chosen bench/chosen.json \
        --lr-grid mtl=1e-3,2e-3 --results-name cl-benchmark-long
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import math
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from moram_cli import __version__
from moram_cli.data.jsonl import read_examples
from moram_cli.errors import MoramError
from moram_cli.evaluation.cl_metrics import average_accuracy, backward_transfer, forgetting, mean, shown
from moram_cli.evaluation.evaluate import evaluate_examples
from moram_cli.hashing import sha256_file
from moram_cli.markdown import markdown_table
from moram_cli.models.memory import build_memory_model
from moram_cli.store import MemoryStore
from moram_cli.store.init import init_store
from moram_cli.training.learn import learn_task

REPO = Path(__file__).resolve().parents[1]
SCORINGS = ("generate", "choice")
# Eight tasks of the paper's long sequence (O-LoRA's order 4), in its order: NLI twice, word sense, causal choice,
# paraphrase, reading comprehension, sentiment and topic, each with its own labels and format. The pack lacks rte, sst-2
# and yahoo; imdb, yelp, agnews and multirc are left out for time (imdb's and multirc's prompts are 2 to 3 times as long).
ORDERS = {"long": "mnli,cb,wic,copa,qqp,boolq,amazon,dbpedia"}
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
RUN_KEYS = ("order", "n_train", "n_dev", "n_test", "base_model", "r", "target_modules", "epochs", "batch_size", "max_length",
            "seed", "scorings", "full_matrix")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks-dir", type=Path, default=REPO.parent / "shared" / "data" / "cl-benchmark",
                   help="folder of <task>/{train,test}.jsonl + labels.json (the CL benchmark pack's layout)")
    p.add_argument("--order", default="dbpedia,amazon,yelp,agnews",
                   help=f"comma-separated task order, or long: {ORDERS['long']} (eight tasks of the paper's long sequence)")
    p.add_argument("--scorings", default="generate,choice",
                   help="how every cell is scored, the headline first (tuning uses it): generate (greedy answer, exact match after "
                        "trimming, as the paper reports) and choice (the most likely label of the task's own label set)")
    p.add_argument("--full-matrix", action="store_true",
                   help="score every task learned so far after each task; by default only the task just learned, and every task "
                        "after the last (the diagonal and the final row: all average accuracy and BWT need)")
    p.add_argument("--methods", default="moram,lora,inclora,mtl",
                   help="any of moram, lora, inclora, mtl; zero-shot always runs. LABEL=METHOD adds a second arm of a method "
                        "under its own label (its settings from --chosen LABEL): two arms with equal settings share stage records")
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
    p.add_argument("--chosen", type=Path, default=None, metavar="FILE.json",
                   help='settings to use instead of tuning, per method: {"moram": {"lr": 8e-3, ...}, ...}; methods it lacks are tuned')
    p.add_argument("--work-dir", type=Path, default=REPO / "bench" / "work", help="stores and data samples")
    p.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--results-name", default="cl-benchmark",
                   help="NAME.json, .md and .png in --results-dir; the stage records go to NAME-stages/ beside them, to be committed")
    p.add_argument("--jobs", type=int, default=1,
                   help="methods run side by side in this many processes, the CPU threads split between them: for machines with "
                        "more cores than one small model keeps busy (on 2 cores, 2 jobs gain about 10%%); progress bars need --jobs 1")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    args.stages_dir = args.results_dir / f"{args.results_name}-stages"
    args.chosen_from, args.chosen = args.chosen, read_chosen(args.chosen)
    return args


def read_chosen(path: Path | None) -> dict[str, dict]:
    if path is None:
        return {}
    try:
        chosen = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: --chosen {path}: cannot be read ({err}); give a JSON object of method: settings")
    if not isinstance(chosen, dict) or not all(isinstance(v, dict) and "lr" in v for v in chosen.values()):
        raise SystemExit(f'error: --chosen {path}: give a JSON object of method: settings, each with an "lr"')
    return chosen


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
    """One run: data samples and stores live under `args.work_dir`, the stage records under `args.stages_dir`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.work, self.stages = args, args.work_dir, args.stages_dir
        self.order = expand_order(args.order)
        self.arms = method_arms(args.methods)
        self.methods = list(self.arms)
        self.scorings = args.scorings.split(",")
        unknown = set(self.arms.values()) - set(LR_GRIDS)
        if unknown:
            raise MoramError(f"--methods: unknown method {sorted(unknown)[0]!r}; use any of {', '.join(LR_GRIDS)}")
        unset = [label for label, method in self.arms.items() if label != method and label not in args.chosen]
        if unset:
            raise MoramError(f"--methods: arm {unset[0]!r} has no settings; give them in --chosen under {unset[0]!r}")
        if set(self.scorings) - set(SCORINGS) or len(set(self.scorings)) != len(self.scorings):
            raise MoramError(f"--scorings {args.scorings}: name each of {', '.join(SCORINGS)} at most once, the headline first")
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
        return slice_path(self.work, task, split)

    def store_settings(self, method: str, setting: dict) -> dict:
        a = self.args
        r = a.r if method in ("moram", "inclora") else a.r * len(self.order)
        gate = {k: setting[k] for k in ("temperature", "k", "threshold", "key_init", "routing", "gate_scope", "gain_lr", "max_grad_norm") if k in setting}
        return {"base_model": a.base_model, "method": "lora" if method == "mtl" else method, "r": r,
                "target_modules": a.target_modules.split(","), "lr": setting["lr"],
                "later_lr": setting.get("later_lr"), "epochs": a.epochs, "batch_size": a.batch_size, "max_length": a.max_length,
                "seed": setting.get("seed", a.seed), **gate}

    def sequence(self, store: Path, method: str, setting: dict, tasks: list[str], split: str, scorings: list[str]) -> dict:
        """A new store learning `tasks` in order, scored on their `split` files (see `learn_and_score`)."""
        init_store(store, **self.store_settings(method, setting))
        return {"setting": setting} | self.learn_and_score(store, tasks, [], {s: [] for s in scorings}, split)

    def learn_and_score(self, store: Path, tasks: list[str], learned: list[str], rows: dict[str, list], split: str,
                        **overrides) -> dict:
        """Learn `tasks` after the store's `learned` ones, whose accuracy-matrix rows under each scoring `rows` holds.

        After each task its own split file is scored, and after the last every
        task's (every task's after each with --full-matrix): the cells average
        accuracy and BWT need, 2T - 1 test sets instead of T(T+1)/2. Cells not
        scored stay None. Also returns the seconds spent training, loading
        models and scoring under each scoring.
        """
        seconds: Counter = Counter()
        for task in tasks:
            started = time.time()
            learn_task(store, self.data(task, "train"), name=task, show_progress=self.progress, **overrides)
            seconds["train"] += time.time() - started
            learned = learned + [task]
            wanted = learned if task == tasks[-1] or self.args.full_matrix else [task]
            cells = self.score(store, wanted, split, list(rows), seconds)
            for scoring, matrix in rows.items():
                matrix.append([cells[scoring].get(t) for t in learned])
        return {"scorings": {scoring: sequence_measures(R) for scoring, R in rows.items()}, "seconds": _rounded(seconds)}

    def continue_sequence(self, store: Path, method: str, first: dict, setting: dict) -> dict:
        """The tuned first-task store (copied; learned again if it is gone) learning the second task at `setting`'s later_lr."""
        name = stage_name("tune", method, first)
        source = self.work / "stores" / name
        record = self.stage(name, lambda path: self.sequence(path, method, first, self.order[:1], "dev", self.scorings[:1]))
        if not source.is_dir():
            self.sequence(source, method, first, self.order[:1], "dev", self.scorings[:1])
        shutil.copytree(source, store)
        rows = {s: [list(row) for row in m["matrix"]] for s, m in record["scorings"].items()}
        return {"setting": setting} | self.learn_and_score(store, self.order[1:2], self.order[:1], rows, "dev", lr=setting["later_lr"])

    def score(self, store: Path, tasks: list[str], split: str, scorings: list[str], seconds: Counter,
              upto: int | None = None) -> dict[str, dict[str, float]]:
        """Accuracy on each task's `split` file under each scoring, of the store's model (first `upto` banks) loaded once."""
        started = time.time()
        memory = MemoryStore.open(store)
        model, tokenizer = build_memory_model(memory, upto)
        seconds["load"] += time.time() - started
        cells: dict[str, dict[str, float]] = {scoring: {} for scoring in scorings}
        for task in tasks:
            path = self.data(task, split)
            examples = read_examples(path, allow_text=False)
            for scoring in scorings:
                started = time.time()
                cells[scoring][task] = evaluate_examples(model, tokenizer, examples, path, scoring, memory.config.training.max_length,
                                                         self.progress)["accuracy"]
                seconds[scoring] += time.time() - started
        return cells

    def multitask(self, store: Path, setting: dict, tasks: list[str], split: str, scorings: list[str]) -> dict:
        """One LoRA adapter with the total rank of the sequence, trained once on the shuffled union of the tasks' training data."""
        settings = self.store_settings("mtl", setting)
        init_store(store, **settings)
        union = self.work / "data" / f"union-{'-'.join(tasks)}-seed{settings['seed']}.jsonl"
        lines = [line for task in tasks for line in self.data(task, "train").read_text(encoding="utf-8").splitlines()]
        random.Random(settings["seed"]).shuffle(lines)
        union.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        seconds: Counter = Counter()
        started = time.time()
        learn_task(store, union, name="mtl", show_progress=self.progress)
        seconds["train"] += time.time() - started
        cells = self.score(store, tasks, split, scorings, seconds)
        return {"setting": setting, "scorings": {s: task_measures([cells[s][t] for t in tasks]) for s in scorings},
                "seconds": _rounded(seconds)}

    def zero_shot(self, store: Path) -> dict:
        init_store(store, base_model=self.args.base_model)
        seconds: Counter = Counter()
        cells = self.score(store, self.order, "test", self.scorings, seconds, upto=0)
        model = MemoryStore.open(store).config.base_model.source
        return {"scorings": {s: task_measures([cells[s][t] for t in self.order]) for s in self.scorings}, "model": model,
                "seconds": _rounded(seconds)}

    def run(self, method: str, setting: dict, split: str) -> dict:
        """A final run (split "test": the whole order, every scoring) or a first-round tuning trial (split "dev": the
        first task, or every task for the multi-task run, under the headline scoring)."""
        final = split == "test"
        name = stage_name("final" if final else "tune", method, setting)
        scorings = self.scorings if final else self.scorings[:1]
        if method == "mtl":
            return self.stage(name, lambda store: self.multitask(store, setting, self.order, split, scorings))
        tasks = self.order if final else self.order[:1]
        return self.stage(name, lambda store: self.sequence(store, method, setting, tasks, split, scorings))

    def tune(self, arm: str, candidates: list[dict], later_rates: list[float]) -> dict:
        """Two rounds on dev splits under the headline scoring, the best average dev accuracy winning each (the earlier on a tie).

        First every candidate learns the first task (the multi-task run: the
        union of every task, judged on every task's dev slice); then the
        winner's store (for MoRAM, the best store of each k and δ) learns the
        second task at each later rate, so the rate, k and δ are chosen for
        what the second task learns and what it makes the first forget. A
        method (or arm) `--chosen` names is not tuned.
        """
        method = self.arms[arm]
        has_later = method != "mtl" and len(self.order) > 1
        if arm in self.args.chosen:
            return {"chosen": self.args.chosen[arm], "trials": [], "given": str(self.args.chosen_from)}
        if self.args.no_tune:
            return {"chosen": candidates[0] | ({"later_lr": later_rates[0]} if has_later else {}), "trials": []}
        headline = self.scorings[0]
        trials = [{"setting": s, "dev_avg_acc": self.run(method, s, "dev")["scorings"][headline]["avg_acc"]} for s in candidates]
        if not has_later:
            return {"chosen": _best(trials), "trials": trials, "tasks": self.order if method == "mtl" else self.order[:1]}
        later = []
        for first, rate in itertools.product(_leaders(trials), later_rates):
            setting = first | {"later_lr": rate}
            trial = self.stage(stage_name("tune2", method, setting), lambda store: self.continue_sequence(store, method, first, setting))
            later.append({"setting": setting, "dev_avg_acc": trial["scorings"][headline]["avg_acc"]})
        return {"chosen": _best(later), "trials": trials, "later_trials": later, "tasks": self.order[:2]}


def sequence_measures(R: list[list]) -> dict:
    return {"matrix": R, "avg_acc": average_accuracy(R)["value"], "bwt": backward_transfer(R)["value"], "forgetting": forgetting(R)}


def task_measures(per_task: list[float]) -> dict:
    return {"per_task": per_task, "avg_acc": sum(per_task) / len(per_task)}


def _rounded(seconds: Counter) -> dict[str, float]:
    return {key: round(value, 1) for key, value in seconds.items()}


def expand_order(order: str) -> list[str]:
    return ORDERS.get(order, order).split(",")


def stage_name(phase: str, method: str, setting: dict) -> str:
    return f"{phase}-{method}-" + "-".join(f"{k}{v}" if isinstance(v, str) else f"{k}{v:g}" for k, v in setting.items())


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
            slice_path(args.work_dir, task, split).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        shutil.copyfile(source / "labels.json", target / "labels.json")


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise MoramError(f"{path}: missing; --tasks-dir needs <task>/train.jsonl, test.jsonl and labels.json per task")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_run(args: argparse.Namespace, order: list[str]) -> None:
    """Refuse to resume stage records of a run with other data, model or budget (the data by its slices' hashes, so the
    records resume on another machine with the pack somewhere else)."""
    run = {key: str(getattr(args, key)) for key in RUN_KEYS}
    run["data_sha256"] = {task: {split: sha256_file(slice_path(args.work_dir, task, split)) for split in ("train", "dev", "test")} for task in order}
    marker = args.stages_dir / "run.json"
    if marker.is_file() and json.loads(marker.read_text()) != run:
        raise MoramError(f"{marker}: the stage records are of a run with other data or settings; pass another --results-name or remove them")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(run, indent=1) + "\n")


def slice_path(work_dir: Path, task: str, split: str) -> Path:
    return work_dir / "data" / task / f"{split}.jsonl"


def benchmark(args: argparse.Namespace) -> dict:
    """Run (or resume) every stage: each method's tuning, then the finals seed by seed (every method at one seed before
    the next, so a run cut short leaves paired seeds), then zero-shot; returns the results record."""
    started = time.time()
    bench = Benchmark(args)
    prepare_data(args, bench.order)
    check_run(args, bench.order)
    candidates, seeds = grids(args), final_seeds(args)
    outcomes = _in_workers(args, tune_method, [(m, candidates[bench.arms[m]]) for m in bench.methods])
    tuning = {m: outcome["tuning"] for m, outcome in zip(bench.methods, outcomes)}
    jobs = [(m, tuning[m]["chosen"] | {"seed": seed}) for seed in seeds for m in bench.methods]
    finals = _in_workers(args, final_run, jobs)
    for outcome in outcomes + finals:
        bench.wall |= outcome["wall"]
    methods = {m: over_seeds([f["record"] for (method, _), f in zip(jobs, finals) if method == m], seeds) for m in bench.methods}
    zero = bench.stage("zero-shot", bench.zero_shot)
    methods["zero_shot"] = {"scorings": zero["scorings"]}
    settings = {key: getattr(args, key) for key in ("r", "target_modules", "epochs", "batch_size", "max_length", "seed", "num_seeds",
                                                    "later_lr_grid", "jobs")}
    settings |= {"final_seeds": seeds, "tasks_dir": str(args.tasks_dir), "tool_version": __version__, "lora_rank": args.r * len(bench.order),
                 "arms": bench.arms, "grids": {m: candidates[bench.arms[m]] for m in bench.methods}, "tuning": tuning, "chosen": {m: t["chosen"] for m, t in tuning.items()},
                 "stage_wall_seconds": bench.wall}
    return {"model": zero["model"], "order": bench.order, "n_train": args.n_train, "n_dev": args.n_dev, "n_test": args.n_test,
            "scorings": bench.scorings, "matrix": "full" if args.full_matrix else "diagonal and final row", "settings": settings,
            "wall_seconds": round(sum(bench.wall.values()), 1), "elapsed_seconds": round(time.time() - started, 1), "methods": methods,
            "paired": paired_statistics(methods, bench.scorings), "seconds": seconds_by_method(methods)}


def method_arms(methods: str) -> dict[str, str]:
    """`--methods` as label: method, a plain method being its own label."""
    arms = (item.partition("=") for item in methods.split(","))
    return {label: method or label for label, _, method in arms}


def final_seeds(args: argparse.Namespace) -> list[int]:
    return list(range(args.seed, args.seed + args.num_seeds))


def tune_method(args: argparse.Namespace, arm: str, candidates: list[dict]) -> dict:
    bench = Benchmark(args)
    return {"tuning": bench.tune(arm, candidates, _floats(args.later_lr_grid)), "wall": bench.wall}


def final_run(args: argparse.Namespace, arm: str, setting: dict) -> dict:
    bench = Benchmark(args)
    return {"record": bench.run(bench.arms[arm], setting, "test"), "wall": bench.wall}


def over_seeds(finals: list[dict], seeds: list[int]) -> dict:
    """Per scoring, each measure's mean over the seeds' final runs (cell by cell for a row or matrix) and the spread of
    the average accuracy (sample standard deviation); each seed's own record, so every mean can be recomputed."""
    scorings = {}
    for scoring in finals[0]["scorings"]:
        records = [final["scorings"][scoring] for final in finals]
        scorings[scoring] = {key: _mean_of([record[key] for record in records]) for key in records[0]}
        scorings[scoring]["avg_acc_sd"] = statistics.stdev(r["avg_acc"] for r in records) if len(records) > 1 else None
    seeds = [{"seed": seed, "scorings": f["scorings"], "seconds": f["seconds"], "wall_seconds": f["wall_seconds"]}
             for seed, f in zip(seeds, finals)]
    return {"scorings": scorings, "seeds": seeds}


def _mean_of(values: list):
    if isinstance(values[0], list):
        return [_mean_of(list(cells)) for cells in zip(*values)]
    return mean(values)["value"]


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of the paired differences a - b, its standard error (None for one pair), and how often a was ahead."""
    diffs = [x - y for x, y in zip(a, b)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return {"mean": statistics.fmean(diffs), "se": se, "ahead": sum(d > 0 for d in diffs), "pairs": len(diffs)}


def paired_statistics(methods: dict, scorings: list[str]) -> dict:
    """Per scoring and pair of methods ("a - b", in the order they ran), the paired differences by seed of average
    accuracy and, for two sequences, of BWT."""
    out: dict[str, dict] = {scoring: {} for scoring in scorings}
    runs = {name: {s["seed"]: s["scorings"] for s in m["seeds"]} for name, m in methods.items() if "seeds" in m}
    for a, b in itertools.combinations(runs, 2):
        shared = sorted(set(runs[a]) & set(runs[b]))
        for scoring in scorings if shared else ():
            pair = {}
            for measure in ("avg_acc", "bwt"):
                values = [(runs[a][seed][scoring].get(measure), runs[b][seed][scoring].get(measure)) for seed in shared]
                if all(x is not None and y is not None for x, y in values):
                    pair[measure] = paired(*zip(*values))
            out[scoring][f"{a} - {b}"] = pair
    return out


def seconds_by_method(methods: dict) -> dict[str, dict[str, float]]:
    """Each method's mean seconds per final run: training, loading models, each scoring, and the stage's wall time."""
    out = {}
    for name, m in methods.items():
        if "seeds" in m:
            parts = Counter()
            for run in m["seeds"]:
                parts.update(run["seconds"] | {"stage": run["wall_seconds"]})
            out[name] = {key: round(value / len(m["seeds"]), 1) for key, value in parts.items()}
    return out


def _in_workers(args: argparse.Namespace, work, items: list[tuple]) -> list[dict]:
    """`work(args, *item)` for every item, in order, or in `args.jobs` spawned processes (a forked torch can hang)."""
    if args.jobs <= 1:
        return [work(args, *item) for item in items]
    threads = max(1, len(os.sched_getaffinity(0)) // args.jobs)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_start_worker, initargs=(args, threads)) as pool:
        return list(pool.map(work, [args] * len(items), *zip(*items)))


def _start_worker(args: argparse.Namespace, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if args.quiet:
        _quiet_transformers()


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its weight-loading bar, once per store the run opens


def _pm(pair: dict | None) -> str:
    if not pair:
        return "–"
    return f"{pair['mean']:+.3f} ± {shown(pair['se'])} ({pair['ahead']}/{pair['pairs']})"


def markdown_report(result: dict) -> str:
    """Per scoring: the means over seeds (average accuracy, its spread, BWT, final accuracy per task), the paired
    differences, and each sequence's diagonal (accuracy right after learning); then each seed's numbers and the time."""
    order, methods = result["order"], result["methods"]
    seeds = ", ".join(map(str, result["settings"]["final_seeds"]))
    parts = [f"{' → '.join(order)}; {result['n_train']} training and {result['n_test']} test examples per task; matrix: "
             f"{result['matrix']}; means over the final runs at seeds {seeds}."]
    for scoring in result["scorings"]:
        rows = []
        for name, m in methods.items():
            s = m["scorings"][scoring]
            final = s["matrix"][-1] if "matrix" in s else s["per_task"]
            rows.append([name, shown(s["avg_acc"]), shown(s.get("avg_acc_sd")), shown(s.get("bwt")), *map(shown, final)])
        parts += [f"### Scoring: {scoring}", markdown_table(["method", "avg acc", "sd", "BWT", *order], rows)]
        pairs = [[pair, _pm(p.get("avg_acc")), _pm(p.get("bwt"))] for pair, p in result["paired"][scoring].items()]
        parts += ["Paired by seed (mean difference ± standard error, seeds ahead):",
                  markdown_table(["pair", "avg acc", "BWT"], pairs)]
        diagonal = [[name, *map(shown, (m["scorings"][scoring]["matrix"][j][j] for j in range(len(order))))]
                    for name, m in methods.items() if "matrix" in m["scorings"][scoring]]
        parts += ["Accuracy on each task right after learning it (the diagonal):", markdown_table(["method", *order], diagonal)]
    per_seed = [[name, str(run["seed"]), *[f"{shown(run['scorings'][sc]['avg_acc'])} / {shown(run['scorings'][sc].get('bwt'))}"
                                          for sc in result["scorings"]], f"{run['wall_seconds']:.0f}"]
                for name, m in methods.items() for run in m.get("seeds", [])]
    parts += ["Each seed's final run (average accuracy / BWT):",
              markdown_table(["method", "seed", *result["scorings"], "stage s"], per_seed)]
    kinds = sorted({key for times in result["seconds"].values() for key in times})
    timing = [[name, *[f"{times.get(kind, 0):.0f}" for kind in kinds]] for name, times in result["seconds"].items()]
    parts += ["Mean seconds per final run:", markdown_table(["method", *kinds], timing)]
    return "\n\n".join(parts) + "\n"


def plot(result: dict, path: Path) -> None:
    """Per scoring, every seed's average accuracy and BWT per method (dots) with the mean (a bar), MTL and zero-shot included."""
    from matplotlib.figure import Figure

    methods, scorings = result["methods"], result["scorings"]
    figure = Figure(figsize=(3.6 * len(scorings), 5.6), layout="constrained")
    axes = figure.subplots(2, len(scorings), squeeze=False)
    for column, scoring in enumerate(scorings):
        for row, measure in enumerate(("avg_acc", "bwt")):
            ax = axes[row][column]
            for x, (name, m) in enumerate(methods.items()):
                values = [run["scorings"][scoring].get(measure) for run in m.get("seeds", [])]
                values = [v for v in values if v is not None] or [v for v in [m["scorings"][scoring].get(measure)] if v is not None]
                ax.scatter([x] * len(values), values, s=14, alpha=0.6)
                if values:
                    ax.hlines(statistics.fmean(values), x - 0.3, x + 0.3, color="black")
            ax.set_xticks(range(len(methods)), list(methods), rotation=30, ha="right", rotation_mode="anchor", fontsize="small")
            ax.set_title(f"{scoring}: {'average accuracy' if measure == 'avg_acc' else 'BWT'}", fontsize="medium")
            if measure == "bwt":
                ax.axhline(0, color="grey", linewidth=0.5)
    figure.suptitle(f"{len(result['order'])} tasks, seeds {', '.join(map(str, result['settings']['final_seeds']))}", fontsize="medium")
    figure.savefig(path)


def write_reports(result: dict, directory: Path, name: str, markdown: Callable[[dict], str] | None = None,
                  plot: Callable[[dict, Path], None] | None = None) -> list[Path]:
    """A bench script's results: `name`.json in `directory`, with `name`.md and `name`.png where a report and a plot
    are given."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{name}.json"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    if markdown is not None:
        paths.append(directory / f"{name}.md")
        paths[-1].write_text(markdown(result))
    if plot is not None:
        paths.append(directory / f"{name}.png")
        plot(result, paths[-1])
    return paths


def write_results(result: dict, args: argparse.Namespace) -> list[Path]:
    return write_reports(result, args.results_dir, args.results_name, markdown_report, plot)


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
    return script_main(parse_args(argv), benchmark, write_results)


if __name__ == "__main__":
    sys.exit(main())
