"""Scoring and greedy generation. Evaluation runs one example at a time so memory stays flat with dataset size;
`moram generate` batches its prompts with `generate_batch`."""

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


def generate(model, tokenizer, prompt: str, max_new_tokens: int, max_length: int) -> tuple[str, bool]:
    """Greedy continuation of `prompt` (special tokens dropped, stripped), and whether the prompt was cut."""
    return generate_batch(model, tokenizer, [prompt], max_new_tokens, max_length)[0]


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, max_length: int) -> list[tuple[str, bool]]:
    """Greedy continuations of `prompts`, decoded in one batch, and whether each prompt was cut.

    Prompts are padded on the left so that every row's next token comes right
    after its own prompt; the attention mask keeps the pads out of attention
    (and out of source routing's scores). A batch of one has no padding.
    """
    encoded = [encode_prompt(prompt, tokenizer, max(1, max_length - max_new_tokens)) for prompt in prompts]
    width = max(len(ids) for ids, _ in encoded)
    pads = [width - len(ids) for ids, _ in encoded]
    input_ids = torch.tensor([[tokenizer.pad_token_id] * pad + ids for pad, (ids, _) in zip(pads, encoded)], device=model.device)
    attention_mask = torch.tensor([[0] * pad + [1] * (width - pad) for pad in pads], device=model.device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return [(tokenizer.decode(row[width:], skip_special_tokens=True).strip(), cut) for row, (_, cut) in zip(output, encoded)]
