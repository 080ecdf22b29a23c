"""Train-step throughput of sa.py's model: eager and torch.compile, each in fp32 and under --amp, side by side in one
run, each step sa.train_step through the view the script trains with (trainlib.training_view: autocast inside the
compiled module, the non-finite guard included). --amp is bf16 where the hardware has it (AVX-512 BF16, AMX, an
Ampere+ GPU) and fp32 elsewhere, as in the scripts (the "amp" rows then repeat the fp32 ones).

    .venv/bin/python bench/bench_sa.py [--preset cpu] [--steps 10] [--device auto]

Also prints model FLOPs per training step (torch's FlopCounterMode), the machine's measured matmul peak and
the fraction of it that one step reaches (MFU), and each variant's peak resident memory.
Timings on shared machines drift: variants are interleaved in rounds and the median is reported.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import sa  # noqa: E402
import trainlib  # noqa: E402
from benchlib import matmul_peak, sync  # noqa: E402


def peak_rss_reset() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so each variant's peak is measured on its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def make_step(view: torch.nn.Module, model: sa.SlotAutoencoder, opt: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler, images: torch.Tensor, cfg: sa.SAConfig) -> Callable[[], torch.Tensor]:
    def step():
        loss, problem = sa.train_step(view, model, opt, scaler, images, 2_000, cfg)
        assert problem is None, problem
        return loss
    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="cpu", choices=sorted(sa.PRESETS))
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = trainlib.pick_device(args.device)
    cfg = cli.make_config(sa.SAConfig, sa.PRESETS[args.preset])
    cfg.encoder.slots = cfg.encoder.slots or 7   # --slots 0 = from the data: 7 on synthetic-clevr
    resolution = cfg.encoder.resolution
    images = torch.rand(cfg.batch_size, 3, resolution, resolution, device=device)
    print(f"preset {args.preset}: {resolution}x{resolution}, batch {cfg.batch_size}, {cfg.encoder.slots} slots, "
          f"enc {cfg.encoder.enc_channels} ch, dec {cfg.decoder.dec_channels} ch, device {device}, "
          f"threads {torch.get_num_threads()}")

    torch.manual_seed(0)
    base = sa.SlotAutoencoder(cfg).to(device)
    with FlopCounterMode(display=False) as counter:
        base(images)["loss"].backward()
    flops = counter.get_total_flops()
    print(f"model FLOPs per training step (fwd+bwd): {flops / 1e9:.1f} GFLOP")

    variants = {}
    amp_name = trainlib.precision(device, True)
    for name, compiled, amp in [("eager fp32", False, False), (f"eager amp {amp_name}", False, True),
                                ("compiled fp32", True, False), (f"compiled amp {amp_name}", True, True)]:
        model = sa.SlotAutoencoder(cfg).to(device)
        model.load_state_dict(base.state_dict())
        opt = trainlib.adam(model.parameters(), lr=1e-4)
        view = trainlib.training_view(model, device, amp, compiled)
        step = make_step(view, model, opt, trainlib.make_grad_scaler(device, amp), images, cfg)
        peak_rss_reset()
        t = time.perf_counter()
        for _ in range(2):  # warm-up (and compilation)
            step()
        sync(device)
        variants[name] = dict(step=step, times=[], warmup_s=time.perf_counter() - t)

    for _ in range(args.rounds):
        for v in variants.values():
            peak_rss_reset()
            t = time.perf_counter()
            for _ in range(args.steps):
                v["step"]()
            sync(device)
            v["times"].append((time.perf_counter() - t) / args.steps)
            v["peak_gib"] = peak_rss_gib()

    # without bf16 hardware the emulated bf16 matmul (minutes to measure there) is no ceiling: the fp32 peak is
    bf16_hardware = trainlib.amp_dtype(device) is not None
    peak32 = matmul_peak(device, torch.float32)
    peak = matmul_peak(device, torch.bfloat16) if bf16_hardware else peak32
    fp32 = "fp32 (TF32, as cuDNN's convolutions)" if device.type == "cuda" else "fp32"
    print(f"measured matmul peak: {fp32} {peak32 / 1e12:.2f} TFLOP/s, bf16 "
          + (f"{peak / 1e12:.2f} TFLOP/s" if bf16_hardware else "emulated (MFU against the fp32 peak)"))
    for name, v in variants.items():
        s = statistics.median(v["times"])
        ref = peak if "amp" in name and bf16_hardware else peak32
        print(f"{name:22s} {s * 1e3:8.1f} ms/step  {cfg.batch_size / s:7.1f} img/s  MFU {flops / s / ref:6.1%}  "
              f"peak RSS {v['peak_gib']:.2f} GiB  (warm-up/compile {v['warmup_s']:.1f} s)")
    eager, eager_amp, compiled, compiled_amp = (statistics.median(v["times"]) for v in variants.values())
    print(f"speed-up vs eager fp32: eager amp {eager / eager_amp:.2f}x, compiled {eager / compiled:.2f}x, compiled "
          f"amp {eager / compiled_amp:.2f}x; compiled amp vs eager amp {eager_amp / compiled_amp:.2f}x")


if __name__ == "__main__":
    main()
