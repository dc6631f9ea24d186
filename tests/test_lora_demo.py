"""scripts/demo/lora.py at a tiny size: the pink set built and sharded, a LoRA and a full fine-tune of two steps
each from a text checkpoint, the three models sampled and scored, the summary and the grid written. What the
README's figures need is there: steps, trainable parameters, sizes, scores. (The figures themselves come from the
full-size run on an idle machine.)"""

import json
import subprocess
import sys

from PIL import Image

from tests.stages import ROOT, TINY


def test_lora_demo_runs_end_to_end_at_a_tiny_size(stage2_checkpoint, tmp_path):
    out = tmp_path / "demo"
    tiny = [o for o in TINY if not o.startswith("train.preview")] + ["train.eval_batches=0", "train.num_threads=1"]
    proc = subprocess.run([sys.executable, "-m", "scripts.demo.lora", "--base", str(stage2_checkpoint), "--out-dir",
                           str(out), "--samples", "40", "--steps", "2", "--rank", "2", "--eval-samples", "1", "--",
                           *tiny, "train.sample_every=1000"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    lora, full = summary["runs"]["lora"], summary["runs"]["full"]
    assert lora["steps"] == full["steps"] == 2
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"] == full["parameters"]
    assert lora["checkpoint_bytes"] < full["checkpoint_bytes"] and lora["adapter_bytes"] > 0
    for run in ("base", "lora", "full"):
        scores = summary["runs"][run]["scores"]
        assert 0 <= scores["pink"] <= 1 and 0 <= scores["control_colour"] <= 1
    grid = Image.open(out / "lora_demo.png")
    assert grid.size[0] > grid.size[1]  # 6 prompts across, 3 runs down
    assert (out / "lora" / "adapter" / "adapter_config.json").is_file()


def test_the_novel_colour_is_in_the_lora_set_alone():
    """The pink scenes say pink and are pink (read back by the analyser against the palette with pink); the
    curriculum's generator never draws it, so the base model has never seen the word or the colour."""
    import math

    import numpy as np

    from data.embedded import synthetic
    from evaluation.analyse import analyse_scene

    palette = synthetic.COLOURS | synthetic.NOVEL_COLOURS
    for index in range(20):
        sample = synthetic.novel_colour_sample(0, index, 32)
        assert " pink " in sample.caption and sample.attributes["shapes"][0]["colour"] == "pink"
        reading = analyse_scene(np.asarray(sample.image), background=sample.attributes["background"])
        assert min(palette, key=lambda c: math.dist(reading.rgb, palette[c])) == "pink"
    assert all("pink" not in synthetic.caption(synthetic.spec_for_index(0, i)) for i in range(2000))
