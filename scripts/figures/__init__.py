"""The figures and tables the README and docs/ show, redrawn from the code that computes them."""
