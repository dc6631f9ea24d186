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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- aspect-ratio buckets -----------------------------------------------------------------------------

BUCKETS = {"2x4": (1, 2, 4), "3x3": (1, 3, 3), "4x2": (1, 4, 2)}  # name -> latent shape [c, h, w]


def make_bucketed(root: Path, counts: dict[str, int], per_shard: int) -> Path:
    """A labels dataset of buckets: `counts[name]` records in bucket `name`, ids numbered across buckets in the
    order of `counts`; a record's latents are filled with its id (exact in bf16 below 256)."""
    spec = DatasetSpec(kind="labels", latent_shape=(1, 3, 3), image_size=3, vae=VAE, num_classes=10_000,
                       buckets={n: dict(size=list(BUCKETS[n][1:]), latent_shape=list(BUCKETS[n])) for n in counts})
    start = 0
    for name, n in counts.items():
        with ShardWriter(root, spec, per_shard, prefix=f"shard+{name}", bucket=name) as writer:
            for i in range(start, start + n):
                writer.add(latents=torch.full(BUCKETS[name], float(i % 256)), labels=torch.tensor(i))
        start += n
    write_manifest(root, spec, per_shard)
    return root


def bucket_of(batch: dict) -> str:
    shape = tuple(batch["latents"].shape[1:])
    return next(name for name, s in BUCKETS.items() if s == shape)


def epoch_batches(root: Path, world: int, workers: int, batch: int, seed: int = 0, epochs: int = 1, **kw):
    """Each rank's batches of its first `epochs` epochs, through a real DataLoader."""
    out = []
    for rank in range(world):
        loader = build_loader(root, batch, rank=rank, world_size=world, seed=seed, num_workers=workers, **kw)
        n = loader.dataset.samples_per_epoch // batch * epochs
        out.append([{k: v.clone() for k, v in b.items()} for b in islice(loader, n)])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world, workers, mix", [(1, 0, 4), (2, 0, 1), (2, 2, 4), (3, 2, 2)])
def test_bucketed_batches_share_a_bucket_and_split_evenly(tmp_path, world, workers, mix):
    counts = {"2x4": 61, "3x3": 40, "4x2": 23}
    root = make_bucketed(tmp_path, counts, per_shard=7)
    ranks = epoch_batches(root, world, workers, batch=3, mix_shards=mix)
    slots = world * max(workers, 1)
    expected = {name: n // slots // 3 * max(workers, 1) for name, n in counts.items()}  # K_b batches x W, per rank
    seen = []
    for batches_ in ranks:
        assert len(batches_) == sum(expected.values())  # every rank takes the same number of steps
        per_bucket = Counter(bucket_of(b) for b in batches_)
        assert dict(per_bucket) == {k: v for k, v in expected.items() if v}
        for b in batches_:
            assert len(b["labels"]) == 3
            # a row's latents are its id: rows kept together, and the bucket holds ids of that bucket only
            assert torch.equal(b["latents"].float().flatten(1)[:, 0].long(), b["labels"] % 256)
        seen += [int(i) for b in batches_ for i in b["labels"]]
    assert len(seen) == len(set(seen))  # no record twice in an epoch, over all ranks and workers
    first = {"2x4": range(0, 61), "3x3": range(61, 101), "4x2": range(101, 124)}
    for b in (b for r in ranks for b in r):
        assert all(int(i) in first[bucket_of(b)] for i in b["labels"])


def test_bucket_order_is_deterministic_in_seed_and_epoch(tmp_path):
    root = make_bucketed(tmp_path, {"2x4": 30, "3x3": 30, "4x2": 30}, per_shard=10)

    def run(seed: int) -> list[list[int]]:
        return [b["labels"].tolist() for b in epoch_batches(root, 1, 0, 3, seed=seed, epochs=2)[0]]

    one = run(1)
    assert one == run(1)
    half = len(one) // 2
    assert one[:half] != one[half:] and sorted(sum(one[:half], [])) == sorted(sum(one[half:], []))
    assert run(2) != one
    sequence = [bucket_of(b) for b in epoch_batches(root, 1, 0, 3, seed=1)[0]]
    assert sequence != sorted(sequence)  # buckets interleave, they do not come one after another


def test_bucket_frequencies_are_proportional_to_their_records(tmp_path):
    counts = {"2x4": 600, "3x3": 300, "4x2": 100}
    ds = ShardDataset(make_bucketed(tmp_path, counts, per_shard=100), batch_size=10)
    got = Counter(bucket_of(b) for b in islice(iter(ds), ds.batches_per_epoch * 3))
    assert got == {"2x4": 180, "3x3": 90, "4x2": 30}  # 60 / 30 / 10 batches an epoch, 3 epochs


def test_ranks_draw_the_same_bucket_at_every_step(tmp_path):
    root = make_bucketed(tmp_path, {"2x4": 50, "3x3": 47, "4x2": 31}, per_shard=6)
    ranks = epoch_batches(root, 3, 0, batch=2, epochs=2)
    for step in zip(*ranks, strict=True):
        assert len({bucket_of(b) for b in step}) == 1


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_bucketed_resume_reproduces_the_uninterrupted_batches(tmp_path, workers):
    root = make_bucketed(tmp_path, {"2x4": 37, "3x3": 25, "4x2": 19}, per_shard=5)
    kw = dict(seed=3, num_workers=workers, mix_shards=2)
    per_epoch = build_loader(root, 3, **kw).dataset.samples_per_epoch // 3
    total = 3 * per_epoch
    full = list(islice(build_loader(root, 3, **kw), total))
    for k in (1, per_epoch - 1, per_epoch, per_epoch + 3):
        state = json.loads(json.dumps(build_loader(root, 3, **kw).dataset.state_at(k * 3)))
        resumed = list(islice(build_loader(root, 3, state=state, **kw), total - k))
        assert all(torch.equal(a["latents"], b["latents"]) and torch.equal(a["labels"], b["labels"])
                   for a, b in zip(resumed, full[k:], strict=True)), f"resumed at batch {k}"
    with pytest.raises(ValueError, match="batch boundaries"):
        ShardDataset(root, batch_size=3).load_state_dict(ShardDataset(root, batch_size=3).state_at(4))


def test_bucket_filter_and_too_small_buckets(tmp_path):
    root = make_bucketed(tmp_path, {"2x4": 20, "3x3": 20, "4x2": 2}, per_shard=10)
    ds = ShardDataset(root, batch_size=4, buckets=["3x3"])
    assert {bucket_of(b) for b in islice(iter(ds), 12)} == {"3x3"} and ds.num_records == 20
    with pytest.raises(ValueError, match="has buckets"):
        ShardDataset(root, buckets=["5x5"])
    with pytest.warns(UserWarning, match="bucket 4x2 .* none of them is drawn"):
        ds = ShardDataset(root, batch_size=4)
    assert "4x2" not in {bucket_of(b) for b in islice(iter(ds), 20)}
    with pytest.raises(ValueError, match="no buckets"):
        ShardDataset(make_labels(tmp_path / "plain", shards=1, per_shard=4), buckets=["3x3"])


# ---- stored text features -----------------------------------------------------------------------------

WIDTH = 3


def make_features(root: Path, n: int, per_shard: int) -> tuple[Path, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Text records with stored features: record i's long caption has 1 + i % 3 real tokens, its short one 1, and
    its states are random; returns each id's (long, short) states at its real tokens, as given to the writer."""
    spec = DatasetSpec(kind="text", latent_shape=LATENT, image_size=2, vae=VAE, short_captions=True,
                       tokenizer={"id": "test", "max_length": TEXT_LEN, "vocab_size": 100_000},
                       text_features=dict(encoder=dict(id="test/encoder", revision="abc"), width=WIDTH,
                                          dtype="bfloat16", max_length=TEXT_LEN, layout="compact"))
    gen, states = torch.Generator().manual_seed(0), {}
    with ShardWriter(root, spec, records_per_shard=per_shard, buffer_bytes=200) as writer:
        for i in range(n):
            long_mask, short_mask = torch.arange(TEXT_LEN) < 1 + i % 3, torch.arange(TEXT_LEN) < 1
            long, short = (torch.randn(TEXT_LEN, WIDTH, generator=gen).bfloat16() for _ in range(2))
            states[i] = (long[long_mask], short[short_mask])
            writer.add(latents=torch.zeros(LATENT), text_tokens=torch.tensor([i, 0, 5, 5]), attn_mask=long_mask,
                       short_text_tokens=torch.tensor([i, 1, 0, 0]), short_attn_mask=short_mask,
                       text_features=long, short_text_features=short)
    write_manifest(root, spec, per_shard)
    return root, states


@pytest.mark.parametrize("workers", [0, 2])
def test_stored_features_come_back_at_their_mask_positions(tmp_path, workers):
    root, states = make_features(tmp_path, n=23, per_shard=5)
    loader = build_loader(root, 4, num_workers=workers, short_caption_prob=0.5, text_features=True, seed=1)
    kinds = set()
    for batch in islice(loader, 12):
        assert batch["text_features"].dtype == torch.bfloat16 and batch["text_features"].shape == (4, TEXT_LEN, WIDTH)
        for row in range(4):
            record, kind = int(batch["text_tokens"][row, 0]), int(batch["caption_kind"][row])
            kinds.add(kind)
            mask = batch["attn_mask"][row]
            assert torch.equal(batch["text_features"][row][mask], states[record][kind])
            assert not batch["text_features"][row][~mask].any()  # zeros where the encoder would output zeros
    assert kinds == {0, 1}
    assert "text_features" not in next(iter(build_loader(root, 4, num_workers=0)))  # only when asked for
    with pytest.raises(ValueError, match="holds no text features"):
        ShardDataset(make_text(tmp_path / "tokens", shards=1, per_shard=4), text_features=True)
