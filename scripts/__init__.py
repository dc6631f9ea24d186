"""The repository's tools beside the packages, grouped by job; each runs as `python -m scripts.<job>.<name>` from
the repository root (scripts/README.md says why, and lists them)."""
