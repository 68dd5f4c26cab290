"""Rich tables for the commands' results (the `--json` output carries the same data)."""

from __future__ import annotations

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from moram_cli.evaluation.ci_gates import eval_mode
from moram_cli.evaluation.cl_metrics import matrix_rows, metric_lines, shown

console = Console()


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


def eval_table(result: dict) -> Table:
    banks = ", ".join(result["banks"]) or "none (base model)"
    table = Table(title=f"evaluation of {result['store']}")
    for column in ("data", "banks", "scoring", "accuracy", "correct"):
        table.add_column(column)
    table.add_row(result["data"], banks, result["scoring"], f"{result['accuracy']:.3f}", f"{result['correct']}/{result['total']}")
    return table


def accuracy_matrix_table(tasks: list[str], rows: list[tuple[str, list[float | None]]], title: str) -> Table:
    """One row per stage (zero-shot, after task 1, ...), one column per task; a short row leaves its last columns blank."""
    table = Table(title=escape(title))
    table.add_column("stage")
    for task in tasks:
        table.add_column(escape(task), justify="right")
    for stage, accuracies in rows:
        table.add_row(escape(stage), *(shown(a) for a in accuracies), *[""] * (len(tasks) - len(accuracies)))
    return table


def eval_tables(result: dict) -> Table | Group:
    """The table of whichever mode `moram eval` ran: one test set, the accuracy matrix, or lm-eval scores."""
    return {"data": eval_table, "cl": cl_table, "suite": suite_table}[eval_mode(result)](result)


def cl_table(result: dict) -> Group:
    """The zero-shot row, one row per learned task and the forgetting per task; the metrics below, one per line."""
    tasks = [t["task"] for t in result["tasks"]]
    table = accuracy_matrix_table(tasks, matrix_rows(result), f"accuracy matrix of {result['store']} (method {result['method']})")
    return Group(table, *(Text(line) for line in metric_lines(result)))


def suite_table(result: dict) -> Table:
    banks = ", ".join(result["banks"]) or "none (base model)"
    table = Table(title=escape(f"lm-eval {result['suite'] or result['suite_path']} on {result['store']}"), caption=escape(f"banks: {banks}"))
    for column in ("task", "acc", "acc_norm", "n"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, scores in result["results"].items():
        table.add_row(escape(task), *(shown(scores.get(key)) for key in ("acc", "acc_norm")), str(scores["n"]))
    return table


def inspect_tables(result: dict) -> Group:
    """The banks' static statistics, then (with --data) gate usage per module with one share column per bank."""
    totals = result["totals"]
    banks = Table(title=escape(f"ranks of {result['store']}" + (f" (modules matching {result['module_filter']!r})" if result["module_filter"] else "")),
                  caption=f"{totals['ranks']} ranks, {totals['parameters']:,} parameters, {totals['dead_ranks']} dead; "
                          f"{totals['disk_bytes']:,} bytes on disk")
    for column in ("bank", "ranks", "parameters", "key norm mean", "value norm min / mean / max", "dead"):
        banks.add_column(column, justify="left" if column == "bank" else "right", no_wrap=column.startswith("value"))
    for bank in result["banks"]:
        value = bank["value_norm"]
        banks.add_row(bank["bank"], str(bank["ranks"]), f"{bank['parameters']:,}", f"{bank['key_norm']['mean']:.3g}",
                      f"{value['min']:.3g} / {value['mean']:.3g} / {value['max']:.3g}", str(bank["dead_ranks"]))
    return Group(banks, gates_table(result["gates"], [b["bank"] for b in result["banks"]])) if "gates" in result else Group(banks)


def gates_table(gates: dict, banks: list[str]) -> Table:
    table = Table(title=escape(f"gate usage on {gates['data']} ({gates['tokens']:,} tokens)"), caption="bank columns: share of the module's gate mass")
    for column in ("module", "ranks", "ranks for 99%", *banks, "busiest ranks", "never selected"):
        table.add_column(column, justify="left" if column in ("module", "busiest ranks") else "right", no_wrap=column in ("module", "busiest ranks"))
    for module, usage in gates["modules"].items():
        shares = (f"{usage['bank_share'][bank]:.1%}" for bank in banks)
        busiest = "\n".join(f"{t['bank']}#{t['rank']} {t['share']:.0%}" for t in usage["top"])
        unused = sum(len(ranks) for ranks in usage["never_selected"].values())
        table.add_row(module, str(usage["ranks"]), f"{usage['ranks_for_99_mass']:.2f}", *shares, busiest, str(unused))
    return table


def merge_table(result: dict) -> Table:
    routed = result["routing"] == "source"
    table = Table(title=escape(f"merged into {result['store']}"), caption=f"{result['deduplicated']} duplicate bank(s) stored once; routing: {result['routing']}")
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
    return table


def verify_table(result: dict) -> Group:
    """One row per entry of banks/: OK or its first problem; warnings (leftovers, a lock) below, one per line."""
    # Below the table, not as its caption: a caption wraps to the table's few columns and breaks paths apart.
    table = Table(title=escape(f"verification of {result['store']} (format {result['format_version']})"))
    for column in ("bank", "task", "experts", "status"):
        table.add_column(column, justify="right" if column == "experts" else "left")
    for bank in result["banks"]:
        # A problem starts with the bank's path, which the first column already shows.
        status = "[green]OK[/]" if bank["ok"] else f"[red]{escape(bank['problems'][0].split(': ', 1)[-1])}[/]"
        table.add_row(escape(bank["bank"]), escape(str(bank["task"] or "")), "" if bank["experts"] is None else str(bank["experts"]), status)
    return Group(table, *(Text(f"warning: {warning}", style="yellow") for warning in result["warnings"]))
