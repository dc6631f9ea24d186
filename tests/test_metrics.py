"""evaluation/metrics.py against independent references: closed forms, scipy in float64 by another route, a brute
force, and torchmetrics (FID, IS, CLIP score) fed the same small random networks (tests/eval_nets.py)."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from evaluation import metrics
from evaluation.metrics import Gaussian, fit_gaussian, frechet_distance
from evaluation.npz import write_streamed
from tests.eval_nets import TinyFeatures, tiny_clip


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_diagonal_closed_form():
    """Commuting (diagonal) covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(Gaussian(mu1, np.diag(a)), Gaussian(mu2, np.diag(b)))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_general_covariances_by_another_route():
    """tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): symmetric roots by eigh, float64, not sqrtm."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = x @ x.T + 0.1 * np.eye(8), y @ y.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    r1 = _sym_sqrt(s1)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sym_sqrt(r1 @ s2 @ r1))
    assert frechet_distance(Gaussian(mu1, s1), Gaussian(mu2, s2)) == pytest.approx(expected, rel=1e-9)


def test_fid_of_gaussian_samples_approaches_the_closed_form():
    """Features drawn from two known Gaussians: fit_gaussian + frechet_distance estimate the true distance."""
    rng = np.random.default_rng(2)
    n, mu1, mu2 = 200_000, np.array([0.0, 1.0, -1.0]), np.array([0.5, 1.0, 0.0])
    a, b = np.array([1.0, 2.0, 0.5]), np.array([2.0, 0.5, 0.5])
    x = rng.normal(mu1, np.sqrt(a), size=(n, 3))
    y = rng.normal(mu2, np.sqrt(b), size=(n, 3))
    truth = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # 1.25 + 0.343...
    assert frechet_distance(fit_gaussian(x), fit_gaussian(y)) == pytest.approx(truth, abs=0.02)
    assert frechet_distance(fit_gaussian(x), fit_gaussian(x)) == pytest.approx(0.0, abs=1e-9)


class _Head(torch.nn.Module):
    """One output of the tiny net as a plain tensor: what torchmetrics' metrics take as `feature`."""

    def __init__(self, net, key: str):
        super().__init__()
        self.net, self.key = net, key

    def forward(self, images):
        return self.net(images)[self.key]


def _images(n: int, seed: int, size: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(1, size, size, 3))
    noise = rng.integers(-60, 60, size=(n, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def test_fid_matches_torchmetrics_with_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = TinyFeatures()
    real, fake = _images(80, 0), _images(70, 1)
    ours = frechet_distance(fit_gaussian(metrics.extract(fake, net, batch_size=32)["pool"]),
                            fit_gaussian(metrics.extract(real, net, batch_size=32)["pool"]))
    peer = FrechetInceptionDistance(feature=_Head(net, "pool"))
    peer.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    peer.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    assert ours > 0.01
    assert ours == pytest.approx(float(peer.compute()), rel=1e-4)


def test_inception_score_closed_forms_and_torchmetrics():
    from torchmetrics.image.inception import InceptionScore

    k = 5
    one_hot = torch.eye(k).repeat(20, 1) * 60.0  # confident and balanced: IS = k
    assert metrics.inception_score(one_hot)[0] == pytest.approx(k, rel=1e-6)
    assert metrics.inception_score(torch.zeros(50, k))[0] == pytest.approx(1.0, abs=1e-12)  # uniform: 1
    # Splits are contiguous runs of split_size images (ADM's): 50 confident class-0 images then 50 class-1 ones
    # score 1 in each split of 50, and 2 as one split.
    halves = torch.cat([torch.tensor([[60.0, 0.0]]).repeat(50, 1), torch.tensor([[0.0, 60.0]]).repeat(50, 1)])
    assert metrics.inception_score(halves, split_size=50)[0] == pytest.approx(1.0, abs=1e-6)
    assert metrics.inception_score(halves, split_size=100)[0] == pytest.approx(2.0, rel=1e-6)
    logits = torch.randn(64, 7, generator=torch.Generator().manual_seed(0)) * 2
    peer = InceptionScore(feature=torch.nn.Identity(), splits=1)
    peer.inception.num_features = 7
    peer.update(logits)
    assert metrics.inception_score(logits)[0] == pytest.approx(float(peer.compute()[0]), rel=1e-5)


def _brute_force_pr(ref: np.ndarray, gen: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al.'s definition written out in float64 with scipy's distances."""
    d_rr, d_gg, d_gr = cdist(ref, ref), cdist(gen, gen), cdist(gen, ref)
    r_ref = np.sort(d_rr, axis=1)[:, k]  # column 0 is the point itself
    r_gen = np.sort(d_gg, axis=1)[:, k]
    precision = np.mean([(d_gr[i] <= r_ref).any() for i in range(len(gen))])
    recall = np.mean([(d_gr[:, j] <= r_gen).any() for j in range(len(ref))])
    return precision, recall


def test_precision_recall_against_a_brute_force():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(150, 5))
    gen = rng.normal(loc=0.7, scale=0.6, size=(120, 5))
    expected = _brute_force_pr(ref, gen, 3)
    got = metrics.precision_recall(torch.from_numpy(ref), torch.from_numpy(gen), k=3)
    assert 0.05 < expected[0] < 0.999 and 0.05 < expected[1] < 0.999  # neither side trivial
    assert got == pytest.approx(expected, abs=1e-12)
    far = metrics.precision_recall(torch.from_numpy(ref), torch.from_numpy(gen + 100), k=3)
    assert far == (0.0, 0.0)
    assert metrics.precision_recall(torch.from_numpy(ref), torch.from_numpy(ref.copy()), k=3) == (1.0, 1.0)


def test_precision_recall_blocks_do_not_change_the_answer():
    rng = np.random.default_rng(4)
    ref, gen = torch.from_numpy(rng.normal(size=(90, 4))), torch.from_numpy(rng.normal(size=(70, 4)) + 0.3)
    radii = metrics.manifold_radii(ref, 3, block=7)
    assert torch.allclose(radii, metrics.manifold_radii(ref, 3, block=1000), rtol=1e-9)  # cdist's mm route
    assert torch.equal(metrics.inside(gen, ref, radii, block=5), metrics.inside(gen, ref, radii, block=1000))


def test_clip_score_matches_an_independent_computation():
    model, processor = tiny_clip()
    images, captions = _images(6, 5, size=40), [f"a {c} circle" for c in ("red", "blue", "green", "red", "x", "y")]
    got = metrics.clip_score(images, captions, lambda: (metrics.ProjectedCLIP(model), processor), batch_size=4)
    with torch.no_grad():
        inputs = processor(text=captions, images=list(torch.from_numpy(images).permute(0, 3, 1, 2)),
                           return_tensors="pt", padding=True)
        out = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    expected = 100 * float(cos.mean())
    # Neither side may be CLIPScore's floor of 0 (a mean cosine below 0 scores 0), or 0 == 0 would pass.
    assert expected > 10 and got > 10
    assert got == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():  # the floor itself: text embeddings turned around score exactly 0
        model.text_projection.weight.neg_()
    assert metrics.clip_score(images, captions, lambda: (metrics.ProjectedCLIP(model), processor)) == 0.0


def _samples_npz(path, images, **small):
    write_streamed(path, images.shape, [images[:5], images[5:]], **small)


def test_evaluate_end_to_end_with_an_adm_reference(tmp_path):
    """A reference .npz with images and statistics: the statistics are used (ADM's protocol) unless recomputed;
    a saved reference gives the same report without the images."""
    net = TinyFeatures()
    ref_images, gen_images = _images(40, 6), _images(30, 7)
    _samples_npz(tmp_path / "samples.npz", gen_images, captions=np.array(["a red circle"] * 30))
    gen_feats = metrics.extract(gen_images, net)
    same = fit_gaussian(gen_feats["pool"])  # statistics equal to the samples': FID 0 if they are read
    np.savez(tmp_path / "ref.npz", arr_0=ref_images, mu=same.mu, sigma=same.sigma)
    from evaluation.npz import read_npz

    samples = read_npz(tmp_path / "samples.npz", "--samples")
    given = metrics.load_reference(tmp_path / "ref.npz", net)
    report = metrics.evaluate(samples, given, net)
    assert given.stats_from == "npz" and report["fid"] == pytest.approx(0.0, abs=1e-6)
    fresh = metrics.load_reference(tmp_path / "ref.npz", net, recompute=True)
    model, processor = tiny_clip()
    report = metrics.evaluate(samples, fresh, net, clip=lambda: (metrics.ProjectedCLIP(model), processor))
    expected_pr = _brute_force_pr(metrics.extract(ref_images, net)["pool"].double().numpy(),
                                  gen_feats["pool"].double().numpy(), 3)
    assert report["fid"] > 0.01 and report["sfid"] > 0.0 and report["inception_score"] >= 1.0
    assert (report["precision"], report["recall"]) == pytest.approx(expected_pr, abs=1e-12)
    assert 0.0 <= report["clip_score"] <= 100.0
    metrics.save_reference(tmp_path / "saved.npz", fresh)
    saved = metrics.load_reference(tmp_path / "saved.npz", None)  # no images: no net needed
    again = metrics.evaluate(samples, saved, net)
    assert saved.stats_from == "saved"
    for key in ("fid", "sfid", "precision", "recall"):
        assert again[key] == pytest.approx(report[key], rel=1e-9)


def test_reference_folder_and_its_errors(tmp_path):
    from PIL import Image

    net = TinyFeatures()
    folder = tmp_path / "ref"
    folder.mkdir()
    images = _images(6, 8)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:02d}.png")
    ref = metrics.load_reference(folder, net)
    assert ref.num_images == 6
    assert torch.allclose(ref.pool_features, metrics.extract(images, net)["pool"])
    Image.fromarray(_images(1, 9, size=20)[0]).save(folder / "99.png")
    with pytest.raises(ValueError, match="99.png: 20x20 px"):
        metrics.load_reference(folder, net)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no .png"):
        metrics.load_reference(tmp_path / "empty", net)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz: not a readable .npz"):
        metrics.load_reference(tmp_path / "bad.npz", net)


def test_cli_says_what_to_install_without_torch_fidelity(tmp_path):
    try:
        import torch_fidelity  # noqa: F401
        pytest.skip("torch-fidelity loads here: nothing to refuse")
    except ImportError:
        pass
    images = _images(4, 10)
    _samples_npz(tmp_path / "s.npz", images)
    np.savez(tmp_path / "r.npz", arr_0=images)
    with pytest.raises(SystemExit, match=r"torch-fidelity .*pip install -e '\.\[eval\]'"):
        metrics.main(["--samples", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "r.npz"), "--device", "cpu"])


def test_cli_refuses_a_request_with_nothing_to_compute(tmp_path):
    _samples_npz(tmp_path / "s.npz", _images(6, 11))
    with pytest.raises(SystemExit, match="nothing to compute without --reference"):
        metrics.main(["--samples", str(tmp_path / "s.npz"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="missing.npz: no such file"):
        metrics.main(["--samples", str(tmp_path / "missing.npz"), "--device", "cpu"])


class _StandInInception(torch.nn.Module):
    """torch-fidelity's FeatureExtractorInceptionV3 as the wrapper uses it: its constructor's arguments, a Mixed_6d
    block with a branch1x1 convolution (17 x 17, 192 channels), and (pool, logits) out of forward."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None):
        super().__init__()
        assert (name, features_list) == ("inception-v3-compat", ["2048", "logits_unbiased"])
        self.weights_path = feature_extractor_weights_path
        self.Mixed_6d = torch.nn.Module()
        # torch-fidelity's BasicConv2d applies its ReLU inside forward: the hook sees TF's mixed_6/conv:0
        self.Mixed_6d.branch1x1 = torch.nn.Sequential(torch.nn.Conv2d(3, 192, 1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(192, 10, bias=False)

    def forward(self, x):
        h = self.Mixed_6d.branch1x1(torch.nn.functional.interpolate(x.float() / 255, size=(17, 17)))
        pool = h.mean(dim=(2, 3))
        return pool, self.fc(pool)


def test_inception_wrapper_with_a_stand_in(monkeypatch, tmp_path):
    """evaluation/features.py's wiring, offline: the weights file is checked with weights_only first, the spatial
    features are mixed_6/conv's first 7 channels in NHWC order (ADM's), pool and logits pass through."""
    import sys
    import types

    from evaluation.features import InceptionFeatures

    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = _StandInInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pth")
    net = InceptionFeatures(tmp_path / "plain.pth")
    assert net.net.weights_path == str(tmp_path / "plain.pth")
    images = torch.from_numpy(_images(3, 12)).permute(0, 3, 1, 2)
    out = net(images)
    inner = net.net
    with torch.no_grad():
        h = inner.Mixed_6d.branch1x1(torch.nn.functional.interpolate(images.float() / 255, size=(17, 17)))
    assert out["spatial"].shape == (3, 7 * 17 * 17)
    torch.testing.assert_close(out["spatial"], h[:, :7].permute(0, 2, 3, 1).reshape(3, -1))
    torch.testing.assert_close(out["pool"], h.mean(dim=(2, 3)))
    torch.save(types.SimpleNamespace(a=1), tmp_path / "pickle.pth")  # more than tensors: refused before use
    with pytest.raises(ValueError, match="pickle.pth: not a plain state dict"):
        InceptionFeatures(tmp_path / "pickle.pth")
    with pytest.raises(FileNotFoundError, match="--inception-weights .*missing.pth: no such file"):
        InceptionFeatures(tmp_path / "missing.pth")


# ---- degenerate input, refused before any feature is extracted (issue 25, item 10) -----------------------------


class _CountingFeatures(TinyFeatures):
    """TinyFeatures that counts the images it is shown (the probe of its widths is one), optionally NaN."""

    def __init__(self, nan: bool = False):
        super().__init__()
        self.seen, self.nan = 0, nan

    def forward(self, images):
        self.seen += len(images)
        out = super().forward(images)
        return {k: v * float("nan") for k, v in out.items()} if self.nan else out


@pytest.fixture
def counting_net(monkeypatch):
    """The CLI's InceptionFeatures replaced by a counting stand-in (torch-fidelity is not installed here)."""
    import evaluation.features

    net = _CountingFeatures()
    monkeypatch.setattr(evaluation.features, "InceptionFeatures", lambda weights=None: net)
    return net


def _cli_refuses(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as caught:
        metrics.main([*argv, "--device", "cpu"])
    assert isinstance(caught.value.code, str), caught.value.code  # a message, not a status of its own
    return caught.value.code


@pytest.mark.parametrize("n", [0, 1, 3])
def test_too_few_samples_are_refused_before_extraction(tmp_path, counting_net, n):
    np.savez(tmp_path / "s.npz", arr_0=_images(max(n, 1), 20)[:n])
    np.savez(tmp_path / "r.npz", arr_0=_images(10, 21))
    message = _cli_refuses(["--samples", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "r.npz")])
    assert f"--samples {tmp_path / 's.npz'} holds {n} image" in message and "give at least 4" in message
    assert counting_net.seen == 0


def test_too_few_reference_images_are_refused_before_extraction(tmp_path, counting_net):
    _samples_npz(tmp_path / "s.npz", _images(10, 22))
    np.savez(tmp_path / "r.npz", arr_0=_images(3, 23))
    message = _cli_refuses(["--samples", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "r.npz")])
    assert f"--reference {tmp_path / 'r.npz'} holds 3 images" in message
    assert counting_net.seen <= 1  # the probe of the net's widths, one image


@pytest.mark.parametrize(("stats", "words"), [
    (dict(mu=np.zeros(5), sigma=np.eye(12)), "mu [5] and sigma [12, 12] are not a mean of d numbers"),
    (dict(mu=np.zeros(5), sigma=np.eye(5)), "mu/sigma are of 5 features, but the feature net gives 12"),
    (dict(mu=np.zeros(12), sigma=-np.eye(12)), "sigma has a negative eigenvalue"),
    (dict(mu=np.zeros(12), sigma=np.triu(np.ones((12, 12)))), "sigma is not symmetric"),
    (dict(mu=np.full(12, np.nan), sigma=np.eye(12)), "mu or sigma holds NaN"),
    (dict(mu=np.zeros(12)), "holds mu without sigma"),
], ids=["shapes", "widths", "not-psd", "not-symmetric", "nan", "half"])
def test_reference_statistics_are_checked_before_extraction(tmp_path, counting_net, stats, words):
    _samples_npz(tmp_path / "s.npz", _images(10, 24))
    np.savez(tmp_path / "r.npz", arr_0=_images(10, 25), **stats)
    message = _cli_refuses(["--samples", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "r.npz")])
    assert message.startswith(f"--reference {tmp_path / 'r.npz'}: ") and words in message, message
    assert counting_net.seen <= 1


def test_a_non_finite_result_is_refused_and_never_written(tmp_path, monkeypatch):
    """NaN features would give a NaN FID, and JSON has no NaN: refused, nothing printed or written."""
    import evaluation.features

    monkeypatch.setattr(evaluation.features, "InceptionFeatures", lambda weights=None: _CountingFeatures(nan=True))
    _samples_npz(tmp_path / "s.npz", _images(10, 26))
    np.savez(tmp_path / "r.npz", arr_0=_images(10, 27))
    message = _cli_refuses(["--samples", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "r.npz"),
                            "--json", str(tmp_path / "m.json")])
    assert "the feature net gave NaN or infinite" in message and not (tmp_path / "m.json").exists()


def test_clip_that_cannot_load_is_found_before_extraction(tmp_path, counting_net):
    _samples_npz(tmp_path / "s.npz", _images(10, 28), captions=np.array(["a red circle"] * 10))
    np.savez(tmp_path / "r.npz", arr_0=_images(10, 29))
    missing = tmp_path / "no" / "clip"
    message = _cli_refuses(["--samples", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "r.npz"),
                            "--clip-model", str(missing)])
    assert f"--clip-model {missing}: cannot load it" in message and "--no-clip" in message
    assert counting_net.seen == 0


@pytest.mark.parametrize("where", ["folder", "below-a-file"])
def test_an_unwritable_json_is_found_before_extraction(tmp_path, counting_net, where):
    _samples_npz(tmp_path / "s.npz", _images(10, 30))
    np.savez(tmp_path / "r.npz", arr_0=_images(10, 31))
    (tmp_path / "file").write_text("")
    target = tmp_path if where == "folder" else tmp_path / "file" / "m.json"
    message = _cli_refuses(["--samples", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "r.npz"),
                            "--json", str(target)])
    assert message.startswith(f"--json {target}: ") and counting_net.seen == 0


def test_a_damaged_compressed_npz_is_named(tmp_path):
    """A flipped byte inside a deflated member fails in zlib, not in zip's CRC check."""
    from evaluation.npz import read_npz

    np.savez_compressed(tmp_path / "r.npz", arr_0=_images(40, 32), mu=np.random.default_rng(0).random(1000))
    original = (tmp_path / "r.npz").read_bytes()
    found = set()
    for position in range(100, len(original) - 100, 61):
        damaged = bytearray(original)
        damaged[position] ^= 0xFF
        (tmp_path / "r.npz").write_bytes(bytes(damaged))
        try:
            read_npz(tmp_path / "r.npz", "--reference")
        except ValueError as err:
            assert "not a readable .npz" in str(err) or "arr_0 must be" in str(err), err
            found.add("named")
    assert found == {"named"}
