"""Datasets. The shard format, loader and sharding pipeline come with the data work; for now the
embedded default is a synthetic dataset generated in-process (data/synthetic.py)."""
