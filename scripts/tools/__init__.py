"""Builders of the repository's generated assets: the embedded shards and the scene encoder's weights."""
