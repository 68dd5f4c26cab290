"""The on-disk memory store: a YAML config plus one directory per learned task (a rank bank)."""

from moram_cli.store.bank import Bank
from moram_cli.store.config import AdapterSettings, StoreConfig, TrainingSettings
from moram_cli.store.store import MemoryStore

__all__ = ["AdapterSettings", "Bank", "MemoryStore", "StoreConfig", "TrainingSettings"]
