"""The one default device rule: CUDA when this machine has it, else the CPU."""

import torch


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device; None picks CUDA when available."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
