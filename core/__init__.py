"""The inference floor: what training, the data pipeline, sampling, evaluation and reparameterize.py share.

    text_encoder.py   the frozen text encoder (token ids -> hidden states)
    tokenizer.py      the tokenizer and its portable identity; which hub ids and paths a loader may take
    identity.py       the portable identity of a tokenizer's or a text encoder's files (bundled, folder, hub id)
    vae.py            the image autoencoders (pixel space, SD3's VAE) and the pixel convention at their interface
    conditioning.py   class labels or captions -> the model's keyword inputs, the null condition, dropout
    checkpoint.py     reading and atomically writing checkpoints, their typed metadata record, linear layouts
    images.py         images people look at: uint8 conversion, grids
    files.py          atomic file writes
    ranks.py          which rank this process is under torchrun, the collectives training and evaluation share
    device.py         the default device

It imports models/ and flow/ and nothing of trainer/, data/, app/ or evaluation/, so every one of those can
import it without pulling in another's machinery.
"""
