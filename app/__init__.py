"""Sampling front ends: the command-line sampler (sample.py); the Gradio app joins with the sampling work."""
