"""The shard format: writer/reader round trip, manifest, and one clear error per kind of bad shard."""

import json

import pytest
import torch

from data.loader import build_loader
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


# ---------------------------------------------------------------------------------------------------------
# Manifests a person or a script got wrong


def edit_manifest(data_dir, change) -> None:
    path = data_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_an_empty_dataset_fails_validation(tmp_path, capsys):
    write_manifest(tmp_path, DatasetSpec(**TEXT_SPEC), 4)  # a folder with no shards at all
    errors = validate(tmp_path)
    assert [(e.file, e.field) for e in errors] == [(str(tmp_path / "manifest.json"), "shards")]
    assert "no shards" in errors[0].problem
    assert validate_main([str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "ok" not in captured.out and "manifest.json: shards: " in captured.err


def test_a_dataset_of_empty_shards_fails_validation(tmp_path):
    write_text_dataset(tmp_path, n=2, per_shard=2)
    edit_manifest(tmp_path, lambda m: m.update(num_records=0, shards=[dict(m["shards"][0], records=0)]))
    assert any(e.field == "shards" and "0 records" in e.problem for e in validate(tmp_path))


@pytest.mark.parametrize("file", ["/etc/passwd", "../outside/shard-00000.pt", "sub/../../outside/shard-00000.pt", ""])
def test_a_shard_outside_the_data_folder_is_refused_before_it_is_opened(tmp_path, file):
    data = tmp_path / "data"
    spec, _ = write_text_dataset(data, n=4, per_shard=4)
    # A valid shard with the right checksum, one folder up: before, validation passed and the loader read it.
    (tmp_path / "outside").mkdir()
    (data / "shard-00000.pt").rename(tmp_path / "outside" / "shard-00000.pt")
    edit_manifest(data, lambda m: m["shards"][0].update(file=file))
    for call in (lambda: read_manifest(data), lambda: build_loader(data, batch_size=2, num_workers=0)):
        with pytest.raises(ShardError) as info:
            call()
        assert (info.value.file, info.value.field) == (str(data / "manifest.json"), "shards[0].file")
        assert repr(file) in info.value.problem and "inside the data folder" in info.value.problem
    assert [e.field for e in validate(data)] == ["shards[0].file"]
    entry = dict(file=file, records=4, sha256="0" * 64)
    with pytest.raises(ShardError, match="inside the data folder"):  # a caller with its own entry: same check
        load_shard(data, entry, spec)


@pytest.mark.parametrize(
    "change, field, words",
    [
        (lambda m: m["shards"][0].pop("records"), "shards[0].records", "missing"),
        (lambda m: m["shards"][1].update(records="4"), "shards[1].records", "not a non-negative integer"),
        (lambda m: m["shards"][0].update(records=-1), "shards[0].records", "not a non-negative integer"),
        (lambda m: m["shards"][0].update(records=2.5), "shards[0].records", "not a non-negative integer"),
        (lambda m: m["shards"][0].update(records=True), "shards[0].records", "not a non-negative integer"),
        (lambda m: m["shards"][0].pop("file"), "shards[0].file", "missing"),
        (lambda m: m["shards"][0].update(file=7), "shards[0].file", "not a string"),
        (lambda m: m["shards"][0].update(sha256=None), "shards[0].sha256", "not a string"),
        (lambda m: m["shards"].__setitem__(1, "shard-00001.pt"), "shards[1]", "not an object"),
        (lambda m: m["shards"].__setitem__(1, m["shards"][0]), "shards[1].file", "listed twice"),
        (lambda m: m.update(shards={"file": "shard-00000.pt"}), "shards", "not a list"),
        (lambda m: m.update(num_records="8"), "num_records", "not a non-negative integer"),
    ],
)
def test_each_bad_manifest_entry_gives_a_clear_error(tmp_path, change, field, words):
    write_text_dataset(tmp_path, n=8, per_shard=4)
    edit_manifest(tmp_path, change)
    for call in (lambda: read_manifest(tmp_path), lambda: build_loader(tmp_path, batch_size=2, num_workers=0)):
        with pytest.raises(ShardError) as info:
            call()
        assert (info.value.file, info.value.field) == (str(tmp_path / "manifest.json"), field)
        assert words in info.value.problem
    assert [(e.field, words in e.problem) for e in validate(tmp_path)] == [(field, True)]


@pytest.mark.parametrize("text", ["[]", '"rfdit-latent-shards"', "null", "3"])
def test_a_manifest_that_is_not_a_json_object_gives_a_clear_error(tmp_path, text, capsys):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ShardError, match="manifest.json: manifest: .*not a JSON object"):
        read_manifest(tmp_path)
    assert validate_main([str(tmp_path)]) == 1
    assert "not a JSON object" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Bounded memory: the streaming writer and the chunked check


def test_the_streaming_writer_writes_what_torch_save_writes(tmp_path):
    """Records spilled to disk every few records (a 3 KiB buffer) give a shard that loads, plain and memory-mapped,
    to exactly the tensors torch.save of the stacked records gives; the buffer never holds more than its budget
    plus one record, and no temporary file is left."""
    spec = DatasetSpec(**TEXT_SPEC)
    budget, record = 3 << 10, 4 * 8 * 8 * 2 + 4 * 6 * 6  # bytes: bf16 latents, int32 tokens and bool masks x 2
    records, gen = [], torch.Generator().manual_seed(0)
    with ShardWriter(tmp_path / "stream", spec, records_per_shard=50, buffer_bytes=budget) as writer:
        for i in range(73):
            mask = torch.arange(6) < 1 + i % 6
            records.append(dict(latents=torch.randn(4, 8, 8, generator=gen), text_tokens=torch.arange(6) * mask,
                                attn_mask=mask, short_text_tokens=torch.arange(6) * mask, short_attn_mask=mask))
            writer.add(**records[-1])
            assert writer.pending_bytes < budget + record
    assert sorted(p.name for p in (tmp_path / "stream").iterdir()) == [
        f"shard-0000{i}.{ext}" for i in (0, 1) for ext in ("captions.jsonl", "json", "pt")]
    for index, rows in ((0, records[:50]), (1, records[50:])):
        reference = {k: torch.stack([r[k] for r in rows]).to(dtype) for k, (dtype, _) in spec.expected().items()}
        torch.save(reference, tmp_path / "reference.pt")
        for mmap in (False, True):
            streamed = torch.load(tmp_path / "stream" / f"shard-0000{index}.pt", weights_only=True, mmap=mmap)
            saved = torch.load(tmp_path / "reference.pt", weights_only=True, mmap=mmap)
            assert streamed.keys() == saved.keys()
            for key in saved:
                assert streamed[key].dtype == saved[key].dtype and torch.equal(streamed[key], saved[key]), key


def test_a_failed_writer_leaves_no_temporary_file(tmp_path):
    spec = DatasetSpec(kind="labels", latent_shape=(3, 4, 4), image_size=4, vae=dict(id="identity"), num_classes=5)
    with pytest.raises(RuntimeError, match="stop"):
        with ShardWriter(tmp_path, spec, records_per_shard=10, buffer_bytes=1) as writer:
            for i in range(14):
                writer.add(latents=torch.zeros(3, 4, 4), labels=torch.tensor(i % 5))
            raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.captions.jsonl", "shard-00000.json",
                                                          "shard-00000.pt"]  # the finished shard only


def test_the_check_reads_a_chunk_at_a_time_and_finds_a_nan_in_the_last(tmp_path, monkeypatch):
    import data.shards as shards

    spec, _ = write_text_dataset(tmp_path, n=40, per_shard=40)
    rewrite(tmp_path, lambda s: s["latents"].__setitem__((39, 3, 7, 7), float("nan")))
    opened = []
    real_open = shards._open
    monkeypatch.setattr(shards, "_open", lambda path: opened.append(path) or real_open(path))
    monkeypatch.setattr(shards, "CHECK_CHUNK_BYTES", 4 * 8 * 8 * 2 * 5)  # five latents a chunk
    errors = validate(tmp_path)
    assert [(e.field, "NaN" in e.problem) for e in errors] == [("latents", True)]
    assert len(opened) >= 40 // 5  # a mapping of its own for each chunk of the latents


# ---------------------------------------------------------------------------------------------------------
# Buckets and stored text features

FEATURES = dict(encoder=dict(id="acme/encoder", revision="0123abc"), width=5, dtype="bfloat16", max_length=6,
                layout="compact")


def write_feature_dataset(out_dir, n: int = 8, per_shard: int = 8):
    spec = DatasetSpec(**TEXT_SPEC, text_features=FEATURES)
    gen = torch.Generator().manual_seed(1)
    with ShardWriter(out_dir, spec, records_per_shard=per_shard) as writer:
        for i in range(n):
            mask = torch.arange(6) < 2 + i % 4
            writer.add(latents=torch.randn(4, 8, 8, generator=gen), text_tokens=torch.arange(6) * mask,
                       attn_mask=mask, short_text_tokens=torch.arange(6) * mask, short_attn_mask=mask,
                       text_features=torch.randn(6, 5, generator=gen), short_text_features=torch.randn(6, 5))
    write_manifest(out_dir, spec, per_shard)
    return spec


@pytest.mark.parametrize(
    "mutate, field, words",
    [
        (lambda s: s.pop("text_features"), "text_features", "missing key"),
        (lambda s: s.update(text_features=s["text_features"].float()), "text_features", "dtype"),
        (lambda s: s.update(short_text_features=s["short_text_features"][:, :4]), "short_text_features", "shape"),
        (lambda s: s["text_features"].__setitem__((3, 1), float("inf")), "text_features", "NaN or Inf"),
        (lambda s: s["text_feature_offsets"].__setitem__(2, 3), "text_feature_offsets", "record 1"),
        (lambda s: s["attn_mask"].__setitem__((0, 5), True), "text_feature_offsets", "record 0's features"),
        (lambda s: s.update(short_text_feature_offsets=s["short_text_feature_offsets"][:-1]),
         "short_text_feature_offsets", "shape"),
    ],
)
def test_each_bad_feature_field_gives_a_clear_error(tmp_path, mutate, field, words):
    write_feature_dataset(tmp_path)
    assert validate(tmp_path) == []
    path = rewrite(tmp_path, mutate)
    errors = validate(tmp_path)
    assert [(e.file, e.field) for e in errors] == [(str(path), field)] and words in errors[0].problem


def test_features_hold_only_the_real_tokens(tmp_path):
    write_feature_dataset(tmp_path, n=8)
    shard = torch.load(tmp_path / "shard-00000.pt", weights_only=True)
    lengths = [2 + i % 4 for i in range(8)]
    assert shard["text_features"].shape == (sum(lengths), 5)  # no padded rows on disk
    assert shard["text_feature_offsets"].tolist() == [sum(lengths[:i]) for i in range(9)]


def test_validate_checks_the_encoder_identity(tmp_path, capsys):
    from core.identity import files_sha256
    from data.features import WEIGHT_PATTERNS

    write_feature_dataset(tmp_path / "data")
    folder = tmp_path / "my-encoder"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "t5"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    assert validate_main([str(tmp_path / "data"), "--text-encoder", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "'acme/encoder' (revision 0123abc)" in err and f"'sha256:{files_sha256(folder, WEIGHT_PATTERNS)}'" in err
    assert validate_main([str(tmp_path / "data")]) == 0
    assert "text features of acme/encoder" in capsys.readouterr().out
    # The hash covers every weight and config file by name, size and bytes, in name order.
    import hashlib

    digest = hashlib.sha256()
    for name, data in (("config.json", b'{"model_type": "t5"}'), ("model.safetensors", b"weights")):
        digest.update(f"{name}\0{len(data)}\0".encode() + data)
    assert files_sha256(folder, WEIGHT_PATTERNS) == digest.hexdigest()


def test_a_bucketed_manifest_counts_and_checks_its_buckets(tmp_path):
    buckets = {"8x4": dict(size=[8, 4], latent_shape=[4, 8, 4]), "4x8": dict(size=[4, 8], latent_shape=[4, 4, 8])}
    spec = DatasetSpec(**dict(TEXT_SPEC, short_captions=False), buckets=buckets)
    mask = torch.arange(6) < 3
    for name, n in (("8x4", 5), ("4x8", 3)):
        with ShardWriter(tmp_path, spec, records_per_shard=4, prefix=f"shard+{name}", bucket=name) as writer:
            for _ in range(n):
                writer.add(latents=torch.zeros(spec.latent_shape_of(name)), text_tokens=torch.arange(6) * mask,
                           attn_mask=mask)
    manifest = write_manifest(tmp_path, spec, 4)
    assert manifest["buckets"] == {"8x4": 5, "4x8": 3}
    assert sorted((e["file"], e["bucket"], e["records"]) for e in manifest["shards"]) == [
        ("shard+4x8-00000.pt", "4x8", 3), ("shard+8x4-00000.pt", "8x4", 4), ("shard+8x4-00001.pt", "8x4", 1)]
    assert validate(tmp_path) == []
    edit_manifest(tmp_path, lambda m: m["shards"][1].update(bucket="4x8"))  # an 8x4 shard, filed under 4x8
    errors = validate(tmp_path)
    assert [(e.field, "shape" in e.problem) for e in errors] == [("latents", True)]
    edit_manifest(tmp_path, lambda m: m["shards"][0].update(bucket="9x9"))
    with pytest.raises(ShardError, match=r"shards\[0\]\.bucket: '9x9' is not one of"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="not one of the dataset's"):
        ShardWriter(tmp_path, spec, bucket="9x9")
