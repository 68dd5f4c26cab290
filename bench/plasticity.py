"""The plasticity probe: do MoRAM's later tasks learn? Each option of how a task's new experts start and train, against
IncLoRA and SeqLoRA, on the first tasks of the benchmark's order, on dev slices, at several seeds.

Every trial learns the first task (a stage shared by the options that differ
only in how later tasks train), then the later tasks, each scored on every
task so far. Reported per option: each later task's accuracy right after it
was learned (R[j][j]), BWT, and for MoRAM the share of the gate mass its
later banks take on their own task's dev text and how many of their ranks the
gate never selects there. Stage records go to bench/results/plasticity-stages/
as they finish and are committed, so a run continues in another session from
them alone; stores are rebuilt when needed. Method settings are the ones the
benchmark chose (bench/results/cl-benchmark.json).

    python bench/plasticity.py                         # every option, seeds 0-2 (2 to 3 h on 2 cores; committed stages are reused)
    python bench/plasticity.py --options kaiming,data --seeds 0
    python bench/plasticity.py --options data-task-later2e-3,data-task,inclora,seqlora --seeds 0,1,2,3,4 --results-name plasticity-5-seeds
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

from cl_benchmark import REPO, Benchmark, _say, paired, prepare_data, script_main, write_reports

from moram_cli.errors import MoramError
from moram_cli.evaluation.cl_metrics import shown
from moram_cli.evaluation.continual import continual_report
from moram_cli.inspection.inspect import inspect_ranks
from moram_cli.markdown import markdown_table
from moram_cli.store import MemoryStore
from moram_cli.store.init import init_store
from moram_cli.training.learn import learn_task

PROBE_MORAM = {"key_init": "kaiming", "routing": "token"}
MORAM = {"lr": 8e-3, "temperature": 0.1, "k": 4, "threshold": 0.0, "later_lr": 1e-3}
# Each option: its method and settings. "later" settings act from the second task on, so options that differ only in
# them share the first task's stage.
OPTIONS = {
    "kaiming": ("moram", MORAM | {"key_init": "kaiming"}),
    "warm": ("moram", MORAM | {"key_init": "warm"}),
    "data": ("moram", MORAM | {"key_init": "data"}),
    "data-task": ("moram", MORAM | {"key_init": "data", "routing": "task"}),
    "data-task-later2e-3": ("moram", MORAM | {"key_init": "data", "routing": "task", "later_lr": 2e-3}),
    "data-task-later4e-3": ("moram", MORAM | {"key_init": "data", "routing": "task", "later_lr": 4e-3}),
    "data-one-lr": ("moram", MORAM | {"key_init": "data", "later_lr": 8e-3}),
    "kaiming-one-lr": ("moram", MORAM | {"key_init": "kaiming", "later_lr": 8e-3}),
    "data-k8": ("moram", MORAM | {"key_init": "data", "k": 8}),
    "data-clip": ("moram", MORAM | {"key_init": "data", "max_grad_norm": 1.0}),
    "inclora": ("inclora", {"lr": 4e-3, "later_lr": 1e-3}),
    "seqlora": ("lora", {"lr": 1e-3, "later_lr": 5e-4}),
}
LATER_KEYS = ("key_init", "later_lr", "max_grad_norm")
BASELINES = ("inclora", "seqlora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks-dir", type=Path, default=REPO.parent / "shared" / "data" / "cl-benchmark")
    p.add_argument("--order", default="dbpedia,amazon", help="the first task, then the later ones")
    p.add_argument("--options", default=",".join(OPTIONS), help=f"any of {', '.join(OPTIONS)}")
    p.add_argument("--seeds", default="0,1,2", help="each option runs at every seed; stages run seed by seed")
    p.add_argument("--base-model", default=None, help="as for moram init; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--n-train", type=int, default=128)
    p.add_argument("--n-dev", type=int, default=32, help="the dev slice every cell is scored on (the lines after the training ones)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=320)
    p.add_argument("--work-dir", type=Path, default=REPO / "bench" / "work-plasticity", help="stores and data samples")
    p.add_argument("--stages-dir", type=Path, default=REPO / "bench" / "results" / "plasticity-stages",
                   help="one JSON per finished stage: commit them, and a later run resumes from them")
    p.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--results-name", default="plasticity", help="the results files' name: NAME.json, NAME.md, NAME.png")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    # What Benchmark reads besides: test slices are never used here, and every option's settings are fixed.
    args.n_test, args.num_seeds, args.jobs, args.seed, args.methods, args.scorings = 0, 1, 1, 0, "moram,lora,inclora", "choice"
    return args


class Probe(Benchmark):
    """The benchmark's stages, each cell scored by ranked choice through `learn-task --eval-data` (the store's own
    accuracy record, every task so far after each task)."""

    def store_settings(self, method: str, setting: dict) -> dict:
        # The probe's options name what they change from how the benchmark's MoRAM ran then (random keys, every token gated).
        return super().store_settings(method, (PROBE_MORAM if method == "moram" else {}) | setting)

    def recorded_sequence(self, store: Path, method: str, setting: dict, tasks: list[str], split: str) -> dict:
        init_store(store, **self.store_settings(method, setting))
        for task in tasks:
            self.learn(store, task, split)
        return self.summary(store, setting)

    def learn(self, store: Path, task: str, split: str, **overrides) -> None:
        learn_task(store, self.data(task, "train"), name=task, eval_data=self.data(task, split), show_progress=self.progress,
                   **overrides)

    def summary(self, store: Path, setting: dict) -> dict:
        report = continual_report(store)
        return {"setting": setting, "matrix": report["matrix"], "avg_acc": report["average_accuracy"]["value"],
                "bwt": report["bwt"]["value"], "fwt": report["fwt"]["value"], "forgetting": report["forgetting"]}

    def first(self, method: str, setting: dict) -> tuple[str, dict]:
        """The first task's stage of `setting` (its name and record): later-task settings left out, so options share it."""
        first = {k: v for k, v in setting.items() if k not in LATER_KEYS}
        name = _name("first", method, first)
        return name, self.stage(name, lambda store: self.recorded_sequence(store, method, first, self.order[:1], "dev"))

    def trial(self, option: str, seed: int) -> dict:
        method, setting = OPTIONS[option]
        setting = setting | {"seed": seed}
        first_name, _ = self.first(method, setting)
        return self.stage(_name("trial", option, {"seed": seed}), lambda store: self.later(store, method, setting, first_name))

    def later(self, store: Path, method: str, setting: dict, first_name: str) -> dict:
        """The first task's store (rebuilt when this session lacks it) learning the later tasks, then its gate usage."""
        source = self.work / "stores" / first_name
        if not source.is_dir():
            self.stages.joinpath(f"{first_name}.json").unlink()
            self.first(method, setting)
        shutil.copytree(source, store)
        config = MemoryStore.open(store).config
        if method == "moram":
            # The copied store was created without the later-task settings: key_init is a store setting.
            config.adapter.key_init = setting["key_init"]
            config.save(store)
        for task in self.order[1:]:
            self.learn(store, task, "dev", lr=setting["later_lr"], max_grad_norm=setting.get("max_grad_norm"))
        return self.summary(store, setting) | {"gates": self.gates(store) if method == "moram" else None}

    def gates(self, store: Path) -> list[dict]:
        """Per later task: its bank's mean share of the gate mass over the adapted modules on its own dev text, and
        its ranks the gate never selects there."""
        out = []
        for j, task in enumerate(self.order[1:], start=1):
            report = inspect_ranks(store, data=self.data(task, "dev"), top=0)
            bank = report["banks"][j]["bank"]
            modules = report["gates"]["modules"].values()
            dead = sum(len(m["never_selected"][bank]) for m in modules)
            ranks = sum(len(m["rank_share"][bank]) for m in modules)
            out.append({"task": task, "own_share": statistics.fmean(m["bank_share"][bank] for m in modules),
                        "dead_ranks": dead, "ranks": ranks})
        return out


def _name(phase: str, label: str, setting: dict) -> str:
    return f"{phase}-{label}-" + "-".join(f"{k}{v:g}" if isinstance(v, (int, float)) else f"{k}{v}" for k, v in setting.items())


def trial_measures(trial: dict) -> dict:
    """A trial's probe numbers: later tasks' mean R[j][j], BWT, and (MoRAM) later banks' own share and dead fraction."""
    R = trial["matrix"]
    out = {"later_diag": statistics.fmean(R[j][j] for j in range(1, len(R))), "bwt": trial["bwt"], "avg_acc": trial["avg_acc"],
           "first_diag": R[0][0]}
    if trial.get("gates"):
        out["own_share"] = statistics.fmean(g["own_share"] for g in trial["gates"])
        out["dead_fraction"] = sum(g["dead_ranks"] for g in trial["gates"]) / sum(g["ranks"] for g in trial["gates"])
    return out


def summarise(per_seed: dict[str, dict[int, dict]]) -> dict:
    """Per option: each measure's mean over the seeds it ran at, each seed's numbers, and R[j][j] paired against each baseline."""
    options = {}
    for option, runs in per_seed.items():
        measures = {seed: trial_measures(trial) for seed, trial in sorted(runs.items())}
        keys = next(iter(measures.values())).keys()
        record = {key: statistics.fmean(m[key] for m in measures.values()) for key in keys}
        record["seeds"] = {seed: m for seed, m in measures.items()}
        for baseline in BASELINES:
            shared = sorted(set(runs) & set(per_seed.get(baseline, {})))
            if option != baseline and shared:
                own = [measures[s]["later_diag"] for s in shared]
                other = [trial_measures(per_seed[baseline][s])["later_diag"] for s in shared]
                record[f"later_diag_vs_{baseline}"] = paired(own, other)
        options[option] = record
    return options


def probe(args: argparse.Namespace) -> dict:
    """Run (or resume) every stage, seed by seed so a partial run stays balanced; returns the results record."""
    options, seeds = args.options.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise MoramError(f"--options: unknown option {sorted(unknown)[0]!r}; use any of {', '.join(OPTIONS)}")
    started = time.time()
    bench = Probe(args)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    prepare_data(args, bench.order)
    per_seed = {option: {} for option in options}
    for seed in seeds:
        for option in options:
            per_seed[option][seed] = bench.trial(option, seed)
    return {"order": bench.order, "n_train": args.n_train, "n_dev": args.n_dev, "seeds": seeds,
            "settings": {o: dict(zip(("method", "setting"), OPTIONS[o])) for o in options},
            "options": summarise(per_seed), "stage_wall_seconds": bench.wall, "wall_seconds": round(sum(bench.wall.values()), 1),
            "elapsed_seconds": round(time.time() - started, 1)}


def markdown_report(result: dict) -> str:
    """One row per option: means over the seeds, and R[j][j] paired against IncLoRA and SeqLoRA (mean ± standard error, seeds ahead)."""
    rows = []
    for option, m in result["options"].items():
        vs = [m.get(f"later_diag_vs_{b}") for b in BASELINES]
        rows.append([option, shown(m["first_diag"]), shown(m["later_diag"]), shown(m["bwt"]), shown(m["avg_acc"]),
                     shown(m.get("own_share")), shown(m.get("dead_fraction")),
                     *["–" if v is None else f"{v['mean']:+.3f} ± {shown(v['se'])} ({v['ahead']}/{v['pairs']})" for v in vs]])
    order = " → ".join(result["order"])
    head = (f"{order}, {result['n_train']} training examples per task, every cell on {result['n_dev']} dev examples; means over "
            f"seeds {', '.join(map(str, result['seeds']))}. R[j][j]: a later task's accuracy right after it was learned; own share: "
            "its bank's share of the gate mass on its own text; dead: its ranks the gate never selects there.")
    table = markdown_table(["option", "first task", "later R[j][j]", "BWT", "avg acc", "own share", "dead", "R[j][j] − IncLoRA",
                            "R[j][j] − SeqLoRA"], rows)
    return head + "\n\n" + table + "\n"


def plot(result: dict, path: Path) -> None:
    """Later tasks' R[j][j] against BWT, one point per option and seed, the option's mean as a large marker."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.subplots()
    for option, m in result["options"].items():
        points = list(m["seeds"].values())
        line = ax.scatter([p["bwt"] for p in points], [p["later_diag"] for p in points], s=14, alpha=0.5)
        ax.scatter([m["bwt"]], [m["later_diag"]], s=80, color=line.get_facecolor()[0], label=option, edgecolor="black")
    ax.axvline(0, color="grey", linewidth=0.5)
    ax.set(xlabel="BWT (0: nothing forgotten)", ylabel="later tasks' accuracy right after learning",
           title=" → ".join(result["order"]) + f", seeds {', '.join(map(str, result['seeds']))}")
    ax.legend(fontsize="small", ncols=2)
    figure.savefig(path)


def write_results(result: dict, args: argparse.Namespace) -> list[Path]:
    _say(args, f"wall {result['wall_seconds']} s")
    return write_reports(result, args.results_dir, args.results_name, markdown_report, plot)


def main(argv: list[str] | None = None) -> int:
    return script_main(parse_args(argv), probe, write_results)


if __name__ == "__main__":
    sys.exit(main())
