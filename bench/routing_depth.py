"""Task routing on the first blocks: how often reading the inputs of the first L blocks picks the bank of the prompt's
own task, and what reading every block picks, on a learned task-routed store.

    python bench/routing_depth.py --store STORE --data-dir WORK/data     # WORK: a cl_benchmark work directory

The test prompts of each bank's task come from `DATA_DIR/<task>/test.jsonl`
(the bank's name without its number); its prototypes at every block, from
the training file the bank records. Writes bench/results/routing-depth.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from cl_benchmark import REPO, script_main, write_reports
from moram_cli.data.encode import encode_dataset, split_example
from moram_cli.data.jsonl import read_examples
from moram_cli.models.memory import build_memory_model
from moram_cli.store import Bank, MemoryStore
from moram_cli.training.key_init import task_prototypes
from moram_cli.tuner.routing import block_index


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--depths", default="1,2,4,8")
    p.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def depth_agreement(args: argparse.Namespace) -> dict:
    store = MemoryStore.open(args.store)
    banks = store.banks()
    model, tokenizer = build_memory_model(store, upto=0)
    layers = model.moram_layers()
    prototypes = [every_module_prototype(model, tokenizer, bank, list(layers)) for bank in banks]
    block = {name: block_index(name) for name in layers}
    depths = [int(d) for d in args.depths.split(",")] + [max(block.values()) + 1]
    means: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        layer.register_forward_pre_hook(lambda _, inputs, name=name: means.__setitem__(name, inputs[0][0].double().mean(0)))
    picks: dict[int, list[int]] = {d: [] for d in depths}
    truth = []
    for own, bank in enumerate(banks):
        for example in read_examples(args.data_dir / bank.path.name.split("-", 1)[1] / "test.jsonl", allow_text=False):
            with torch.no_grad():
                model(input_ids=tokenizer(split_example(example, tokenizer)[0], return_tensors="pt").input_ids, logits_to_keep=1)
            distance = {name: torch.stack([(means[name] - p[name].double()).square().sum() for p in prototypes]) for name in layers}
            for d in depths:
                picks[d].append(int(sum(v for name, v in distance.items() if block[name] < d).argmin()))
            truth.append(own)
    every = picks[depths[-1]]
    share = lambda a, b: round(sum(x == y for x, y in zip(a, b)) / len(b), 4)  # noqa: E731
    return {"store": str(args.store), "banks": [bank.path.name for bank in banks], "prompts": len(truth),
            "by_blocks": {str(d): {"own_task": share(picks[d], truth), "as_every_block": share(picks[d], every)} for d in depths}}


def every_module_prototype(model, tokenizer, bank: Bank, modules: list[str]) -> dict[str, torch.Tensor]:
    """The bank's task prototype at every module, from the examples and settings it was learned with: a bank records
    those of the blocks the router reads alone."""
    learned = bank.metadata()
    settings = learned["hyperparameters"]
    encoded, _ = encode_dataset(read_examples(Path(learned["data"])), tokenizer, settings["max_length"])
    return task_prototypes(model, encoded, tokenizer.pad_token_id, settings["batch_size"], settings["seed"], Accelerator(), False, modules)


def write_results(result: dict, args: argparse.Namespace) -> list[Path]:
    return write_reports(result, args.results_dir, "routing-depth")


def main(argv: list[str] | None = None) -> int:
    return script_main(parse_args(argv), depth_agreement, write_results)


if __name__ == "__main__":
    sys.exit(main())
