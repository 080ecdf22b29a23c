"""FID's last step, the Frechet distance of two Gaussians, on this CPU: metrics.frechet_distance (two symmetric
eigendecompositions) against clean-fid's frechet_distance (scipy's general sqrtm), timed side by side, and both
against the exact value, which centred features give directly: tr((sigma1 sigma2)^1/2) is the sum of the singular
values of X1 X2' when sigma = X'X.

    .venv/bin/python bench/bench_frechet.py [--dim 2048] [--samples 500,500 5000,3000 8,4]

Features are ReLUs of random mixtures (non-negative and correlated, as Inception's pool features are); pairs of
sample counts below --dim give the singular covariances of FID on few images.
"""
import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metrics  # noqa: E402


def features(rng: np.random.Generator, mixing: np.ndarray, n: int, shift: float) -> np.ndarray:
    return np.maximum(rng.standard_normal((n, len(mixing))) @ mixing + shift, 0)


def exact_distance(first: np.ndarray, second: np.ndarray) -> float:
    centred = [(f - f.mean(0)) / np.sqrt(len(f) - 1) for f in (first, second)]
    root_trace = np.linalg.svd(centred[0] @ centred[1].T, compute_uv=False).sum()
    difference = first.mean(0) - second.mean(0)
    return float(difference @ difference + (centred[0] ** 2).sum() + (centred[1] ** 2).sum() - 2 * root_trace)


def timed(function, *args) -> tuple[float, float]:
    start = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048, help="feature size (Inception's pool features: 2048)")
    parser.add_argument("--samples", nargs="+", default=["500,500", "5000,3000", "8,4"],
                        help="sample counts of the two sides, as n1,n2")
    args = parser.parse_args(argv)
    from cleanfid import fid as cleanfid

    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((args.dim, args.dim)) * 0.03
    print("| samples | exact | metrics.frechet_distance: s, relative error | clean-fid (sqrtm): s, relative error |")
    print("|---|---|---|---|")
    for pair in args.samples:
        n1, n2 = (int(n) for n in pair.split(","))
        first, second = features(rng, mixing, n1, 0.0), features(rng, mixing, n2, 0.1)
        stats = (first.mean(0), np.cov(first, rowvar=False), second.mean(0), np.cov(second, rowvar=False))
        exact = exact_distance(first, second)
        ours, ours_s = timed(metrics.frechet_distance, *stats)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # sqrtm's "matrix is singular" and scipy's deprecation of disp=
            theirs, theirs_s = timed(cleanfid.frechet_distance, *stats)
        print(f"| {n1}, {n2} | {exact:.6f} | {ours_s:.2f}, {abs(ours - exact) / exact:.1e} | "
              f"{theirs_s:.2f}, {abs(theirs - exact) / exact:.1e} |", flush=True)


if __name__ == "__main__":
    main()
