"""SAHN: the seed paper's semantic-aware hierarchical network as a sahn-bench method (see sahn/model.py)."""
