"""metrics.py against independent references: scikit-learn's adjusted_rand_score, hand-computed IoUs,
well-separated blobs for k-means, and clean-fid's own compute_fid for FID."""
import os
import sys
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import adjusted_rand_score

import metrics
from errors import InputError


def sklearn_ari(true_masks: torch.Tensor, pred_masks: torch.Tensor, foreground_only: bool = False) -> np.ndarray:
    scores = []
    flat_true = true_masks.reshape(len(true_masks), -1).numpy()
    flat_pred = pred_masks.reshape(len(pred_masks), -1).numpy()
    for true, pred in zip(flat_true, flat_pred):
        keep = true != 0 if foreground_only else np.ones_like(true, dtype=bool)
        scores.append(adjusted_rand_score(true[keep], pred[keep]))
    return np.array(scores)


def assert_matches_sklearn(true_masks: torch.Tensor, pred_masks: torch.Tensor) -> None:
    for foreground_only in (False, True):
        ours = metrics.ari(true_masks, pred_masks, foreground_only=foreground_only)
        assert ours.dtype == torch.float64 and ours.shape == (len(true_masks),)
        reference = sklearn_ari(true_masks, pred_masks, foreground_only)
        np.testing.assert_allclose(ours.numpy(), reference, rtol=0, atol=1e-6)


def blob_masks(n: int, size: int, objects: int, generator: torch.Generator) -> torch.Tensor:
    """0 = background, disks 1..objects painted in order, later ones on top (so some are partly hidden)."""
    centers = torch.rand(n, objects, 2, 1, 1, generator=generator) * size
    radii = (0.08 + 0.15 * torch.rand(n, objects, 1, 1, generator=generator)) * size
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, size, size, dtype=torch.int64)
    for obj in range(objects):
        masks[(rows - centers[:, obj, 0]) ** 2 + (cols - centers[:, obj, 1]) ** 2 < radii[:, obj] ** 2] = obj + 1
    return masks


# ----------------------------------------------------------------------------------------------------------
# ARI / FG-ARI

def test_ari_matches_sklearn_on_random_masks():
    generator = torch.Generator().manual_seed(0)
    true_masks = torch.randint(0, 5, (16, 12, 12), generator=generator)
    pred_masks = torch.randint(0, 7, (16, 12, 12), generator=generator)
    assert_matches_sklearn(true_masks, pred_masks)
    # narrow dtypes, non-contiguous ids and (B, N) input give the same scores
    flat_true = true_masks.to(torch.uint8).reshape(16, -1)
    assert_matches_sklearn(flat_true, (pred_masks * 13 + 2).to(torch.int32).reshape(16, -1))


def test_ari_matches_sklearn_on_blob_masks():
    generator = torch.Generator().manual_seed(1)
    true_masks = blob_masks(24, 48, 10, generator)
    # predictions of three qualities: shifted truth with merged ids, Voronoi cells, and the truth itself
    shifted = torch.roll(true_masks, shifts=(2, -3), dims=(1, 2)) % 7
    seeds = torch.rand(24, 11, 2, 1, 1, generator=generator) * 48
    rows, cols = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
    voronoi = ((rows - seeds[:, :, 0]) ** 2 + (cols - seeds[:, :, 1]) ** 2).argmin(1)
    for pred_masks in (shifted, voronoi, true_masks):
        assert_matches_sklearn(true_masks, pred_masks)
    assert torch.all(metrics.ari(true_masks, true_masks) == 1.0)


def test_ari_degenerate_cases_match_sklearn():
    # each row: (true, pred, ARI, FG-ARI); the expected numbers are also what sklearn returns (checked below)
    cases = [
        ([1, 1, 1, 1], [3, 3, 3, 3], 1.0, 1.0),  # one cluster in both: zero denominator -> 1
        ([0, 1, 2, 3], [3, 2, 1, 0], 1.0, 1.0),  # all singletons in both: zero denominator -> 1
        ([0, 0, 0, 0], [0, 1, 0, 1], 0.0, 1.0),  # no foreground pixel at all: FG-ARI of an empty set -> 1
        ([0, 0, 0, 5], [0, 1, 2, 1], -1 / 3, 1.0),  # a single foreground pixel: FG-ARI -> 1 (ARI: 0-0.5 / 2-0.5)
        ([2, 2, 2, 2], [0, 1, 2, 3], 0.0, 0.0),  # one true cluster split into singletons: 0, not degenerate
    ]
    true_masks = torch.tensor([case[0] for case in cases])
    pred_masks = torch.tensor([case[1] for case in cases])
    expected_ari = np.array([case[2] for case in cases])
    expected_fg = np.array([case[3] for case in cases])
    np.testing.assert_array_equal(sklearn_ari(true_masks, pred_masks), expected_ari)
    np.testing.assert_array_equal(sklearn_ari(true_masks, pred_masks, foreground_only=True), expected_fg)
    np.testing.assert_array_equal(metrics.ari(true_masks, pred_masks).numpy(), expected_ari)
    np.testing.assert_array_equal(metrics.ari(true_masks, pred_masks, foreground_only=True).numpy(), expected_fg)


def test_ari_with_large_sparse_ids():
    # ids this large take the dense-relabelling path; true has no id 0, so FG-ARI must ignore nothing
    generator = torch.Generator().manual_seed(2)
    true_masks = torch.randint(1, 4, (3, 50), generator=generator) * 5_000_000
    pred_masks = torch.randint(0, 5, (3, 50), generator=generator) * 7_000_000
    assert_matches_sklearn(true_masks, pred_masks)
    assert torch.equal(metrics.ari(true_masks, pred_masks), metrics.ari(true_masks, pred_masks, foreground_only=True))


def test_ari_and_mbo_ignore_predicted_id_permutation():
    generator = torch.Generator().manual_seed(3)
    true_masks = blob_masks(8, 32, 6, generator)
    pred_masks = torch.randint(0, 7, (8, 32, 32), generator=generator)
    permuted = torch.randperm(7, generator=generator)[pred_masks]
    for foreground_only in (False, True):
        torch.testing.assert_close(metrics.ari(true_masks, pred_masks, foreground_only),
                                   metrics.ari(true_masks, permuted, foreground_only), rtol=0, atol=1e-12)
    torch.testing.assert_close(metrics.mbo(true_masks, pred_masks), metrics.mbo(true_masks, permuted), rtol=0, atol=0)


def test_masks_are_not_modified():
    true_masks = torch.tensor([[0, 1, 1, 2]], dtype=torch.int32)
    pred_masks = torch.tensor([[1, 1, 0, 0]], dtype=torch.int32)
    metrics.ari(true_masks, pred_masks), metrics.mbo(true_masks, pred_masks)
    assert true_masks.tolist() == [[0, 1, 1, 2]] and pred_masks.tolist() == [[1, 1, 0, 0]]


@pytest.mark.parametrize("true_masks, pred_masks", [
    (torch.zeros(2, 4, 4, dtype=torch.int64), torch.zeros(2, 4, 5, dtype=torch.int64)),  # shapes differ
    (torch.zeros(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.int64)),  # float ids
    (torch.zeros(2, 4, 4, dtype=torch.int64), -torch.ones(2, 4, 4, dtype=torch.int64)),  # negative ids
    (torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)),  # no batch dimension
])
def test_bad_masks_raise_input_error(true_masks, pred_masks):
    with pytest.raises(InputError):
        metrics.ari(true_masks, pred_masks)
    with pytest.raises(InputError):
        metrics.mbo(true_masks, pred_masks)


# ----------------------------------------------------------------------------------------------------------
# mBO

def test_mbo_hand_computed():
    true_masks = torch.tensor([
        [[1, 1, 2, 2],
         [0, 0, 2, 2]],
        [[1, 2, 0, 0],
         [0, 0, 0, 0]],
        [[0, 0, 0, 0],
         [0, 0, 0, 0]],
        [[3, 3, 0, 0],
         [3, 3, 0, 0]],
    ])
    pred_masks = torch.tensor([
        [[0, 0, 0, 1],
         [0, 0, 1, 1]],
        [[5, 5, 0, 0],
         [0, 0, 0, 0]],
        [[0, 1, 2, 3],
         [4, 5, 6, 7]],
        [[2, 2, 0, 0],
         [2, 2, 0, 1]],
    ])
    # image 0: object 1 (2 px) vs pred 0 (5 px): I=2, U=5 -> 0.4; vs pred 1 (3 px): I=0 -> best 0.4
    #          object 2 (4 px) vs pred 0: I=1, U=8 -> 0.125; vs pred 1: I=3, U=4 -> 0.75 -> best 0.75
    #          mBO = (0.4 + 0.75) / 2 = 0.575
    # image 1: objects 1 and 2 (1 px each) both best match pred 5 (2 px, reused): I=1, U=2 -> 0.5 each -> 0.5
    # image 2: no foreground -> NaN
    # image 3: object 3 (4 px) vs pred 2 (4 px): I=4, U=4 -> 1.0 (ids 1 and 2 absent here: not averaged in)
    expected = torch.tensor([0.575, 0.5, float("nan"), 1.0], dtype=torch.float64)
    torch.testing.assert_close(metrics.mbo(true_masks, pred_masks), expected, equal_nan=True, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# k-means and compositional sampling

def blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """4 tight, far-apart Gaussian blobs of 50 points in 3-D and the blob index of every point."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]])
    labels = torch.arange(4).repeat_interleave(50)
    return centers[labels] + 0.3 * torch.randn(200, 3, generator=generator), labels


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if labelings a and b group the points identically (equal up to renaming the labels)."""
    pairs = torch.unique(torch.stack([a, b], 1), dim=0)
    return len(pairs) == len(a.unique()) == len(b.unique())


def test_kmeans_recovers_blobs():
    x, labels = blobs()
    centroids, assignments, spread = metrics.kmeans(x, 4, seed=0)
    assert centroids.shape == (4, 3) and assignments.shape == (200,) and spread.shape == (4, 3)
    assert same_partition(assignments, labels)
    for cluster in range(4):
        members = x[assignments == cluster]
        torch.testing.assert_close(centroids[cluster], members.mean(0))
        torch.testing.assert_close(spread[cluster], members.std(0, unbiased=False))


def test_kmeans_is_deterministic_and_seed_independent_on_blobs():
    x, labels = blobs(1)
    first, second = metrics.kmeans(x, 4, seed=5), metrics.kmeans(x, 4, seed=5)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for seed in range(4):
        assert same_partition(metrics.kmeans(x, 4, seed=seed)[1], labels)


def test_kmeans_one_point_per_cluster():
    x = torch.tensor([[0.0, 0], [1, 0], [0, 1], [5, 5]])
    centroids, assignments, spread = metrics.kmeans(x, 4)
    assert sorted(assignments.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(centroids[assignments], x)
    assert torch.all(spread == 0)


@pytest.mark.parametrize("k", [0, -1, 5])
def test_kmeans_bad_k_raises_input_error(k):
    with pytest.raises(InputError):
        metrics.kmeans(torch.randn(4, 2), k)


def test_compose_slots_member_mode_draws_one_member_of_each_cluster():
    x, _ = blobs(2)
    slots = metrics.compose_slots(x, k=4, n=10, mode="member", seed=3)
    assert slots.shape == (10, 4, 3)
    _, assignments, _ = metrics.kmeans(x, 4, seed=3)  # the clustering compose_slots uses
    for scene in slots:
        for cluster, slot in enumerate(scene):
            rows = (x == slot).all(1).nonzero().squeeze(1)
            assert len(rows) == 1 and assignments[rows[0]] == cluster  # an actual library slot of cluster j
    assert torch.equal(slots, metrics.compose_slots(x, k=4, n=10, mode="member", seed=3))


def test_compose_slots_gaussian_mode_matches_cluster_statistics():
    x, _ = blobs(3)
    slots = metrics.compose_slots(x, k=4, n=4000, mode="gaussian", seed=0)
    centroids, _, spread = metrics.kmeans(x, 4, seed=0)
    assert slots.shape == (4000, 4, 3)
    # 4000 draws: the sample mean is within ~4 standard errors, the sample std within ~5%
    assert torch.all((slots.mean(0) - centroids).abs() < 4 * spread / 4000**0.5)
    torch.testing.assert_close(slots.std(0), spread, rtol=0.05, atol=0)


def test_compose_slots_bad_mode_raises_input_error():
    with pytest.raises(InputError):
        metrics.compose_slots(torch.randn(10, 2), k=2, n=1, mode="uniform")


# ----------------------------------------------------------------------------------------------------------
# images and FID

def test_save_images_roundtrip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    metrics.save_images(images, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["000000.png", "000001.png", "000002.png"]
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"{i:06d}.png")), images[i])
    with pytest.raises(InputError):
        metrics.save_images(images[..., :2], str(tmp_path / "bad"))


def noise_and_gradient_images(count: int = 5, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    noise = np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    ramp = np.linspace(0, 1, size)
    gradients = []
    for i in range(count):
        red = np.outer(ramp, np.ones(size)) * 255
        green = np.outer(np.ones(size), ramp) * 255 * (i + 1) / count
        blue = np.full((size, size), 40.0 * i)
        gradients.append(np.stack([red, green, blue], -1).round().astype(np.uint8))
    return noise, np.stack(gradients)


def write_pngs(images: np.ndarray, folder) -> str:
    """Independent of metrics.save_images, so the reference run does not share our code."""
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    return str(folder)


@pytest.fixture
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args}")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr("requests.Session.request", refuse)


def test_fid_same_folder_is_zero_and_needs_no_scipy_sqrtm(tmp_path, monkeypatch, no_downloads):
    """clean-fid's own Frechet distance calls scipy.linalg.sqrtm(..., disp=False), which newer scipys dropped."""
    import scipy.linalg
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda A, blocksize=64: A)
    noise, _ = noise_and_gradient_images()
    folder = write_pngs(noise, tmp_path / "noise")
    assert abs(metrics.fid(folder, folder, device="cpu")) < 1e-3


@pytest.mark.filterwarnings("ignore:Matrix is singular", "ignore:The `disp` argument")   # clean-fid's sqrtm
def test_fid_of_arrays_equals_cleanfid_on_folders(tmp_path, monkeypatch, no_downloads):
    """Our statistics of arrays against clean-fid's compute_fid of the same images as folders, and our Frechet
    distance of them against clean-fid's (its scipy sqrtm: ~20 s at 2048-D on 2 cores, taken once here)."""
    from cleanfid import fid as cleanfid

    noise, gradients = noise_and_gradient_images()
    ours, reference = [], []
    frechet = metrics.frechet_distance
    monkeypatch.setattr(metrics, "frechet_distance", lambda *stats: ours.append(stats) or frechet(*stats))
    fid = metrics.fid(noise, gradients, device="cpu")
    clean_frechet = cleanfid.frechet_distance
    monkeypatch.setattr(cleanfid, "frechet_distance", lambda *stats: reference.append(stats) or clean_frechet(*stats))
    clean_fid = cleanfid.compute_fid(write_pngs(noise, tmp_path / "noise"),
                                     write_pngs(gradients, tmp_path / "gradients"), mode="clean",
                                     custom_feat_extractor=metrics._inception(torch.device("cpu")),
                                     device=torch.device("cpu"), num_workers=0)
    # the same (mu, sigma) of both sides as clean-fid's own run, and the same FID from them
    for mine, theirs in zip(ours[0], reference[0]):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-9)
    assert fid == pytest.approx(clean_fid, rel=1e-5)
    mu_noise, _, mu_gradients, _ = ours[0]
    # FID = |mu1 - mu2|^2 + (a squared Bures distance >= 0), so this bounds it well away from 0
    assert ((mu_noise - mu_gradients) ** 2).sum() > 50 and fid > 50


@pytest.mark.parametrize("samples", [(400, 300), (6, 4)])   # full-rank covariances, and singular ones
def test_frechet_distance_equals_cleanfids_and_the_exact_value_from_the_features(samples):
    """Against clean-fid's frechet_distance (scipy sqrtm) and against the exact value from the features themselves
    (bench_frechet.exact_distance: the nuclear norm of X1 X2' for centred features)."""
    from cleanfid import fid as cleanfid
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_frechet import exact_distance, features

    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((64, 64))
    first, second = (features(rng, mixing, n, shift) for n, shift in zip(samples, (0, 1)))
    stats = [x for f in (first, second) for x in (f.mean(0), np.cov(f, rowvar=False))]
    exact = exact_distance(first, second)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # sqrtm warns that the singular product "might be inaccurate"
        theirs = cleanfid.frechet_distance(*stats)
    assert metrics.frechet_distance(*stats) == pytest.approx(exact, rel=1e-9)
    assert metrics.frechet_distance(*stats) == pytest.approx(theirs, rel=1e-6)
    assert metrics.frechet_distance(*stats[:2], *stats[:2]) == pytest.approx(0, abs=1e-9 * np.trace(stats[1]))


def test_segmentation_scores_average_over_all_images_of_all_batches():
    rng = np.random.default_rng(3)
    true = torch.from_numpy(rng.integers(0, 4, (5, 8, 8)))
    pred = torch.from_numpy(rng.integers(0, 3, (5, 8, 8)))
    true[4] = 0                                   # no objects: counts for ARI/FG-ARI, skipped by mBO
    scores = metrics.SegmentationScores()
    scores.update(true[:2], pred[:2])
    scores.update(true[2:], pred[2:])
    summary = scores.summary()
    assert summary["ari"] == pytest.approx(np.mean([adjusted_rand_score(t.ravel(), p.ravel())
                                                    for t, p in zip(true.numpy(), pred.numpy())]))
    assert summary["fg_ari"] == pytest.approx(metrics.ari(true, pred, foreground_only=True).mean().item())
    assert summary["mbo"] == pytest.approx(metrics.mbo(true[:4], pred[:4]).mean().item())


def test_fid_stats_of_an_array_are_cached_by_content(tmp_path, monkeypatch, no_downloads):
    noise, gradients = noise_and_gradient_images()
    inception, passes = metrics._inception, []
    monkeypatch.setattr(metrics, "_inception", lambda device: passes.append(1) or inception(device))
    first = metrics.fid_stats(noise, device="cpu", cache_dir=str(tmp_path))
    again = metrics.fid_stats(noise.copy(), device="cpu", cache_dir=str(tmp_path))   # same content: read back
    assert len(passes) == 1 and len(list((tmp_path / "fid").glob("*.npz"))) == 1
    for ours, cached in zip(first, again):
        np.testing.assert_array_equal(ours, cached)
    other = metrics.fid_stats(gradients, device="cpu", cache_dir=str(tmp_path))   # other content: computed
    assert len(passes) == 2 and not np.allclose(other[0], first[0])
