"""`learn-task --launch`: run the same command again on several processes through `accelerate launch`.

The way TRL's command line does it: the argument list minus the launch
options, behind `accelerate launch --config_file ...`. The launcher replaces
this process, so its exit code is the command's.

A launched process that fails writes its one-line message and exit code into
a report folder (`MORAM_LAUNCH_STATUS`) instead of printing it, and exits
with the code, so torchrun still stops the other processes. The launcher,
run through `quiet_launch` below, then prints each distinct message once and
exits with the code, in place of torchrun's log lines and traceback.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from moram_cli.errors import STATUS_ENV, MoramError
from moram_cli.store.yamlio import read_yaml

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes" / "launch"
LAUNCH_OPTIONS = ("--launch", "--num-processes")


def shipped_recipes() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def launch_config(recipe: str) -> Path:
    """A shipped recipe by name (cpu-ddp, ddp, zero2, zero3), or an accelerate config file."""
    shipped = RECIPES_DIR / f"{recipe}.yaml"
    if shipped.is_file():
        return shipped
    if Path(recipe).is_file():
        return Path(recipe)
    raise MoramError(f"--launch {recipe}: no such launch recipe or file; the shipped recipes are {', '.join(shipped_recipes())}")


def without_launch_options(args: list[str]) -> list[str]:
    """`args` less `--launch X` and `--num-processes N` (also written `--launch=X`), so the processes do not launch again."""
    kept, skip_value = [], False
    for arg in args:
        option = arg.split("=", 1)[0]
        if not skip_value and option not in LAUNCH_OPTIONS:
            kept.append(arg)
        skip_value = arg in LAUNCH_OPTIONS
    return kept


def launch_argv(args: list[str], config_file: Path, config: dict, num_processes: int | None) -> list[str]:
    """The `accelerate launch` command line (through `quiet_launch`) that runs `moram <args>` on every process."""
    argv = [sys.executable, "-m", "moram_cli.training.launch", "--config_file", str(config_file)]
    if num_processes is not None:
        argv += ["--num_processes", str(num_processes)]
    if "main_process_port" not in config and config.get("num_machines", 1) == 1:
        # Port 0: accelerate picks a free one. On its fixed default, 29500, a second launch on the machine
        # warns and moves, or fails when both start at once.
        argv += ["--main_process_port", "0"]
    return [*argv, "-m", "moram_cli", *without_launch_options(args)]


def launch_env(config: dict) -> dict[str, str]:
    """The launcher's environment: a fresh report folder for the processes' failures, and the config's use_cpu."""
    env = os.environ | {STATUS_ENV: tempfile.mkdtemp(prefix="moram-launch-")}
    if config.get("use_cpu"):
        # accelerate does not pass a config's use_cpu on to multi-process launches; the processes read this instead.
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def relaunch(args: list[str], recipe: str | None, num_processes: int | None, check: Callable[[int], None]) -> NoReturn:
    """Replace this process with `accelerate launch` running `moram <args>` under the recipe.

    `check(processes)` first raises what the processes would each fail on.
    """
    if recipe is None:
        raise MoramError("--num-processes needs --launch NAME|FILE (a launch recipe or an accelerate config file)")
    config_file = launch_config(recipe)
    config = read_yaml(config_file, "launch config", "pass an accelerate config file, or a shipped recipe by name")
    processes = config.get("num_processes", 1) if num_processes is None else num_processes
    if not isinstance(processes, int) or processes < 1:
        raise MoramError(f"--launch {recipe}: the process count is left open or below 1; pass --num-processes N (one per GPU)")
    check(processes)
    argv, env = launch_argv(args, config_file, config, num_processes), launch_env(config)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


def quiet_launch(argv: list[str]) -> NoReturn:
    """`accelerate launch argv`; when processes failed with a report, their messages (each once) and code instead of torchrun's."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    # torchrun logs every failed process and the SIGTERM it sends the others; the reports say what went wrong.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    folder = Path(os.environ[STATUS_ENV])
    try:
        launch_command(launch_command_parser().parse_args(argv))
        code = 0
    except (Exception, KeyboardInterrupt):
        reports = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(folder.glob("process-*.json"))]
        if not reports:  # a crash or a kill: torchrun's account is all there is
            raise
        for message in dict.fromkeys(report["message"] for report in reports):
            print(message, file=sys.stderr)
        code = max(report["code"] for report in reports)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    quiet_launch(sys.argv[1:])
