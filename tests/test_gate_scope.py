"""`gate_scope`: a store whose banks gate their own experts (init, old stores, the model it builds)."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import random_bank
from moram_cli.cli import app
from moram_cli.errors import MoramError
from moram_cli.models.memory import build_memory_model
from moram_cli.store import MemoryStore
from moram_cli.store.init import init_store

Q0 = "model.layers.0.self_attn.q_proj"


def test_init_sets_gate_scope_for_moram_and_refuses_it_for_baselines(tmp_path, tiny_model_dir):
    assert init_store(tmp_path / "m", base_model=str(tiny_model_dir), gate_scope="bank")["adapter"]["gate_scope"] == "bank"
    assert init_store(tmp_path / "i", base_model=str(tiny_model_dir), method="inclora")["adapter"]["gate_scope"] == "all"
    with pytest.raises(MoramError, match="--gate-scope bank needs method moram"):
        init_store(tmp_path / "l", base_model=str(tiny_model_dir), method="lora", gate_scope="bank")
    result = CliRunner().invoke(app, ["init", str(tmp_path / "bad"), "--base-model", str(tiny_model_dir), "--gate-scope", "rank"])
    assert result.exit_code == 2 and "invalid --gate-scope 'rank'; use one of all, bank" in result.output
    assert not (tmp_path / "bad").exists()


def test_a_store_written_before_gate_scope_gates_over_all_ranks(tmp_path, tiny_model_dir):
    init_store(tmp_path / "old", base_model=str(tiny_model_dir))
    config = yaml.safe_load((tmp_path / "old" / "store.yaml").read_text())
    del config["adapter"]["gate_scope"]
    (tmp_path / "old" / "store.yaml").write_text(yaml.safe_dump(config))
    assert MemoryStore.open(tmp_path / "old").config.adapter.gate_scope == "all"


def test_the_model_knows_each_banks_ranks_frozen_and_new(tmp_path, tiny_model_dir):
    init_store(tmp_path / "s", base_model=str(tiny_model_dir), r=4, k=2, gate_scope="bank", routing="token")
    store = MemoryStore.open(tmp_path / "s")
    for name, seed in (("one", 1), ("two", 2)):
        store.add_bank(name, random_bank(4, seed), {})
    model, _ = build_memory_model(store)
    layer = model.moram_layers()[Q0]
    assert layer.config.gate_scope == "bank" and torch.equal(layer.bank_table, torch.arange(8).view(2, 4))
    model.add_task_ranks(4, seed=0)
    assert torch.equal(layer.bank_table, torch.arange(12).view(3, 4))
    # k = 2 kept per bank: the gate statistics of inspect-ranks count up to 6 ranks per token
    assert layer.kept_per_token == 6
