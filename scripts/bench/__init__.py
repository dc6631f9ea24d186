"""Measurements whose printed figures the README and docs/ quote: speed, memory, and parity of FP8 and export."""
