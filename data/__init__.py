"""Data: the latent shard format (shards.py, validate.py), the resumable shard loader (loader.py), the
sharding pipeline from WebDataset tars (pipeline/, shard_caption_example.py), the embedded offline
datasets (embedded/), and the in-process coloured discs of the Stage-1 demo (synthetic.py).
data/README.md documents the format and the commands."""
