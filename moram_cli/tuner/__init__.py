"""The MoRAM adapter, organised like a PEFT tuner: config, layer, injection model."""

from moram_cli.tuner.config import MoramConfig
from moram_cli.tuner.gating import rank_gate
from moram_cli.tuner.layer import MoramLayer
from moram_cli.tuner.model import MoramModel

__all__ = ["MoramConfig", "MoramLayer", "MoramModel", "rank_gate"]
