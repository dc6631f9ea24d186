"""Embedded datasets: small image-caption sets built offline into WebDataset tars.

    python -m data.embedded.build --dataset {synthetic,openmoji} --out DIR

`synthetic` (synthetic.py) renders compositional shape scenes with held-out combinations; `openmoji`
(openmoji.py) renders the OpenMoji colour emoji (CC BY-SA 4.0). build.py writes both in the same tar
layout, which the sharding pipeline reads as "captions already in the tar":

    DIR/<name>-0000.tar ...  samples_per_tar samples each; per sample __key__, png, txt, json
    DIR/dataset.json          name, licence, source, image_size, num_samples, class_names, num_tars, ...
"""

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class EmbeddedSample:
    """One record before encoding: build.py turns it into the tar entries."""

    key: str
    """Unique and deterministic within the dataset, e.g. 'synthetic-000123'; no dots (WebDataset splits there)."""
    image: Image.Image
    """RGB, the dataset's image_size square (synthetic scenes built with sizes: that sample's size)."""
    caption: str
    short_caption: str
    label: int
    label_name: str
    attributes: dict[str, Any] = field(default_factory=dict)
    """Dataset-specific fields merged into the sample's json."""
