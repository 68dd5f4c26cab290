"""Configuration of the MoRAM adapter (the PEFT-style config dataclass)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig

from moram_cli.store.config import GATE_SCOPES

GATES = ("moram", "none")


@dataclass
class MoramConfig(PeftConfig):
    """Hyper-parameters of one MoRAM memory.

    `r` new rank-1 experts are added to every target module per task; the gate
    keeps the `k` most relevant ranks (at least 2), sharpened by
    `temperature`; at inference a rank whose normalised score is below
    `threshold` is switched off. `gate="none"` drops the gate altogether, so
    every rank adds its full `B A x` (the IncLoRA baseline on the same code
    path). `gate_scope="bank"` gates each bank's ranks apart (k per bank) and
    adds the banks' outputs. `target_modules` uses PEFT's matching rules (suffix names, a regex
    string, or "all-linear").
    """

    r: int = 8
    k: int = 4
    temperature: float = 0.03
    threshold: float = 0.0
    dropout: float = 0.0
    gate: str = "moram"
    gate_scope: str = "all"
    target_modules: list[str] | str | None = field(default_factory=lambda: ["q_proj", "k_proj"])
    exclude_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1 or self.k < 1:
            raise ValueError(f"r and k must be positive, got r={self.r}, k={self.k}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.gate_scope not in GATE_SCOPES:
            raise ValueError(f"gate_scope must be one of {GATE_SCOPES}, got {self.gate_scope!r}")
