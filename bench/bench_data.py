"""Single-core speed of the synthetic scene generator (images/s at 64x64 and 128x128).

    python bench/bench_data.py [--n 200]
"""
import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: numpy must not spread work over threads
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import scenegen  # noqa: E402


def images_per_second(resolution: int, n: int) -> tuple[float, float]:
    """-> (per second of this process's CPU time, per wall-clock second); they differ when the machine is busy."""
    scenegen.render_scene(0, resolution)  # builds the per-resolution camera grid outside the timing
    wall, cpu = time.perf_counter(), time.process_time()
    for seed in range(1, n + 1):
        scenegen.render_scene(seed, resolution)
    return n / (time.process_time() - cpu), n / (time.perf_counter() - wall)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200, help="scenes per resolution")
    args = parser.parse_args()
    for resolution in (64, 128):
        cpu, wall = images_per_second(resolution, args.n)
        print(f"render_scene {resolution}x{resolution}: {cpu:.0f} images/s per CPU-second, {wall:.0f} images/s wall "
              f"(single thread, {args.n} scenes, 3-10 objects)")
