"""Data: the latent shard format (shards.py, validate.py), the resumable shard loader (loader.py), the
sharding pipeline from tars, image folders, datasets and parquet (pipeline/, make_shards.py) and the embedded offline
datasets (embedded/). data/README.md documents the format and the commands."""
