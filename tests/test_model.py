"""Injection into a transformers model: target matching, freezing, optimiser scope."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moram_cli.tuner import MoramConfig, MoramLayer, MoramModel


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_default_targets_q_and_k_and_all_linear_covers_every_projection():
    assert [n.rsplit(".", 1)[1] for n in MoramModel(tiny_llama(), MoramConfig(), "default").moram_layers()] == ["q_proj", "k_proj"] * 2
    every = MoramModel(tiny_llama(), MoramConfig(target_modules="all-linear"), "default").moram_layers()
    assert len(every) == 14 and "lm_head" not in every


def test_only_new_ranks_are_trainable_and_in_the_optimizer():
    model = MoramModel(tiny_llama(), MoramConfig(r=4), "default")
    layers = model.moram_layers()
    model.set_memory({n: (torch.randn(4, l.in_features), torch.randn(l.out_features, 4)) for n, l in layers.items()})
    params = model.add_task_ranks(4, seed=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}
    assert sum(p.numel() for p in params) == 2 * 4 * (32 + 32) + 2 * 4 * (32 + 16)
    frozen_before = {n: l.moram_A_frozen["default"].clone() for n, l in layers.items()}
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = torch.randint(0, 64, (2, 6))
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(l.moram_A_frozen["default"], frozen_before[n]) for n, l in layers.items())
    assert all(l.moram_B["default"].abs().sum() > 0 for l in layers.values())
    assert all(isinstance(l, MoramLayer) for l in layers.values())


def test_fresh_memory_leaves_the_model_output_unchanged():
    base = tiny_llama()
    x = torch.randint(0, 64, (2, 6))
    expected = base(input_ids=x).logits.detach()
    model = MoramModel(base, MoramConfig(), "default")
    model.add_task_ranks(8, seed=3)
    torch.testing.assert_close(model(input_ids=x).logits, expected)


def test_task_ranks_are_reproducible_from_the_seed():
    a = MoramModel(tiny_llama(), MoramConfig(), "default")
    b = MoramModel(tiny_llama(), MoramConfig(), "default")
    a.add_task_ranks(8, seed=5)
    b.add_task_ranks(8, seed=5)
    assert all(torch.equal(a.task_ranks()[n][0], b.task_ranks()[n][0]) for n in a.task_ranks())
