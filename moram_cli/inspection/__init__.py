"""Looking inside a store: static statistics of its banks, and how the gate uses each rank on data (also used by `merge --prune-below`)."""
