"""`moram inspect-ranks`: static bank statistics, gate usage on data, the module filter, heatmaps and errors."""

from __future__ import annotations

import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import random_bank, snapshot
from moram_cli.cli import app
from moram_cli.inspection.gates import GateStats, collect_gates
from moram_cli.store import MemoryStore
from test_errors import fails_cleanly

runner = CliRunner()
MODULES = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "k_proj")]


def inspect(*args) -> dict:
    import json

    result = runner.invoke(app, ["inspect-ranks", *(str(a) for a in args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    """Two banks without training: "keys" with 4 random ranks per module, "blank" with 3 ranks whose values are zero."""
    path = tmp_path / "store"
    # Token routing: banks added without learn-task carry no task prototypes.
    assert runner.invoke(app, ["init", str(path), "--base-model", str(tiny_model_dir), "--r", "4", "--k", "3", "--routing", "token"]).exit_code == 0
    opened = MemoryStore.open(path)
    opened.add_bank("keys", random_bank(4, seed=0), {})
    opened.add_bank("blank", random_bank(3, seed=1, values=False), {})
    return path


def test_static_stats_count_ranks_parameters_and_dead_ranks(store):
    result = inspect(store)
    keys, blank = result["banks"]
    assert (keys["bank"], keys["task"], keys["ranks"], blank["ranks"]) == ("001-keys", "keys", 16, 12)
    assert keys["parameters"] == 2 * 4 * (32 + 32) + 2 * 4 * (32 + 16)
    assert keys["dead_ranks"] == 0 and blank["dead_ranks"] == 12
    assert blank["modules"][MODULES[0]]["dead_ranks"] == [0, 1, 2] and blank["value_norm"]["max"] == 0
    assert 0 < keys["key_norm"]["min"] <= keys["key_norm"]["mean"] <= keys["key_norm"]["max"]
    files = [p for p in store.rglob("*") if p.is_file()]
    assert result["totals"] == {"banks": 2, "ranks": 28, "parameters": keys["parameters"] + blank["parameters"], "dead_ranks": 12,
                                "disk_bytes": sum(p.stat().st_size for p in files)}
    assert "gates" not in result


def test_gate_usage_shares_add_up_and_ranks_for_99_percent_stay_within_the_budget(store, tiny_task):
    before = snapshot(store)
    gates = inspect(store, "--data", tiny_task.test, "--top", "3")["gates"]
    assert gates["tokens"] > 12 * 20 and sorted(gates["modules"]) == sorted(MODULES)
    for usage in gates["modules"].values():
        shares = [s for bank in usage["rank_share"].values() for s in bank]
        assert len(shares) == usage["ranks"] == 7 and sum(shares) == pytest.approx(1)
        assert sum(usage["bank_share"].values()) == pytest.approx(1)
        assert 1 <= usage["ranks_for_99_mass"] <= 3
        assert [t["share"] for t in usage["top"]] == sorted(shares, reverse=True)[:3]
        assert all(usage["rank_share"][t["bank"]][t["rank"]] == t["share"] for t in usage["top"])
        assert all(usage["rank_share"][bank][r] == 0 for bank, ranks in usage["never_selected"].items() for r in ranks)
    assert snapshot(store) == before


def test_a_single_bank_store_puts_all_gate_mass_on_it(tmp_path, tiny_model_dir, tiny_task):
    path = tmp_path / "one"
    assert runner.invoke(app, ["init", str(path), "--base-model", str(tiny_model_dir)]).exit_code == 0
    MemoryStore.open(path).add_bank("only", random_bank(8, seed=2), {})
    for usage in inspect(path, "--data", tiny_task.test)["gates"]["modules"].values():
        assert usage["bank_share"] == {"001-only": pytest.approx(1)}


def test_module_filter_matches_anywhere_in_the_name_with_wildcards(store, tiny_task):
    q_only = inspect(store, "--module", "q_proj", "--data", tiny_task.test, "--top", "1")
    assert sorted(q_only["banks"][0]["modules"]) == sorted(MODULES[::2]) and q_only["totals"]["ranks"] == 14
    assert sorted(q_only["gates"]["modules"]) == sorted(MODULES[::2])
    assert all(len(usage["top"]) == 1 for usage in q_only["gates"]["modules"].values())
    assert list(inspect(store, "--module", "layers.1.*k_proj")["banks"][1]["modules"]) == [MODULES[3]]
    fails_cleanly(["inspect-ranks", store, "--module", "v_proj"], store, "matches no adapted module")


def test_gate_statistics_are_running_totals():
    stats = GateStats(ranks=3, kept=2)
    stats.add(torch.tensor([[0.995, 0.005, 0.0], [0.5, 0.5, 0.0]]))
    stats.add(torch.tensor([[0.0, 0.0, 0.0]]))  # every rank thresholded away
    assert stats.mass.tolist() == pytest.approx([1.495, 0.505, 0.0]) and stats.selected.tolist() == [2, 2, 0]
    assert stats.tokens == 3 and stats.mean_ranks_for_mass == pytest.approx((1 + 2 + 0) / 3)


def test_collection_leaves_the_layers_as_it_found_them(store, tiny_task):
    from moram_cli.data.jsonl import read_examples
    from moram_cli.models.memory import build_memory_model

    model, tokenizer = build_memory_model(MemoryStore.open(store))
    stats = collect_gates(model, tokenizer, read_examples(tiny_task.test), batch_size=4, max_length=128)
    assert all(s.tokens == stats[MODULES[0]].tokens > 0 for s in stats.values())
    assert all(layer.gate_observer is None for layer in model.moram_layers().values())


def test_plot_writes_heatmaps(store, tiny_task, tmp_path):
    result = inspect(store, "--data", tiny_task.test, "--plot", tmp_path / "gates.png")
    assert result["plot"] == str(tmp_path / "gates.png")
    assert (tmp_path / "gates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = runner.invoke(app, ["inspect-ranks", str(store), "--data", str(tiny_task.test), "--plot", str(tmp_path / "again.png")])
    assert shown.exit_code == 0 and f"heatmaps written to {tmp_path / 'again.png'}" in shown.stdout
    fails_cleanly(["inspect-ranks", store, "--data", tiny_task.test, "--plot", tmp_path / "gates.xyz"], store, "cannot write the plot")


def test_plot_needs_data_and_matplotlib(store, tiny_task, tmp_path, monkeypatch):
    fails_cleanly(["inspect-ranks", store, "--plot", tmp_path / "p.png"], store, "--plot needs --data")
    fails_cleanly(["inspect-ranks", store, "--data", tiny_task.test, "--plot", tmp_path / "no" / "p.png"], store, "does not exist")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    fails_cleanly(["inspect-ranks", store, "--data", tiny_task.test, "--plot", tmp_path / "p.png"], store, "pip install 'moram[plot]'")
    assert not (tmp_path / "p.png").exists()


def test_tables_without_json(store, tiny_task):
    result = runner.invoke(app, ["inspect-ranks", str(store), "--data", str(tiny_task.test)])
    assert result.exit_code == 0, result.output
    assert "001-keys" in result.stdout and "gate usage" in result.stdout and "dead" in result.stdout


def test_missing_store_bad_data_and_empty_store(store, tmp_path, tiny_model_dir, tiny_task, write_jsonl):
    fails_cleanly(["inspect-ranks", tmp_path / "missing"], expect="not a moram store")
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    fails_cleanly(["inspect-ranks", store, "--data", bad], store, "bad.jsonl:1: invalid JSON")
    empty = tmp_path / "empty"
    assert runner.invoke(app, ["init", str(empty), "--base-model", str(tiny_model_dir)]).exit_code == 0
    assert inspect(empty)["totals"]["ranks"] == 0
    fails_cleanly(["inspect-ranks", empty, "--data", tiny_task.test], empty, "the store has no banks")
