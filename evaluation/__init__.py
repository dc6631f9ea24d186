"""Scoring generated images: the synthetic-scene analyser (analyse.py) and the held-out evaluation (evaluate.py)."""
