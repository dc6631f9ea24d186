"""The memory planner: what one GPU holds for a training configuration, before anything is launched.

    plan.py               the plan (state in closed form, activations measured, frozen models, the choice of
                          micro-batch and checkpointing), `check_memory` for the trainer, the command line
    activation_memory.py  the saved activations of one micro-batch, measured on the CPU as a GPU holds them

`python -m planner` prints the plan. It reads the trainer's config schema and its shape rules (trainer/builders.py,
trainer/fast_path.py); the trainer imports only `check_memory`, when it starts on CUDA.
"""
