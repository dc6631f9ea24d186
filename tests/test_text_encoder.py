"""FrozenTextEncoder against sentence-transformers (an independent path to the same MiniLM weights), its
freezing, and the encoder-decoder loading paths on tiny randomly initialised models saved to tmp_path."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from core.text_encoder import BUNDLED_ENCODER, FrozenTextEncoder, default_text_encoder_path, weights_sha256

CAPTIONS = [
    "a small red circle in the top left on a gray background",
    "emoji: grinning face",
    "two large blue squares next to a yellow triangle, centred, on a white background",
]
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "text_encoder"


@pytest.fixture(scope="module")
def minilm() -> FrozenTextEncoder:
    return FrozenTextEncoder.from_pretrained(None, device="cpu")


def tokenize(texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded int32 ids and a bool mask, as the data pipeline stores them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_text_encoder_path())
    out = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return out["input_ids"].to(torch.int32), out["attention_mask"].bool()


def test_minilm_matches_sentence_transformers(minilm: FrozenTextEncoder) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(default_text_encoder_path(), device="cpu")
    # A list of [n_valid, 384] tensors: sentence-transformers drops the padding of each caption.
    reference = st.encode(CAPTIONS, output_value="token_embeddings", convert_to_numpy=False)
    tokens, mask = tokenize(CAPTIONS, max_length=32)
    out = minilm(tokens, mask)
    assert out.shape == (len(CAPTIONS), 32, 384) and out.dtype == torch.float32
    assert minilm.hidden_size == 384
    for i, ref in enumerate(reference):
        n = int(mask[i].sum())
        assert ref.shape == (n, 384)
        torch.testing.assert_close(out[i, :n], ref.float().cpu(), atol=1e-5, rtol=1e-5)
        assert out[i, n:].abs().max() == 0  # padded positions are zeros


def test_padding_does_not_change_valid_positions(minilm: FrozenTextEncoder) -> None:
    short_tokens, short_mask = tokenize(CAPTIONS, max_length=24)
    long_tokens, long_mask = tokenize(CAPTIONS, max_length=64)
    short, long = minilm(short_tokens, short_mask), minilm(long_tokens, long_mask)
    assert torch.equal(short_mask, long_mask[:, :24]) and not long_mask[:, 24:].any()
    torch.testing.assert_close(long[:, :24][short_mask], short[short_mask], atol=1e-5, rtol=1e-5)


def test_dropped_caption_row_is_finite_zeros(minilm: FrozenTextEncoder) -> None:
    tokens, mask = tokenize(CAPTIONS[:2], max_length=16)
    mask[1] = False  # a caption dropped for classifier-free guidance
    out = minilm(tokens, mask)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    torch.testing.assert_close(out[0], minilm(tokens[:1], mask[:1])[0], atol=1e-5, rtol=1e-5)


def test_frozen(minilm: FrozenTextEncoder) -> None:
    assert not any(p.requires_grad for p in minilm.parameters())
    parent = nn.ModuleDict(dict(text=minilm))  # a parent's .train() must not switch dropout back on
    parent.train()
    assert not minilm.training and not any(m.training for m in minilm.modules())
    assert minilm.train(True) is minilm and not minilm.encoder.training
    tokens, mask = tokenize(CAPTIONS[:1], max_length=16)
    with torch.enable_grad():
        out = minilm(tokens, mask)
    assert not out.requires_grad and out.grad_fn is None
    info = minilm.info
    assert info["hidden_size"] == 384 and info["dtype"] == "float32"
    assert info["kind"] == "encoder" and info["model_type"] == "bert"
    # Its portable identity, never the local path (tests/test_checkpoint_sources.py recomputes the hash).
    assert info["id"] == BUNDLED_ENCODER and info["sha256"] == weights_sha256(default_text_encoder_path())
    assert default_text_encoder_path() not in repr(info)


def _tiny_inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(2, vocab, (2, 7), dtype=torch.int32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    return tokens, mask


def _check_encoder_of(full: nn.Module, enc: FrozenTextEncoder, width: int, vocab: int) -> None:
    """enc returns [b, l, width] equal to the full model's own encoder, and holds no decoder weights."""
    tokens, mask = _tiny_inputs(vocab)
    out = enc(tokens, mask)
    assert out.shape == (2, 7, width) and enc.hidden_size == width
    with torch.no_grad():
        ref = full.get_encoder()(input_ids=tokens.long(), attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(out[mask], ref[mask], atol=1e-5, rtol=1e-5)
    assert not any("decoder" in name for name, _ in enc.named_parameters())
    assert not hasattr(enc.encoder, "decoder")


def test_t5_encoder_decoder_loads_encoder_only(tmp_path: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, dropout_rate=0.0
    )
    full = T5ForConditionalGeneration(config).eval()
    full.save_pretrained(tmp_path)
    enc = FrozenTextEncoder.from_pretrained(tmp_path, device="cpu", local_files_only=True)
    assert type(enc.encoder).__name__ == "T5EncoderModel" and enc.info["kind"] == "encoder-class"
    _check_encoder_of(full, enc, 32, 64)


def test_saved_t5_encoder_alone_loads_without_a_decoder(tmp_path: Path) -> None:
    """SD3's text_encoder_3 is such a checkpoint: its config need not say is_encoder_decoder."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0)
    full = T5EncoderModel(config).eval()
    full.save_pretrained(tmp_path / "text_encoder")
    enc = FrozenTextEncoder.from_pretrained(tmp_path, device="cpu", subfolder="text_encoder", local_files_only=True)
    assert type(enc.encoder).__name__ == "T5EncoderModel"
    _check_encoder_of(full, enc, 32, 64)


def test_t5gemma_encoder_decoder_loads_encoder_only(tmp_path: Path) -> None:
    from transformers import T5GemmaConfig, T5GemmaForConditionalGeneration

    module = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    full = T5GemmaForConditionalGeneration(T5GemmaConfig(encoder=module, decoder=module, vocab_size=64)).eval()
    full.save_pretrained(tmp_path)
    enc = FrozenTextEncoder.from_pretrained(str(tmp_path), device="cpu", local_files_only=True)
    assert type(enc.encoder).__name__ == "T5GemmaEncoderModel" and enc.info["model_type"] == "t5gemma"
    _check_encoder_of(full, enc, 32, 64)


def test_other_encoder_decoder_keeps_get_encoder(tmp_path: Path) -> None:
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=32,
    )
    full = BartForConditionalGeneration(config).eval()
    full.save_pretrained(tmp_path)
    enc = FrozenTextEncoder.from_pretrained(tmp_path, device="cpu", local_files_only=True)
    assert enc.info["kind"] == "get_encoder" and type(enc.encoder).__name__ == "BartEncoder"
    _check_encoder_of(full, enc, 32, 64)


def test_unreachable_hub_id_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "no-such-org/no-such-text-encoder"
    with pytest.raises(OSError, match=name) as err:
        FrozenTextEncoder.from_pretrained(name, device="cpu")
    assert "HF_HUB_OFFLINE" in str(err.value) and "local folder" in str(err.value)


def test_configs_declare_widths_and_minilm_config_loads(minilm: FrozenTextEncoder) -> None:
    widths = {"minilm": 384, "t5gemma": 2048, "t5_xxl": 4096}
    for stem, width in widths.items():
        cfg = OmegaConf.load(CONFIGS / f"{stem}.yaml")
        assert cfg.hidden_size == width and cfg.trust_remote_code is False
        assert {"name_or_path", "max_length", "dtype", "tokenizer"} <= set(cfg)
    cfg = OmegaConf.load(CONFIGS / "minilm.yaml")
    assert FrozenTextEncoder.from_config(cfg, device="cpu").info == minilm.info
    with pytest.raises(ValueError, match="384"):
        FrozenTextEncoder.from_config(OmegaConf.merge(cfg, dict(hidden_size=2048)), device="cpu")
