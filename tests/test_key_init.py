"""How a task's new keys start (`init --key-init`): data keys outside the old span, warm copies, kaiming as before."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

import moram_cli.training.learn as learn_module
from moram_cli.cli import app
from moram_cli.errors import MoramError
from moram_cli.store import MemoryStore
from moram_cli.store.init import init_store
from moram_cli.training.learn import learn_task, rank_init_seed
from moram_cli.data.encode import encode_dataset
from moram_cli.data.jsonl import read_examples
from moram_cli.models.memory import build_memory_model
from moram_cli.models.token_passes import masked_passes
from moram_cli.training.key_init import input_moments
from moram_cli.tuner.keys import InputMoments, data_keys, kaiming_keys

# A step this small leaves the trained keys equal to the keys they started from, to float32 resolution.
FROZEN = {"lr": 1e-9, "max_steps": 1, "batch_size": 4}


def moments_of(x: torch.Tensor) -> InputMoments:
    moments = InputMoments(x.shape[1])
    moments.add(x)
    return moments


def test_data_keys_leave_the_old_span_point_with_the_mean_input_and_take_the_old_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 32, generator=g) + 3 * torch.randn(32, generator=g)
    old = torch.randn(6, 32, generator=g) * torch.tensor([[0.5], [1.0], [2.0], [3.0], [4.0], [9.0]])
    keys = data_keys(moments_of(x), old, r=4)
    assert keys.shape == (4, 32)
    assert (old @ keys.T).abs().max() < 1e-5 * old.norm(dim=1).max() * keys.norm(dim=1).max()
    assert torch.allclose(keys.norm(dim=1), torch.full((4,), old.norm(dim=1).median().item()), rtol=1e-5)
    assert ((keys @ x.mean(0)) > 0).all()
    assert torch.equal(keys, data_keys(moments_of(x), old, r=4))
    # Without old keys the leading key is the dominant direction of the inputs, at the kaiming norm.
    first = data_keys(moments_of(x), None, r=2)
    top = torch.linalg.eigh(x.double().T @ x.double()).eigenvectors[:, -1].float()
    assert abs(torch.dot(first[0] / first[0].norm(), top)) > 0.999 and math.isclose(first[0].norm().item(), math.sqrt(1 / 3), rel_tol=1e-5)


def test_data_keys_stop_where_the_old_keys_fill_the_space():
    x = torch.randn(100, 8)
    assert data_keys(moments_of(x), torch.randn(6, 8), r=4).shape == (2, 8)
    assert data_keys(moments_of(x), torch.randn(8, 8), r=4).shape == (0, 8)


@pytest.fixture
def started(monkeypatch):
    """The starting keys each learn_task call chose (None: drawn at random), in call order."""
    calls, real = [], learn_module.initial_keys

    def record(*args, **kwargs):
        keys = real(*args, **kwargs)
        calls.append(keys)
        return keys

    monkeypatch.setattr(learn_module, "initial_keys", record)
    return calls


def keys_of(store, bank: int) -> dict[str, torch.Tensor]:
    return {module: A for module, (A, _) in MemoryStore.open(store).banks()[bank].tensors().items()}


def two_tasks(store, tiny_task, **second) -> None:
    learn_task(store, tiny_task.train, name="one", show_progress=False, batch_size=4, max_steps=3, lr=1e-2)
    learn_task(store, tiny_task.train, name="two", show_progress=False, **FROZEN | second)


def test_a_new_store_starts_later_tasks_from_data_keys_outside_the_old_span(tmp_path, tiny_model_dir, tiny_task, started):
    store = tmp_path / "s"
    init_store(store, base_model=str(tiny_model_dir), r=4, k=2)
    assert yaml.safe_load((store / "store.yaml").read_text())["adapter"]["key_init"] == "data"
    two_tasks(store, tiny_task)
    assert started[0] is None  # the first task's keys are drawn: nothing trained competes with them yet
    old, new = keys_of(store, 0), keys_of(store, 1)
    for module, keys in started[1].items():
        assert (old[module] @ keys.T).abs().max() < 1e-5 * old[module].norm(dim=1).max() * keys.norm(dim=1).max()
        assert torch.allclose(new[module], keys, atol=1e-7)
    banks = [yaml.safe_load(p.read_text()) for p in sorted((store / "banks").glob("*/bank.yaml"))]
    assert [b["key_init"] for b in banks] == ["data", "data"]

    again = tmp_path / "again"
    init_store(again, base_model=str(tiny_model_dir), r=4, k=2)
    two_tasks(again, tiny_task)
    assert all(torch.equal(started[1][m], started[3][m]) for m in started[1])


def test_warm_keys_copy_the_previous_bank_and_kaiming_draws_them_as_before(tmp_path, tiny_model_dir, tiny_task, started):
    warm, kaiming = tmp_path / "warm", tmp_path / "kaiming"
    for store, mode in ((warm, "warm"), (kaiming, "kaiming")):
        init_store(store, base_model=str(tiny_model_dir), r=4, k=2, key_init=mode)
        two_tasks(store, tiny_task)
    assert all(torch.equal(started[1][m], A) for m, A in keys_of(warm, 0).items())
    assert started[3] is None
    # kaiming: module by module in model order, each task's keys drawn from its own seeded generator.
    g, drawn = torch.Generator().manual_seed(rank_init_seed(0, 1)), keys_of(kaiming, 1)
    for module in (f"model.layers.{i}.self_attn.{m}_proj" for i in range(2) for m in "qk"):
        assert torch.allclose(drawn[module], kaiming_keys(4, 32, g), atol=1e-7)


def test_a_store_from_before_key_init_loads_and_draws_its_keys_at_random(new_store, tiny_task, started):
    store = new_store("old")
    config = yaml.safe_load((store / "store.yaml").read_text())
    del config["adapter"]["key_init"]
    (store / "store.yaml").write_text(yaml.safe_dump(config))
    assert MemoryStore.open(store).config.adapter.key_init == "kaiming"
    two_tasks(store, tiny_task)
    assert started == [None, None]


def test_baselines_start_at_random_and_lora_refuses_other_keys(tmp_path, tiny_model_dir):
    for method in ("lora", "inclora"):
        assert init_store(tmp_path / method, base_model=str(tiny_model_dir), method=method)["adapter"]["key_init"] == "kaiming"
    assert init_store(tmp_path / "i", base_model=str(tiny_model_dir), method="inclora", key_init="data")["adapter"]["key_init"] == "data"
    with pytest.raises(MoramError, match="--key-init data needs new ranks per task"):
        init_store(tmp_path / "l", base_model=str(tiny_model_dir), method="lora", key_init="data")
    result = CliRunner().invoke(app, ["init", str(tmp_path / "bad"), "--base-model", str(tiny_model_dir), "--key-init", "pca"])
    assert result.exit_code == 2 and "invalid --key-init 'pca'; use one of kaiming, data, warm" in result.output
    assert not (tmp_path / "bad").exists()


def test_max_grad_norm_clips_every_step_and_must_be_positive(new_store, tiny_task, monkeypatch):
    from accelerate import Accelerator

    clipped = []
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", lambda self, params, norm: clipped.append((len(list(params)), norm)))
    summary = learn_task(new_store("c"), tiny_task.train, show_progress=False, batch_size=4, max_steps=2, max_grad_norm=0.5)
    # Two steps, each clipping the A and B of the four adapted modules of the tiny Llama.
    assert clipped == [(8, 0.5)] * 2 and summary["hyperparameters"]["max_grad_norm"] == 0.5
    with pytest.raises(MoramError, match="max_grad_norm=0.0; need > 0"):
        learn_task(new_store("z"), tiny_task.train, show_progress=False, max_grad_norm=0.0)


def test_input_moments_take_a_shared_input_once_and_stop_after_the_modules_asked_for(new_store, tiny_task):
    model, tokenizer = build_memory_model(MemoryStore.open(new_store("m")))
    encoded, _ = encode_dataset(read_examples(tiny_task.train), tokenizer, 64)
    layers = model.moram_layers()
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    inputs, ran = [], []
    hooks = [layers[q].register_forward_pre_hook(lambda _, args: inputs.append(args[0]))]
    hooks += [layer.base_layer.register_forward_hook(lambda *_, name=name: ran.append(name)) for name, layer in layers.items()]
    current = {}
    masked_passes(model, encoded, tokenizer.pad_token_id, 4, lambda mask: current.update(mask=mask),
                  lambda: inputs.append(inputs.pop().flatten(0, -2)[current["mask"]]))
    x = torch.cat(inputs).double()
    ran.clear()
    asked = input_moments(model, encoded, tokenizer.pad_token_id, 4, "moments", False, second=False, modules=[q, k])
    # k reads q's input: the pass ends at k's hook, before any later module runs.
    assert set(ran) == {q}
    every = input_moments(model, encoded, tokenizer.pad_token_id, 4, "moments", False)
    for hook in hooks:
        hook.remove()
    assert every[q] is every[k] and every[q] is not every["model.layers.1.self_attn.q_proj"]
    assert asked[q].tokens == every[q].tokens == x.shape[0]
    torch.testing.assert_close(every[q].second, x.T @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(asked[k].total, x.sum(0), rtol=1e-6, atol=1e-6)
