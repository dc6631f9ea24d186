"""The embedded five-stage demo (`python -m scripts.demo`, what `make demo` runs) and the runs that study it."""
