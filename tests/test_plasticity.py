"""A smoke run of bench/plasticity.py on the tiny model and two tiny tasks: every option, the outputs, and resuming from
the stage records alone."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"


@pytest.fixture(scope="module")
def probe():
    sys.path.insert(0, str(BENCH))  # the probe imports the benchmark's stage code as a sibling module
    spec = importlib.util.spec_from_file_location("plasticity", BENCH / "plasticity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(probe, tmp_path, tasks_dir, tiny_model_dir, options: str) -> dict:
    argv = ["--tasks-dir", str(tasks_dir), "--order", "one,two", "--base-model", str(tiny_model_dir), "--n-train", "8", "--n-dev", "4",
            "--r", "2", "--batch-size", "4", "--target-modules", "q_proj,k_proj", "--seeds", "0,1", "--options", options,
            "--work-dir", str(tmp_path / "work"), "--stages-dir", str(tmp_path / "stages"), "--results-dir", str(tmp_path / "results"),
            "--quiet"]
    assert probe.main(argv) == 0
    return json.loads((tmp_path / "results" / "plasticity.json").read_text())


def test_the_probe_measures_every_option_and_resumes_from_stage_records_alone(probe, tmp_path, tasks_dir, tiny_model_dir, monkeypatch):
    result = run(probe, tmp_path, tasks_dir, tiny_model_dir, "kaiming,data,seqlora,inclora")
    options = result["options"]
    assert set(options) == {"kaiming", "data", "seqlora", "inclora"} and result["seeds"] == [0, 1]
    for name in ("kaiming", "data"):
        assert set(options[name]["seeds"]) == {"0", "1"} and 0 <= options[name]["own_share"] <= 1
        assert 0 <= options[name]["dead_fraction"] <= 1 and options[name]["later_diag_vs_inclora"]["pairs"] == 2
    assert "own_share" not in options["seqlora"] and "later_diag_vs_seqlora" not in options["seqlora"]
    # kaiming and data share the first task's stage: they differ from the second task on.
    stages = sorted(p.name for p in (tmp_path / "stages").iterdir())
    assert len([s for s in stages if s.startswith("first-moram")]) == 2 and len([s for s in stages if s.startswith("trial-")]) == 8
    assert options["kaiming"]["first_diag"] == options["data"]["first_diag"]
    assert "| option | first task | later R[j][j] |" in (tmp_path / "results" / "plasticity.md").read_text()
    assert (tmp_path / "results" / "plasticity.png").stat().st_size > 0

    # Another session: no stores, no data samples; nothing trains and the results come back the same.
    shutil.rmtree(tmp_path / "work")
    monkeypatch.setattr(probe, "learn_task", lambda *a, **k: pytest.fail("a finished stage trained again"), raising=False)
    monkeypatch.setattr(probe.Probe, "learn", lambda *a, **k: pytest.fail("a finished stage trained again"))
    again = run(probe, tmp_path, tasks_dir, tiny_model_dir, "kaiming,data,seqlora,inclora")
    assert again["options"] == options
