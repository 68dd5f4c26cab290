"""`learn-task --launch`: run the same command again on several processes through `accelerate launch`.

The way TRL's command line does it: the argument list minus the launch
options, behind `accelerate launch --config_file ...`. The launcher replaces
this process, so its exit code is the command's.

A launched process that fails writes its one-line message and exit code into
a report folder (`MORAM_LAUNCH_STATUS`) instead of printing it, and exits
with the code, so torchrun still stops the other processes. The launcher,
run through `quiet_launch` below, then prints the one message that says why
(the failure the others followed, or the signal that killed a process) and
exits with its code, in place of torchrun's log lines and traceback.
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
from typing import TYPE_CHECKING, NoReturn

from moram_cli.errors import STATUS_ENV, MoramError
from moram_cli.store.yamlio import read_yaml

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

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
    """`accelerate launch argv`; when processes failed, one line and exit code for all of them instead of torchrun's report."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun logs every failed process and the SIGTERM it sends the others; the reports say what went wrong.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    folder = Path(os.environ[STATUS_ENV])
    try:
        launch_command(launch_command_parser().parse_args(argv))
        code = 0
    except (Exception, KeyboardInterrupt) as err:
        failure = launch_failure(err.failures if isinstance(err, ChildFailedError) else {}, read_reports(folder))
        if failure is None:  # a crash: torchrun's account, and the process's own traceback, are all there is
            raise
        message, code = failure
        print(message, file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    sys.exit(code)


def read_reports(folder: Path) -> dict[int, dict]:
    """Process index -> the failure it reported (moram_cli.errors.report_failure)."""
    return {int(path.stem.removeprefix("process-")): json.loads(path.read_text(encoding="utf-8"))
            for path in folder.glob("process-*.json")}


def launch_failure(ended: dict[int, ProcessFailure], reports: dict[int, dict]) -> tuple[str, int] | None:
    """The one line and exit code that say why a launch failed; None for a crash (a bug), whose traceback stands.

    `ended` is torchrun's account of the processes that ended with an error.
    The first of them to end that failed on its own (its report says so) or
    was killed (a signal, and no report) is the cause: the others only
    followed it. When all of them followed (Ctrl-C reaches every process),
    the first report is the line.
    """
    first_ended = sorted(ended, key=lambda process: ended[process].timestamp)
    for process in dict.fromkeys([*first_ended, *sorted(reports)]):
        report = reports.get(process)
        if report is None:
            return None if ended[process].exitcode > 0 else (killed(process, ended[process].signal_name()), MoramError.exit_code)
        if not report["follows"]:
            return report["message"], report["code"]
    if not reports:
        return None
    report = reports[min(reports)]
    return report["message"], report["code"]


def killed(process: int, signal_name: str) -> str:
    # The kernel's out-of-memory killer sends SIGKILL: the likeliest sender when nobody did.
    cause = " (killed, or out of memory)" if signal_name == "SIGKILL" else ""
    return (f"error: process {process} died of {signal_name}{cause}, and the launch stopped the others; "
            "rerun learn-task, with --resume if it saved a checkpoint")


if __name__ == "__main__":
    quiet_launch(sys.argv[1:])
