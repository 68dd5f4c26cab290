"""Store round trips and atomic writes, without loading any model."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from conftest import snapshot
from moram_cli.errors import MoramError
from moram_cli.models.memory import stack_banks
from moram_cli.models.reference import BaseModelRef
from moram_cli.store import MemoryStore, StoreConfig
from moram_cli.store.bank import check_task_name


def new_store(path) -> MemoryStore:
    return MemoryStore.create(path, StoreConfig(base_model=BaseModelRef("local", "/models/x", "f" * 64)))


def tensors(seed: int, r: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.q_proj": (torch.randn(r, 8, generator=g), torch.randn(6, r, generator=g)) for i in range(2)}


def test_config_and_banks_round_trip(tmp_path):
    store = new_store(tmp_path / "s")
    first = store.add_bank("alpha", tensors(0), {"examples": 5})
    store.add_bank("beta", tensors(1, r=2), {"examples": 7})
    reopened = MemoryStore.open(tmp_path / "s")
    assert reopened.config == store.config
    assert [(b.index, b.name) for b in reopened.banks()] == [(1, "alpha"), (2, "beta")]
    loaded = first.tensors()
    assert all(torch.equal(loaded[m][0], tensors(0)[m][0]) and torch.equal(loaded[m][1], tensors(0)[m][1]) for m in loaded)
    assert first.metadata()["examples"] == 5 and first.metadata()["task"] == "alpha"


def test_stacking_puts_older_banks_first():
    stacked = stack_banks([tensors(0), tensors(1, r=2)])
    A, B = stacked["layers.0.q_proj"]
    assert A.shape == (5, 8) and B.shape == (6, 5)
    assert torch.equal(A[:3], tensors(0)["layers.0.q_proj"][0]) and torch.equal(B[:, 3:], tensors(1, r=2)["layers.0.q_proj"][1])


def test_a_failed_bank_write_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    store = new_store(tmp_path / "s")
    store.add_bank("alpha", tensors(0), {})
    before = snapshot(store.path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # write_bank imports the writer when it writes (torch stays unloaded until a bank meets a model).
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(MoramError, match="No space left on device.*unchanged"):
        store.add_bank("beta", tensors(1), {})
    assert snapshot(store.path) == before
    assert [b.name for b in store.banks()] == ["alpha"]


def test_init_accepts_an_empty_directory_and_refuses_a_file(tmp_path):
    (tmp_path / "empty").mkdir()
    new_store(tmp_path / "empty")
    assert (tmp_path / "empty" / "store.yaml").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(MoramError, match="already exists"):
        new_store(tmp_path / "file")


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 65, "a..b", "-rf"])
def test_unsafe_task_names_are_refused(name):
    with pytest.raises(MoramError, match="invalid task name"):
        check_task_name(name)


def test_ordinary_task_names_pass():
    assert check_task_name("yelp_2024-v1.2") == "yelp_2024-v1.2"


def test_only_numbered_directories_are_banks_and_they_go_by_number(tmp_path):
    store = new_store(tmp_path / "s")
    for name in ("1000-late", "999-early", "003", "001x-a", "notes"):
        (store.path / "banks" / name).mkdir()
    assert [b.path.name for b in store.banks()] == ["999-early", "1000-late"]
