"""Small training helpers shared by sa.py, slotdiff.py and vae.py.

Only what would otherwise be copied between the three training scripts lives here: device/DDP set-up,
mixed precision, the learning-rate schedule, atomic checkpoints, RNG capture for exact resume, the metrics
log, loss-curve plots and clean Ctrl-C handling. Each script still owns its own model and training loop.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import re
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data import InputError


# ----------------------------------------------------------------------------------------------------------
# devices, DDP, mixed precision

@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def setup_distributed(device: str = "auto") -> Dist:
    """One process per GPU under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set), a single process otherwise."""
    if "RANK" not in os.environ:
        return Dist(0, 1, 0, pick_device(device))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl")
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(rank, world, local, dev)


def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (CPU, Ampere+), fp16 on older GPUs (needs a GradScaler)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, enabled: bool = True):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device))


def make_grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """Loss scaling is only needed for fp16; with bf16 (or AMP off) the scaler is a no-op."""
    return torch.amp.GradScaler(device.type, enabled=enabled and amp_dtype(device) == torch.float16)


# ----------------------------------------------------------------------------------------------------------
# learning-rate schedules: pure functions of the step, so resuming needs no scheduler state

def lr_warmup_cosine(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_warmup_step_decay(step: int, base_lr: float, warmup: int, decay_every: int, decay_rate: float) -> float:
    """Locatello et al. 2020: linear warm-up, then multiply by decay_rate every decay_every steps (smoothly)."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return base_lr * warm * decay_rate ** (step / decay_every)


# ----------------------------------------------------------------------------------------------------------
# checkpoints and RNG state

def save_checkpoint(state: dict, path: str | Path) -> None:
    """Atomic: write a temp file in the same folder, fsync, then rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """torch.load with weights_only=True: a checkpoint is tensors and plain data only, so a file from elsewhere
    (the course's vae_checkpoint.pth, a colleague's run) can never execute code while it is read."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist; train first or pass the right --ckpt/--resume path")
    try:
        with warnings.catch_warnings():  # a raw pickle's protocol warning would only precede the refusal below
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise InputError(f"refusing to load {path}: it contains a pickled Python object ({found.group(1)}), "
                             f"which could run code on this machine; only checkpoints of tensors, numbers, "
                             f"strings, lists and dicts are loaded") from None
        raise InputError(f"checkpoint {path} is unreadable: not a PyTorch file of tensors and plain data "
                         f"(truncated, corrupt, or a bare pickle, which is never loaded because it could run "
                         f"code); delete it and retrain") from None
    except Exception as e:  # a truncated or foreign file: say which one, not a pickle traceback
        raise InputError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); delete it and retrain") from None


def rng_state() -> dict:
    """Every generator's state as tensors and plain numbers (loadable with weights_only=True)."""
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [torch.from_numpy(numpy_keys.astype(np.int64)), numpy_pos, numpy_has_gauss, numpy_gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------
# logging, plots, interruption

class MetricsLog:
    """Append-only JSON-lines log. On resume, records after the checkpoint's step are dropped so the curve
    has no duplicated segment."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in self.records() if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, **values) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(values) + "\n")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss_curves(records: list[dict], png_path: str | Path, keys=("train_loss", "val_loss"),
                     x: str = "step", title: str = "", scores=("fg_ari", "ari", "mbo")) -> None:
    """Losses (log scale) on the left; on the right, the segmentation scores of the periodic evaluations, when
    there are any, so a reader sees whether falling loss means objects are being found."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def draw(ax, names):
        for key in names:
            pts = [(r[x], r[key]) for r in records if key in r and x in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=SCORE_NAMES.get(key, key))
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend()

    has_scores = any(key in r for r in records for key in scores)
    fig, axes = plt.subplots(1, 2 if has_scores else 1, figsize=(12 if has_scores else 7, 4), squeeze=False)
    draw(axes[0, 0], keys)
    axes[0, 0].set_ylabel("loss")
    axes[0, 0].set_yscale("log")
    axes[0, 0].set_title(title)
    if has_scores:
        draw(axes[0, 1], scores)
        axes[0, 1].set_ylim(min(0.0, *(r[k] for r in records for k in scores if k in r)), 1.0)
        axes[0, 1].set_title("val segmentation (periodic eval subset)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


SCORE_NAMES = {"fg_ari": "FG-ARI", "ari": "ARI", "mbo": "mBO", "train_loss": "train loss", "val_loss": "val loss"}


class StopOnInterrupt:
    """The first Ctrl-C only sets .requested, so the loop can finish its step, checkpoint and exit;
    a second Ctrl-C interrupts immediately."""

    def __init__(self):
        self.requested = False

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to abort)", flush=True)

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)
        return False


class TimeBudget:
    """Ends training after `minutes` of wall time (0 = never), so a demo fits a fixed budget on any machine.
    The step-decay/cosine schedules are functions of the step, so stopping early leaves them consistent."""

    def __init__(self, minutes: float):
        self.deadline = time.monotonic() + minutes * 60 if minutes > 0 else None

    def expired(self, world_size: int = 1, device: torch.device | None = None) -> bool:
        late = self.deadline is not None and time.monotonic() > self.deadline
        if world_size > 1 and self.deadline is not None:  # every DDP rank must stop at the same step
            flag = torch.tensor(float(late), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            late = bool(flag.item())
        return late


class TrainProgress:
    """The training progress bar, with a true total and ETA: under a time budget it fills with the budget's
    seconds (or the steps, whichever runs out first), so its ETA is the budget's end, not `--steps` at the
    current speed; without one it counts steps."""

    def __init__(self, start: int, steps: int, minutes: float, disable: bool = False):
        self.start, self.steps, self.seconds = start, steps, minutes * 60
        self.began = time.monotonic()
        if self.seconds > 0:
            self.bar = tqdm(total=1000, desc="train", disable=disable, dynamic_ncols=True,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining} of the "
                                       f"{minutes:g}-minute budget" + "{postfix}")
        else:
            self.bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=disable, dynamic_ncols=True)

    def update(self, done: int) -> None:
        if self.seconds > 0:
            fraction = max((time.monotonic() - self.began) / self.seconds,
                           (done - self.start) / max(1, self.steps - self.start))
            self.bar.update(min(1000, int(fraction * 1000)) - self.bar.n)
        else:
            self.bar.update(done - self.bar.n)

    def show(self, done: int, **values: str) -> None:
        self.bar.set_postfix(step=f"{done}/{self.steps}", **values)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
