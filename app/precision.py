"""The dtype the sampler runs the transformer in, for every front end (app/sample.py, the Gradio app, the
evaluation CLIs): bfloat16 on CUDA, float32 on a CPU or with --fp32.

On a GPU a bf16 transformer samples several times faster than fp32 (tensor cores, half the bytes) and is what the
model was trained under (bf16 autocast). The weights are cast once when the checkpoint loads; the ODE state, the
time grid and the guidance combination stay float32 (flow/sampler.py casts at the model's edge), so only the
network's own arithmetic is in bf16. A CPU has no fast bf16 path for these kernels, so it keeps float32.

Importing this module does not import torch (the CLIs answer --help without it).
"""

import argparse

FP32_HELP = ("run the transformer in float32 on CUDA (default there: bfloat16 weights and activations, float32 ODE "
             "state; a CPU always samples in float32)")


def add_fp32_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--fp32", action="store_true", help=FP32_HELP)


def inference_dtype(device, fp32: bool = False):
    """torch.bfloat16 on a CUDA `device` unless `fp32`, else torch.float32."""
    import torch

    return torch.bfloat16 if torch.device(device).type == "cuda" and not fp32 else torch.float32
