"""The MoRAM layer against a direct computation of the method's six steps."""

import math

import pytest
import torch
from torch import nn

from moram_cli.tuner import MoramConfig, MoramLayer, rank_gate
from moram_cli.tuner.gating import kept_per_bank, spread


def reference_output(x, W, A, B, k, tau, delta, training):
    """Steps 1-6 of the method, written out per token with plain loops over ranks."""
    out = torch.empty(x.shape[0], B.shape[0], dtype=x.dtype)
    for n, token in enumerate(x):
        z = A @ token
        s = z / max(z.norm().item(), 1e-8)
        k_eff = min(max(k, 2), A.shape[0])
        keep = sorted(range(len(s)), key=lambda i: -s[i].item())[:k_eff]
        logits = torch.full_like(s, -math.inf)
        logits[keep] = s[keep] / tau
        g = torch.softmax(logits, dim=0)
        if not training and delta > 0:
            g = g * (s >= delta).float()
        out[n] = W @ token + B @ (g * z)
    return out


def make_layer(d_in=12, d_out=10, frozen=6, new=4, sizes=None, **cfg):
    torch.manual_seed(0)
    layer = MoramLayer(nn.Linear(d_in, d_out, bias=False), "default", MoramConfig(**cfg))
    if frozen:
        layer.set_frozen(torch.randn(frozen, d_in), torch.randn(d_out, frozen), sizes)
    if new:
        layer.add_ranks(new, torch.Generator().manual_seed(1))
        with torch.no_grad():
            layer.moram_B["default"].normal_()
    return layer


def stacked(layer):
    A = torch.cat([layer.moram_A_frozen["default"], layer.moram_A["default"]])
    B = torch.cat([layer.moram_B_frozen["default"], layer.moram_B["default"]], dim=1)
    return A.detach(), B.detach()


@pytest.mark.parametrize("k,tau,delta", [(4, 0.03, 0.0), (1, 0.5, 0.0), (3, 0.1, 0.2), (50, 1.0, 0.1)])
@pytest.mark.parametrize("training", [True, False])
def test_layer_matches_reference(k, tau, delta, training):
    layer = make_layer(k=k, temperature=tau, threshold=delta)
    layer.train(training)
    x = torch.randn(7, 12)
    A, B = stacked(layer)
    expected = reference_output(x, layer.base_layer.weight.detach(), A, B, k, tau, delta, training)
    torch.testing.assert_close(layer(x).detach(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("ranks_per_kept", [0, 10_000])
@pytest.mark.parametrize("sizes", [[2, 5, 4], [4, 4, 4]], ids=["unequal banks", "equal banks"])
def test_a_bank_scoped_gate_is_the_sum_of_each_bank_gated_alone(training, ranks_per_kept, sizes, monkeypatch):
    from moram_cli.tuner import layer as layer_module

    monkeypatch.setattr(layer_module, "GATHER_RANKS_PER_KEPT", {False: ranks_per_kept, True: ranks_per_kept})
    # unequal: a bank of 2 (fewer ranks than k: both kept), then 5 and 4 ranks; equal banks take the padding-free path
    layer = make_layer(frozen=sum(sizes[:2]), sizes=sizes[:2], new=sizes[2], k=3, temperature=0.1, threshold=0.3,
                       gate_scope="bank").double()
    layer.train(training)
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    A, B = stacked(layer)
    W = layer.base_layer.weight.detach()
    starts = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    banks = [range(a, b) for a, b in zip(starts, starts[1:])]
    expected = W @ x.detach().T
    for bank in banks:
        b = list(bank)
        expected = expected + reference_output(x.detach(), 0 * W, A[b], B[:, b], 3, 0.1, 0.3, training).T
    out = layer(x)
    torch.testing.assert_close(out.detach(), expected.T, rtol=1e-12, atol=1e-12)
    # the gradients are the dense product's, whichever mix ran
    weights = torch.randn_like(out)
    got = torch.autograd.grad((out * weights).sum(), (x, layer.moram_B["default"]))
    g = layer._gate(x @ A.T)
    dense = W @ x.T + B @ (spread(x @ A.T, *g) * (x @ A.T)).T
    want = torch.autograd.grad((dense.T * weights).sum(), (x, layer.moram_B["default"]), allow_unused=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)


def test_a_bank_scoped_gate_keeps_only_the_routed_groups_banks():
    z = torch.randn(2, 9, dtype=torch.float64)
    table = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, -1, -1, -1]])
    member = torch.tensor([[True] * 4 + [False] * 5, [True] * 9])
    indices, g = kept_per_bank(z, 2, 0.2, 0.0, member, table)
    weights = spread(z, indices, g)
    assert torch.equal(weights[0, 4:], torch.zeros(5)) and weights[0].sum().item() == pytest.approx(1.0)
    # every bank of the second row contributes a whole softmax: two banks of k ranks, and the single rank of the third
    assert weights[1].sum().item() == pytest.approx(3.0) and weights[1, 8].item() == pytest.approx(1.0)


def test_a_bank_scoped_gate_over_equal_banks_keeps_only_the_routed_groups_banks():
    z = torch.randn(2, 12, dtype=torch.float64)
    table = torch.arange(12).view(3, 4)
    member = torch.tensor([[True] * 4 + [False] * 8, [True] * 12])
    weights = spread(z, *kept_per_bank(z, 2, 0.2, 0.0, member, table))
    assert torch.equal(weights[0, 4:], torch.zeros(8)) and weights[0].sum().item() == pytest.approx(1.0)
    assert weights[1].sum().item() == pytest.approx(3.0)
    for bank in table:
        torch.testing.assert_close(weights[1, bank], rank_gate(z[1:, bank], 2, 0.2)[0])


def test_gate_keeps_k_eff_ranks_and_threshold_does_not_renormalise():
    z = torch.tensor([[3.0, -1.0, 2.0, 0.5, 0.1]])
    g = rank_gate(z, k=3, temperature=1.0)
    assert (g > 0).sum() == 3 and torch.isclose(g.sum(), torch.tensor(1.0))
    s = z / z.norm()
    pruned = rank_gate(z, k=3, temperature=1.0, threshold=0.3)
    torch.testing.assert_close(pruned, g * (s >= 0.3))
    assert pruned.sum() < 1.0
    assert (rank_gate(z, k=1, temperature=1.0) > 0).sum() == 2  # k_eff = max(k, 2)


def test_temperature_sharpens_the_gate():
    z = torch.randn(1, 8)
    soft, sharp = rank_gate(z, 8, 1.0), rank_gate(z, 8, 0.01)
    assert sharp.max() > soft.max()


def test_threshold_only_applies_in_eval_mode():
    layer = make_layer(threshold=0.3)
    x = torch.randn(5, 12)
    layer.train()
    train_out = layer(x)
    layer.eval()
    assert not torch.allclose(train_out, layer(x))


def test_new_ranks_start_with_zero_values_so_a_fresh_layer_is_unchanged():
    torch.manual_seed(0)
    layer = MoramLayer(nn.Linear(12, 10), "default", MoramConfig())
    x = torch.randn(4, 12)
    before = layer(x).detach()
    layer.add_ranks(4, torch.Generator().manual_seed(0))
    assert torch.count_nonzero(layer.moram_B["default"]) == 0
    bound = 1 / math.sqrt(12)  # nn.Linear's kaiming-uniform(a=sqrt(5)) bound
    assert layer.moram_A["default"].abs().max() <= bound
    torch.testing.assert_close(layer(x), before)


def test_new_ranks_join_the_gate_of_old_ones():
    # With old ranks present, B_new = 0 does not make the new ranks invisible: they take part in the
    # normalisation and the top-k, so old ranks can be re-weighted from the first step (the method's gate).
    layer = make_layer(frozen=6, new=0)
    x = torch.randn(4, 12)
    old_only = layer(x).detach()
    layer.add_ranks(4, torch.Generator().manual_seed(0))
    assert torch.count_nonzero(layer.moram_B["default"]) == 0
    A, B = stacked(layer)
    expected = reference_output(x, layer.base_layer.weight.detach(), A, B, 4, 0.03, 0.0, True)
    torch.testing.assert_close(layer(x).detach(), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(layer(x), old_only)


def test_old_ranks_get_no_gradient():
    layer = make_layer()
    layer(torch.randn(3, 12)).sum().backward()
    assert not layer.moram_A_frozen["default"].requires_grad
    assert layer.moram_A["default"].grad is not None and layer.moram_B["default"].grad is not None
    assert layer.base_layer.weight.grad is not None  # nn.Linear itself is frozen by MoramModel, tested there


def test_gradient_reaches_new_keys_through_both_projection_and_gate():
    layer = make_layer(k=10, temperature=0.5)
    x = torch.randn(3, 12)

    def grad_of_A(detach_gate):
        layer.zero_grad()
        A, B = stacked(layer)
        A = torch.cat([A[:6], layer.moram_A["default"]])
        z = x @ A.T
        g = rank_gate(z, 10, 0.5)
        (((g.detach() if detach_gate else g) * z) @ B.T).sum().backward()
        return layer.moram_A["default"].grad.clone()

    through_z = grad_of_A(detach_gate=True)
    full = grad_of_A(detach_gate=False)
    assert through_z.abs().sum() > 0
    assert not torch.allclose(full, through_z)  # the gate contributes its own gradient
    layer.zero_grad()
    layer(x).sum().backward()
    torch.testing.assert_close(layer.moram_A["default"].grad, full)


def test_set_frozen_rejects_wrong_shapes():
    layer = make_layer(frozen=0)
    with pytest.raises(ValueError, match="do not fit"):
        layer.set_frozen(torch.randn(4, 11), torch.randn(10, 4))
    with pytest.raises(ValueError, match="do not add up"):
        layer.set_frozen(torch.randn(4, 12), torch.randn(10, 4), [2, 1])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("delta", [0.0, 0.2])
def test_the_sparse_value_mix_gives_the_dense_products_outputs_and_gradients(training, delta, monkeypatch):
    from moram_cli.tuner import layer as layer_module

    layer = make_layer(d_in=24, d_out=20, frozen=40, new=8, k=4, temperature=0.1, threshold=delta).double().train(training)
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    # The dense product `B (g ⊙ z)` over every rank, differentiated by autograd: what the gathered mix must equal.
    A_new, B_new = (p.detach().clone().requires_grad_() for p in (layer.moram_A["default"], layer.moram_B["default"]))
    A = torch.cat([layer.moram_A_frozen["default"], A_new])
    B = torch.cat([layer.moram_B_frozen["default"], B_new], dim=1)
    z = x @ A.T
    dense = layer.base_layer(x) + (rank_gate(z, 4, 0.1, 0.0 if training else delta) * z) @ B.T
    weights = torch.randn_like(dense)
    expected = torch.autograd.grad((dense * weights).sum(), (x, A_new, B_new))
    # Either path may run, with or without gradients, by the number of ranks: both give the dense product.
    for ranks_per_kept in (0, 10_000):
        monkeypatch.setattr(layer_module, "GATHER_RANKS_PER_KEPT", {False: ranks_per_kept, True: ranks_per_kept})
        out = layer(x)
        got = torch.autograd.grad((out * weights).sum(), (x, layer.moram_A["default"], layer.moram_B["default"]))
        torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), dense, rtol=1e-12, atol=1e-12)


def test_a_member_mask_gates_each_row_as_if_only_its_ranks_existed():
    z = torch.randn(4, 9, dtype=torch.float64)
    groups = [torch.arange(0, 9), torch.tensor([2, 5, 6, 7]), torch.tensor([4]), torch.tensor([], dtype=torch.long)]
    member = torch.zeros(4, 9, dtype=torch.bool)
    for row, ranks in zip(member, groups):
        row[ranks] = True
    g = rank_gate(z, 3, 0.2, 0.1, member)
    for row, ranks in enumerate(groups):
        alone = torch.zeros(9, dtype=torch.float64)
        if len(ranks):
            alone[ranks] = rank_gate(z[row, ranks].unsqueeze(0), 3, 0.2, 0.1)[0]
        torch.testing.assert_close(g[row], alone)


def test_folding_frozen_ranks_into_the_weight_is_exact_for_an_ungated_layer_only():
    x = torch.randn(5, 12, dtype=torch.float64)
    layer = make_layer(new=0, gate="none").double()
    before = layer(x)
    layer.fold_frozen()
    assert layer.frozen_ranks == 0
    torch.testing.assert_close(layer(x), before)
    with pytest.raises(ValueError, match="ungated"):
        make_layer(new=0).fold_frozen()
