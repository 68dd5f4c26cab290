"""Speed: the MoRAM layer and model against PEFT LoRA and the bare model, as ratios measured in interleaved rounds.

Every figure is a ratio of median times from one process, its variants run
in turn within each round, so a machine that gets busier or quieter part way
moves both sides alike. Layer figures use one linear layer of the model's
width; model figures the base model of a store made with the `moram init`
defaults (adapters on q and k, r 8, k 4), random banks standing in for
learned ones (speed does not depend on what the experts learned).

    python bench/speed.py                               # SmolLM2-135M, writes bench/results/speed.{json,md}
    python bench/speed.py --rounds 3 --banks 1,4        # a quick look
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from cl_benchmark import REPO, _say, script_main, write_reports
from moram_cli import __version__
from moram_cli.data.encode import split_example
from moram_cli.data.jsonl import read_examples
from moram_cli.evaluation.evaluate import evaluate_examples
from moram_cli.markdown import markdown_table
from moram_cli.models.loading import load_base_model
from moram_cli.models.memory import route_by_task
from moram_cli.store import MemoryStore
from moram_cli.store.init import init_store
from moram_cli.tuner import MoramConfig, MoramLayer, MoramModel, SeqLoraModel

DATA = REPO / "moram_cli" / "demo_data" / "dbpedia" / "test.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-model", default=None, help="as for moram init; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--banks", default="1,4,16,64", help="bank counts for inference against the bare model")
    p.add_argument("--frozen-banks", type=int, default=8, help="earlier tasks' banks in the training step (one new bank trains)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per comparison; medians are reported")
    p.add_argument("--eval-examples", type=int, default=32, help="dbpedia test examples (the shipped sample) for eval throughput")
    p.add_argument("--data", type=Path, default=DATA, help="a labelled JSONL test file with labels.json beside it")
    p.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--results-name", default="speed")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each variant over `rounds` rounds, each round calling every variant once, after a warm-up call."""
    for run in variants.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def ratios(times: dict[str, float], reference: str) -> dict[str, float]:
    return {name: round(seconds / times[reference], 3) for name, seconds in times.items() if name != reference}


def random_bank(layers: dict[str, nn.Module], r: int, generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of one bank for every adapted module, drawn at random (the scale of trained ones)."""
    out = {}
    for name, layer in layers.items():
        d_in, d_out = layer.in_features, layer.out_features
        out[name] = (torch.randn(r, d_in, generator=generator) / d_in ** 0.5, torch.randn(d_out, r, generator=generator) * 0.02)
    return out


def layer_figures(width: int, batch: int, tokens: int, rounds: int, gate_scope: str, r: int = 8, k: int = 4, banks: int = 16) -> dict:
    """One width → width layer: MoRAM with `banks` frozen banks against PEFT LoRA (rank r) and a plain linear, forward
    without gradients; and the training pass (forward + backward) of one new bank on top of them against LoRA's."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, width, generator=generator)
    plain = nn.Linear(width, width, bias=False).requires_grad_(False)
    lora = LoraLinear(copy.deepcopy(plain), "default", LoraConfig(r=r, lora_alpha=r), r=r, lora_alpha=r)
    nn.init.normal_(lora.lora_B["default"].weight, std=0.02)
    moram = MoramLayer(copy.deepcopy(plain), "default", MoramConfig(r=r, k=k, gate_scope=gate_scope))
    A, B = random_bank({"layer": plain}, r * banks, generator)["layer"]
    moram.set_frozen(A, B, [r] * banks)
    moram.eval()
    with torch.no_grad():
        forward = interleaved({"linear": lambda: plain(x), "lora": lambda: lora(x), "moram": lambda: moram(x)}, rounds)
    moram.add_ranks(r, generator)
    moram.train()
    step = interleaved({"lora": lambda: lora(x).sum().backward(), "moram": lambda: moram(x).sum().backward()}, rounds)
    return {"width": width, "tokens": batch * tokens, "banks": banks, "forward_seconds": forward,
            "forward_vs_lora": round(forward["moram"] / forward["lora"], 3), "forward_vs_linear": round(forward["moram"] / forward["linear"], 3),
            "train_seconds": step, "train_vs_lora": round(step["moram"] / step["lora"], 3)}


class Models:
    """The store's base model three times: MoRAM, IncLoRA (MoRAM's layers without a gate) and PEFT LoRA."""

    def __init__(self, args: argparse.Namespace, store: MemoryStore) -> None:
        base, self.tokenizer = load_base_model(store.config.base_model, store.config.dtype)
        a = store.config.adapter
        self.r, self.generator = a.r, torch.Generator().manual_seed(0)
        config = MoramConfig(r=a.r, k=a.k, temperature=a.temperature, target_modules=a.target_modules, gate_scope=a.gate_scope)
        # lora_alpha = r, a scaling of 1, as `moram init --method lora` sets it.
        self.lora = SeqLoraModel(copy.deepcopy(base), LoraConfig(r=a.r, lora_alpha=a.r, target_modules=a.target_modules), "default")
        self.inclora = MoramModel(copy.deepcopy(base), MoramConfig(r=a.r, target_modules=a.target_modules, gate="none"), "default")
        self.moram = MoramModel(base, config, "default")
        self.ids = torch.randint(len(self.tokenizer), (args.batch, args.tokens), generator=self.generator)

    def memory(self, model: MoramModel, banks: int) -> None:
        """`banks` random banks; MoRAM's routed by task (random prototypes) too, a routing `unrouted()` switches off."""
        layers = model.moram_layers()
        model.set_memory(random_bank(layers, self.r * banks, self.generator), [dict.fromkeys(layers, self.r)] * banks)
        if model is self.inclora:
            # As `build_memory_model` does. Each call folds more random ranks into the same weights, which speed ignores.
            model.fold_frozen()
        if model is self.moram:
            prototypes = [{name: torch.randn(layer.in_features, generator=self.generator) for name, layer in layers.items()}
                          for _ in range(banks)]
            route_by_task(model, prototypes)

    def forward(self, model: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return model(input_ids=self.ids, logits_to_keep=1)
        return run

    def train_step(self, model: nn.Module, params: list[nn.Parameter]) -> Callable[[], object]:
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def run() -> None:
            model(input_ids=self.ids, labels=self.ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return run


def inference_figures(args: argparse.Namespace, models: Models) -> dict:
    """Inference with 1, 4, 16, 64 banks (MoRAM routed by token and by task, IncLoRA) against the bare model."""
    inference = {}
    for banks in [int(b) for b in args.banks.split(",")]:
        for model in (models.moram, models.inclora):
            models.memory(model, banks)
            model.eval()
        variants = {"bare": _bare(models.moram, models.forward(models.moram)), "moram": _unrouted(models.moram, models.forward(models.moram)),
                    "moram_task_routed": models.forward(models.moram), "inclora": models.forward(models.inclora)}
        times = interleaved(variants, args.rounds)
        inference[str(banks)] = {"seconds": times, "vs_bare": ratios(times, "bare")}
        _say(args, f"inference, {banks} banks: {inference[str(banks)]['vs_bare']}")
    return inference


def train_figures(args: argparse.Namespace, models: Models) -> dict:
    """A training step with `--frozen-banks` frozen banks and one new one against PEFT LoRA of the same trainable rank
    (last: the new ranks stay in the model)."""
    models.memory(models.moram, args.frozen_banks)  # training gates over every rank: the routing waits for inference
    moram_params = models.moram.add_task_ranks(models.r, seed=0)
    lora_params = models.lora.add_task_ranks(models.r, seed=0)
    models.moram.train()
    models.lora.train()
    times = interleaved({"lora": models.train_step(models.lora, lora_params), "moram": models.train_step(models.moram, moram_params)},
                        args.rounds)
    return {"frozen_banks": args.frozen_banks, "seconds": times, "vs_lora": ratios(times, "lora")}


def _unrouted(model: MoramModel, run: Callable[[], object]) -> Callable[[], object]:
    """`run` with every token gated over every rank (token routing, the baselines' and older stores')."""
    def token_routed() -> object:
        with model.unrouted():
            return run()
    return token_routed


def _bare(model: MoramModel, run: Callable[[], object]) -> Callable[[], object]:
    """`run` with the adapter layers and the router switched off: the bare base model, through the same wrapped modules
    (a router left on would run its first pass over the bare model too)."""
    def bare() -> object:
        model.disable_adapter_layers()
        try:
            with model.unrouted():
                return run()
        finally:
            model.enable_adapter_layers()
    return bare


def eval_figures(args: argparse.Namespace, models: Models) -> dict:
    """`moram eval`'s examples per second (ranked choice and generation, MoRAM with 4 banks) against one bare forward
    pass per example's prompt."""
    examples = read_examples(args.data, allow_text=False)[: args.eval_examples]
    prompts = [models.tokenizer(split_example(ex, models.tokenizer)[0], return_tensors="pt").input_ids for ex in examples]
    models.memory(models.moram, 4)
    model = models.moram

    def prompts_once() -> None:
        with torch.no_grad():
            for ids in prompts:
                model(input_ids=ids, logits_to_keep=1)

    def scoring(kind: str) -> Callable[[], object]:
        return lambda: evaluate_examples(model, models.tokenizer, examples, args.data, kind, 512)
    variants = {"bare_forward": _bare(model, prompts_once), "choice": scoring("choice"), "generate": scoring("generate")}
    times = interleaved(variants, max(1, args.rounds // 3))
    per_second = {name: round(len(examples) / seconds, 2) for name, seconds in times.items()}
    return {"examples": len(examples), "examples_per_second": per_second, "vs_bare_forward": ratios(times, "bare_forward")}


def speed(args: argparse.Namespace) -> dict:
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        init_store(Path(tmp) / "store", base_model=args.base_model)
        store = MemoryStore.open(Path(tmp) / "store")
        models = Models(args, store)
        width = next(iter(models.moram.moram_layers().values())).in_features
    layer = layer_figures(width, args.batch, args.tokens, args.rounds, store.config.adapter.gate_scope)
    _say(args, f"layer: {layer['forward_vs_lora']}x lora forward, {layer['train_vs_lora']}x lora training")
    result = {"model": store.config.base_model.source, "adapter": dataclasses.asdict(store.config.adapter), "batch": args.batch,
              "tokens": args.tokens, "rounds": args.rounds, "threads": torch.get_num_threads(), "tool_version": __version__,
              "layer": layer, "inference": inference_figures(args, models), "eval": eval_figures(args, models),
              "train_step": train_figures(args, models)}
    return result | {"wall_seconds": round(time.time() - started, 1)}


def markdown_report(result: dict) -> str:
    layer, train = result["layer"], result["train_step"]
    rows = [["layer forward, MoRAM (16 banks) / PEFT LoRA", f"{layer['forward_vs_lora']:.2f}"],
            ["layer forward, MoRAM (16 banks) / plain linear", f"{layer['forward_vs_linear']:.2f}"],
            ["layer forward + backward, MoRAM (16 frozen + 1 new) / PEFT LoRA", f"{layer['train_vs_lora']:.2f}"],
            [f"model training step, MoRAM ({train['frozen_banks']} frozen + 1 new) / PEFT LoRA", f"{train['vs_lora']['moram']:.2f}"]]
    for banks, figures in result["inference"].items():
        v = figures["vs_bare"]
        rows.append([f"model inference, {banks} bank(s): MoRAM (token routing), MoRAM (task routing), IncLoRA, each / bare",
                     f"{v['moram']:.2f}, {v['moram_task_routed']:.2f}, {v['inclora']:.2f}"])
    ev = result["eval"]
    rows.append([f"eval examples/s ({ev['examples']} dbpedia): bare forward, choice, generate",
                 ", ".join(f"{ev['examples_per_second'][k]:.1f}" for k in ("bare_forward", "choice", "generate"))])
    head = (f"{result['model']}, batch {result['batch']} × {result['tokens']} tokens, {result['threads']} threads, medians of "
            f"{result['rounds']} interleaved rounds; ratios below 1 are faster than the reference.")
    return head + "\n\n" + markdown_table(["figure", "ratio"], rows) + "\n"


def write_results(result: dict, args: argparse.Namespace) -> list[Path]:
    return write_reports(result, args.results_dir, args.results_name, markdown_report)


def main(argv: list[str] | None = None) -> int:
    return script_main(parse_args(argv), speed, write_results)


if __name__ == "__main__":
    sys.exit(main())
