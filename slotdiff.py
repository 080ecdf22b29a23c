"""SlotDiffusion (Wu et al., NeurIPS 2023) in one file: Slot Attention slots condition a latent diffusion model
(a UNet denoising the latents of a frozen VQ-VAE; the slots enter through cross-attention). Encoder and UNet
are trained jointly by the denoising loss alone.

    python slotdiff.py --preset cpu                       # VQ-VAE (trained once, cached), SlotDiffusion, evaluation
    python slotdiff.py --preset paper --vae vae_checkpoint.pth --data PATH
    python slotdiff.py eval --ckpt runs/slotdiff/ckpt.pt  # ARI, FG-ARI, mBO, reconstructions, compositional FID
    torchrun --nproc_per_node 8 slotdiff.py ...           # DDP, one process per GPU

Reads top to bottom: config, forward process and samplers (DDPM, DDIM, DPM-Solver++), UNet, model, training
loop, evaluation, CLI.
The slot encoder and its config are sa.py's (imported, not copied).

Two differences from the reference implementation, both pure speed-ups with identical maths:
  * the frozen VQ-VAE encodes every image once per dataset (cached on disk), not on every training batch;
  * the sampler works on continuous latents for all T steps and quantises once, inside the VAE decode,
    instead of re-quantising against the codebook at every step.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cli
import metrics
import sa
import trainlib
import vae
from data import (Scenes, batch_indices, check_source, colorize_masks, from_uint8, get_batch, iterate_batches,
                  load_split, save_grid, to_uint8)
from errors import InputError
from sa import (EncoderConfig, SlotEncoder, attention_masks, check_resolution, composed_slots, save_and_score_composed,
                validate_encoder, with_slots_for)


# ----------------------------------------------------------------------------------------------------------
# config

@dataclass
class UNetConfig:
    """The slot-conditioned UNet on the VAE latent (it reads the slot size from the encoder's config)."""
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)  # one level per entry (the latent's size, halved at each next)
    num_res_blocks: int = 2        # per level going down; going up there is one more, for the down-sampler's skip
    head_dim: int = 32
    dropout: float = 0.1


@dataclass
class DiffusionConfig:
    """The DDPM noise schedule."""
    timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    beta_schedule: str = "linear"  # "linear" (as the assignment states) or "scaled_linear" (what LDM calls linear)
    latent_scale: float = 1.0      # the schedule noises latent_scale * z (LDM's z_scale_factor, Rombach et al. 2022;
                                   # SlotDiffusion's configs: 1.0); 0 = one over the std of the training latents,
                                   # measured once and kept in the checkpoint


@dataclass
class SDConfig:
    # data
    data: str = "synthetic-clevr"  # a name of the embedded generator (synthetic-clevr, ...; data.SYNTHETIC) or a dataset folder
    num_train: int | None = None   # scenes to use (synthetic: to generate); None = the whole split / 5000
    num_val: int | None = None     # None = the whole split / 500
    # model: sa.py's slot encoder, the UNet, the schedule, and the frozen VQ-VAE whose latents are denoised
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    encoder_from: str | None = None  # an sa.py checkpoint whose trained slot encoder starts this one (same settings)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    vae: str | None = None         # a VQ-VAE checkpoint, or None = train one here once per dataset (cached)
    sampler: str = "ddpm"          # "ddpm": ancestral (the assignment); "ddim" (Song et al. 2021) or "dpm-solver++"
                                   # (2M, Lu et al. 2022): deterministic ODE solvers, 20-50 steps instead of 1000
    sample_steps: int | None = None  # None = all T; ddpm: a divisor of T (strided respacing); ODE solvers: any
    sample_batch: int = 64         # the most latents denoised together when sampling (in chunks of equal size)
    # optimisation (SlotDiffusion: Adam, batch 64, lr 1e-4 encoder / 2e-4 UNet, 5% warm-up + cosine, clip 1)
    batch_size: int = 64
    lr: float = 1e-4               # slot encoder
    unet_lr: float = 2e-4
    encoder_steps: int = 0         # > 0: the encoder's cosine ends at 0 after this many steps (then it is frozen and
                                   # only the UNet trains); 0 = it follows the UNet's schedule over --steps
    encoder_delay: int = 0         # the encoder's learning rate is 0 for the first this many steps (its warm-up and
                                   # cosine start after them): a warm-started encoder is not moved by a fresh UNet
                                   # that cannot yet read its slots
    warmup: int = 12_500           # linear learning-rate warm-up steps before the cosine decay
    cooldown: float = 0.0          # > 0: over this last share of the budget (--steps or --max-minutes) lr falls to 0
    steps: int = 250_000
    grad_clip: float = 1.0         # 0 = off
    ema_decay: float = 0.0         # > 0: evaluate and sample with an EMA of the weights (trainlib.EMA); 0 = off
    # system
    device: str = "auto"           # auto (cuda if available), cpu, cuda, cuda:1, ...
    compile: bool = True           # torch.compile the training step and the sampling UNet
    amp: bool = True               # bf16 autocast (fp16 + loss scaling on GPUs without bf16)
    seed: int = 0
    out: str = "runs/slotdiff"     # folder for ckpt.pt, metrics.jsonl and the pictures
    log_every: int = 50
    eval_every: int = 2_000        # steps between the periodic val evaluations
    eval_images: int = 256         # val images used for the periodic val loss / FG-ARI during training
    ckpt_every: int = 1_000
    max_minutes: float = 0.0       # wall-time budget for training (0 = none): checkpoint, stop, evaluate
    # evaluation: every val image is also sampled from its own slots (reconstruction MSE and FID, as sa.py's)
    comp_sample: str = "member"    # compositional generation: "member" (a random cluster member) or "gaussian"
    num_gen: int | None = None     # images to generate for FID (None = size of the val split)


PRESETS = {
    # the paper's CLEVR setting: 128x128 images, VQ-VAE latent 3x32x32, UNet levels 32/16/8/4 with slot attention
    # at 16/8/4 (the reference CLEVRTex config widens the UNet to 128 channels)
    "paper": dict(encoder=EncoderConfig(resolution=128), unet=UNetConfig(), batch_size=64, warmup=12_500,
                  steps=250_000),
    # a 2-core CPU; why each setting, with its measurement: docs/results.md, "Part 2: SlotDiffusion on 2 CPU cores"
    "cpu": dict(encoder=replace(sa.PRESETS["cpu"]["encoder"],   # sa.py's cpu encoder recipe, but PyTorch's init:
                                weight_init="torch",    # Glorot-init encoders' attention maps missed the objects
                                slot_frame=False,       # and no slot frames or their shape moments, and 32
                                slot_moments=False,     # channels: Part 2 as measured (docs/results.md)
                                enc_channels=32),
                num_train=5_000, num_val=500,
                latent_scale=0.0,                 # the small VAE's latents to unit std: -16% reconstruction MSE
                compile=False,                    # 2 cores: the first compilation costs more steps than it wins back
                unet=UNetConfig(base_channels=32, channel_mult=(1, 2, 3), num_res_blocks=1, head_dim=32, dropout=0.0),
                batch_size=16,
                lr=1e-4,                          # the encoder's: 4e-4 broke the handed-over binding, 2e-5 let it decay
                unet_lr=4e-4, warmup=500,
                encoder_steps=6_000,              # the encoder's cosine ends here: trained on, its maps drifted away
                encoder_delay=1_000,              # the encoder waits while the fresh UNet learns to read its slots
                cooldown=0.3,                     # the UNet's lr to 0 over the last 30%: -6 to -18% loss and MSE
                steps=100_000, max_minutes=20, log_every=25, eval_every=500, eval_images=128, ckpt_every=500,
                sample_batch=250),
}


def validate(cfg: SDConfig) -> None:
    """Every setting checked before any work (the VAE included), each problem as one line naming the flag."""
    check_source(cfg.data)
    validate_encoder(cfg.encoder)
    cli.check_ranges(cfg, positive=("base_channels", "num_res_blocks", "head_dim", "timesteps", "beta_start",
                                    "beta_end", "sample_steps", "sample_batch", "batch_size", "lr", "unet_lr",
                                    "steps", "log_every", "eval_every", "eval_images", "ckpt_every",
                                    "num_train", "num_gen"),
                     non_negative=("dropout", "warmup", "grad_clip", "ema_decay", "seed", "max_minutes",
                                   "encoder_steps", "encoder_delay", "latent_scale"),
                     choices=dict(comp_sample=("member", "gaussian"), sampler=SAMPLERS,
                                  beta_schedule=("linear", "scaled_linear")), shares=("cooldown",))
    if cfg.num_val is not None and cfg.num_val < 2:
        raise InputError(f"--num-val {cfg.num_val}: FID needs at least 2 val images (default: the whole split)")
    if cfg.encoder_delay and not cfg.encoder_delay < (cfg.encoder_steps or cfg.steps):
        raise InputError(f"--encoder-delay {cfg.encoder_delay}: the encoder must start before its training ends "
                         f"(--encoder-steps {cfg.encoder_steps}, --steps {cfg.steps}); use a smaller delay")
    if cfg.sample_steps is not None:
        check_sample_steps(cfg.sample_steps, cfg.sampler, cfg.diffusion.timesteps)
    schedule = cfg.diffusion
    if not schedule.beta_start <= schedule.beta_end < 1:
        raise InputError(f"--beta-start {schedule.beta_start} / --beta-end {schedule.beta_end}: need "
                         f"0 < beta-start <= beta-end < 1 (the assignment: 0.0015 and 0.0195)")
    trainlib.check_ema_decay(cfg.ema_decay)
    unet = cfg.unet
    if not unet.channel_mult or min(unet.channel_mult) < 1 or unet.dropout >= 1:
        raise InputError(f"--channel-mult {unet.channel_mult} / --dropout {unet.dropout}: need positive multipliers "
                         f"(e.g. 1,2,3) and a dropout in [0, 1)")
    with_attention = unet.channel_mult[ATTN_FROM_LEVEL:] + unet.channel_mult[-1:]   # the middle too
    widths = sorted({unet.base_channels * m for m in with_attention})
    if any(w % unet.head_dim for w in widths):
        raise InputError(f"UNet widths {widths} (--base-channels x --channel-mult) must be multiples of "
                         f"--head-dim {unet.head_dim}; change one of them")
    if cfg.encoder_from:
        trainlib.load_checkpoint(cfg.encoder_from, kind="sa")   # exists and is a Slot Attention checkpoint
    # the VAE (given, or the one ensure_vae would train) must suit the resolution: check now, not after training it
    preset = vae.PRESETS["cpu" if cfg.encoder.resolution <= 64 else "paper"]["model"]
    check_latent_size(cfg, vae.load_vae(cfg.vae).cfg.downsample if cfg.vae else preset.downsample)


def check_latent_size(cfg: SDConfig, downsample: int) -> None:
    levels, resolution = 2 ** (len(cfg.unet.channel_mult) - 1), cfg.encoder.resolution
    latent_size = resolution // downsample
    if resolution % downsample or latent_size % levels:
        raise InputError(f"--resolution {resolution} gives a {latent_size}x{latent_size} latent, which the UNet's "
                         f"{len(cfg.unet.channel_mult)} levels cannot halve {len(cfg.unet.channel_mult) - 1} times; "
                         f"use a resolution divisible by {downsample * levels}")


SAMPLERS = ("ddpm", "ddim", "dpm-solver++")


def check_sample_steps(steps: int, sampler: str, timesteps: int) -> int:
    """A DDPM chain's --sample-steps must divide the schedule, so that every step spans as many timesteps; the ODE
    solvers take any number up to T."""
    if sampler == "ddpm" and (not 1 <= steps <= timesteps or timesteps % steps):
        options = ", ".join(str(d) for d in range(1, timesteps + 1) if timesteps % d == 0)
        raise InputError(f"--sample-steps {steps} must divide the {timesteps}-step schedule for DDPM; use one of "
                         f"{options} (or leave it unset: all {timesteps}), or --sampler ddim / dpm-solver++")
    if not 1 <= steps <= timesteps:
        raise InputError(f"--sample-steps {steps}: {sampler} takes 1 to {timesteps} steps (e.g. 20)")
    return steps


# ----------------------------------------------------------------------------------------------------------
# forward process q(x_t | x_0) = N(sqrt(a_bar_t) x_0, (1 - a_bar_t) I)

def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """float64 betas. "scaled_linear" is linear in sqrt(beta): the schedule LDM and SlotDiffusion ship as "linear"."""
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, cfg.timesteps, dtype=torch.float64)
    if cfg.beta_schedule == "scaled_linear":
        return torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.timesteps, dtype=torch.float64) ** 2
    raise InputError(f"unknown beta schedule {cfg.beta_schedule!r}; use --beta-schedule linear or scaled_linear")


class Diffusion(nn.Module):
    """Noise schedule (as buffers, so it follows .to(device)), training loss and the samplers."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        betas = make_betas(cfg)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # float64: 1000 products lose digits in float32
        self.timesteps = cfg.timesteps
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt().float(), persistent=False)
        self.alphas_cumprod64 = alphas_cumprod  # the sampler derives its coefficients from these

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (self.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x0
                + self.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1) * noise)

    def loss(self, unet: nn.Module, x0: torch.Tensor, slots: torch.Tensor,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Epsilon-prediction MSE (Ho et al. 2020, L_simple). Pass t and noise to evaluate at fixed points."""
        if t is None:
            t = torch.randint(0, self.timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        return F.mse_loss(unet(self.q_sample(x0, t, noise), t, slots).float(), noise)

    def chain(self, steps: int | None = None, sampler: str = "ddpm") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Timesteps (steps,) of the sampling chain with a_bar_t and a_bar_{t-1} (float64), in increasing t.
        `steps` < T (--sample-steps, not the assignment's setting) keeps every (T/steps)-th timestep, ending at
        T-1, and a_bar_prev of a sub-chain is the previous kept timestep's: strided DDPM respacing (Nichol &
        Dhariwal 2021), the same marginals in fewer, larger steps. steps == T is the plain chain. The ODE solvers
        (ddim, dpm-solver++) take any number of steps, evenly spaced in log-SNR lambda = log(sqrt(a_bar) /
        sqrt(1 - a_bar)) from t = T-1 to t = 0 (Lu et al. 2022's "logSNR" spacing), each rounded to the nearest
        whole timestep (two that round alike merge, so a long chain may make a few fewer calls): on Gaussian data,
        where the exact solution is known, DPM-Solver++ with 20 steps lands 40x closer to it than with steps
        evenly spaced in t, whose last step from t = 53 to 0 spans a third of the whole lambda range."""
        steps = check_sample_steps(steps or self.timesteps, sampler, self.timesteps)
        if sampler == "ddpm" or steps == self.timesteps:
            ts = torch.arange(self.timesteps - 1, -1, -(self.timesteps // steps)).flip(0)
        else:
            log_snr = 0.5 * torch.log(self.alphas_cumprod64 / (1 - self.alphas_cumprod64))   # falls with t
            targets = torch.linspace(float(log_snr[-1]), float(log_snr[0]), steps, dtype=torch.float64)
            ts = (log_snr[None] - targets[:, None]).abs().argmin(dim=1).unique()   # increasing t
        a_bar = self.alphas_cumprod64[ts]
        return ts, a_bar, torch.cat([torch.ones(1, dtype=torch.float64), a_bar[:-1]])

    def step_coefficients(self, steps: int | None = None, sampler: str = "ddpm") -> tuple[torch.Tensor, torch.Tensor]:
        """The one-step samplers, each written as x_prev = c_x * x_t - c_eps * eps + sigma * z. Returns the
        timesteps (steps,) in the order the sampler runs them (t = T-1 first) and float64 rows (c_x, c_eps, sigma):
        sample() uses them, and so does export.py's ONNX Runtime sampler.
        "ddpm": the ancestral step of Ho et al. 2020 (Algorithm 2),
            x_{t-1} = (x_t - beta_t / sqrt(1 - a_bar_t) * eps) / sqrt(alpha_t) + sigma_t * z,
        with the posterior variance sigma_t^2 = beta-tilde_t = (1 - a_bar_{t-1}) / (1 - a_bar_t) * beta_t ("fixed
        small", as LDM; exactly 0 at the last step).
        "ddim": Song et al. 2021 with eta = 0, deterministic: predict x0 = (x_t - sqrt(1 - a_bar_t) eps) /
        sqrt(a_bar_t), then x_{t-1} = sqrt(a_bar_{t-1}) x0 + sqrt(1 - a_bar_{t-1}) eps."""
        ts, a_bar, a_bar_prev = self.chain(steps, sampler)
        if sampler == "ddim":
            c_x = (a_bar_prev / a_bar).sqrt()
            coefs = torch.stack([c_x, c_x * (1 - a_bar).sqrt() - (1 - a_bar_prev).sqrt(), torch.zeros_like(c_x)], 1)
        else:
            alpha = a_bar / a_bar_prev
            beta = 1 - alpha
            coefs = torch.stack([1 / alpha.sqrt(), beta / ((1 - a_bar).sqrt() * alpha.sqrt()),
                                 ((1 - a_bar_prev) / (1 - a_bar) * beta).sqrt()], dim=1)
        return ts.flip(0), coefs.flip(0)

    @staticmethod
    def ancestral_step(x_t: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_{t-1} from one row (c_x, c_eps, sigma) of step_coefficients."""
        return coefs[0] * x_t - coefs[1] * eps + coefs[2] * noise

    @torch.no_grad()
    def sample(self, unet: Callable, slots: torch.Tensor, latent_shape: tuple[int, int, int], seed: int = 0,
               steps: int | None = None, sampler: str = "ddpm", progress: bool = True) -> torch.Tensor:
        """One latent per slot set, from x_T ~ N(0, I) (drawn from `seed`) down the chain of `steps` timesteps
        (all T by default: the assignment's DDPM; see `chain`). unet(x, t, slots) -> eps."""
        generator = torch.Generator(slots.device).manual_seed(seed)
        x = torch.randn((slots.shape[0], *latent_shape), generator=generator, device=slots.device)
        if sampler == "dpm-solver++":   # a multistep solver: no per-step rows
            return self.dpm_solver_pp(unet, x, slots, self.chain(steps, sampler)[0].flip(0), progress)
        ts, coefs = self.step_coefficients(steps, sampler)
        for t, step_coefs in tqdm(zip(ts.tolist(), coefs.tolist()), total=len(ts), desc=sampler,
                                  disable=not progress, leave=False):
            eps = unet(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), slots).float()
            # no noise (and no draw from the generator) where sigma is 0: DDPM's last step, every DDIM step
            noise = torch.randn(x.shape, generator=generator, device=x.device) if step_coefs[2] else 0.0
            x = self.ancestral_step(x, eps, step_coefs, noise)
        return x

    def dpm_solver_pp(self, unet: Callable, x: torch.Tensor, slots: torch.Tensor, ts: torch.Tensor,
                      progress: bool = True) -> torch.Tensor:
        """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2: the probability-flow ODE solved in log-SNR time
        lambda = log(alpha / sigma) (alpha = sqrt(a_bar), sigma = sqrt(1 - a_bar)) with the model's data
        prediction x0 = (x - sigma eps) / alpha, second order by a finite difference with the previous step's x0.
        The first step and the last (to a_bar = 1, the data, where lambda is infinite) are first order: DDIM's."""
        a_bar = self.alphas_cumprod64[ts].tolist() + [1.0]       # t = T-1 first, then the data
        x0_prev, h_prev = None, None
        for i, t in enumerate(tqdm(ts.tolist(), desc="dpm-solver++", disable=not progress, leave=False)):
            alpha, sigma = math.sqrt(a_bar[i]), math.sqrt(1 - a_bar[i])
            alpha_next, sigma_next = math.sqrt(a_bar[i + 1]), math.sqrt(1 - a_bar[i + 1])
            eps = unet(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), slots).float()
            x0 = (x - sigma * eps) / alpha
            if sigma_next == 0:                                     # the last step lands on x0
                return x0
            h = math.log(alpha_next / sigma_next) - math.log(alpha / sigma)
            d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * h / (2 * h_prev)   # (1 + 1/2r) x0 - 1/2r x0_prev
            x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        return x


# ----------------------------------------------------------------------------------------------------------
# UNet: ResBlocks with a timestep embedding; Transformer blocks cross-attend to the slots

def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups (as LDM) but at least 4 channels per group: with 1-2 channels a group is
    InstanceNorm, which erases each channel's mean (the colour bias SlotDiffusion reports at small widths)."""
    groups = max((g for g in range(1, 33) if channels % g == 0 and channels // g >= 4), default=1)
    return nn.GroupNorm(groups, channels)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al.), periods from 2*pi to 10000*2*pi."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero the last layer of a residual branch so a fresh block is the identity (stable start, as LDM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-conv, + timestep projection, GN-SiLU-dropout-conv, + skip. resample="down"/"up" resamples by 2
    (average pooling / nearest) before the first conv, on both the residual and the skip path."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float = 0.0, resample: str | None = None):
        super().__init__()
        self.resample = {None: nn.Identity(), "down": nn.AvgPool2d(2), "up": nn.Upsample(scale_factor=2.0)}[resample]
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.resample(F.silu(self.norm1(x))))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(self.resample(x)) + h


class Attention(nn.Module):
    """Multi-head attention of tokens (B,N,dim) to a context (B,M,context_dim): self-attention when context is x."""

    def __init__(self, dim: int, context_dim: int, head_dim: int):
        super().__init__()
        if dim % head_dim:
            raise InputError(f"UNet width {dim} is not a multiple of head_dim {head_dim}; pick channels that are")
        self.heads = dim // head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.to_q(x)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2) for z in (q, k, v))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated hidden layer (Shazeer 2020), 4x wide, as in LDM's transformer."""

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        self.proj_in = nn.Linear(dim, 8 * dim)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(self.dropout(value * F.gelu(gate)))


class SlotTransformer(nn.Module):
    """Feature-map tokens: self-attention, cross-attention to the slots (the only path by which slots reach the
    image), feed-forward; pre-LayerNorm residuals. The zero-initialised 1x1 out-projection makes it the identity
    at initialisation."""

    def __init__(self, channels: int, slot_dim: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm = group_norm(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.norm_self, self.self_attn = nn.LayerNorm(channels), Attention(channels, channels, head_dim)
        self.norm_cross, self.cross_attn = nn.LayerNorm(channels), Attention(channels, slot_dim, head_dim)
        self.norm_ff, self.ff = nn.LayerNorm(channels), GEGLU(channels, dropout)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, H*W, C)
        hn = self.norm_self(h)
        h = h + self.self_attn(hn, hn)
        h = h + self.cross_attn(self.norm_cross(h), slots)
        h = h + self.ff(self.norm_ff(h))
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class UNetLayer(nn.ModuleList):
    """A run of ResBlocks (which read the timestep) and SlotTransformers (which read the slots)."""

    def forward(self, h: torch.Tensor, temb: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        for block in self:
            h = block(h, temb) if isinstance(block, ResBlock) else block(h, slots)
        return h


ATTN_FROM_LEVEL = 1   # the paper's UNet attends to the slots at every level but the full latent resolution


class UNet(nn.Module):
    """eps_theta(x_t, t, slots) on the latent. Levels of num_res_blocks ResBlocks (each followed by a
    SlotTransformer from level ATTN_FROM_LEVEL on) joined by down-sampling ResBlocks; a middle of
    ResBlock-SlotTransformer-ResBlock; the mirror image going up, every layer concatenating the matching skip."""

    def __init__(self, cfg: UNetConfig, slot_dim: int, latent_channels: int = 3):
        super().__init__()
        base, time_dim = cfg.base_channels, 4 * cfg.base_channels
        self.base_channels = base
        self.time_mlp = nn.Sequential(nn.Linear(base, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))

        def res(i: int, o: int, resample: str | None = None) -> ResBlock:
            return ResBlock(i, o, time_dim, cfg.dropout, resample)

        def attn(ch: int) -> SlotTransformer:
            return SlotTransformer(ch, slot_dim, cfg.head_dim, cfg.dropout)

        def level_blocks(level: int, i: int, o: int) -> list[nn.Module]:
            """A level's ResBlock, with slot attention after it from level ATTN_FROM_LEVEL on."""
            return [res(i, o)] + ([attn(o)] if level >= ATTN_FROM_LEVEL else [])

        self.conv_in = nn.Conv2d(latent_channels, base, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, ch = [base], base
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = level_blocks(level, ch, base * mult)
                ch = base * mult
                self.down.append(UNetLayer(blocks))
                skip_channels.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(UNetLayer([res(ch, ch, "down")]))
                skip_channels.append(ch)

        self.middle = UNetLayer([res(ch, ch), attn(ch), res(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = level_blocks(level, ch + skip_channels.pop(), base * mult)
                ch = base * mult
                if level > 0 and i == cfg.num_res_blocks:
                    blocks.append(res(ch, ch, "up"))
                self.up.append(UNetLayer(blocks))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_init(nn.Conv2d(ch, latent_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.base_channels))
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, temb, slots)
            skips.append(h)
        h = self.middle(h, temb, slots)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), temb, slots)
        return self.out(h)


# ----------------------------------------------------------------------------------------------------------
# the model: slot encoder + slot-conditioned UNet (the frozen VQ-VAE stays outside: training sees its latents)

class SlotDiffusion(nn.Module):
    def __init__(self, cfg: SDConfig, latent_channels: int = 3):
        super().__init__()
        self.encoder = SlotEncoder(cfg.encoder)
        self.unet = UNet(cfg.unet, cfg.encoder.out_dim, latent_channels)
        self.diffusion = Diffusion(cfg.diffusion)

    def forward(self, images: torch.Tensor, latents: torch.Tensor,
                t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images (B,3,H,W) in [0,1] and their VAE latents -> denoising loss, slots, attention (B,K,N)."""
        slots, attn = self.encoder(images)
        return dict(loss=self.diffusion.loss(self.unet, latents, slots, t, noise), slots=slots, attn=attn)


# ----------------------------------------------------------------------------------------------------------
# the frozen VQ-VAE and its latents, cached on disk

def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def ensure_vae(cfg: SDConfig, train_set: Scenes, cache_dir: str = ".cache") -> str:
    """Absolute path of the VQ-VAE checkpoint: --vae, or one trained here with vae.py's preset for the resolution,
    once per (training images, resolution, preset settings): later runs reuse it, changed images or a changed
    preset train a new one, and an interrupted VAE training resumes (a Ctrl-C during it stops this script too, so
    SlotDiffusion never trains on an unfinished VAE)."""
    if cfg.vae:
        return str(Path(cfg.vae).resolve())
    resolution = cfg.encoder.resolution
    preset = "cpu" if resolution <= 64 else "paper"
    scenes = f"-n{cfg.num_train}" if cfg.num_train else ""
    vae_cfg = cli.make_config(vae.TrainConfig, vae.PRESETS[preset], dict(
        data=cfg.data, resolution=resolution, num_train=cfg.num_train, device=cfg.device))
    settings = hashlib.sha256((repr(replace(vae_cfg, device="", out="")) + train_set.content_hash).encode()
                              ).hexdigest()[:8]
    folder = Path(cache_dir) / "vae" / f"{safe_name(cfg.data)}{scenes}-{resolution}px-{preset}-{settings}"
    vae_cfg = replace(vae_cfg, out=str(folder))
    vae.validate(vae_cfg)
    path = folder / "ckpt.pt"
    if path.exists():
        state = trainlib.load_checkpoint(path, kind="vae")
        if state.get("finished") or state["step"] >= state["config"]["steps"]:
            return str(path.resolve())
    cap = f" or {vae_cfg.max_minutes:g} minutes, whichever comes first" if vae_cfg.max_minutes else ""
    print(f"no --vae given: training a VQ-VAE (vae.py --preset {preset}: {vae_cfg.steps} steps{cap}) in {folder}; "
          f"later runs reuse it")
    vae.train(vae_cfg, resume=str(path) if path.exists() else None)
    return str(path.resolve())


def cached_latents(vqvae: vae.VQVAE, vae_hash: str, scenes: Scenes, device: torch.device, batch_size: int,
                   cache_dir: str = ".cache") -> torch.Tensor:
    """VAE latents (N, C, h, w) of a whole split, computed once and kept on disk, keyed by VAE + images."""
    path = (Path(cache_dir) / "latents" / f"{safe_name(scenes.name)}-n{len(scenes)}-{scenes.images.shape[1]}px-"
                                          f"{scenes.content_hash}-vae{vae_hash}.pt")
    if path.exists():
        return trainlib.load_checkpoint(path)
    latents = vae.encode_scenes(vqvae, scenes, batch_size, device)
    trainlib.save_checkpoint(latents, path)
    return latents


def diffusion_latents(cfg: SDConfig, vqvae: vae.VQVAE, vae_hash: str, train_set: Scenes, val_set: Scenes,
                      device: torch.device) -> tuple[SDConfig, torch.Tensor, torch.Tensor]:
    """The cached latents of both splits as the diffusion sees them, times the latent scale (train on `device`),
    and cfg with the scale resolved: --latent-scale 0 measures it on the training latents, and the checkpoint keeps
    that number, so sampling divides by it before decoding."""
    train = cached_latents(vqvae, vae_hash, train_set, device, cfg.batch_size).to(device)
    val = cached_latents(vqvae, vae_hash, val_set, device, cfg.batch_size)
    scale = cfg.diffusion.latent_scale or 1 / train.float().std().item()
    return replace(cfg, diffusion=replace(cfg.diffusion, latent_scale=scale)), train * scale, val * scale


@contextlib.contextmanager
def master_first(world_size: int, is_master: bool) -> Iterator[None]:
    """Under DDP, rank 0 fills the caches (VAE, latents) while the other ranks wait, then they read them."""
    if world_size > 1 and not is_master:
        torch.distributed.barrier()
    yield
    if world_size > 1 and is_master:
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------------------
# training

def lr_scale(step: int, cfg: SDConfig, group: str = "unet", progress: float = 0.0) -> float:
    """Warm-up + cosine, as a factor of a parameter group's base learning rate, times the cool-down at the end of
    the budget (progress: its share spent, in steps or minutes). With --encoder-steps the encoder decays to 0 over
    its own shorter horizon, in steps, whatever the budget (so the cool-down leaves it alone, and a slow machine
    cannot cut it short): slots bound to objects early are then kept while the UNet learns to draw from them.
    With --encoder-delay the encoder's schedule starts that many steps late (its warm-up included), at 0 until
    then, and still ends at --encoder-steps."""
    delay = cfg.encoder_delay if group == "encoder" else 0
    if step < delay:
        return 0.0
    if group == "encoder" and cfg.encoder_steps:
        return trainlib.lr_warmup_cosine(step - delay, 1.0, cfg.warmup, cfg.encoder_steps - delay, min_ratio=0.0)
    return (trainlib.lr_warmup_cosine(step - delay, 1.0, cfg.warmup, cfg.steps - delay)
            * trainlib.cooldown_factor(progress, cfg.cooldown))


def batch_with_latents(scenes: Scenes, latents: torch.Tensor, step: int, cfg: SDConfig, device: torch.device,
                       rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of `step` (data.get_batch's images) and the cached VAE latents of the same scenes."""
    images, _ = get_batch(scenes, step, cfg.batch_size, cfg.seed, device, rank, world_size)
    index = batch_indices(len(scenes), step, cfg.batch_size, cfg.seed, rank, world_size)
    return images, latents[torch.from_numpy(index).to(latents.device)].to(device)


def make_optimizer(model: SlotDiffusion, cfg: SDConfig) -> torch.optim.Adam:
    """Adam with the encoder's and the UNet's own base learning rates (train_step scales both by lr_scale)."""
    return trainlib.adam([dict(params=model.encoder.parameters(), base_lr=cfg.lr),
                         dict(params=model.unet.parameters(), base_lr=cfg.unet_lr)])


def train_step(step_model: nn.Module, model: SlotDiffusion, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               images: torch.Tensor, latents: torch.Tensor, step: int, cfg: SDConfig, ema: trainlib.EMA | None = None,
               progress: float = 0.0, world_size: int = 1) -> tuple[torch.Tensor, str | None]:
    """One optimiser step on images and their VAE latents (step_model: TrainLoop.step_model's autocast / compiled /
    DDP view of model), then the EMA of the weights when there is one; progress: the share of the budget spent
    (lr_scale). Returns the loss and, when the step was not applied, what was not finite."""
    for group, name in zip(opt.param_groups, ("encoder", "unet")):   # make_optimizer's order
        group["lr"] = group["base_lr"] * lr_scale(step, cfg, name, progress)
    loss = step_model(images, latents)["loss"]
    problem = trainlib.optimizer_step(loss, opt, scaler, model, cfg.grad_clip, world_size)
    if ema is not None and problem is None:
        ema.update(model)
    return loss, problem


def checkpoint_state(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, step: int,
                     cfg: SDConfig, vae_hash: str, ema: trainlib.EMA | None = None) -> dict:
    """cfg.vae is an absolute path and vae_hash its content's hash, so the checkpoint finds (and checks) its VAE
    from any working directory. "model" holds the trained weights, "ema" (when kept) the averaged ones that
    `load` returns for evaluation."""
    return trainlib.with_ema(dict(kind="slotdiff", model=model.state_dict(), optimizer=opt.state_dict(),
                                  scaler=scaler.state_dict(), step=step, config=asdict(cfg), vae_hash=vae_hash,
                                  rng=trainlib.rng_state()), ema)


def load_frozen_vae(cfg: SDConfig, device: torch.device) -> tuple[vae.VQVAE, str]:
    """The VAE, checked against the UNet's levels, and the hash of its file (which identifies cached latents and
    must match a checkpoint's)."""
    vqvae = vae.load_vae(cfg.vae).to(device).requires_grad_(False)
    check_latent_size(cfg, vqvae.cfg.downsample)
    return vqvae, trainlib.file_hash(cfg.vae)


@torch.no_grad()
def evaluate_loss_and_masks(model: SlotDiffusion, scenes: Scenes, latents: torch.Tensor, cfg: SDConfig,
                            device: torch.device, limit: int | None = None, progress: bool = False) -> dict[str, float]:
    """Val denoising loss at a fixed set of (t, noise) and slot initialisations, so evaluations are comparable,
    and ARI / FG-ARI / mBO of the argmax-over-slots attention masks."""
    model.eval()
    n = min(len(scenes), limit) if limit else len(scenes)
    subset = scenes.head(n)
    loss, scores = 0.0, metrics.SegmentationScores()
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = iterate_batches(subset, cfg.batch_size, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # the Gaussian slot initialisation
        bar = tqdm(batches, total=math.ceil(n / cfg.batch_size), desc="eval", disable=not progress, leave=False)
        for i, (images, true_masks) in enumerate(bar):
            z0 = latents[i * cfg.batch_size:][:len(images)].to(device)
            t = torch.randint(0, cfg.diffusion.timesteps, (len(images),), generator=generator).to(device)
            noise = torch.randn(z0.shape, generator=generator).to(device)
            with trainlib.autocast(device, cfg.amp):
                out = model(images, z0, t, noise)
            loss += out["loss"].item() * len(images)
            scores.update(true_masks, attention_masks(out["attn"], *images.shape[-2:]))
    model.train()
    return dict(val_loss=loss / n, **scores.summary())


def trained_encoder(path: str, cfg: EncoderConfig, quiet: bool = False) -> dict[str, torch.Tensor]:
    """The slot encoder weights of an sa.py checkpoint (Part 1; its EMA weights when it kept them), refused unless
    it was trained with the same encoder settings as this run, so that a warm start never silently reshapes or
    reinterprets weights."""
    state = trainlib.load_checkpoint(path, kind="sa")
    trained, ours = state["config"]["encoder"], asdict(cfg)
    differing = [f"{cli.flag(key)} {ours[key]} here, {trained[key]} there" for key in ours
                 if key in trained and trained[key] != ours[key] and key != "weight_init"]   # loaded weights win
    if differing:
        raise InputError(f"--encoder-from {path}: its slot encoder was trained with other settings "
                         f"({'; '.join(differing)}); pass that checkpoint's values to slotdiff.py")
    if trained.get("weight_init") == "xavier" and not quiet:
        print(f"note: {path} was trained with --weight-init xavier; such an encoder's attention maps, which "
              f"SlotDiffusion is scored on, sat beside the objects (docs/results.md); `make demo-diffusion` trains "
              f"its encoder with --weight-init torch")
    return {key.removeprefix("encoder."): value for key, value in trainlib.scored_weights(state).items()
            if key.startswith("encoder.")}


def train(cfg: SDConfig, resume: str | None = None, overwrite: bool = False) -> Path | None:
    """Trains, writing ckpt.pt, metrics.jsonl and loss_curves.png to cfg.out; returns the checkpoint path
    (None on the non-master DDP ranks, which do not evaluate)."""
    ddp = trainlib.setup_distributed(cfg.device)
    device, master = ddp.device, ddp.is_master
    if master:
        trainlib.prepare_out(cfg.out, resume, overwrite)
    torch.manual_seed(cfg.seed + ddp.rank)

    resolution = cfg.encoder.resolution
    train_set = load_split(cfg.data, "train", resolution, cfg.num_train)
    val_set = load_split(cfg.data, "val", resolution, cfg.num_val)
    check_resolution(train_set, cfg.encoder)
    cfg = replace(cfg, encoder=with_slots_for(train_set, cfg.encoder))
    warm_start = (trained_encoder(cfg.encoder_from, cfg.encoder, quiet=not master)
                  if cfg.encoder_from and not resume else None)
    with master_first(ddp.world_size, master):
        cfg = replace(cfg, vae=ensure_vae(cfg, train_set))
        vqvae, vae_hash = load_frozen_vae(cfg, device)
        cfg, train_latents, val_latents = diffusion_latents(cfg, vqvae, vae_hash, train_set, val_set, device)
    model = SlotDiffusion(cfg, vqvae.cfg.embed_dim).to(device)
    del vqvae  # training never touches the VAE again
    if warm_start is not None:
        model.encoder.load_state_dict(warm_start)
    opt = make_optimizer(model, cfg)
    scaler = trainlib.make_grad_scaler(device, cfg.amp)
    start = 0
    if resume:
        state = trainlib.load_checkpoint(resume, map_location=device, kind="slotdiff")
        for part in ("encoder", "unet", "diffusion"):
            cli.check_unchanged(getattr(cfg, part), state["config"][part], "the model", resume)
        if state["vae_hash"] != vae_hash:
            raise InputError(f"{resume} was trained on the latents of another VAE than {cfg.vae}; "
                             f"pass --vae with the VAE it was trained with")
        start = trainlib.restore(state, resume, master, model=model, optimizer=opt, scaler=scaler)
    ema = trainlib.make_ema(model, cfg.ema_decay)
    if resume:
        trainlib.restore_ema(ema, state, resume, master)
    loop = trainlib.TrainLoop(cfg, start, Path(cfg.out), script="slotdiff.py", title="SlotDiffusion",
                              resumed=bool(resume), master=master, world_size=ddp.world_size, device=device,
                              images_per_step=cfg.batch_size * ddp.world_size, epoch_size=len(train_set))
    if master:
        print(f"SlotDiffusion: encoder {sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f}M + UNet "
              f"{sum(p.numel() for p in model.unet.parameters()) / 1e6:.2f}M params, latents "
              f"{tuple(train_latents.shape[1:])}, {len(train_set)} train / {len(val_set)} val scenes, device {device}")
        if (cfg.encoder_steps or cfg.encoder_delay) and not cfg.encoder_from and not resume:
            print(f"note: the slot encoder trains from step {cfg.encoder_delay} (--encoder-delay) to step "
                  f"{cfg.encoder_steps or cfg.steps} (--encoder-steps), settings for an encoder warm-started with "
                  f"--encoder-from; from scratch it may stop before slots bind to objects (--encoder-delay 0 "
                  f"--encoder-steps 0 train it throughout)")

    batch = lambda step: batch_with_latents(train_set, train_latents, step, cfg, device, ddp.rank, ddp.world_size)
    first = batch(start)
    step_model = loop.step_model(model, loss_of=lambda view: view(*first)["loss"])
    if ddp.world_size > 1:
        step_model = nn.parallel.DistributedDataParallel(
            step_model, device_ids=[ddp.local_rank] if device.type == "cuda" else None)
    for step in loop.steps():
        progress = loop.progress(step)
        loss, problem = train_step(step_model, model, opt, scaler, *batch(step), step, cfg, ema, progress,
                                   ddp.world_size)
        loop.end_step(step + 1, loss, cfg.unet_lr * lr_scale(step, cfg, progress=progress),
                      evaluate=lambda: evaluate_loss_and_masks(trainlib.scored_model(model, ema), val_set,
                                                               val_latents, cfg, device, limit=cfg.eval_images),
                      state=lambda: checkpoint_state(model, opt, scaler, step + 1, cfg, vae_hash, ema),
                      problem=problem)
    if ddp.world_size > 1:
        torch.distributed.destroy_process_group()
    return loop.ckpt if master else None


# ----------------------------------------------------------------------------------------------------------
# evaluation: segmentation from the attention maps, reconstruction and compositional generation by DDPM

SAMPLER_TITLE = "SlotDiffusion sampler"   # its compile time's key in trainlib.compile_times


def pytorch_sampler(model: SlotDiffusion, cfg: SDConfig, device: torch.device) -> Callable:
    """sample(slots, latent_shape, seed, steps=None, progress=True) -> latents: cfg.sampler's chain (cfg.sample_steps,
    or `steps`) with the UNet compiled and under autocast as cfg says. A compiled UNet's first call compiles it:
    that call is made alone, announced and timed (trainlib.compile_notice), so a chain's progress bar never sits
    silent on it, and its output is checked against the eager UNet's (trainlib.check_compiled_inference): where
    they disagree, sampling runs eagerly and says why in one line; sample.compiled says which ran."""
    denoiser = trainlib.compile_model(model.unet, cfg.compile)
    checked = not cfg.compile

    @torch.no_grad()
    def sample(slots: torch.Tensor, shape: tuple[int, int, int], seed: int, steps: int | None = None,
               progress: bool = True) -> torch.Tensor:
        nonlocal checked, denoiser
        if not checked:
            tqdm.write(trainlib.compile_notice(SAMPLER_TITLE, "the sampling UNet"))
            start = time.monotonic()
            generator = torch.Generator().manual_seed(seed)
            probe = (torch.randn(len(slots), *shape, generator=generator).to(device),
                     torch.randint(0, cfg.diffusion.timesteps, (len(slots),), generator=generator).to(device), slots)
            check = trainlib.check_compiled_inference(model.unet, denoiser, probe, device, cfg.amp)
            trainlib.record_compile_time(SAMPLER_TITLE, time.monotonic() - start)
            if not check.ok:
                tqdm.write(f"the compiled sampling UNet disagreed with eager: {check.reason}; sampling eagerly")
                denoiser, sample.compiled = model.unet, False
            checked = True
        with trainlib.autocast(device, cfg.amp):
            return model.diffusion.sample(denoiser, slots, shape, seed=seed, steps=steps or cfg.sample_steps,
                                          sampler=cfg.sampler, progress=progress)
    sample.compiled = cfg.compile
    return sample


def sampler_name(cfg: SDConfig) -> str:
    """e.g. "1000-step ddpm", "20-step dpm-solver++": what the progress bars and the results say was used."""
    return f"{cfg.sample_steps or cfg.diffusion.timesteps}-step {cfg.sampler}"


def sampling_chunk(n: int, sample_batch: int) -> int:
    """Scenes per DDPM chunk when sampling n: as few chunks as sample_batch allows, of equal size, so that padding
    the last wastes less than one scene per chunk (564 scenes in chunks of 250 would pad 186: a quarter of the
    1000-step chains for nothing; in chunks of 188, none)."""
    return math.ceil(n / math.ceil(n / sample_batch))


@torch.no_grad()
def generate(model: SlotDiffusion, vqvae: vae.VQVAE, slots: torch.Tensor, cfg: SDConfig, device: torch.device,
             sample: Callable | None = None, decode: Callable | None = None) -> np.ndarray:
    """Slots (n,K,D) -> cfg.sampler's chain in the latent space (by default DDPM, all T steps) -> VAE decode ->
    (n,H,W,3) uint8. Every chunk has sampling_chunk(n) scenes (the last is padded), so a compiled UNet is compiled
    for one shape only; chunk i is sampled with seed cfg.seed + i. sample(slots, latent_shape, seed) -> latents and decode(latents) -> images
    replace the PyTorch sampler and VAE decoder (export.py passes ONNX Runtime ones)."""
    model.eval()
    sample = sample or pytorch_sampler(model, cfg, device)
    decode = decode or vqvae.decode
    size = cfg.encoder.resolution // vqvae.cfg.downsample
    batch = sampling_chunk(len(slots), cfg.sample_batch)
    images = []
    bar = tqdm(slots.split(batch), desc=sampler_name(cfg), unit="batch", dynamic_ncols=True)
    for i, chunk in enumerate(bar):
        padded = torch.cat([chunk, chunk[-1:].expand(batch - len(chunk), -1, -1)]).to(device)
        z = sample(padded, (vqvae.cfg.embed_dim, size, size), cfg.seed + i)
        images.append(to_uint8(decode(z[:len(chunk)] / cfg.diffusion.latent_scale)))
    return np.concatenate(images)


@torch.no_grad()
def own_slots(encoder: SlotEncoder, scenes: Scenes, cfg: SDConfig, device: torch.device
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Every scene's slots (N, K, D) on the CPU, encoded in batches, and the first batch (images, true masks) with
    its attention maps, for the picture of what was sampled from those very slots."""
    encoder.eval()
    slots, first = [], None
    for images, masks in iterate_batches(scenes, cfg.batch_size, device):
        with trainlib.autocast(device, cfg.amp):
            batch_slots, attn = encoder(images)
        slots.append(batch_slots.float().cpu())
        first = first or ((images, masks), attn)
    return torch.cat(slots), *first


def save_reconstructions(images: torch.Tensor, true_masks: torch.Tensor, attn: torch.Tensor, vae_recon: np.ndarray,
                         recon: np.ndarray, path: Path, shown: int = 8) -> None:
    """One row per val image, the first `shown`: input | VAE alone (the ceiling) | slots -> DDPM -> VAE | true masks
    | attention masks."""
    images, true_masks = images[:shown], true_masks[:shown]
    pred = attention_masks(attn[:shown], *images.shape[-2:])   # masks only for the rows drawn
    rows = []
    for i in range(len(images)):
        rows += [to_uint8(images[i:i + 1] * 2 - 1)[0], vae_recon[i], recon[i],
                 colorize_masks(true_masks[i].cpu().numpy()), colorize_masks(pred[i].cpu().numpy())]
    save_grid(np.stack(rows), str(path), nrow=5, labels=["input", "VAE", "sampled", "true", "attention"])


def load(ckpt: str | Path, cfg: SDConfig | None = None, device: torch.device | str = "cpu"
         ) -> tuple[SDConfig, SlotDiffusion, vae.VQVAE, dict]:
    """A slotdiff.py checkpoint: its config (or cfg: the checkpoint's with flags applied, which may change
    evaluation settings but not the model's), the model (its EMA weights when it kept them) and its frozen VQ-VAE
    (checked by content hash) in eval mode on `device`, and the checkpoint's dict."""
    state = trainlib.load_checkpoint(ckpt, map_location=device, kind="slotdiff")
    cfg = cfg or cli.config_from_checkpoint(SDConfig, state["config"], ckpt)
    for part in ("encoder", "unet", "diffusion"):
        cli.check_unchanged(getattr(cfg, part), state["config"][part], "the model", ckpt)
    vqvae, vae_hash = load_frozen_vae(cfg, device)
    if state["vae_hash"] != vae_hash:
        raise InputError(f"{ckpt} was trained on the latents of another VAE than {cfg.vae}; pass --vae with the "
                         f"VAE it was trained with")
    model = SlotDiffusion(cfg, vqvae.cfg.embed_dim).to(device)
    trainlib.load_weights(model, trainlib.scored_weights(state), ckpt)
    return cfg, model.eval(), vqvae.eval(), state


def encoder_run_recon_fid(cfg: SDConfig, val_images: int) -> float | None:
    """The reconstruction FID of the Slot Attention run this encoder started from (its mixture decoder), when
    `sa.py` evaluated that run on the same val images: SlotDiffusion's claim is sharper reconstructions than it."""
    if not cfg.encoder_from:
        return None
    path = Path(cfg.encoder_from).parent / "val_metrics.json"
    if not (path.exists() and Path(cfg.encoder_from).is_file()):   # moved or deleted since: nothing to compare
        return None
    encoder_run = json.loads(path.read_text())
    same_images = (encoder_run.get("val_images") == val_images
                   and trainlib.load_checkpoint(cfg.encoder_from, kind="sa")["config"]["data"] == cfg.data)
    return encoder_run.get("recon_fid") if same_images else None


def evaluate(ckpt: str | Path, cfg: SDConfig | None = None, out: str | Path | None = None) -> dict:
    """Full evaluation of a checkpoint (with its own config unless one is given); writes val_metrics.json,
    reconstructions.png, comp_grid.png and the generated images in comp_gen/ to `out` (default: beside the
    checkpoint)."""
    device = trainlib.pick_device(cfg.device if cfg else "auto")
    cfg, model, vqvae, state = load(ckpt, cfg, device)
    vae_hash = state["vae_hash"]
    out = Path(out or Path(ckpt).parent)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)                      # Gaussian slot init: make eval repeatable

    val_set = load_split(cfg.data, "val", cfg.encoder.resolution, cfg.num_val)
    train_set = load_split(cfg.data, "train", cfg.encoder.resolution, cfg.num_train)
    check_resolution(val_set, cfg.encoder)
    val_latents = cached_latents(vqvae, vae_hash, val_set, device, cfg.batch_size)
    result = evaluate_loss_and_masks(model, val_set, val_latents * cfg.diffusion.latent_scale, cfg, device,
                                     progress=True)
    everything_one_segment = torch.zeros(val_set.masks.shape, dtype=torch.long)
    result["fg_ari_one_segment_baseline"] = metrics.ari(torch.from_numpy(np.array(val_set.masks, np.int64)),
                                                        everything_one_segment, foreground_only=True).mean().item()

    # reconstruction: every val image from its own slots; compositional generation: k-means the slots of all
    # training images into K clusters, one slot per cluster per new scene. Both sampled in one run (one compilation).
    slots, first_images, first_attn = own_slots(model.encoder, val_set, cfg, device)
    n = cfg.num_gen or len(val_set)
    composed = composed_slots(model.encoder, train_set, n, cfg, device)
    samples = generate(model, vqvae, torch.cat([slots, composed]), cfg, device)
    recon, generated = samples[:len(val_set)], samples[len(val_set):]

    vae_recon = np.concatenate([to_uint8(vqvae.decode(z.to(device))) for z in val_latents.split(cfg.batch_size)])
    save_reconstructions(*first_images, first_attn, vae_recon, recon, out / "reconstructions.png")
    inputs = from_uint8(val_set.images)
    result["recon_mse"] = F.mse_loss(from_uint8(recon), inputs).item()
    result["vae_recon_mse"] = F.mse_loss(from_uint8(vae_recon), inputs).item()
    result["fid"], val_stats = save_and_score_composed(generated, val_set, out, device)
    # SlotDiffusion's claim against a mixture decoder: sharper reconstructions, compared by this FID with sa.py's
    result["recon_fid"] = metrics.fid(val_stats, metrics.fid_stats(recon, str(device), name="reconstructed"))
    # the floor of that FID: a sampled reconstruction cannot be sharper than the frozen VAE's own decode
    result["vae_recon_fid"] = metrics.fid(val_stats, metrics.fid_stats(vae_recon, str(device), name="VAE-decoded"))
    result["encoder_run_recon_fid"] = encoder_run_recon_fid(cfg, len(val_set))
    slot_attention = (f"; Slot Attention's mixture decoder in {cfg.encoder_from}: {result['encoder_run_recon_fid']:.2f}"
                      if result["encoder_run_recon_fid"] is not None else "")
    result.update(step=state["step"], val_images=len(val_set), generated_images=n, comp_sample=cfg.comp_sample,
                  sampler=cfg.sampler, sample_steps=cfg.sample_steps or cfg.diffusion.timesteps)
    (out / "val_metrics.json").write_text(json.dumps(result, indent=2))
    print(f"val ({len(val_set)} images): ARI {result['ari']:.4f}  FG-ARI {result['fg_ari']:.4f} (one-segment "
          f"baseline {result['fg_ari_one_segment_baseline']:.4f})  mBO {result['mbo']:.4f}  denoising loss "
          f"{result['val_loss']:.5f}\nreconstruction MSE ({len(val_set)} images, [-1,1]): {result['recon_mse']:.4f} "
          f"(VAE alone {result['vae_recon_mse']:.4f})\ncompositional FID ({n} generated vs {len(val_set)} val, "
          f"{cfg.comp_sample} sampling, {sampler_name(cfg)}): {result['fid']:.2f}   reconstruction FID (val decoded "
          f"from its own slots): {result['recon_fid']:.2f} (VAE alone {result['vae_recon_fid']:.2f}{slot_attention})\n"
          f"wrote {out}/val_metrics.json, reconstructions.png, comp_grid.png, comp_gen/, loss_curves.png")
    return result


# ----------------------------------------------------------------------------------------------------------
# command line: every config field is a flag (--base-channels, --channel-mult 1,2,3, --compile 0, ...); presets
# are override dicts

def main(argv: list[str] | None = None) -> None:
    cli.run_command_line(argv, SDConfig, PRESETS, __doc__, "slotdiff", validate, train, evaluate,
                         eval_needs=metrics.require_fid)


if __name__ == "__main__":
    main()
