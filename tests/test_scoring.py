"""Ranked choice's packed pass against scoring each candidate on its own, on the tiny Llama."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

from moram_cli.evaluation.scoring import packed_continuations


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_continuations_give_each_continuations_own_log_probabilities(tiny_model_dir, attention):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
    prompt = [5, 9, 14, 3, 22, 7]
    continuations = [[11], [], [4, 30, 2], [8, 8]]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        packed = packed_continuations(model, out.cache, len(prompt), continuations)
        for tokens, got in zip(continuations, packed):
            # Alone: the prompt and this continuation in one sequence, nothing else in attention.
            alone = F.log_softmax(model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt):].float(), dim=-1)
            assert got.shape == alone.shape
            torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-4)
