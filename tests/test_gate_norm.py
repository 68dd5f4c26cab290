"""`gate_norm`: a store whose gate scores each expert within its own bank (init, old stores, the model it builds)."""

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


def test_init_sets_gate_norm_for_moram_and_refuses_it_for_baselines(tmp_path, tiny_model_dir):
    assert init_store(tmp_path / "m", base_model=str(tiny_model_dir), gate_norm="bank")["adapter"]["gate_norm"] == "bank"
    assert init_store(tmp_path / "i", base_model=str(tiny_model_dir), method="inclora")["adapter"]["gate_norm"] == "all"
    with pytest.raises(MoramError, match="--gate-norm bank needs method moram"):
        init_store(tmp_path / "l", base_model=str(tiny_model_dir), method="lora", gate_norm="bank")
    result = CliRunner().invoke(app, ["init", str(tmp_path / "bad"), "--base-model", str(tiny_model_dir), "--gate-norm", "rank"])
    assert result.exit_code == 2 and "invalid --gate-norm 'rank'; use one of all, bank" in result.output
    assert not (tmp_path / "bad").exists()


def test_a_store_written_before_gate_norm_normalises_over_all_ranks(tmp_path, tiny_model_dir):
    init_store(tmp_path / "old", base_model=str(tiny_model_dir))
    config = yaml.safe_load((tmp_path / "old" / "store.yaml").read_text())
    del config["adapter"]["gate_norm"]
    (tmp_path / "old" / "store.yaml").write_text(yaml.safe_dump(config))
    assert MemoryStore.open(tmp_path / "old").config.adapter.gate_norm == "all"


def test_the_model_scores_each_expert_within_its_bank_frozen_and_new(tmp_path, tiny_model_dir):
    init_store(tmp_path / "s", base_model=str(tiny_model_dir), r=4, k=2, gate_norm="bank", routing="token")
    store = MemoryStore.open(tmp_path / "s")
    for name, seed in (("one", 1), ("two", 2)):
        store.add_bank(name, random_bank(4, seed), {})
    model, _ = build_memory_model(store)
    layer = model.moram_layers()[Q0]
    assert layer.config.gate_norm == "bank" and torch.equal(layer.bank_table.sum(0), torch.tensor([4.0, 4.0]))
    model.add_task_ranks(4, seed=0)
    assert torch.equal(layer.bank_table.sum(0), torch.tensor([4.0, 4.0, 4.0]))
    assert torch.equal(layer.bank_table.argmax(1), torch.arange(12) // 4)
