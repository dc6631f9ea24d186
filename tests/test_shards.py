"""The shard format: writer/reader round trip, manifest, and one clear error per kind of bad shard."""

import json

import pytest
import torch

from data.shards import DatasetSpec, ShardError, ShardWriter, load_shard, read_manifest, write_manifest
from data.validate import main as validate_main
from data.validate import validate

TEXT_SPEC = dict(
    kind="text",
    latent_shape=(4, 8, 8),
    image_size=64,
    vae=dict(id="test-vae", scale=1.5305, shift=0.0609, pixel_range=[0, 1]),
    tokenizer=dict(id="test-tok", max_length=6, vocab_size=100),
    short_captions=True,
    source="unit test",
    licence="CC0",
)


def write_text_dataset(out_dir, n: int, per_shard: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    spec = DatasetSpec(**TEXT_SPEC)
    writer = ShardWriter(out_dir, spec, records_per_shard=per_shard)
    records = []
    for i in range(n):
        mask = torch.arange(6) < 2 + i % 4
        record = dict(
            latents=torch.randn(4, 8, 8, generator=gen),
            text_tokens=torch.randint(0, 100, (6,), generator=gen) * mask,
            attn_mask=mask,
            short_text_tokens=torch.randint(0, 100, (6,), generator=gen) * mask,
            short_attn_mask=mask,
        )
        records.append(record)
        writer.add(caption=dict(caption=f"long caption {i}", short_caption=f"short {i}"), **record)
    writer.close()
    write_manifest(out_dir, spec, per_shard)
    return spec, records


def test_round_trip_with_partial_last_shard_and_no_garbage_rows(tmp_path):
    spec, records = write_text_dataset(tmp_path, n=23, per_shard=10)
    manifest, spec_read = read_manifest(tmp_path)
    assert spec_read == spec
    assert [e["records"] for e in manifest["shards"]] == [10, 10, 3]  # the last partial shard is saved
    assert manifest["num_records"] == 23 and manifest["spec"]["licence"] == "CC0"
    loaded = [load_shard(tmp_path, e, spec) for e in manifest["shards"]]
    latents = torch.cat([s["latents"] for s in loaded])
    assert latents.dtype == torch.bfloat16 and latents.shape == (23, 4, 8, 8)
    expected = torch.stack([r["latents"] for r in records]).to(torch.bfloat16)
    assert torch.equal(latents, expected)
    tokens = torch.cat([s["text_tokens"] for s in loaded])
    assert tokens.dtype == torch.int32 and torch.equal(tokens, torch.stack([r["text_tokens"] for r in records]).int())
    assert torch.equal(torch.cat([s["attn_mask"] for s in loaded]), torch.stack([r["attn_mask"] for r in records]))
    captions = (tmp_path / "shard-00002.captions.jsonl").read_text().splitlines()
    assert [json.loads(c)["short_caption"] for c in captions] == ["short 20", "short 21", "short 22"]


def test_shards_load_with_weights_only_and_refuse_pickled_code(tmp_path):
    spec, _ = write_text_dataset(tmp_path, n=4, per_shard=4)
    manifest, _ = read_manifest(tmp_path)
    path = tmp_path / manifest["shards"][0]["file"]

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"latents": Evil()}, path)
    with pytest.raises(ShardError, match="unreadable"):
        load_shard(tmp_path, manifest["shards"][0], spec, verify_checksum=False)


def rewrite(tmp_path, mutate):
    """Load shard 0, change it, save it back and refresh its checksum so only the mutation is wrong."""
    from data.shards import sha256

    manifest, _ = read_manifest(tmp_path)
    entry = manifest["shards"][0]
    path = tmp_path / entry["file"]
    shard = torch.load(path, weights_only=True)
    mutate(shard)
    torch.save(shard, path)
    entry["sha256"] = sha256(path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize(
    "mutate, field, words",
    [
        (lambda s: s.pop("attn_mask"), "attn_mask", "missing key"),
        (lambda s: s.update(latents=s["latents"].float()), "latents", "dtype"),
        (lambda s: s.update(text_tokens=s["text_tokens"][:, :5]), "text_tokens", "shape"),
        (lambda s: s["short_text_tokens"].__setitem__((0, 0), 100), "short_text_tokens", "vocabulary"),
        (lambda s: s["latents"].__setitem__((1, 0, 0, 0), float("nan")), "latents", "NaN"),
    ],
)
def test_each_bad_field_gives_a_clear_error(tmp_path, mutate, field, words):
    spec, _ = write_text_dataset(tmp_path, n=8, per_shard=8)
    path = rewrite(tmp_path, mutate)
    errors = validate(tmp_path)
    assert len(errors) == 1
    assert errors[0].file == str(path) and errors[0].field == field and words in errors[0].problem


def test_truncated_file_and_checksum_mismatch(tmp_path):
    spec, _ = write_text_dataset(tmp_path, n=8, per_shard=4)
    manifest, _ = read_manifest(tmp_path)
    first, second = (tmp_path / e["file"] for e in manifest["shards"])
    first.write_bytes(first.read_bytes()[:200])  # truncated
    data = bytearray(second.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte
    second.write_bytes(bytes(data))
    errors = validate(tmp_path)
    assert [(e.file, e.field) for e in errors] == [(str(first), "sha256"), (str(second), "sha256")]
    unchecked = validate(tmp_path, verify_checksum=False)
    assert unchecked[0].file == str(first) and unchecked[0].field == "file" and "unreadable" in unchecked[0].problem


def test_validate_cli_exit_codes_and_messages(tmp_path, capsys):
    write_text_dataset(tmp_path, n=5, per_shard=5)
    assert validate_main([str(tmp_path)]) == 0
    assert "5 records" in capsys.readouterr().out
    (tmp_path / "shard-00000.pt").unlink()
    assert validate_main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "shard-00000.pt: file: missing" in err


def test_missing_manifest_and_bad_spec(tmp_path):
    assert "manifest" in str(validate(tmp_path)[0])
    (tmp_path / "manifest.json").write_text(json.dumps(dict(format="rfdit-latent-shards", spec={}, shards=[])))
    assert validate(tmp_path)[0].field == "spec"


def test_labels_out_of_range(tmp_path):
    spec = DatasetSpec(kind="labels", latent_shape=(3, 4, 4), image_size=4, vae=dict(id="identity"), num_classes=5)
    writer = ShardWriter(tmp_path, spec, records_per_shard=4)
    for i in range(4):
        writer.add(latents=torch.zeros(3, 4, 4), labels=torch.tensor(i))
    writer.close()
    write_manifest(tmp_path, spec, 4)
    assert validate(tmp_path) == []
    rewrite(tmp_path, lambda s: s["labels"].__setitem__(0, 7))
    assert validate(tmp_path)[0].field == "labels"


def test_writer_rejects_wrong_records(tmp_path):
    writer = ShardWriter(tmp_path, DatasetSpec(**TEXT_SPEC), records_per_shard=4)
    with pytest.raises(ValueError, match="expected"):
        writer.add(latents=torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match="latents"):
        writer.add(
            latents=torch.zeros(4, 8, 9), text_tokens=torch.zeros(6), attn_mask=torch.ones(6),
            short_text_tokens=torch.zeros(6), short_attn_mask=torch.ones(6),
        )
