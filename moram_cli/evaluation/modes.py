"""`run_eval`: the eval command's three modes, a JSONL test set, the continual-learning record, or an lm-eval suite."""

from __future__ import annotations

from pathlib import Path

from moram_cli.errors import MoramError
from moram_cli.evaluation.continual import continual_report

CL_SUITE = "cl"


def run_eval(
    store: Path,
    *,
    data: Path | None = None,
    suite: str | None = None,
    suite_path: Path | None = None,
    upto: int | None = None,
    base_only: bool = False,
    scoring: str = "auto",
    max_length: int | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    min_accuracy: float | None = None,
    max_forgetting: float | None = None,
    show_progress: bool = True,
    trust_remote_code: bool = False,
) -> dict:
    """Evaluate `store` on `data`, report its accuracy matrix (`suite="cl"`), or run an lm-eval suite; gates are checked for sense first."""
    continual = suite == CL_SUITE
    if (data is not None) + (suite is not None or suite_path is not None) != 1 or (continual and suite_path is not None):
        raise MoramError("give one of --data FILE.jsonl, --suite cl, or an lm-eval --suite NAME and/or --suite-path DIR")
    check_gate_flags(min_accuracy, max_forgetting, continual)
    if continual:
        if base_only:
            raise MoramError("--base-only does not apply to --suite cl: the zero-shot row of the matrix is the base model")
        return continual_report(store, upto)
    # The modes that run a model are imported when chosen: `--suite cl` only reads the banks' records and starts at once.
    if data is not None:
        from moram_cli.evaluation.evaluate import evaluate_store

        return evaluate_store(store, data, upto=upto, base_only=base_only, scoring=scoring, max_length=max_length,
                              show_progress=show_progress, trust_remote_code=trust_remote_code)
    from moram_cli.evaluation.harness import evaluate_suite

    return evaluate_suite(store, suite, suite_path, upto=upto, base_only=base_only, batch_size=batch_size, limit=limit,
                          max_length=max_length, trust_remote_code=trust_remote_code)


def check_gate_flags(min_accuracy: float | None, max_forgetting: float | None, continual: bool) -> None:
    """Refuse gates that cannot apply, before anything is measured."""
    if min_accuracy is not None and not 0 <= min_accuracy <= 1:
        raise MoramError(f"--min-accuracy {min_accuracy} is out of range; give an accuracy between 0 and 1")
    if max_forgetting is not None and not (continual and 0 <= max_forgetting <= 1):
        raise MoramError("--max-forgetting goes with --suite cl and takes an accuracy drop between 0 and 1, e.g. 0.05")

