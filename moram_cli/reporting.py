"""Rich tables for the commands' results (the `--json` output carries the same data)."""

from __future__ import annotations

import os

from rich.console import Console, ConsoleDimensions, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from moram_cli.evaluation.ci_gates import eval_mode
from moram_cli.evaluation.cl_metrics import matrix_rows, metric_lines, shown

# Columns of a log or a pipe: more than any row needs, so tables are laid out at their natural width.
PIPED_WIDTH = 100_000


class ReportConsole(Console):
    """A rich Console that prints full-width tables when its stream is not a terminal.

    Rich lays a pipe or a file out in 80 columns: in a CI log, `verify` and
    `inspect-ranks` lost the ends of their paths and numbers. With no screen
    to fit, no cell is cut or wrapped; an explicit COLUMNS still wins.
    """

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self.is_terminal or "COLUMNS" in os.environ:
            return size
        return ConsoleDimensions(PIPED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


# Where results go: stdout, looked up at each print (so a redirected sys.stdout is followed).
console = ReportConsole()


def titled(table: Table, title: str, caption: str = "") -> Group:
    """`table` under its title and over its caption, each a plain-text line of its own.

    Given to the table, rich wraps both to the table's own width however wide
    the screen or log is: paths came out in pieces and numbers split apart.
    """
    return Group(Text(title, style="table.title"), table, *([Text(caption, style="table.caption")] if caption else []))


def learn_table(result: dict) -> Table:
    table = Table(title=f"learned task {result['task']}", show_header=False)
    loss, batch = result["loss"], result["batch"]
    resumed = f", resumed at step {result['resumed_from_step']}" if "resumed_from_step" in result else ""
    rows = [
        ("bank", result.get("bank", "")),
        ("examples", f"{result['examples']} ({result['truncated_examples']} prompts cut to --max-length)"),
        ("steps / tokens", f"{result['steps']} / {result['tokens']:,}{resumed}"),
        ("batch", f"{batch['global']} = {batch['processes']} process(es) x {batch['grad_accum']} accumulation x {batch['micro']}, {result['precision']}"),
        ("new parameters", f"{result['trainable_parameters']:,} ({result['new_ranks_per_module']} ranks per module)"),
        ("loss first / last / mean", f"{loss['first']:.4f} / {loss['last']:.4f} / {loss['mean']:.4f}"),
        ("wall time", f"{result['wall_seconds']:.1f} s"),
    ]
    if "eval" in result:
        ev = result["eval"]
        rows.append(("eval accuracy", f"{ev['accuracy']:.3f} ({ev['correct']}/{ev['total']}, {ev['scoring']})"))
    if "cl" in result:
        rows.append(("accuracy on tasks so far", ", ".join(f"{task} {shown(a)}" for task, a in result["cl"]["row"].items())))
    for key, value in rows:
        table.add_row(key, str(value))
    return table


def eval_table(result: dict) -> Group:
    banks = ", ".join(result["banks"]) or "none (base model)"
    table = Table()
    for column in ("data", "banks", "scoring", "accuracy", "correct"):
        table.add_column(column)
    table.add_row(escape(result["data"]), escape(banks), result["scoring"], f"{result['accuracy']:.3f}", f"{result['correct']}/{result['total']}")
    return titled(table, f"evaluation of {result['store']}")


def accuracy_matrix_table(tasks: list[str], rows: list[tuple[str, list[float | None]]], title: str) -> Group:
    """One row per stage (zero-shot, after task 1, ...), one column per task; a short row leaves its last columns blank."""
    table = Table()
    table.add_column("stage")
    for task in tasks:
        table.add_column(escape(task), justify="right")
    for stage, accuracies in rows:
        table.add_row(escape(stage), *(shown(a) for a in accuracies), *[""] * (len(tasks) - len(accuracies)))
    return titled(table, title)


def eval_tables(result: dict) -> Group:
    """The table of whichever mode `moram eval` ran: one test set, the accuracy matrix, or lm-eval scores."""
    return {"data": eval_table, "cl": cl_table, "suite": suite_table}[eval_mode(result)](result)


def cl_table(result: dict) -> Group:
    """The zero-shot row, one row per learned task and the forgetting per task; the metrics below, one per line."""
    tasks = [t["task"] for t in result["tasks"]]
    table = accuracy_matrix_table(tasks, matrix_rows(result), f"accuracy matrix of {result['store']} (method {result['method']})")
    return Group(table, *(Text(line) for line in metric_lines(result)))


def suite_table(result: dict) -> Group:
    banks = ", ".join(result["banks"]) or "none (base model)"
    table = Table()
    for column in ("task", "acc", "acc_norm", "n"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, scores in result["results"].items():
        table.add_row(escape(task), *(shown(scores.get(key)) for key in ("acc", "acc_norm")), str(scores["n"]))
    return titled(table, f"lm-eval {result['suite'] or result['suite_path']} on {result['store']}", f"banks: {banks}")


def inspect_tables(result: dict) -> Group:
    """The banks' static statistics, then (with --data) gate usage per module with one share column per bank."""
    totals = result["totals"]
    banks = Table()
    for column in ("bank", "ranks", "parameters", "key norm mean", "value norm min / mean / max", "dead"):
        banks.add_column(column, justify="left" if column == "bank" else "right", no_wrap=column.startswith("value"))
    for bank in result["banks"]:
        value = bank["value_norm"]
        banks.add_row(bank["bank"], str(bank["ranks"]), f"{bank['parameters']:,}", f"{bank['key_norm']['mean']:.3g}",
                      f"{value['min']:.3g} / {value['mean']:.3g} / {value['max']:.3g}", str(bank["dead_ranks"]))
    title = f"ranks of {result['store']}" + (f" (modules matching {result['module_filter']!r})" if result["module_filter"] else "")
    caption = f"{totals['ranks']} ranks, {totals['parameters']:,} parameters, {totals['dead_ranks']} dead; {totals['disk_bytes']:,} bytes on disk"
    gates = [gates_table(result["gates"], [b["bank"] for b in result["banks"]])] if "gates" in result else []
    plot = [Text(f"heatmaps written to {result['plot']}")] if "plot" in result else []
    return Group(titled(banks, title, caption), *gates, *plot)


def gates_table(gates: dict, banks: list[str]) -> Group:
    table = Table()
    for column in ("module", "ranks", "ranks for 99%", *banks, "busiest ranks", "never selected"):
        table.add_column(column, justify="left" if column in ("module", "busiest ranks") else "right", no_wrap=column in ("module", "busiest ranks"))
    for module, usage in gates["modules"].items():
        shares = (f"{usage['bank_share'][bank]:.1%}" for bank in banks)
        busiest = "\n".join(f"{t['bank']}#{t['rank']} {t['share']:.0%}" for t in usage["top"])
        unused = sum(len(ranks) for ranks in usage["never_selected"].values())
        table.add_row(module, str(usage["ranks"]), f"{usage['ranks_for_99_mass']:.2f}", *shares, busiest, str(unused))
    return titled(table, f"gate usage on {gates['data']} ({gates['tokens']:,} tokens)", "bank columns: share of the module's gate mass")


def merge_table(result: dict) -> Group:
    routed = result["routing"] == "source"
    table = Table()
    table.add_column("bank")
    table.add_column("from")
    if routed:
        table.add_column("group")
    for bank in result["banks"]:
        table.add_row(bank["bank"], escape(bank["from"]), *([",".join(map(str, bank["routing_groups"]))] if routed else []))
    if "prune" in result:
        prune = result["prune"]
        table.add_row("pruned", f"{prune['ranks_dropped']} of {prune['ranks_before']} ranks below {prune['below']:g} of their module's gate mass")
        if "eval" in prune:
            ev = prune["eval"]
            table.add_row("accuracy", f"{ev['accuracy_before']:.3f} -> {ev['accuracy_after']:.3f} ({ev['change']:+.3f}) on {escape(ev['data'])}")
    return titled(table, f"merged into {result['store']}", f"{result['deduplicated']} duplicate bank(s) stored once; routing: {result['routing']}")


def verify_table(result: dict) -> Group:
    """One row per entry of banks/: OK or its first problem; warnings (leftovers, a lock) below, one per line."""
    # Below the table, not as its caption: a caption wraps to the table's few columns and breaks paths apart.
    table = Table()
    for column in ("bank", "task", "experts", "status"):
        table.add_column(column, justify="right" if column == "experts" else "left")
    for bank in result["banks"]:
        # A problem starts with the bank's path, which the first column already shows.
        status = "[green]OK[/]" if bank["ok"] else f"[red]{escape(bank['problems'][0].split(': ', 1)[-1])}[/]"
        table.add_row(escape(bank["bank"]), escape(str(bank["task"] or "")), "" if bank["experts"] is None else str(bank["experts"]), status)
    title = f"verification of {result['store']} (format {result['format_version']})"
    return Group(titled(table, title), *(Text(f"warning: {warning}", style="yellow") for warning in result["warnings"]))


def generate_table(result: dict) -> Group:
    """One row per prompt with its completion; the banks used and any cut prompts below."""
    table = Table(show_lines=True)
    table.add_column("prompt")
    table.add_column("completion")
    for record in result["completions"]:
        table.add_row(escape(record["prompt"]), escape(record["completion"]))
    banks = ", ".join(result["banks"]) or "none (base model)"
    caption = f"banks: {banks}; at most {result['max_new_tokens']} new tokens, greedy; {result['truncated_prompts']} prompt(s) cut to --max-length"
    return titled(table, f"generated by {result['store']}", caption)
