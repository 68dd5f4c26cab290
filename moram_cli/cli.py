"""The `moram` command line: a thin layer mapping flags to the library's command functions."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from moram_cli import __version__
from moram_cli.command_line import MoramCommand, MoramGroup, fail
from moram_cli.command_signals import signals_as_interrupt
from moram_cli.entry import INTERRUPTED, work_done
from moram_cli.errors import FollowsAnotherProcess, GateViolation, MoramError
from moram_cli.reporting import console, eval_tables, learn_table

app = typer.Typer(
    name="moram",
    help="Continual learning for language models: teach one base model task after task without forgetting. "
    "Each task adds rank-1 experts (MoRAM) to an on-disk memory store; old ones stay frozen.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=MoramGroup,
)

StoreArg = Annotated[Path, typer.Argument(help="The memory store directory.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for scripts).")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Run Python code shipped with the base model (custom architectures on the Hub). Off by default: read that code first.")]


def run(command: Callable[..., dict], *args, **kwargs) -> dict:
    """Run a command function; a MoramError becomes one line on stderr and exit code 2, a GateViolation exit code 1."""
    _quiet_libraries()
    try:
        with signals_as_interrupt():
            result = command(*args, **kwargs)
    except MoramError as err:
        fail(f"error: {err}", MoramError.exit_code, follows=isinstance(err, FollowsAnotherProcess))
    except GateViolation as err:
        fail(f"gate failed: {err}", GateViolation.exit_code)
    except KeyboardInterrupt as interrupt:
        # learn-task's message (if any) says where its resume data is. Under --launch this is also torchrun
        # stopping the others after one process failed, whose message is then the one to print.
        fail("; ".join([INTERRUPTED, *map(str, interrupt.args)]), 130, follows=True)
    work_done()
    return result


def _quiet_libraries() -> None:
    """Library chatter (progress bars, accelerator notices) would bury moram's own output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # transformers reads these when first imported, which only commands that build a model do: importing it here to
    # quieten it cost the others seconds. One imported already (app() called from Python) is told directly.
    if "transformers" in sys.modules:
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


@app.command(cls=MoramCommand)
def init(
    store: StoreArg,
    base_model: Annotated[Optional[str], typer.Option(help="Hugging Face hub id, local model directory or .gguf file. Default: the embedded SmolLM2-135M-Instruct.")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML recipe with 'adapter:' and 'training:' sections (see recipes/init/); flags below override it.")] = None,
    method: Annotated[Optional[str], typer.Option(help="moram; or a baseline on the same code path: lora (one LoRA adapter of rank r trained task after task, SeqLoRA) or inclora (r new LoRA ranks per task, old ones frozen, summed without a gate). Default: moram.")] = None,
    r: Annotated[Optional[int], typer.Option("--r", help="New rank-1 experts per adapted module per task (lora: the adapter's rank). Default: 8.")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Activation budget: ranks kept by the gate per token, at least 1; the gate always mixes 2 or more, so 1 acts as 2. Default: 4.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Softmax temperature of the gate. Default: 0.03.")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Inference-time pruning: ranks with normalised score below this are off. Default: 0.")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout on the adapter input. Default: 0.")] = None,
    target_modules: Annotated[Optional[str], typer.Option(help="Comma-separated module names to adapt, or 'all-linear'. Default: q_proj,k_proj.")] = None,
    key_init: Annotated[Optional[str], typer.Option(help="How each later task's new experts' keys start: data (the top principal directions of the task's own inputs outside the old keys' span; on the README's probe the second task learned 0.365 against 0.292 at random), kaiming (at random, the method as written) or warm (copies of the previous bank's keys, as the authors' LLM code). The first task always starts at random. Default: data (moram), kaiming (baselines).")] = None,
    routing: Annotated[Optional[str], typer.Option(help="task: at inference each input is answered by the banks up to the task it resembles most (each bank records its task's mean inputs), so a later task cannot take over an earlier one's inputs (on the README's probe BWT went from -0.115 to 0.000); token: every rank competes for every token, the method as written. Training always gates over every rank. Default: task (moram), token (baselines).")] = None,
    gate_scope: Annotated[Optional[str], typer.Option(help="Over which experts the gate runs: bank (each task's bank gates its own experts, k of them, and the banks' outputs add up, so a new task's experts never compete with trained ones for a place; on the README's long benchmark it averaged 0.480 against 0.437 for all, ahead at five seeds of five), all (every expert competes for the k places, the method as written), task (each task is learned on the bare model plus its own bank, and each input is answered by its nearest task's bank alone; needs --routing task; 0.461 against 0.484 for bank on the same benchmark, three seeds) or weighted (as bank, and each task learns a gain per earlier bank by which its answers weigh that bank's output, so it can turn down banks that hinder it; needs --routing task; the gains train at the recipe's gain_lr, 5e-2; 0.492 against 0.484 for bank on generated answers, the same by choice, three seeds). Default: bank (moram), all (baselines).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Base model dtype: float32, bfloat16 or float16. Default: float32.")] = None,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Create an empty memory store for a base model.

    The store records the base model (with a fingerprint, so it never runs on a
    changed model), the MoRAM settings, and default training settings that
    learn-task flags can override. Refuses an existing non-empty directory.
    """
    from moram_cli.store.init import init_store

    modules = None if target_modules is None else (target_modules if target_modules == "all-linear" else target_modules.split(","))
    result = run(init_store, store, base_model=base_model, recipe=recipe, dtype=dtype, method=method, trust_remote_code=trust_remote_code,
                 r=r, k=k, temperature=temperature, threshold=threshold, dropout=dropout, target_modules=modules, key_init=key_init, routing=routing,
                 gate_scope=gate_scope)
    if as_json:
        emit(result, True, None)
    else:
        bm = result["base_model"]
        console.print(f"created store [bold]{store}[/] on {bm['kind']} model {bm['source']} ({bm['fingerprint'][:12]})")


@app.command("learn-task", cls=MoramCommand)
def learn_task_command(
    store: StoreArg,
    data: Annotated[Path, typer.Option(help="Training data, JSONL: {prompt, completion}, {messages} or {text} per line.", show_default=False)],
    name: Annotated[Optional[str], typer.Option(help="Task name. Default: the data file's name, or its folder's for train.jsonl.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the data (fractions allowed). Default: the store's, 1.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate. Default: the store's lr (2e-3) for the first task, its later_lr (5e-4) for every later one.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per optimiser step (the global batch, split over processes and --grad-accum). Default: the store's, 8.")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Token limit per example; longer prompts are cut in the middle. Default: the store's, 512.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for new-rank initialisation and data order. Default: the store's, 0.")] = None,
    lr_schedule: Annotated[Optional[str], typer.Option(help="constant, or cosine (decays to zero at the last step). Default: the store's, constant.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Gradient accumulation steps per optimiser step. Default: the store's, 1.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (bf16 autocast on a GPU that supports it, else fp32), fp32 or bf16. Default: the store's, auto.")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing", help="Recompute activations in the backward pass: less memory, slower. Default: the store's, off.", show_default=False)] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimiser steps, even if --epochs asks for more. Default: no limit.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Save resume data every N steps (0: only on Ctrl-C or SIGTERM). Default: the store's, 50.")] = None,
    max_grad_norm: Annotated[Optional[float], typer.Option(help="Clip the new ranks' gradient to this norm. Default: the store's, off.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue this task's interrupted run from its last checkpoint, with its settings; clears the lock it left when its process is gone from this machine.")] = False,
    launch: Annotated[Optional[str], typer.Option(help="Run on several processes through accelerate launch: a shipped recipe (cpu-ddp, ddp, zero2, zero3) or an accelerate config file.")] = None,
    num_processes: Annotated[Optional[int], typer.Option(help="With --launch: how many processes (one per GPU). Default: the recipe's.")] = None,
    collective_timeout: Annotated[Optional[float], typer.Option(help="With several processes: seconds one waits for the others at a collective operation (a broadcast, a gradient reduction) before the run stops with an error instead of hanging. Default: 1800, room for one process loading a large model far behind the others.", show_default=False)] = None,
    eval_data: Annotated[Optional[Path], typer.Option(help="Test set of this task: evaluated after training and recorded in the bank.")] = None,
    break_lock: Annotated[bool, typer.Option("--break-lock", help="First clear a lock left by a learn-task that was killed or crashed (one still running on this machine is never broken).")] = False,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Teach the store one new task: add fresh rank-1 experts and train only them.

    Loads the base model and all existing banks (frozen), adds r new experts per
    adapted module, trains them on the --data file (loss on completion tokens only) and
    writes them as a new bank. The store changes only when training finished.
    Ctrl-C or SIGTERM saves resume data after the current step; --resume goes on from there.
    """
    from moram_cli.training.distributed import is_main_process
    from moram_cli.training.learn import check_before_launch, learn_task

    options = dict(name=name, eval_data=eval_data, break_lock=break_lock, resume=resume, trust_remote_code=trust_remote_code,
                   epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed, lr_schedule=lr_schedule,
                   grad_accum=grad_accum, precision=precision, gradient_checkpointing=gradient_checkpointing,
                   max_steps=max_steps, checkpoint_every=checkpoint_every, max_grad_norm=max_grad_norm,
                   collective_timeout=collective_timeout)
    if launch is not None or num_processes is not None:
        from moram_cli.training.launch import relaunch

        run(relaunch, sys.argv[1:], launch, num_processes, partial(check_before_launch, store, data, **options))
    result = run(learn_task, store, data, show_progress=not as_json, **options)
    if is_main_process():  # every process of a launch returns the summary; one prints it
        emit(result, as_json, learn_table)


@app.command("eval", cls=MoramCommand)
def eval_command(
    store: StoreArg,
    data: Annotated[Optional[Path], typer.Option(help="Test data, JSONL with {prompt, completion} or {messages} per line.", show_default=False)] = None,
    suite: Annotated[Optional[str], typer.Option(help="cl: the accuracy matrix recorded by learn-task --eval-data, with average accuracy, BWT, FWT and forgetting (nothing is run). Any other name: that lm-evaluation-harness task, e.g. mmlu (needs pip install 'moram\\[harness]').", show_default=False)] = None,
    suite_path: Annotated[Optional[Path], typer.Option(help="Folder of lm-eval task YAMLs over local files (relative data paths are read from it): runs its tasks, or the --suite task in it. Example: moram_cli/suites/tiny_topic.", show_default=False)] = None,
    scoring: Annotated[str, typer.Option(help="auto: ranked choice when completions form a label set (labels.json beside the file, or few repeated answers), else exact match of greedy generation; or force choice/generate.")] = "auto",
    upto: Annotated[Optional[int], typer.Option(help="Evaluate the store as it was after its first N banks.")] = None,
    base_only: Annotated[bool, typer.Option("--base-only", help="Evaluate the bare base model (same as --upto 0).")] = False,
    max_length: Annotated[Optional[int], typer.Option(help="Token limit per prompt + answer. Default: the store's max_length.")] = None,
    batch_size: Annotated[int, typer.Option(help="lm-eval suites: requests per forward pass.")] = 8,
    limit: Annotated[Optional[int], typer.Option(help="lm-eval suites: score only the first N documents of each task.", show_default=False)] = None,
    min_accuracy: Annotated[Optional[float], typer.Option(help="CI gate: exit 1 unless the accuracy (--data), the average accuracy (--suite cl) or every task's acc (lm-eval) reaches this.", show_default=False)] = None,
    max_forgetting: Annotated[Optional[float], typer.Option(help="CI gate with --suite cl: exit 1 when any task's forgetting exceeds this.", show_default=False)] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the result as a Markdown table (for reports).")] = False,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure the store: accuracy on a test set, the continual-learning matrix, or an lm-eval suite.

    Give one of --data, --suite cl, or --suite NAME / --suite-path DIR. A
    failed --min-accuracy or --max-forgetting gate exits with code 1 after
    printing the result; usage and input errors exit with 2.
    """
    from moram_cli.evaluation.ci_gates import check_gates
    from moram_cli.evaluation.modes import run_eval
    from moram_cli.markdown import eval_markdown

    result = run(run_eval, store, data=data, suite=suite, suite_path=suite_path, upto=upto, base_only=base_only, scoring=scoring,
                 max_length=max_length, batch_size=batch_size, limit=limit, min_accuracy=min_accuracy,
                 max_forgetting=max_forgetting, show_progress=not as_json, trust_remote_code=trust_remote_code)
    if markdown and not as_json:
        typer.echo(eval_markdown(result))
    else:
        emit(result, as_json, eval_tables)
    run(check_gates, result, min_accuracy, max_forgetting)


@app.command(cls=MoramCommand)
def verify(store: StoreArg, as_json: JsonOpt = False) -> None:
    """Check a store's files without loading a model.

    Checks the store format version and, for every bank, that its files are
    there, its weights match their recorded sha256 and read as safetensors,
    every module has keys A (r x d_in) and values B (d_out x r) that fit each
    other and the other banks, its metadata agrees with its directory, and the
    banks are numbered 001..N. Leftovers of interrupted writes and a lock are
    warnings. Exits 0 when all is well; otherwise prints the table, then the
    first problem as the error (exit 2); --json lists every problem.
    """
    from moram_cli.reporting import verify_table
    from moram_cli.store.verify import require_healthy, verify_store

    result = run(verify_store, store)
    emit(result, as_json, verify_table)
    run(require_healthy, result)


@app.command("inspect-ranks", cls=MoramCommand)
def inspect_ranks_command(
    store: StoreArg,
    data: Annotated[Optional[Path], typer.Option(help="JSONL examples to run the store on: reports how the gate uses each rank (loads the model).")] = None,
    module: Annotated[Optional[str], typer.Option(help="Only modules whose name contains this shell-style pattern, e.g. q_proj or 'layers.1\\[0-5].*k_proj'. Default: all.")] = None,
    top: Annotated[int, typer.Option(help="With --data: how many of the busiest ranks to list per module.")] = 5,
    plot: Annotated[Optional[Path], typer.Option(help="With --data: write heatmaps (bank reuse and ranks for 99% of the gate mass, per layer) to this .png; needs matplotlib: pip install 'moram\\[plot]'.")] = None,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Show what the store's rank-1 experts hold and, with --data, how the gate uses them.

    Without --data, reads only the bank files: ranks, parameters, key and value
    norms and dead ranks (value norm <= 1e-6) per bank and module, and the
    store's size. With --data, runs the model over the examples and reports per
    module the ranks carrying 99% of each token's gate mass, each bank's share
    of the gate mass, the busiest ranks and the ranks never selected.
    """
    from moram_cli.inspection.inspect import inspect_ranks
    from moram_cli.reporting import inspect_tables

    result = run(inspect_ranks, store, data=data, module=module, top=top, plot=plot, trust_remote_code=trust_remote_code)
    emit(result, as_json, inspect_tables)


@app.command(cls=MoramCommand)
def merge(
    out: Annotated[Path, typer.Argument(help="The new store to write (must not exist, or be an empty directory).", show_default=False)],
    sources: Annotated[list[Path], typer.Argument(help="The stores to merge, in order; they are only read.", show_default=False)],
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated task names: merge only those banks. Default: all.")] = None,
    prune_below: Annotated[Optional[float], typer.Option(help="Drop ranks holding less than this share (0-1) of their module's gate mass on --data.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="With --prune-below: calibration examples (JSONL) on which the gate mass is measured.")] = None,
    eval_data: Annotated[Optional[Path], typer.Option(help="With --prune-below: test set scored before and after pruning.")] = None,
    routing: Annotated[Optional[str], typer.Option(help="source: each input is answered by the banks of one source store, picked by their experts' gate scores (default for moram stores); token: all ranks compete for every token, and the merged store can learn further tasks.")] = None,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Merge the banks of several stores into a new store.

    The sources must share the base model, target modules, k, temperature and
    method; the new store takes the first source's settings. Banks with
    identical weights are stored once; a task name already taken gets a suffix
    (-2, -3, ...). Each bank records where it came from. The new store appears
    only when complete. By default each input is answered by the banks of the
    one source its experts pick (--routing source); such a store learns no
    further tasks.
    """
    from moram_cli.curation.merge import merge_stores
    from moram_cli.reporting import merge_table

    picked = None if tasks is None else [t.strip() for t in tasks.split(",") if t.strip()]
    result = run(merge_stores, out, sources, tasks=picked, prune_below=prune_below, data=data, eval_data=eval_data,
                 routing=routing, show_progress=not as_json, trust_remote_code=trust_remote_code)
    emit(result, as_json, merge_table)


@app.command("generate", cls=MoramCommand)
def generate_command(
    store: StoreArg,
    prompt: Annotated[Optional[str], typer.Option(help="Text to continue, as given (no chat template is applied).", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option(help="JSONL examples, read as eval reads them: continues each line's prompt ({prompt, completion}), or its messages before the last one through the chat template ({messages}).", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate per prompt.")] = 64,
    upto: Annotated[Optional[int], typer.Option(help="Use the store as it was after its first N banks (0: the bare base model).", show_default=False)] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Token limit per prompt + generated text; longer prompts are cut in the middle. Default: the store's max_length.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="With --data: prompts generated together.")] = 8,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Continue a prompt, or every prompt of a JSONL file, with the store's model (greedy decoding).

    Give exactly one of --prompt or --data. The model is the one eval scores:
    every bank (or the first --upto N), in inference mode, threshold applied.
    --json prints the store, the banks used and one {prompt, completion}
    record per prompt, in file order.
    """
    from moram_cli.evaluation.generation import generate_completions
    from moram_cli.reporting import generate_table

    result = run(generate_completions, store, prompt=prompt, data=data, upto=upto, max_new_tokens=max_new_tokens, max_length=max_length,
                 batch_size=batch_size, show_progress=not as_json, trust_remote_code=trust_remote_code)
    emit(result, as_json, generate_table)


@app.command(cls=MoramCommand)
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
