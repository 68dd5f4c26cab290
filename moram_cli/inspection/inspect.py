"""`inspect_ranks`: what a store's experts hold and, given data, how the gate uses them."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path

from moram_cli.data.jsonl import Example, read_examples
from moram_cli.errors import MoramError
from moram_cli.inspection.plot import check_plot_target, plot_usage
from moram_cli.inspection.ranks import DEAD_VALUE_NORM, rank_stats
from moram_cli.store import MemoryStore


def module_matcher(pattern: str | None) -> Callable[[str], bool]:
    """`--module`: a shell-style pattern (`*`, `?`, `[...]`) matched anywhere in the module name, so a plain word is a substring."""
    if pattern is None:
        return lambda name: True
    return lambda name: fnmatch.fnmatchcase(name, f"*{pattern}*")


def inspect_ranks(
    store_path: Path, *, data: Path | None = None, module: str | None = None, top: int = 5, plot: Path | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Static statistics of every bank; with `data`, gate usage per adapted module; with `plot`, heatmaps of it."""
    store = MemoryStore.open(store_path)
    if plot is not None:
        if data is None:
            raise MoramError("--plot needs --data: the heatmaps show how the gate uses the ranks on that data")
        check_plot_target(plot)
    if top < 0:
        raise MoramError(f"--top {top} is negative; give how many of the busiest ranks to list per module")
    examples = read_examples(data) if data is not None else None
    keep = module_matcher(module)
    result = {"store": str(store_path), "module_filter": module, "dead_value_norm": DEAD_VALUE_NORM, **rank_stats(store, keep)}
    if module is not None and result["banks"] and not result["banks"][0]["modules"]:
        some = next(iter(store.banks()[0].shapes()))
        raise MoramError(f"{store_path}: --module {module!r} matches no adapted module (they are named like {some}); change the pattern")
    if examples is not None:
        result["gates"] = gate_usage(store, data, examples, keep, top, result["banks"], trust_remote_code)
    if plot is not None:
        plot_usage(result["gates"]["modules"], [b["bank"] for b in result["banks"]], plot)
        result["plot"] = str(plot)
    return result


def gate_usage(
    store: MemoryStore, data: Path, examples: list[Example], keep: Callable[[str], bool], top: int, banks: list[dict],
    trust_remote_code: bool = False,
) -> dict:
    """Run the store's model over `examples` and report, per module `keep` accepts, how its gate spread over the ranks."""
    # Imported here, where the model is built: without --data, inspect-ranks never loads torch.
    from moram_cli.inspection.gates import check_gated, collect_gates
    from moram_cli.inspection.usage import module_usage
    from moram_cli.models.memory import build_memory_model

    if not banks:
        raise MoramError(f"{store.path}: the store has no banks, so there are no gates to inspect; learn a task first")
    check_gated(store)
    model, tokenizer = build_memory_model(store, trust_remote_code=trust_remote_code)
    settings = store.config.training
    stats = collect_gates(model, tokenizer, examples, settings.batch_size, settings.max_length, keep)
    names = [bank["bank"] for bank in banks]
    modules = {
        module: module_usage(totals, names, [bank["modules"][module]["ranks"] for bank in banks], top)
        for module, totals in stats.items()
    }
    return {"data": str(data), "tokens": next(iter(stats.values())).tokens, "modules": modules}
