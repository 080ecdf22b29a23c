"""DDP on the CPU (torchrun, 2 processes, gloo): the same result as one process with the same global batch, and a
signal to one rank stops every rank at the same step."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import trainlib
from helpers import SA_SMALL, records

ROOT = Path(__file__).resolve().parents[1]


def test_distributed_training_matches_one_process_with_the_same_global_batch(tmp_path):
    """torchrun, 2 processes on the CPU (gloo): both ranks end with identical weights, equal (up to float
    summation order) to one process trained on the same global batch."""
    common = ["--resolution", "16", "--slots", "3", "--slot-dim", "8", "--slot-mlp-hidden",
              "8", "--enc-channels", "8", "--dec-channels", "8", "--num-train", "32", "--num-val", "8", "--steps", "3",
              "--eval-images", "8", "--log-every", "1", "--compile", "0", "--amp", "0", "--device", "cpu", "--slot-init",
              "learned", "--no-eval"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    script = ROOT / "tests" / "ddp_train.py"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    str(script), *common, "--batch-size", "4", "--out", str(tmp_path / "ddp")],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, str(script), *common, "--batch-size", "8", "--out", str(tmp_path / "single")],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    losses = {name: [r["train_loss"] for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                     if "train_loss" in r] for name in ("ddp", "single")}
    assert len(losses["ddp"]) == len(losses["single"]) == 3   # the logged loss is the global batch's
    assert losses["ddp"] == pytest.approx(losses["single"], rel=1e-4)


def worker_of_rank(rank: int, cwd: Path) -> int:
    """The pid of the torchrun worker of `rank` running in cwd."""
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and os.readlink(proc / "cwd") == str(cwd)
                    and f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0")):
                return int(proc.name)
        except OSError:   # a process that ended meanwhile, or not ours to read
            continue
    raise AssertionError(f"no rank {rank} worker in {cwd}")


def test_sigterm_to_one_ddp_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path):
    """A scheduler may signal one process of a job: the stop is agreed in the step's collective, so the first rank
    checkpoints that step and every rank exits, instead of one rank waiting forever for the other."""
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            "29519", str(ROOT / "sa.py"), *SA_SMALL, "--steps", "100000", "--log-every", "1",
                            "--ckpt-every", "100000", "--out", "run"], cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    log, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 5) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(worker_of_rank(1, tmp_path), signal.SIGTERM)
    said = job.communicate(timeout=120)[0]
    assert job.returncode != 0   # torchrun reports its workers' exit code 143
    stopped = trainlib.load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"]
    assert f"stopped at step {stopped} (SIGTERM)" in said
    assert max(r["step"] for r in records(tmp_path / "run")) == stopped
