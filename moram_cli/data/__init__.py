"""Reading JSONL examples, tokenising them for causal LMs, and batching them."""
