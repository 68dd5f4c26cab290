"""moram: continual learning of language models with incremental rank-1 associative memory experts."""

__version__ = "0.1.0"
