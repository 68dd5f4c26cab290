"""Scoring and greedy generation: ranked choice runs one example at a time (its candidates in one pass), so memory
stays flat with dataset size; `generate_batch` decodes a batch of prompts."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from moram_cli.data.encode import encode_completion, encode_prompt, separator


@torch.no_grad()
def choose(model, tokenizer, prompt: str, candidates: list[str], max_length: int) -> tuple[int, bool]:
    """Index of the candidate with the highest summed log-likelihood after `prompt`, and whether the prompt was cut.

    The prompt runs once; then every candidate's tokens, packed into one row,
    continue its KV cache in one more pass (`packed_continuations`).
    """
    cand_ids = [encode_completion(separator(prompt, c) + c, tokenizer, add_eos=False) for c in candidates]
    longest = max(len(c) for c in cand_ids)
    prompt_ids, cut = encode_prompt(prompt, tokenizer, max(1, max_length - longest))
    out = model(input_ids=torch.tensor([prompt_ids], device=model.device), use_cache=True, logits_to_keep=1)
    first = F.log_softmax(out.logits[0, -1].float(), dim=-1)
    scores = [first[c[0]].item() for c in cand_ids]
    if longest > 1:
        # Each candidate's token t-1 predicts its token t; its last token predicts nothing and is not fed.
        logp = packed_continuations(model, out.cache, len(prompt_ids), [c[:-1] for c in cand_ids])
        for j, c in enumerate(cand_ids):
            scores[j] += sum(logp[j][t - 1, c[t]].item() for t in range(1, len(c)))
    return max(range(len(scores)), key=scores.__getitem__), cut


def packed_continuations(model, cache, prompt_length: int, continuations: list[list[int]]) -> list[torch.Tensor]:
    """Log-probabilities after each token of each continuation of a cached prompt, from one forward pass.

    The continuations run as one row: each token sees the prompt and the
    earlier tokens of its own continuation (a 4D mask) at the positions it
    would have alone, so no copy of the cache is made per continuation, and
    routing keeps the choice it made on the prompt.
    """
    owner = torch.tensor([j for j, tokens in enumerate(continuations) for _ in tokens])
    order = torch.tensor([t for tokens in continuations for t in range(len(tokens))])
    own = (owner[:, None] == owner[None, :]) & (order[None, :] <= order[:, None])
    allowed = torch.cat([torch.ones(len(owner), prompt_length, dtype=torch.bool), own], dim=1)
    dtype = next(model.parameters()).dtype
    # Additive (0 where attended), the form eager and SDPA attention both take.
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    device = model.device
    logits = model(input_ids=torch.tensor([[t for tokens in continuations for t in tokens]], device=device), cache=cache,
                   attention_mask=mask[None, None].to(device), position_ids=(prompt_length + order)[None].to(device)).logits[0]
    logp = F.log_softmax(logits.float(), dim=-1).cpu()
    return list(logp.split([len(tokens) for tokens in continuations]))


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
