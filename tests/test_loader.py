"""ShardDataset: epoch order, cross-shard mixing, the rank x worker split, exact resume, batches built in
the workers, caption mixing and bad shards.

Every record carries a unique id (its label, or its first text token) so the tests can tell which
records a loader yielded and how often. The key tests run with mix_shards 1 (shard by shard) and 4.
"""

import json
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import pytest
import torch

from data.loader import ShardDataset, build_loader, samples_per_epoch, window_order
from data.shards import DatasetSpec, ShardError, ShardWriter, sha256, write_manifest

LATENT = (2, 2, 2)
TEXT_LEN = 4
VAE = {"id": "identity", "scale": 1.0, "shift": 0.0, "pixel_range": [-1, 1]}


MIX = pytest.mark.parametrize("mix", [1, 4], ids=["mix1", "mix4"])


def make_labels(
    root: Path, shards: int, per_shard: int, last: int | None = None, label: Callable[[int], int] = lambda i: i
) -> Path:
    """`shards` shards of `per_shard` records (the last of `last`), record i labelled label(i) (i by
    default) and its latents filled with i % 256 (exact in bf16): a batch row's latents tell which
    record it is."""
    spec = DatasetSpec(kind="labels", latent_shape=LATENT, image_size=2, vae=VAE, num_classes=10_000)
    writer = ShardWriter(root, spec, records_per_shard=per_shard)
    total = per_shard * (shards - 1) + (per_shard if last is None else last)
    for i in range(total):
        writer.add(latents=torch.full(LATENT, float(i % 256)), labels=torch.tensor(label(i)))
    writer.close()
    write_manifest(root, spec, per_shard)
    return root


def make_text(root: Path, shards: int, per_shard: int) -> Path:
    """Text records: token 0 is the id, token 1 is 0 in the long caption and 1 in the short one."""
    spec = DatasetSpec(
        kind="text",
        latent_shape=LATENT,
        image_size=2,
        vae=VAE,
        tokenizer={"id": "test", "max_length": TEXT_LEN, "vocab_size": 100_000},
        short_captions=True,
    )
    writer = ShardWriter(root, spec, records_per_shard=per_shard)
    for i in range(shards * per_shard):
        long = torch.tensor([i, 0, 5, 5])
        writer.add(
            latents=torch.zeros(LATENT),
            text_tokens=long,
            attn_mask=torch.tensor([True, True, True, False]),
            short_text_tokens=torch.tensor([i, 1, 0, 0]),
            short_attn_mask=torch.tensor([True, True, False, False]),
        )
    writer.close()
    write_manifest(root, spec, per_shard)
    return root


def ids(records) -> list[int]:
    return [int(r["labels"]) for r in records]


def unbatch(batches) -> Iterator[dict]:
    """The records of a stream of batches, in batch order."""
    for batch in batches:
        for i in range(len(next(iter(batch.values())))):
            yield {k: v[i] for k, v in batch.items()}


def take(dataset: ShardDataset, n: int) -> list[dict]:
    """The first n records the dataset yields (in batches of dataset.batch_size, 1 by default)."""
    return list(islice(unbatch(iter(dataset)), n))


def rank_epoch_ids(
    root: Path, world: int, workers: int, seed: int = 0, epochs: int = 1, mix: int = 4
) -> list[list[int]]:
    """Ids each rank yields in its first `epochs` epochs, through a real DataLoader with `workers`
    workers (batch 1, so the round robin interleaves single samples and each epoch ends exactly)."""
    out = []
    for rank in range(world):
        loader = build_loader(
            root, batch_size=1, rank=rank, world_size=world, seed=seed, num_workers=workers, mix_shards=mix
        )
        n = loader.dataset.samples_per_epoch * epochs
        out.append(ids(unbatch(islice(loader, n))))
    return out


# ---- epoch order --------------------------------------------------------------------------------------


@MIX
def test_epoch_order_is_deterministic_and_changes_with_epoch_and_seed(tmp_path, mix):
    """10 shards of 10 records: windows of `mix` shards (4 + 4 + 2 for mix 4), each visited whole
    before the next; shard by shard with mix 1, interleaved across the window's shards with mix 4."""
    root = make_labels(tmp_path, shards=10, per_shard=10)
    one = ids(take(ShardDataset(root, seed=3, mix_shards=mix), 200))
    again = ids(take(ShardDataset(root, seed=3, mix_shards=mix), 200))
    other_seed = ids(take(ShardDataset(root, seed=4, mix_shards=mix), 200))
    assert one == again
    epoch0, epoch1 = one[:100], one[100:]
    assert sorted(epoch0) == sorted(epoch1) == list(range(100))
    assert epoch0 != epoch1
    assert other_seed[:100] != epoch0
    assert epoch0 != list(range(100))
    start = 0
    for size in [mix * 10] * (10 // mix) + [10 % mix * 10] * (10 % mix > 0):
        window = epoch0[start : start + size]
        shards = {i // 10 for i in window}
        assert sorted(window) == [i for s in sorted(shards) for i in range(s * 10, s * 10 + 10)]  # whole shards
        if mix > 1:  # interleaved: the window's first 10 records come from more than one shard
            assert len({i // 10 for i in window[:10]}) > 1
        start += size


def test_mix_shards_1_is_shard_by_shard(tmp_path):
    """mix_shards=1 keeps the shard-by-shard order: each shard's records together, in record_order."""
    root = make_labels(tmp_path, shards=4, per_shard=10)
    epoch0 = ids(take(ShardDataset(root, seed=3, mix_shards=1), 40))
    assert [len({i // 10 for i in epoch0[k : k + 10]}) for k in range(0, 40, 10)] == [1, 1, 1, 1]
    assert window_order(3, 0, 0, [10]).tolist() == list(range(10))  # one shard: the identity


@MIX
def test_no_shuffle_reads_in_file_order(tmp_path, mix):
    root = make_labels(tmp_path, shards=3, per_shard=5)
    assert ids(take(ShardDataset(root, shuffle=False, mix_shards=mix), 15)) == list(range(15))


def test_batches_mix_shards(tmp_path):
    """8 shards, each of a single label: with mix_shards=4 a batch of 32 holds records of several
    shards (>= 3 labels on average), where mix_shards=1 gives 1 or 2."""
    root = make_labels(tmp_path, shards=8, per_shard=64, label=lambda i: i // 64)

    def labels_per_batch(mix: int, workers: int) -> list[int]:
        loader = build_loader(root, 32, num_workers=workers, mix_shards=mix)
        return [len(set(b["labels"].tolist())) for b in islice(loader, 2 * 512 // 32)]  # 2 epochs

    for workers in (0, 2):
        mixed, single = labels_per_batch(4, workers), labels_per_batch(1, workers)
        assert sum(mixed) / len(mixed) >= 3, mixed
        assert max(single) <= 2, single


# ---- split --------------------------------------------------------------------------------------------


@MIX
@pytest.mark.parametrize(
    "shards, per_shard, world, workers",
    [(3, 12, 2, 2), (1, 12, 4, 0), (12, 5, 4, 0), (2, 8, 1, 2), (9, 8, 2, 2)],
    ids=["3-shards-world2-workers2", "1-shard-world4", "12-shards-world4", "2-shards-workers2", "9-shards-w2-w2"],
)
def test_split_covers_every_record_once_per_epoch(tmp_path, shards, per_shard, world, workers, mix):
    root = make_labels(tmp_path, shards, per_shard)
    per_rank = rank_epoch_ids(root, world, workers, epochs=2, mix=mix)
    n = shards * per_shard
    assert {len(r) for r in per_rank} == {2 * n // world}  # the same count on every rank
    for epoch in range(2):
        seen = [i for r in per_rank for i in r[epoch * n // world : (epoch + 1) * n // world]]
        assert sorted(seen) == list(range(n)), f"epoch {epoch}"


@MIX
def test_split_drops_the_remainder_consistently(tmp_path, mix):
    """30 records over 2 ranks x 2 workers: 7 per worker, 2 dropped per epoch, never a duplicate."""
    root = make_labels(tmp_path, shards=3, per_shard=10)
    per_rank = rank_epoch_ids(root, world=2, workers=2, epochs=3, mix=mix)
    assert [len(r) for r in per_rank] == [42, 42]
    dropped = []
    for epoch in range(3):
        seen = Counter(i for r in per_rank for i in r[epoch * 14 : (epoch + 1) * 14])
        assert len(seen) == 28 and max(seen.values()) == 1
        dropped.append(set(range(30)) - set(seen))
    assert len({frozenset(d) for d in dropped}) > 1  # the shuffled tail differs between epochs


@MIX
def test_each_rank_opens_only_the_shards_it_needs(tmp_path, mix):
    """12 shards of 5 records over 4 ranks: a rank's 15 contiguous records span at most 4 shards (mix 1)
    or 2 windows of 4 (mix 4), and it never holds more than `mix` shards open."""
    root = make_labels(tmp_path, shards=12, per_shard=5)
    for rank in range(4):
        ds = ShardDataset(root, rank=rank, world_size=4, batch_size=4, mix_shards=mix)
        open_most = 0
        for _ in islice(iter(ds), ds.samples_per_epoch // 4):
            open_most = max(open_most, ds.open_shards)
        assert ds.shards_loaded <= {1: 4, 4: 8}[mix]
        assert open_most <= mix


def test_too_few_records_for_the_slots_is_an_error(tmp_path):
    root = make_labels(tmp_path, shards=1, per_shard=3)
    with pytest.raises(ValueError, match="fewer than world_size"):
        ShardDataset(root, world_size=2, num_workers=2)


# ---- resume -------------------------------------------------------------------------------------------


def batches(loader, n: int) -> list[torch.Tensor]:
    return [b["labels"].clone() for b in islice(loader, n)]


@MIX
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_the_uninterrupted_batches(tmp_path, workers, mix):
    """5 shards of 11 records, batch 4: an epoch is 55 (w=0) or 2 x 27 (w=2) samples, so batch 5 is
    mid-epoch, batch 17 lies past the first epoch boundary, and odd k exercises the worker rotation.
    With mix 4 the windows (4 + 1 shards) split batches too."""
    root = make_labels(tmp_path, shards=5, per_shard=11)
    bs, total = 4, 40
    kw = dict(seed=1, num_workers=workers, mix_shards=mix)
    full = torch.cat(batches(build_loader(root, bs, **kw), total))
    for k in (5, 8, 17, 30):
        state = build_loader(root, bs, **kw).dataset.state_at(k * bs)
        state = json.loads(json.dumps(state))  # survives a checkpoint round trip
        resumed = build_loader(root, bs, state=state, **kw)
        assert torch.equal(torch.cat(batches(resumed, total - k)), full[k * bs :]), f"resumed at batch {k}"


@MIX
def test_resume_on_two_ranks(tmp_path, mix):
    root = make_labels(tmp_path, shards=3, per_shard=10)
    for rank in range(2):
        kw = dict(rank=rank, world_size=2, seed=5, num_workers=2, mix_shards=mix)
        full = torch.cat(batches(build_loader(root, 3, **kw), 20))
        state = build_loader(root, 3, **kw).dataset.state_at(7 * 3)
        assert torch.equal(torch.cat(batches(build_loader(root, 3, state=state, **kw), 13)), full[21:])


def test_state_dict_counts_samples_in_process(tmp_path):
    root = make_labels(tmp_path, shards=2, per_shard=10)
    loader = build_loader(root, 3, num_workers=0)
    it = iter(loader)
    for _ in range(8):
        next(it)
    state = loader.dataset.state_dict()
    assert (state["epoch"], state["position"], state["samples"]) == (1, 4, 24)
    assert state == loader.dataset.state_at(24)
    with pytest.raises(RuntimeError, match="state_at"):
        build_loader(root, 3, num_workers=2).dataset.state_dict()


def test_resume_with_another_setup_warns(tmp_path):
    root = make_labels(tmp_path, shards=2, per_shard=10)
    state = ShardDataset(root, num_workers=0).state_at(6)
    ds = ShardDataset(root, num_workers=2, batch_size=3)
    with pytest.warns(UserWarning, match="different setup"):
        ds.load_state_dict(state)
    assert ds.start_sample == 6
    with pytest.raises(ValueError, match="batch boundaries"):
        ShardDataset(root, num_workers=2, batch_size=4).load_state_dict(dict(state, num_workers=2, batch_size=4))
    with pytest.warns(UserWarning, match="mix_shards"):
        ShardDataset(root, mix_shards=1).load_state_dict(state)


# ---- caption mixing -----------------------------------------------------------------------------------


def kinds_by_id(root: Path, prob: float, seed: int = 0, **kw) -> dict[int, int]:
    ds = ShardDataset(root, seed=seed, short_caption_prob=prob, batch_size=8, **kw)
    out = {}
    for r in take(ds, ds.samples_per_epoch):
        kind = int(r["caption_kind"])
        assert int(r["text_tokens"][1]) == kind  # the tokens really come from the drawn caption
        assert int(r["attn_mask"].sum()) == (2 if kind else 3)
        out[int(r["text_tokens"][0])] = kind
    return out


def test_short_caption_mixing(tmp_path):
    root = make_text(tmp_path, shards=4, per_shard=250)
    assert set(kinds_by_id(root, 0.0).values()) == {0}
    assert set(kinds_by_id(root, 1.0).values()) == {1}
    mixed = kinds_by_id(root, 0.3)
    assert len(mixed) == 1000
    assert 0.25 < sum(mixed.values()) / 1000 < 0.35
    assert kinds_by_id(root, 0.3) == mixed  # reproducible
    # A record's draw does not depend on which rank or position reads it.
    merged = kinds_by_id(root, 0.3, rank=0, world_size=2) | kinds_by_id(root, 0.3, rank=1, world_size=2)
    assert merged == mixed
    assert kinds_by_id(root, 0.3, mix_shards=1) == mixed  # nor on how shards are mixed
    assert kinds_by_id(root, 0.3, seed=1) != mixed


def test_short_caption_prob_needs_short_captions(tmp_path):
    root = make_labels(tmp_path, shards=1, per_shard=4)
    with pytest.raises(ValueError, match="short captions"):
        ShardDataset(root, short_caption_prob=0.5)


# ---- bad shards ---------------------------------------------------------------------------------------


def corrupt_bytes(root: Path, file: str) -> None:
    path = root / file
    data = bytearray(path.read_bytes())
    data[-40:-30] = b"x" * 10
    path.write_bytes(bytes(data))


def write_nan_shard(root: Path, file: str) -> None:
    """A well-formed shard with a NaN latent, its checksum updated in the manifest: only the values are bad."""
    path = root / file
    shard = torch.load(path, weights_only=True)
    shard["latents"][3, 0, 0, 0] = float("nan")
    torch.save(shard, path)
    manifest = json.loads((root / "manifest.json").read_text())
    next(e for e in manifest["shards"] if e["file"] == file)["sha256"] = sha256(path)
    (root / "manifest.json").write_text(json.dumps(manifest))


@MIX
@pytest.mark.parametrize("corrupt, field", [(corrupt_bytes, "sha256"), (write_nan_shard, "latents")])
def test_bad_shard_raises_or_is_skipped(tmp_path, corrupt, field, mix):
    root = make_labels(tmp_path, shards=3, per_shard=10)
    corrupt(root, "shard-00001.pt")
    with pytest.raises(ShardError, match="shard-00001.pt") as err:
        take(ShardDataset(root, mix_shards=mix), 30)
    assert err.value.field == field

    ds = ShardDataset(root, skip_bad_shards=True, mix_shards=mix, batch_size=4)
    with pytest.warns(UserWarning, match=rf"shard-00001\.pt.*{field}"):
        got = ids(take(ds, 20))
    assert sorted(got) == list(range(10)) + list(range(20, 30))  # batches filled from later records
    assert ds.bad_shards == 1
    assert {len(b["labels"]) for b in islice(iter(ds), 15)} == {4}  # later epochs: full batches, no new warning
    assert ds.bad_shards == 1


def test_only_bad_shards_is_an_error(tmp_path):
    root = make_labels(tmp_path, shards=2, per_shard=5)
    corrupt_bytes(root, "shard-00000.pt")
    corrupt_bytes(root, "shard-00001.pt")
    with pytest.warns(UserWarning, match="skipping bad shard"), pytest.raises(RuntimeError, match="is bad"):
        take(ShardDataset(root, skip_bad_shards=True), 1)


# ---- batches ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_keep_dtypes_and_shapes(tmp_path, workers):
    root = make_text(tmp_path, shards=2, per_shard=6)
    batch = next(iter(build_loader(root, 4, num_workers=workers, short_caption_prob=0.5)))
    assert set(batch) == {"latents", "text_tokens", "attn_mask", "caption_kind"}
    assert batch["latents"].dtype == torch.bfloat16 and batch["latents"].shape == (4, *LATENT)
    assert batch["text_tokens"].dtype == torch.int32 and batch["text_tokens"].shape == (4, TEXT_LEN)
    assert batch["attn_mask"].dtype == torch.bool and batch["attn_mask"].shape == (4, TEXT_LEN)
    assert batch["caption_kind"].dtype == torch.int64 and batch["caption_kind"].shape == (4,)
    assert samples_per_epoch(12, 1, 0) == 12


@MIX
@pytest.mark.parametrize("workers", [0, 2])
def test_batch_rows_keep_each_record_together(tmp_path, workers, mix):
    """Each row's latents hold its record id (make_labels): every key of a row comes from the same record,
    also in batches concatenated from several shards."""
    root = make_labels(tmp_path, shards=4, per_shard=16)
    for batch in islice(build_loader(root, 6, seed=2, num_workers=workers, mix_shards=mix), 30):
        assert torch.equal(batch["latents"].float().flatten(1)[:, 0].long(), batch["labels"] % 256)
