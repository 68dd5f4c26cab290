"""Base models: resolving a `--base-model` reference, fingerprinting it, loading it (with a GGUF cache)."""
