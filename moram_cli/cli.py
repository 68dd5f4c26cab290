"""The `moram` command line: a thin layer mapping flags to the library's command functions."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from moram_cli import __version__
from moram_cli.errors import MoramError
from moram_cli.reporting import console, eval_table, learn_table

app = typer.Typer(
    name="moram",
    help="Continual learning for language models: teach one base model task after task without forgetting. "
    "Each task adds rank-1 experts (MoRAM) to an on-disk memory store; old ones stay frozen.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

StoreArg = Annotated[Path, typer.Argument(help="The memory store directory.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for scripts).")]


def run(command: Callable[..., dict], *args, **kwargs) -> dict:
    """Run a command function; a MoramError becomes one line on stderr and exit code 2."""
    _quiet_libraries()
    try:
        return command(*args, **kwargs)
    except MoramError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(MoramError.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; the store is unchanged", err=True)
        raise typer.Exit(130) from None


def _quiet_libraries() -> None:
    """Library chatter (progress bars, accelerator notices) would bury moram's own output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def emit(result: dict, as_json: bool, table) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        console.print(table(result))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moram {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """Continual learning for language models with incremental rank-1 associative memory experts."""


@app.command()
def init(
    store: StoreArg,
    base_model: Annotated[Optional[str], typer.Option(help="Hugging Face hub id, local model directory or .gguf file. Default: the embedded SmolLM2-135M-Instruct.")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML recipe with 'adapter:' and 'training:' sections (see recipes/); flags below override it.")] = None,
    r: Annotated[Optional[int], typer.Option("--r", help="New rank-1 experts per adapted module per task. Default: 8.")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Activation budget: ranks kept by the gate per token (at least 2). Default: 4.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Softmax temperature of the gate. Default: 0.03.")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Inference-time pruning: ranks with normalised score below this are off. Default: 0.")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout on the adapter input. Default: 0.")] = None,
    target_modules: Annotated[Optional[str], typer.Option(help="Comma-separated module names to adapt, or 'all-linear'. Default: q_proj,k_proj.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Base model dtype: float32, bfloat16 or float16. Default: float32.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an empty memory store for a base model.

    The store records the base model (with a fingerprint, so it never runs on a
    changed model), the MoRAM settings, and default training settings that
    learn-task flags can override. Refuses an existing non-empty directory.
    """
    from moram_cli.store.init import init_store

    modules = None if target_modules is None else (target_modules if target_modules == "all-linear" else target_modules.split(","))
    result = run(init_store, store, base_model=base_model, recipe=recipe, dtype=dtype, r=r, k=k, temperature=temperature,
                 threshold=threshold, dropout=dropout, target_modules=modules)
    if as_json:
        emit(result, True, None)
    else:
        bm = result["base_model"]
        console.print(f"created store [bold]{store}[/] on {bm['kind']} model {bm['source']} ({bm['fingerprint'][:12]})")


@app.command("learn-task")
def learn_task_command(
    store: StoreArg,
    data: Annotated[Path, typer.Option(help="Training data, JSONL: {prompt, completion}, {messages} or {text} per line.", show_default=False)],
    name: Annotated[Optional[str], typer.Option(help="Task name. Default: the data file's name, or its folder's for train.jsonl.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the data (fractions allowed). Default: the store's, 1.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate. Default: the store's, 2e-3.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per optimiser step. Default: the store's, 8.")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Token limit per example; longer prompts are cut in the middle. Default: the store's, 512.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for new-rank initialisation and data order. Default: the store's, 0.")] = None,
    lr_schedule: Annotated[Optional[str], typer.Option(help="constant, or cosine (decays to zero at the last step). Default: the store's, constant.")] = None,
    eval_data: Annotated[Optional[Path], typer.Option(help="Test set of this task: evaluated after training and recorded in the bank.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Teach the store one new task: add fresh rank-1 experts and train only them.

    Loads the base model and all existing banks (frozen), adds r new experts per
    adapted module, trains them on the --data file (loss on completion tokens only) and
    writes them as a new bank. The store changes only when training finished.
    """
    from moram_cli.training.learn import learn_task

    result = run(learn_task, store, data, name=name, eval_data=eval_data, show_progress=not as_json, epochs=epochs,
                 lr=lr, batch_size=batch_size, max_length=max_length, seed=seed, lr_schedule=lr_schedule)
    emit(result, as_json, learn_table)


@app.command("eval")
def eval_command(
    store: StoreArg,
    data: Annotated[Path, typer.Option(help="Test data, JSONL with {prompt, completion} or {messages} per line.", show_default=False)],
    scoring: Annotated[str, typer.Option(help="auto: ranked choice when completions form a label set (labels.json beside the file, or few repeated answers), else exact match of greedy generation; or force choice/generate.")] = "auto",
    upto: Annotated[Optional[int], typer.Option(help="Evaluate the store as it was after its first N banks.")] = None,
    base_only: Annotated[bool, typer.Option("--base-only", help="Evaluate the bare base model (same as --upto 0).")] = False,
    max_length: Annotated[Optional[int], typer.Option(help="Token limit per prompt + answer. Default: the store's max_length.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure accuracy of the store on a test set."""
    from moram_cli.evaluation.evaluate import evaluate_store

    result = run(evaluate_store, store, data, upto=upto, base_only=base_only, scoring=scoring, max_length=max_length, show_progress=not as_json)
    emit(result, as_json, eval_table)


@app.command()
def demo(
    store: Annotated[Path, typer.Argument(help="Where to create the demo store (must not exist).")] = Path("demo-store"),
    as_json: JsonOpt = False,
) -> None:
    """Run the two-task continual-learning demo (dbpedia, then amazon) on the embedded model.

    Prints accuracy on both tasks zero-shot, after task 1 and after task 2.
    Uses the data sample shipped with moram (300 training and 100 test examples per task); takes about 10 minutes on 2 CPU cores.
    """
    from moram_cli.demo import run_demo

    result = run(run_demo, store, show_progress=not as_json)
    if as_json:
        emit(result, True, None)


def main() -> None:
    app(prog_name="moram")


if __name__ == "__main__":
    sys.exit(main())
