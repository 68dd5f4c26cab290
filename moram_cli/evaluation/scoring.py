"""Per-example scorers. Each runs one example at a time so memory stays flat with dataset size."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from moram_cli.data.encode import encode_completion, encode_prompt, separator


@torch.no_grad()
def choose(model, tokenizer, prompt: str, candidates: list[str], max_length: int) -> tuple[int, bool]:
    """Index of the candidate with the highest summed log-likelihood after `prompt`, and whether the prompt was cut.

    The prompt runs once; its KV cache is then shared by all candidates in one batch.
    """
    cand_ids = [encode_completion(separator(prompt, c) + c, tokenizer, add_eos=False) for c in candidates]
    longest = max(len(c) for c in cand_ids)
    prompt_ids, cut = encode_prompt(prompt, tokenizer, max(1, max_length - longest))
    device = model.device
    out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True, logits_to_keep=1)
    first = F.log_softmax(out.logits[0, -1].float(), dim=-1)
    scores = torch.tensor([first[c[0]].item() for c in cand_ids])
    if longest > 1:
        cache = out.cache
        cache.batch_repeat_interleave(len(cand_ids))
        pad = tokenizer.pad_token_id
        rest = torch.tensor([c[:-1] + [pad] * (longest - len(c)) for c in cand_ids], device=device)
        # Right padding needs no mask: causal attention never lets a pad influence an earlier position.
        logp = F.log_softmax(model(input_ids=rest, cache=cache).logits.float(), dim=-1).cpu()
        for j, c in enumerate(cand_ids):
            scores[j] += sum(logp[j, t - 1, c[t]].item() for t in range(1, len(c)))
    return int(scores.argmax()), cut


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int, max_length: int) -> tuple[str, bool]:
    """Greedy continuation of `prompt` (special tokens dropped, stripped), and whether the prompt was cut."""
    prompt_ids, cut = encode_prompt(prompt, tokenizer, max(1, max_length - max_new_tokens))
    input_ids = torch.tensor([prompt_ids], device=model.device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, len(prompt_ids):], skip_special_tokens=True).strip(), cut
