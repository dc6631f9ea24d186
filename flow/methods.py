"""The ODE solvers the sampler offers (torchdiffeq's names), importable without torch (command-line --help)."""

FIXED_METHODS: tuple[str, ...] = ("euler", "midpoint", "heun2", "heun3", "rk4")
"""Fixed-grid solvers: they step exactly on the sampler's warped time grid."""
ADAPTIVE_METHODS: tuple[str, ...] = ("dopri5", "dopri8", "bosh3", "adaptive_heun")
"""Adaptive solvers: they choose their own steps (rtol / atol)."""
METHODS: tuple[str, ...] = FIXED_METHODS + ADAPTIVE_METHODS
