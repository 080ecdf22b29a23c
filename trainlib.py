"""Small training helpers shared by sa.py, slotdiff.py and vae.py.

Only what would otherwise be copied between the three training scripts lives here (their configs and command
line are config.py's): device/DDP set-up, mixed precision, learning-rate schedules, atomic checkpoints, RNG capture
for exact resume; and TrainLoop, the bookkeeping around each script's own loop body (time budget, progress bar,
metrics log, periodic evaluation and plots, checkpoints, Ctrl-C). Each script still owns its model and the
body of its training loop.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import pickle
import random
import re
import signal
import tempfile
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from errors import InputError


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


def free_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can still get on device (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX-512 BF16 or AMX). Without it (an AVX2-only CPU)
    PyTorch emulates bf16: a sa.py cpu-preset training step ran 12.8x slower than in fp32 (bench/bench_sa.py)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """What --amp autocasts to: bf16 where the hardware has it (Ampere+ GPUs, CPUs with cpu_has_bf16), fp16 on
    older GPUs (needs a GradScaler), None = stay in fp32 on a CPU without bf16 arithmetic, where autocast would
    make every step an order of magnitude slower."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def precision(device: torch.device, amp: bool) -> str:
    """What --amp trains and samples in on this device, for the logs: "bf16", "fp16" or "fp32"."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp_dtype(device) if amp else None]


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    dtype = amp_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """Loss scaling is only needed for fp16; with bf16 (or AMP off) the scaler is a no-op."""
    return torch.amp.GradScaler(device.type, enabled=enabled and amp_dtype(device) == torch.float16)


# ----------------------------------------------------------------------------------------------------------
# learning-rate schedules: pure functions of the step, so resuming needs no scheduler state

def lr_warmup_cosine(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1,
                     spent: float = 0.0) -> float:
    """Linear warm-up, then a cosine to min_ratio * base_lr at step `total`, or sooner when `spent` (the share of a
    --max-minutes budget used, TrainLoop.spent) is further along: a run the clock stops still ends annealed."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), spent))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_warmup_step_decay(step: int, base_lr: float, warmup: int, decay_every: int, decay_rate: float) -> float:
    """Locatello et al. 2020: linear warm-up, then multiply by decay_rate every decay_every steps (smoothly)."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return base_lr * warm * decay_rate ** (step / decay_every)


def budget_progress(step: int, steps: int, spent: float) -> float:
    """The share of a run's budget spent before `step`: of its steps, or of its time (`spent`, 0 to 1) when that is
    further along; the learning-rate cool-down follows whichever ends the run."""
    return max(step / steps, spent)


def cooldown_factor(progress: float, fraction: float) -> float:
    """Warm-up-stable-decay's final phase (Hu et al. 2024, MiniCPM; Hagele et al. 2024): over the last `fraction`
    of the training budget the learning rate falls linearly to 0, so a run ends annealed wherever its budget
    ends, in steps or in minutes. progress: the share of the budget spent, 0 to 1. fraction 0 = no cool-down."""
    if fraction <= 0:
        return 1.0
    return min(1.0, max(0.0, (1.0 - progress) / fraction))


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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # torch reports a full disk as a RuntimeError ("file write failed"), or as one from its zip writer
        # raised while the OSError it met is being handled
        os_error = next((c for c in (e, e.__context__) if isinstance(c, OSError)), None)
        torch_write_error = isinstance(e, RuntimeError) and "write" in str(e)
        if os_error is not None or torch_write_error:
            kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
            raise InputError(f"could not write {path} ({os_error or e}); {kept}. Free disk space (or fix the "
                             f"folder), then resume") from None
        raise


SCRIPTS = {"sa": "sa.py", "slotdiff": "slotdiff.py", "vae": "vae.py"}  # checkpoint kind -> the script that writes it


def file_hash(path: str | Path) -> str:
    """A short content hash: names what a cache or an exported graph was made from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", kind: str | None = None) -> dict:
    """torch.load with weights_only=True: a checkpoint is tensors and plain data only, so a file from elsewhere
    (the course's vae_checkpoint.pth, a colleague's run) can never execute code while it is read. With `kind`
    ("sa", "slotdiff", "vae"), anything but a checkpoint that script wrote is refused, naming what it is."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist; train first or pass the right --ckpt/--resume path")
    try:
        with warnings.catch_warnings():  # a raw pickle's protocol warning would only precede the refusal below
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
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
    if kind is not None:
        check_kind(state, kind, path)
    return state


def load_weights(model: torch.nn.Module, weights: dict, path: str | Path) -> None:
    """model.load_state_dict, with a mismatch (an edited file, another version of the code) as one clear line."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = (str(e).splitlines()[1:2] or [str(e)])[0].strip()
        raise InputError(f"{path}: the weights do not match the config stored with them ({first}); the file was "
                         f"edited or written by another version: retrain it") from None


def check_kind(state: object, kind: str, path: str | Path) -> None:
    script = SCRIPTS[kind]
    if not isinstance(state, dict) or not {"model", "config", "kind"} <= set(state):
        what = f"a dict with keys {sorted(map(str, state))[:6]}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise InputError(f"{path} is not a checkpoint written by {script} (it holds {what}); pass the ckpt.pt that "
                         f"`python {script}` wrote")
    if state["kind"] != kind:
        other = SCRIPTS.get(state["kind"], state["kind"])
        raise InputError(f"{path} is a {other} checkpoint, not a {script} one; use it with `python {other}`")


def prepare_out(out: str | Path, resume: str | None, overwrite: bool) -> Path:
    """Checks the output folder before any work: it must be a writable folder, and a new run (or one resumed from
    another folder) must not replace the checkpoint of an earlier one by accident. The log of a run killed before
    its first checkpoint is no such run, and leftover temp files of a checkpoint save that was killed are removed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder for the checkpoint, metrics and pictures")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise InputError(f"--out {out} is not a writable folder ({e.strerror}); choose another --out") from None
    ckpt = out / "ckpt.pt"
    if ckpt.exists() and not overwrite:
        if not resume:
            raise InputError(f"--out {out} already holds a run ({ckpt}); continue it with --resume {ckpt} (or "
                             f"--resume auto), choose another --out, or pass --overwrite to replace it")
        if ckpt.resolve() != Path(resume).resolve():
            raise InputError(f"--out {out} already holds another run ({ckpt}), which --resume {resume} would "
                             f"replace; choose another --out, or pass --overwrite to replace it")
    elif (out / "metrics.jsonl").exists() and not resume:   # a run killed before its first checkpoint
        print(f"note: {out} holds the log of a run that ended before its first checkpoint; starting afresh")
    for leftover in out.glob("ckpt.pt.*.tmp"):
        leftover.unlink(missing_ok=True)
    return out


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


def plot_loss_curves(records: list[dict], png_path: str | Path, keys: tuple[str, ...] = ("train_loss", "val_loss"),
                     x: str = "step", title: str = "", scores: tuple[str, ...] = ("fg_ari", "ari", "mbo")) -> None:
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


SCORE_NAMES = {"fg_ari": "FG-ARI", "ari": "ARI", "mbo": "mBO", "train_loss": "train loss", "val_loss": "val loss",
               "psnr": "PSNR", "codebook_usage": "codebook usage"}


class StopOnInterrupt:
    """The first Ctrl-C or SIGTERM (what SLURM and other schedulers send before they kill a job) only records the
    signal, so the loop can finish its step, checkpoint and exit with 128 + its number; a second one interrupts
    immediately."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, then: str = "writing a checkpoint"):
        self.signal, self.then = 0, then

    @property
    def requested(self) -> bool:
        return self.signal != 0

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and {self.then} (Ctrl-C again to abort)",
              flush=True)

    def __enter__(self):
        self._previous = {number: signal.signal(number, self._handler) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        return False


class TimeBudget:
    """Ends training after `minutes` of wall time (0 = never), so a demo fits a fixed budget on any machine.
    The step-decay/cosine schedules are functions of the step, so stopping early leaves them consistent; --cooldown
    and vae.py's cosine follow the clock too (spent)."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.deadline = time.monotonic() + self.seconds if minutes > 0 else None

    def spent(self) -> float:
        """The share of the budget used so far (0 without a budget)."""
        if self.deadline is None:
            return 0.0
        return 1.0 - (self.deadline - time.monotonic()) / self.seconds

    def expired(self) -> bool:
        return self.spent() > 1


class TrainProgress:
    """The training progress bar, with a true total and ETA: under a time budget it fills with the budget's
    seconds (or the steps, whichever runs out first), so its ETA is the budget's end, not `--steps` at the
    current speed; without one it counts steps. The rate behind the ETA is the run's average (smoothing 0): tqdm's
    default, a recent-rate average, read an evaluation pause as a slowdown and showed 22 minutes left of a
    20-minute budget right after one."""
    TICKS = 100_000   # the bar's units under a budget: fine enough that rounding moves the ETA by under a second

    def __init__(self, start: int, steps: int, minutes: float, disable: bool = False):
        self.start, self.steps, self.seconds = start, steps, minutes * 60
        self.began = time.monotonic()
        if self.seconds > 0:
            self.bar = tqdm(total=self.TICKS, desc="train", disable=disable, dynamic_ncols=True, smoothing=0,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining} of the "
                                       f"{minutes:g}-minute budget" + "{postfix}")
        else:
            self.bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=disable, dynamic_ncols=True)

    def update(self, done: int) -> None:
        if self.seconds > 0:
            fraction = max((time.monotonic() - self.began) / self.seconds,
                           (done - self.start) / max(1, self.steps - self.start))
            self.bar.update(min(self.TICKS, int(fraction * self.TICKS)) - self.bar.n)
        else:
            self.bar.update(done - self.bar.n)

    def show(self, done: int, **values: str) -> None:
        self.bar.set_postfix(step=f"{done}/{self.steps}", **values)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


class EMA:
    """An exponential moving average of a model's weights, the copy that evaluation and sampling use. The decay
    ramps up as (1 + n) / (10 + n) over the first updates (as LDM's LitEma), so the average does not sit on the
    initial weights for its first ~1/(1 - decay) steps."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - decay)

    def state_dict(self) -> dict:
        return dict(model=self.model.state_dict(), updates=self.updates)

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


def check_ema_decay(decay: float) -> None:
    """For the scripts' validate: --ema-decay in [0, 1) (its sign is checked with the other settings')."""
    if decay >= 1:
        raise InputError(f"--ema-decay {decay}: must be in [0, 1), e.g. 0.999 (0 = no EMA)")


def make_ema(model: torch.nn.Module, decay: float) -> EMA | None:
    """The average of model's weights that --ema-decay asks for (> 0), else None."""
    return EMA(model, decay) if decay > 0 else None


def scored_model(model: torch.nn.Module, ema: EMA | None) -> torch.nn.Module:
    """The weights that evaluation, pictures and sampling use: the average when one is kept."""
    return ema.model if ema is not None else model


def with_ema(state: dict, ema: EMA | None) -> dict:
    """A checkpoint's dict with the average beside the trained weights ("ema"), when one is kept."""
    return {**state, "ema": ema.state_dict()} if ema is not None else state


def restore_ema(ema: EMA | None, state: dict, resume: str, master: bool) -> None:
    """A resumed run's average: the checkpoint's, or (a run that kept none) one starting from the restored weights."""
    if ema is None:
        return
    if "ema" in state:
        ema.load_state_dict(state["ema"])
    elif master:
        print(f"{resume} kept no weight average: --ema-decay {ema.decay} starts it from the restored weights")


def scored_weights(state: dict) -> dict[str, torch.Tensor]:
    """A checkpoint's weights to evaluate: the average when it kept one, else the trained ones."""
    return state["ema"]["model"] if "ema" in state else state["model"]


def adam(params: Iterable[torch.Tensor] | Iterable[dict], **kwargs: object) -> torch.optim.Adam:
    """Adam as every training script builds it: fused, one kernel over all parameters. torch's default on a CPU is
    a Python loop of ~10 small ops per tensor: 32 ms of SlotDiffusion's ~250 ms step on 2 AVX2 cores, 7 ms fused
    (docs/results.md, Benchmarks); the update is the same."""
    return torch.optim.Adam(params, fused=True, **kwargs)


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, model: torch.nn.Module,
                   grad_clip: float = 0.0, world_size: int = 1) -> str | None:
    """Backward through the AMP loss scaler, then the optimiser step (after gradient-norm clipping when grad_clip >
    0), only if the loss and the gradient norm are finite on every rank: one non-finite step would poison the
    weights for good. Returns None when the step was applied, else what was not finite (for TrainLoop.end_step,
    which stops a run after MAX_BAD_STEPS of them in a row)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)   # a no-op without fp16 loss scaling
    named = [(name, p) for name, p in model.named_parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for _, p in named])
    finite = torch.stack([torch.isfinite(loss.detach()).all(), torch.isfinite(norm)]).to(torch.int)
    if world_size > 1:   # every rank's loss: one rank's NaN reaches all gradients anyway, but all must agree
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    loss_ok, grads_ok = finite.tolist()
    if loss_ok and grads_ok and grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_([p for _, p in named], grad_clip, norm)
    if scaler.is_enabled():   # fp16: the scaler skips a step with inf gradients itself and lowers its scale
        scaler.step(opt)
        scaler.update()
        return None if loss_ok else non_finite_loss(loss)
    if loss_ok and grads_ok:
        opt.step()
        return None
    if not loss_ok:
        return non_finite_loss(loss)
    bad = [name for name, p in named if not torch.isfinite(p.grad).all()]
    return (f"the gradients of {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} ({len(bad)} of {len(named)} "
            f"tensors) were not finite")


def non_finite_loss(loss: torch.Tensor) -> str:
    """What optimizer_step says of a loss that was not finite here or, under DDP, on another rank."""
    return f"the loss was {loss.item()}" if not torch.isfinite(loss).all() else "another rank's loss was not finite"


def restore(state: dict, path: str | Path, master: bool = True, **parts) -> int:
    """Continues a training checkpoint exactly: loads each part's state (model=..., optimizer=..., scaler=..., the
    keys the checkpoint stores them under) and every random generator's state; returns the checkpoint's step."""
    for key, part in parts.items():
        part.load_state_dict(state[key])
    set_rng_state(state["rng"])
    if master:
        print(f"resumed from {path} at step {state['step']}")
    return state["step"]


COMPILE_CACHE = Path(".cache") / "inductor"
# read at import, not in compile_model: building an optimiser imports torch._dynamo, which sets the variable to torch's
# default (/tmp/torchinductor_<user>) before any model is compiled; None unless the user chose a folder
CHOSEN_COMPILE_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def compile_model(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """torch.compile, with the inductor's caches in the project's .cache/inductor (or the TORCHINDUCTOR_CACHE_DIR
    the user set) instead of /tmp (which machines clear), so only the first run in a folder pays the whole
    compilation; the compiled view shares the parameters."""
    if not enabled:
        return model
    # set, not setdefault (see CHOSEN_COMPILE_CACHE); inductor reads the variable at every cache lookup
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = CHOSEN_COMPILE_CACHE or str(COMPILE_CACHE.resolve())
    import torch._inductor.config   # here, not at the top: only a compiled run pays its import
    # random ops (Gaussian slots, diffusion noise) draw eager's numbers for the same seed, so check_compiled compares
    # like with like; they are a negligible share of a step
    torch._inductor.config.fallback_random = True
    return torch.compile(model)


class Autocast(torch.nn.Module):
    """model(...) under --amp's autocast, entered inside forward: the view every training step calls, compiled or
    not, never inside an autocast of its own. torch.compile traces the backward pass under the autocast active
    around the compiled call, so an outer autocast ran the backward of Slot Attention's fp32 iterations in bf16
    while their forward ran in fp32 (its GRU gradients came out non-finite on an AMX CPU); entered inside, the
    backward keeps the forward's dtypes, as in eager (bench/bench_compile.py)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, enabled: bool):
        super().__init__()
        self.model, self.device_type = model, device.type
        self.dtype = amp_dtype(device) if enabled else None   # here: dynamo cannot trace the CPU feature query

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.model(*args, **kwargs)


def training_view(model: torch.nn.Module, device: torch.device, amp: bool, compiled: bool) -> torch.nn.Module:
    """The view a training step calls (Autocast, compiled or not), unchecked: for benchmarks; the training scripts
    take TrainLoop.step_model's, checked against eager."""
    return compile_model(Autocast(model, device, amp), compiled)


@dataclass
class CompileCheck:
    """check_compiled's verdict: ok, why not (empty when ok), and one row per gradient (then the loss): name, norm
    of the fp32 eager reference, the eager --amp step's distance from it, the compiled step's, and the distance
    allowed to the compiled step."""
    ok: bool
    reason: str
    rows: list[tuple[str, float, float, float, float]]


def loss_and_gradients(view: torch.nn.Module, loss_of: Callable[[torch.nn.Module], torch.Tensor],
                       model: torch.nn.Module, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """{"loss": ..., parameter name: gradient, ...} of loss_of(view) in fp32, from the current weights and a fixed
    seed; the training RNG and model's gradients are left as they were (none)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        loss = loss_of(view)
        model.zero_grad(set_to_none=True)
        loss.float().backward()
    values = {name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().clone()
              for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return {**values, "loss": loss.detach().float().reshape(1)}


def compare_with_eager(reference: dict[str, torch.Tensor], eager: dict[str, torch.Tensor],
                       compiled: dict[str, torch.Tensor]) -> CompileCheck:
    """The compiled values against eager fp32's (reference), each allowed twice eager --amp's error + 5% of the
    reference + a millionth of the largest reference (for values that are zero but for rounding): rounding, not a
    wrong kernel (eager bf16 itself is off by up to 75% on gradients that sum many cancelling terms, so compiled
    bf16 is never compared with eager bf16 directly). A reference that is not finite is no verdict on the compiler
    (the step guard meets it)."""
    largest = max(v.norm().item() for v in reference.values())
    rows, reason = [], ""
    for name, ref in reference.items():
        eager_error, error = (eager[name] - ref).norm().item(), (compiled[name] - ref).norm().item()
        allowed = 2 * eager_error + 0.05 * ref.norm().item() + 1e-6 * largest
        rows.append((name, ref.norm().item(), eager_error, error, allowed))
        if reason or not (ref.isfinite().all() and eager[name].isfinite().all()):
            continue
        if not compiled[name].isfinite().all():
            reason = f"its {name} is not finite"
        elif error > allowed:
            scale = max(ref.norm().item(), 1e-30)
            reason = f"its {name} is {error / scale:.0%} off eager fp32's (eager --amp: {eager_error / scale:.0%})"
    return CompileCheck(not reason, reason, rows)


def compare_steps(reference: dict[str, torch.Tensor], eager: dict[str, torch.Tensor],
                  compiled: dict[str, torch.Tensor]) -> CompileCheck:
    """compare_with_eager for loss_and_gradients' values: the gradients, and the loss on its own scale."""
    def part(values, loss):
        return {k if loss else f"gradient of {k}": v for k, v in values.items() if (k == "loss") == loss}
    gradients, loss = (compare_with_eager(part(reference, x), part(eager, x), part(compiled, x)) for x in (False, True))
    return CompileCheck(loss.ok and gradients.ok, loss.reason or gradients.reason, gradients.rows + loss.rows)


def check_compiled(model: torch.nn.Module, compiled: torch.nn.Module, loss_of: Callable[[torch.nn.Module], torch.Tensor],
                   device: torch.device, amp: bool, world_size: int = 1) -> CompileCheck:
    """Is the compiled training step right here? One batch (loss_of(view) -> its loss) through it and through eager
    from the same weights and seed, the loss and every gradient compared (compare_with_eager). Costs two eager
    steps beside the compilation. Under DDP every rank checks its own batch and all follow the strictest verdict."""
    reference = loss_and_gradients(Autocast(model, device, False), loss_of, model, device)
    eager = (loss_and_gradients(Autocast(model, device, True), loss_of, model, device)
             if amp and amp_dtype(device) is not None else reference)
    check = compare_steps(reference, eager, loss_and_gradients(compiled, loss_of, model, device))
    if world_size > 1:
        ok = torch.tensor(int(check.ok), device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item() and check.ok:
            check = CompileCheck(False, "another rank's compiled step disagreed with eager", check.rows)
    return check


@torch.no_grad()
def check_compiled_inference(model: torch.nn.Module, compiled: torch.nn.Module, inputs: tuple, device: torch.device,
                             amp: bool) -> CompileCheck:
    """check_compiled for a network used without gradients (the sampling UNet): its output on `inputs`, compiled
    (called under --amp's autocast) against eager."""
    def output(view, enabled):
        with autocast(device, enabled):
            return {"output": view(*inputs).float()}
    reference = output(model, False)
    eager = output(model, True) if amp and amp_dtype(device) is not None else reference
    return compare_with_eager(reference, eager, output(compiled, amp))


def compile_times() -> dict[str, float]:
    """Seconds the first training step (or sampling call) took last time, per title, compilation included; {} if
    unknown."""
    try:
        return json.loads((COMPILE_CACHE / "first_step_seconds.json").read_text())
    except (OSError, ValueError):
        return {}


def compile_notice(title: str, what: str = "the training step") -> str:
    """What to expect while `what` compiles: the time it took last time here, or the first-run cost."""
    last = compile_times().get(title)
    kernels = CHOSEN_COMPILE_CACHE or COMPILE_CACHE   # where compile_model puts them
    if last is None:
        return (f"compiling {what} (first run in this folder only: 0.5 to 5 minutes, measured on 2-core CPUs and "
                f"for paper-size models on an H200; later runs reuse {kernels})")
    return f"compiling {what} (cached in {kernels}: ~{last:.0f} s last time)"


def record_compile_time(title: str, seconds: float) -> None:
    with contextlib.suppress(OSError):
        COMPILE_CACHE.mkdir(parents=True, exist_ok=True)
        (COMPILE_CACHE / "first_step_seconds.json").write_text(json.dumps({**compile_times(),
                                                                           title: round(seconds, 1)}))


def decline_note(records: list[dict], key: str = "fg_ari", margin: float = 0.03) -> str | None:
    """One line when a run's last periodic score is more than `margin` below its peak (more training made the
    segmentation worse, which the final loss does not show), naming the peak's step; None otherwise."""
    points = [(r["step"], r[key]) for r in records if key in r]
    if len(points) < 2:
        return None
    (peak_step, peak), (_, final) = max(points, key=lambda point: point[1]), points[-1]
    if final >= peak - margin:
        return None
    return (f"note: val {SCORE_NAMES.get(key, key)} (periodic eval subset) ended at {final:.3f}, {peak - final:.3f} "
            f"below its peak of {peak:.3f} at step {peak_step}; the checkpoint holds the last step")


MAX_BAD_STEPS = 3   # non-finite steps in a row (none of them applied) that stop a run


class Diverged(InputError):
    """Training went non-finite and was stopped: reported like bad input, as one line with the likely fix."""


def all_finite(weights: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(w).all()) for w in weights.values() if w.is_floating_point())


class TrainLoop:
    """The bookkeeping every training script does around its own loop body, written once: the time budget, a
    progress bar with a true ETA, the metrics log, periodic evaluation with the loss-curve picture, atomic
    checkpoints (every ckpt_every steps, at the last step, on Ctrl-C or SIGTERM), numerical health (the compiled
    step checked against eager before training; a run of non-finite steps stops it) and what to print when it
    stops.

        loop = TrainLoop(cfg, start, out, script="sa.py", title="...", resumed=bool(resume))
        step_model = loop.step_model(model, loss_of=lambda view: view(first_batch)["loss"])
        for step in loop.steps():
            loss, problem = ...one optimiser step through step_model (trainlib.optimizer_step)...
            loop.end_step(step + 1, loss, lr, evaluate=lambda: {...scores...}, state=lambda: {...checkpoint...},
                          problem=problem)

    cfg needs steps, max_minutes, log_every, eval_every, ckpt_every (compile and amp where the script has them).
    Under DDP only the master logs, evaluates and saves, but every rank stops at the same step."""

    def __init__(self, cfg, start: int, out: Path, script: str, title: str, resumed: bool = False,
                 master: bool = True, world_size: int = 1, device: torch.device | None = None,
                 images_per_step: int = 1, epoch_size: int = 1):
        self.cfg, self.start, self.out, self.script, self.title = cfg, start, Path(out), script, title
        self.master, self.world_size, self.device = master, world_size, device or torch.device("cpu")
        self.images_per_step, self.epoch_size = images_per_step, epoch_size
        self.ckpt = self.out / "ckpt.pt"
        self.compiled = getattr(cfg, "compile", False)
        self.log = MetricsLog(self.out / "metrics.jsonl", resume_step=start if resumed else None) if master else None
        self.write_config()
        self.finished = start >= cfg.steps
        self.interrupt = StopOnInterrupt()
        self.bad_in_row = 0

    def write_config(self, **notes) -> None:
        """The settings in effect, for the reader of the run folder (checkpoints carry their own copy)."""
        if self.master:
            (self.out / "config.json").write_text(json.dumps({**dataclasses.asdict(self.cfg), **notes}, indent=2))

    def step_model(self, model: torch.nn.Module, loss_of: Callable[[torch.nn.Module], torch.Tensor]) -> torch.nn.Module:
        """What the training step calls: model under --amp's autocast (Autocast), compiled with --compile 1 if the
        compiled step agrees with eager on the first batch (loss_of(view) -> its loss; check_compiled), else eager,
        said in one line and recorded in metrics.jsonl and config.json."""
        cfg, eager = self.cfg, Autocast(model, self.device, getattr(self.cfg, "amp", False))
        if not self.compiled:
            return eager
        if self.master:
            print(compile_notice(self.title), flush=True)
        began = time.monotonic()
        compiled = compile_model(eager)
        check = check_compiled(model, compiled, loss_of, self.device, getattr(cfg, "amp", False), self.world_size)
        if self.master:
            record_compile_time(self.title, time.monotonic() - began)
            self.log.log(step=self.start, compile_check="passed" if check.ok else check.reason)
        if check.ok:
            return compiled
        self.compiled = False
        self.write_config(compile=False, compile_fallback=check.reason)
        if self.master:
            print(f"the compiled training step disagreed with eager on the first batch: {check.reason}; training "
                  f"eagerly instead (as --compile 0; bench/bench_compile.py shows every gradient)", flush=True)
        return eager

    def steps(self) -> Iterator[int]:
        """The step numbers to run, from the start until the last step, the budget, a Ctrl-C or a SIGTERM."""
        self.budget, self.spent = TimeBudget(self.cfg.max_minutes), 0.0
        self.bar = TrainProgress(self.start, self.cfg.steps, self.cfg.max_minutes, disable=not self.master)
        step = self.start
        if getattr(self.cfg, "amp", False) and self.master and precision(self.device, True) == "fp32":
            self.bar.write("--amp: this CPU has no bf16 arithmetic (AVX-512 BF16 or AMX), where bf16 autocast runs "
                           "~13x slower than fp32; training in fp32")
        with self.interrupt:
            try:
                while not self.finished:
                    yield step
                    step += 1
            finally:
                self.bar.close()

    def progress(self, step: int) -> float:
        """budget_progress of --steps and --max-minutes (its time as measured at the end of the step before)."""
        return budget_progress(step, self.cfg.steps, self.spent)

    def shared_clock_and_signal(self) -> tuple[float, int]:
        """The budget's share spent and the stop signal received (0: none), the same on every rank: the largest
        over the ranks, so a signal that reached one rank stops them all at this step."""
        values = torch.tensor([self.budget.spent(), float(self.interrupt.signal)], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        spent, signum = values.tolist()
        return spent, int(signum)

    def end_step(self, done: int, loss: torch.Tensor, lr: float, evaluate: Callable[[], dict],
                 state: Callable[[], dict], problem: str | None = None) -> None:
        cfg = self.cfg
        self.spent, signum = self.shared_clock_and_signal()   # one clock reading (and collective) a step
        self.check_health(done, problem)
        out_of_time = self.spent > 1
        last = done >= cfg.steps or out_of_time
        self.bar.update(done)
        epoch = done * self.images_per_step / self.epoch_size
        if done % cfg.log_every == 0 or last:
            if self.world_size > 1:  # log the loss of the global batch: the mean over the ranks' local losses
                loss = loss.detach().clone()
                dist.all_reduce(loss)   # a sum (gloo has no AVG)
                loss /= self.world_size
        if self.master and (done % cfg.log_every == 0 or last):
            value = loss.item()
            self.bar.show(done, loss=f"{value:.4f}", lr=f"{lr:.1e}")
            self.log.log(step=done, epoch=epoch, train_loss=value, lr=lr)
        if self.master and (done % cfg.eval_every == 0 or last):
            scores = evaluate()
            self.log.log(step=done, epoch=epoch, **scores)
            self.bar.write(f"step {done}: " + "  ".join(f"{SCORE_NAMES.get(k, k)} {v:.4f}" for k, v in scores.items()))
            plot_loss_curves(self.log.records(), self.out / "loss_curves.png", title=self.title)
            if last and (note := decline_note(self.log.records())):
                self.bar.write(note)
        if self.master and (done % cfg.ckpt_every == 0 or last or signum):
            self.save({**state(), "finished": last}, done)   # finished: by --steps or --max-minutes
        if out_of_time and self.master:
            self.bar.write(f"--max-minutes {cfg.max_minutes:g} reached at step {done}; checkpoint {self.ckpt} "
                           f"(train further with: python {self.script} --resume {self.ckpt} --max-minutes N)")
        if signum:
            self.bar.close()
            if self.master:
                print(f"stopped at step {done} ({signal.Signals(signum).name}); checkpoint {self.ckpt}. Resume: "
                      f"python {self.script} --resume {self.ckpt}, or the same command with --resume auto", flush=True)
            sys.exit(128 + signum)
        self.finished = last

    def check_health(self, done: int, problem: str | None) -> None:
        """A step that optimizer_step did not apply (problem: what was not finite) is said and logged;
        MAX_BAD_STEPS in a row stop the run with the likely fix, before any evaluation of the broken model."""
        if problem is None:
            self.bad_in_row = 0
            return
        self.bad_in_row += 1
        if self.master:
            self.bar.write(f"step {done}: {problem}; the step was not applied")
            self.log.log(step=done, skipped_step=problem)
        if self.bad_in_row < MAX_BAD_STEPS:
            return
        self.bar.close()
        fixes = ["--compile 0"] if self.compiled else []
        if getattr(self.cfg, "amp", False) and precision(self.device, True) != "fp32":
            fixes.append("--amp 0")
        fixes.append("a lower --lr" + ("" if getattr(self.cfg, "grad_clip", 1) else " or --grad-clip 1"))
        kept = (f"{self.ckpt} keeps the last good weights" if self.ckpt.exists() else "no checkpoint was written")
        raise Diverged(f"training stopped at step {done}: {problem}, {self.bad_in_row} steps in a row (none of them "
                       f"applied; nothing evaluated); {kept}. Likely fix: {', '.join(fixes)}")

    def save(self, state: dict, done: int) -> None:
        """save_checkpoint, unless the weights are not finite: then the last good checkpoint is kept."""
        if all_finite(state["model"]):
            save_checkpoint(state, self.ckpt)
        else:
            tqdm.write(f"step {done}: the weights are not finite; not saved over {self.ckpt}")
