"""Slot Attention (Locatello et al. 2020) with a Spatial Broadcast Decoder, in one file.

    python sa.py --slots 11                  # train on the embedded synthetic scenes, then evaluate
    python sa.py --preset cpu                # small enough for a 2-core CPU to learn objects in minutes
    python sa.py --data PATH --preset paper  # a real dataset, the paper's object-discovery settings
    python sa.py eval --ckpt runs/sa/ckpt.pt # evaluate a checkpoint: ARI, FG-ARI, mBO, compositional FID
    torchrun --nproc_per_node 8 sa.py ...    # DDP, one process per GPU

Reads top to bottom: config, model (encoder -> Slot Attention -> decoder), training loop, evaluation.
The slot encoder and its config defined here are imported by slotdiff.py, so there is one definition in the project.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cli
import metrics
import trainlib
from data import Scenes, check_source, colorize_masks, get_batch, iterate_batches, load_split, save_grid, to_uint8
from errors import InputError

if TYPE_CHECKING:   # for annotations only: slotdiff imports this module
    import slotdiff


# ----------------------------------------------------------------------------------------------------------
# config

@dataclass
class EncoderConfig:
    """The slot encoder: CNN -> position embedding -> MLP -> Slot Attention (SlotDiffusion uses it too)."""
    resolution: int = 128          # input images are resolution x resolution pixels
    slots: int = 11                # 0 = the most objects in a training scene + 1 (the paper's rule: 7 for CLEVR6)
    iters: int = 3                 # Slot Attention iterations
    slot_dim: int = 64
    slot_mlp_hidden: int = 128
    slot_init: str = "gaussian"    # "gaussian": slots ~ N(mu, sigma) (paper); "learned": K learned vectors
    slot_grad: str = "full"        # "full": backprop through every iteration (paper); "implicit": through the
                                   # last only (Chang et al. 2022); "bo-qsa": implicit + straight-through to the
                                   # initial slots (Jia et al. 2023)
    enc_channels: int = 64
    weight_init: str = "torch"     # "torch": PyTorch's default layer init; "xavier": the official (TF/Keras) code's
                                   # Glorot-uniform weights, orthogonal GRU recurrence, zero biases
    slot_frame: bool = False       # append each slot's position and size (the centre and spread of its attention)
                                   # and decode it in that frame: the decoder side of Invariant Slot Attention
                                   # (Biza et al. 2023), so a shape is one function wherever it lies
    slot_moments: bool = False     # with slot_frame: also append the shape moments of each slot's attention in its
                                   # frame, which hold the orientation and outline a centre and a spread cannot

    @property
    def out_dim(self) -> int:
        """Width of each slot the encoder outputs: slot_dim, + 4 frame numbers (x, y, width, height) with slot_frame,
        + 12 shape moments with slot_moments."""
        return self.slot_dim + FRAME_DIM * self.slot_frame + MOMENT_DIM * self.slot_moments


FRAME_DIM = 4          # a slot's frame: centre (x, y) and spread (sx, sy) in image coordinates [-1, 1]
MOMENT_DIM = 12        # a slot's shape: the moments of degree 2, 3 and 4 of its attention in its frame
MIN_FRAME_SCALE = 1e-3   # a frame never shrinks below this (ISA's bound): the decoder divides by it

@dataclass
class DecoderConfig:
    """The Spatial Broadcast Decoder (it reads the slot size and resolution from the encoder's config)."""
    dec_channels: int = 64
    broadcast: int = 8             # each slot is tiled on a broadcast x broadcast grid, then upsampled by stride-2
                                   # steps to the resolution (the paper's 8: two steps to 32 px, four to 128)
    full_res_kernel: int = 5       # kernel of the stride-1 conv at full resolution (paper: 5); at 5 it is half
                                   # of the cpu preset's FLOPs a step, 3 cuts the step's FLOPs by a third


@dataclass
class SAConfig:
    # data
    data: str = "synthetic-clevr"  # a name of the embedded generator (synthetic-clevr, ...; data.SYNTHETIC) or a dataset folder
    num_train: int | None = None   # scenes to use (synthetic: to generate); None = the whole split / 5000
    num_val: int | None = None     # None = the whole split / 500
    # model (official object-discovery settings)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # optimisation (paper: batch 64, Adam 4e-4, 10k warm-up, x0.5 every 100k, 500k steps)
    batch_size: int = 64
    lr: float = 4e-4
    warmup: int = 10_000           # linear learning-rate warm-up steps
    decay_every: int = 100_000     # the learning rate halves (x decay_rate) every this many steps
    decay_rate: float = 0.5
    cooldown: float = 0.0          # > 0: over this last share of the budget (--steps or --max-minutes) lr falls to 0
    steps: int = 500_000
    grad_clip: float = 0.0         # 0 = off (the paper does not clip)
    ema_decay: float = 0.0         # > 0: evaluate, draw and compose with an EMA of the weights (trainlib.EMA); 0 = off
    # system
    device: str = "auto"           # auto (cuda if available), cpu, cuda, cuda:1, ...
    compile: bool = True           # torch.compile the training step
    amp: bool = True               # bf16 autocast (fp16 + loss scaling on GPUs without bf16)
    seed: int = 0
    out: str = "runs/sa"           # folder for ckpt.pt, metrics.jsonl and the pictures
    log_every: int = 50
    eval_every: int = 2_000        # steps between the periodic val evaluations
    eval_images: int = 256         # val images used for the periodic FG-ARI during training
    ckpt_every: int = 1_000
    max_minutes: float = 0.0       # wall-time budget for training (0 = none): checkpoint, stop, evaluate
    # evaluation
    eval_iters: int = 0            # Slot Attention iterations when scoring, drawing and composing val scenes (the
                                   # model in eval mode); 0 = --iters, as trained
    comp_sample: str = "member"    # compositional generation: "member" (a random cluster member) or "gaussian"
    num_gen: int | None = None     # images to generate for FID (None = size of the val split)


PRESETS = {
    "paper": dict(encoder=EncoderConfig(resolution=128), decoder=DecoderConfig(), batch_size=64, lr=4e-4,
                  warmup=10_000, decay_every=100_000, steps=500_000),
    # a 2-core CPU; why each setting, with its measurement: docs/results.md, "Learning curves: how the cpu preset
    # was chosen"
    "cpu": dict(encoder=EncoderConfig(resolution=32,   # 32x32 and batch 8 buy ~25 steps/s
                                      slots=0,          # the most objects in a training scene + 1
                                      enc_channels=48,  # textured families +0.02-0.04 side by side; suite worst 0.761
                                      slot_init="learned", slot_grad="bo-qsa",   # BO-QSA: slots bind soonest
                                      weight_init="xavier",    # leaves the 2-D plateau; textured +0.36 at 8 min
                                      slot_frame=True,         # 2-D shapes bind at minute 2, not 5; +0.11 at 8 min
                                      slot_moments=True),      # 2-D +0.05-0.10 at 20 min; textured CLEVR -0.02/step
                decoder=DecoderConfig(dec_channels=32,
                                      full_res_kernel=3),   # 1.3x the steps a minute on AVX2, no worse per step
                batch_size=8,                       # with warm-up and decay stretched: +0.06 FG-ARI over batch 16
                lr=4e-4, warmup=1_000, decay_every=10_000, steps=100_000, max_minutes=20,
                num_train=20_000,                   # 5000 scenes overfit in 30k steps (FG-ARI 0.924 vs 0.887)
                num_val=500, log_every=25, eval_every=500, eval_images=128, ckpt_every=500,
                eval_iters=4,    # scored with one iteration more than trained: worst family of the suite +0.013
                ema_decay=0.99),  # scored with an average of the weights: over the 20-minute suite the worst family
                                  # +0.009 and the largest fall from a run's peak 0.053 -> 0.030
}


def validate_encoder(cfg: EncoderConfig) -> None:
    """Catch impossible encoder settings here, with the fix, instead of as a shape error deep inside torch."""
    cli.check_ranges(cfg, positive=("resolution", "iters", "slot_dim", "slot_mlp_hidden", "enc_channels"),
                     non_negative=("slots",),
                     choices=dict(slot_init=("gaussian", "learned"), slot_grad=SLOT_GRADS,
                                  weight_init=("torch", "xavier")))
    if cfg.slot_moments and not cfg.slot_frame:
        raise InputError("--slot-moments 1 measures each slot's shape in its frame; add --slot-frame 1, or "
                         "--slot-moments 0")


def validate(cfg: SAConfig) -> None:
    """Every setting checked before any work, each problem as one line naming the flag."""
    check_source(cfg.data)
    validate_encoder(cfg.encoder)
    cli.check_ranges(cfg, positive=("dec_channels", "broadcast", "batch_size", "lr", "decay_every", "decay_rate",
                                    "steps", "log_every", "eval_every", "eval_images", "ckpt_every", "num_train", "num_gen"),
                     non_negative=("warmup", "grad_clip", "ema_decay", "seed", "max_minutes", "eval_iters"),
                     choices=dict(comp_sample=("member", "gaussian"), full_res_kernel=(1, 3, 5, 7)),
                     shares=("cooldown",))
    ratio = cfg.encoder.resolution / cfg.decoder.broadcast
    if ratio < 1 or ratio != 2 ** round(math.log2(ratio)):
        raise InputError(f"--resolution {cfg.encoder.resolution} is not --broadcast {cfg.decoder.broadcast} times a "
                         f"power of 2, so the decoder's stride-2 steps cannot reach it; use e.g. 32, 64 or 128")
    if cfg.decay_rate > 1:
        raise InputError(f"--decay-rate {cfg.decay_rate}: the learning rate is multiplied by it every "
                         f"--decay-every steps, so it must be in (0, 1] (paper: 0.5)")
    if cfg.num_val is not None and cfg.num_val < 2:
        raise InputError(f"--num-val {cfg.num_val}: FID needs at least 2 val images (default: the whole split)")
    trainlib.check_ema_decay(cfg.ema_decay)


def check_memory(cfg: SAConfig, device: torch.device) -> None:
    """Refuse up front a run whose training step cannot fit: the decoder renders every slot of every image at full
    resolution, and about 8 such maps per layer width are kept for the backward pass."""
    need = 8 * 4 * cfg.batch_size * cfg.encoder.slots * cfg.encoder.resolution ** 2 * cfg.decoder.dec_channels
    free = trainlib.free_memory(device)
    if free is not None and need > free:
        raise InputError(f"--slots {cfg.encoder.slots} with --batch-size {cfg.batch_size} at {cfg.encoder.resolution}px "
                         f"needs about {need / 2**30:.1f} GiB to train, but {device} has {free / 2**30:.1f} GiB "
                         f"free; lower --slots or --batch-size")


# ----------------------------------------------------------------------------------------------------------
# model

def position_grid(height: int, width: int) -> torch.Tensor:
    """(1, H, W, 4) grid [x, y, 1-x, 1-y] in [0, 1]: the 4 'distances to the borders' of the paper."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return torch.stack([xs, ys, 1 - xs, 1 - ys], dim=-1).unsqueeze(0)


class SoftPositionEmbed(nn.Module):
    """Adds a learned linear map of the position grid to a channels-first feature map."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.proj = nn.Linear(4, channels)
        self.register_buffer("grid", position_grid(size, size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.grid).permute(0, 3, 1, 2)


def frame_grid(height: int, width: int) -> torch.Tensor:
    """(H * W, 2) pixel positions (x, y) in [-1, 1], row by row: the coordinates slot frames are measured in."""
    return position_grid(height, width)[0, ..., :2].reshape(-1, 2) * 2 - 1


def attention_weights(attn: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each slot's attention (B, K, N) normalised over the pixels (it is normalised over the slots): the weights
    its frame and shape moments are averages under. eps keeps a slot that attends to nothing finite."""
    return (attn + eps) / (attn + eps).sum(dim=-1, keepdim=True)


def attention_frame(weights: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Each slot's frame (B, K, 4) from its attention weights (B, K, N) over the positions grid (N, 2): the
    weighted mean position and the weighted standard deviation around it, per axis."""
    centre = weights @ grid
    spread = (weights.unsqueeze(-1) * (grid - centre.unsqueeze(2)) ** 2).sum(dim=2).sqrt()
    return torch.cat([centre, spread.clamp(min=MIN_FRAME_SCALE)], dim=-1)


def attention_moments(weights: torch.Tensor, grid: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Each slot's shape moments (B, K, 12): the means, under its attention weights (B, K, N), of the 12 monomials of
    degree 2 to 4 in the positions relative to its frame (B, K, 4). A square, a triangle and a heart have equal
    spreads on both axes, so their frames say nothing of how they are turned; the odd moments tell a triangle's point
    from its base, the 4th tell a square's corners from its sides. Positions pass through 2 tanh(r / 2) first (about
    r near the object, at most 2 far from it), so the faint attention a slot spreads over the whole image cannot
    outweigh the object in a 4th power."""
    relative = 2 * torch.tanh((grid - frame[..., None, :2]) / frame[..., None, 2:] / 2)  # (B, K, N, 2)
    x, y = relative[..., 0], relative[..., 1]
    monomials = torch.stack([x * x, x * y, y * y,
                             x ** 3, x * x * y, x * y * y, y ** 3,
                             x ** 4, x ** 3 * y, x * x * y * y, x * y ** 3, y ** 4], dim=-1)
    return (weights.unsqueeze(-1) * monomials).sum(dim=2)


def example_slots(cfg: EncoderConfig, batch: int, slots: int | None = None) -> torch.Tensor:
    """Random slots shaped as the encoder's output, (batch, slots or cfg.slots, out_dim), their frames inside the
    image: inputs for tracing and checking exported graphs."""
    example = torch.randn(batch, slots or cfg.slots, cfg.out_dim)
    if cfg.slot_frame:
        example[..., cfg.slot_dim:cfg.slot_dim + 2].uniform_(-1, 1)
        example[..., cfg.slot_dim + 2:].uniform_(0.05, 1)
    return example


def xavier_init_(model: nn.Module) -> None:
    """Keras' defaults, which the official Slot Attention code trains with: Glorot-uniform weights, an orthogonal
    GRU recurrence, zero biases (PyTorch's defaults give each layer about a third of that weight variance)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.GRUCell):
            nn.init.xavier_uniform_(module.weight_ih)
            nn.init.orthogonal_(module.weight_hh)
            nn.init.zeros_(module.bias_ih)
            nn.init.zeros_(module.bias_hh)


SLOT_GRADS = ("full", "implicit", "bo-qsa")


class SlotAttention(nn.Module):
    """Algorithm 1 of Locatello et al. 2020; returns the slots and the last iteration's attention (B, K, N).

    grad="full" backpropagates through every iteration, as in the paper. "implicit" (Chang et al. 2022) treats
    the iterations as a fixed-point solver and backpropagates through the last one only, which avoids the
    unstable gradients of the unrolled loop. "bo-qsa" (Jia et al. 2023) adds a straight-through path from the
    last iteration to the initial slots, so that learned initial slots (queries) get a gradient.

    eval_iters (0 = iters) is the number of iterations in eval mode: the iterations refine the slots towards a
    fixed point, and running more of them at evaluation than in training costs no training time."""

    def __init__(self, num_slots: int, dim: int, input_dim: int, iters: int = 3, mlp_hidden: int = 128,
                 init: str = "gaussian", grad: str = "full", eps: float = 1e-8, eval_iters: int = 0):
        super().__init__()
        self.num_slots, self.dim, self.iters, self.grad, self.eps = num_slots, dim, iters, grad, eps
        self.eval_iters = eval_iters or iters
        self.scale = dim ** -0.5
        self.norm_inputs = nn.LayerNorm(input_dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(input_dim, dim, bias=False)
        self.to_v = nn.Linear(input_dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, dim))
        self.init = init
        if init == "gaussian":  # one shared Gaussian: slots are exchangeable, so K can change at test time
            self.slots_mu = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, dim)))
            self.slots_log_sigma = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, dim)))
        else:                   # K learned vectors: deterministic, each slot may specialise
            self.slots_init = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, num_slots, dim)))

    def initial_slots(self, batch: int) -> torch.Tensor:
        if self.init == "gaussian":
            noise = torch.randn(batch, self.num_slots, self.dim, device=self.slots_mu.device)
            return self.slots_mu + self.slots_log_sigma.exp() * noise
        return self.slots_init.expand(batch, -1, -1)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Always in the weights' precision (fp32), even under bf16 autocast: trained with the iterations in bf16, the
        # attention maps shrank to the objects' cores (FG-ARI 0.44 against 0.84 in fp32 after 8 minutes of the cpu
        # preset, docs/results.md), and they are what SlotDiffusion inherits and is scored by.
        with torch.autocast(inputs.device.type, enabled=False):
            return self.iterate(inputs.to(self.to_k.weight.dtype))

    def iterate(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = inputs.shape[0]
        inputs = self.norm_inputs(inputs)                                   # line 2
        k, v = self.to_k(inputs), self.to_v(inputs)                         # computed once, used every iteration
        initial = self.initial_slots(b)                                     # line 1
        slots = initial
        iters = self.iters if self.training else self.eval_iters
        for t in range(iters):                                              # line 3
            if t == iters - 1 and self.grad != "full":
                slots = slots.detach()                                      # implicit: gradient of the last step
                if self.grad == "bo-qsa":
                    slots = slots + initial - initial.detach()              # value: slots; gradient: to initial
            slots_prev = slots
            q = self.to_q(self.norm_slots(slots))                           # lines 5, 6
            logits = torch.einsum("bkd,bnd->bkn", q, k) * self.scale
            attn = logits.softmax(dim=1)                                    # line 6: softmax over SLOTS (competition)
            weights = (attn + self.eps) / (attn + self.eps).sum(dim=-1, keepdim=True)  # line 7: weighted mean
            updates = torch.einsum("bkn,bnd->bkd", weights, v)
            slots = self.gru(updates.reshape(-1, self.dim), slots_prev.reshape(-1, self.dim)).view(b, -1, self.dim)
            slots = slots + self.mlp(self.norm_mlp(slots))                  # line 9: residual MLP
        return slots, attn


class SlotEncoder(nn.Module):
    """Images in [0, 1] -> CNN -> + soft position embedding -> LayerNorm + MLP -> Slot Attention (eval_iters:
    its iterations in eval mode, 0 = cfg.iters)."""

    def __init__(self, cfg: EncoderConfig, eval_iters: int = 0):
        super().__init__()
        c = cfg.enc_channels
        layers = []
        for i in range(4):  # 4 x 5x5 conv at the image's resolution: one token per pixel
            layers += [nn.Conv2d(3 if i == 0 else c, c, 5, padding=2), nn.ReLU()]
        self.cnn = nn.Sequential(*layers)
        self.pos = SoftPositionEmbed(c, cfg.resolution)
        self.mlp = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c))
        self.slot_attention = SlotAttention(cfg.slots, cfg.slot_dim, c, cfg.iters, cfg.slot_mlp_hidden, cfg.slot_init,
                                            cfg.slot_grad, eval_iters=eval_iters)
        self.slot_frame, self.slot_moments = cfg.slot_frame, cfg.slot_moments
        if cfg.slot_frame:
            self.register_buffer("grid", frame_grid(cfg.resolution, cfg.resolution), persistent=False)
        if cfg.weight_init == "xavier":
            xavier_init_(self)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pos(self.cnn(images * 2 - 1))          # the paper feeds images in [-1, 1]
        x = self.mlp(x.flatten(2).transpose(1, 2))      # (B, N, C) with N = H * W
        slots, attn = self.slot_attention(x)
        if self.slot_frame:
            with torch.autocast(images.device.type, enabled=False):   # fp32, as the attention it is measured on
                weights = attention_weights(attn.float())
                frame = attention_frame(weights, self.grid)
                shape = [attention_moments(weights, self.grid, frame)] if self.slot_moments else []
                slots = torch.cat([slots, frame, *shape], dim=-1)
        return slots, attn


class SpatialBroadcastDecoder(nn.Module):
    """Each slot is tiled on a small grid, decoded on its own to RGB + a mask logit; masks compete by softmax.
    With slot_frame the grid's positions are relative to the slot's frame (its last 4 numbers) instead of the
    image: the decoder draws an object the same way wherever it is and whatever its size."""

    def __init__(self, cfg: DecoderConfig, slot_dim: int, resolution: int, slot_frame: bool = False,
                 slot_moments: bool = False):
        super().__init__()
        c, d = cfg.dec_channels, slot_dim
        self.size, self.slot_dim, self.slot_frame = cfg.broadcast, slot_dim, slot_frame
        self.moment_proj = nn.Linear(MOMENT_DIM, d) if slot_moments else None   # the shape, added to every cell
        if slot_frame:
            self.frame_proj = nn.Linear(2, d)
            self.register_buffer("grid", frame_grid(self.size, self.size), persistent=False)
        else:
            self.pos = SoftPositionEmbed(d, self.size)
        layers, channels = [], d
        for _ in range(round(math.log2(resolution // self.size))):   # broadcast -> 2x -> ... -> resolution
            layers += [nn.ConvTranspose2d(channels, c, 5, stride=2, padding=2, output_padding=1), nn.ReLU()]
            channels = c
        k = cfg.full_res_kernel
        layers += [nn.ConvTranspose2d(channels, c, k, padding=k // 2), nn.ReLU(),
                   nn.ConvTranspose2d(c, 4, 3, padding=1)]
        self.cnn = nn.Sequential(*layers)

    def forward(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, k, d = slots.shape[0], slots.shape[1], self.slot_dim
        if self.slot_frame:
            centre = slots[..., d:d + 2].unsqueeze(2)                                   # (B, K, 1, 2)
            spread = slots[..., d + 2:d + 4].clamp(min=MIN_FRAME_SCALE).unsqueeze(2)     # composed: may be < 0
            relative = (self.grid - centre) / spread                                    # (B, K, S*S, 2)
            x = slots[..., :d].unsqueeze(2) + self.frame_proj(relative.to(slots.dtype))
            if self.moment_proj is not None:
                x = x + self.moment_proj(slots[..., d + FRAME_DIM:]).unsqueeze(2)
            x = x.reshape(b * k, self.size, self.size, d).permute(0, 3, 1, 2)
        else:
            x = self.pos(slots.reshape(b * k, d, 1, 1).expand(-1, -1, self.size, self.size))
        out = self.cnn(x)
        out = out.view(b, k, 4, *out.shape[-2:])
        rgb, masks = out[:, :, :3], out[:, :, 3:].softmax(dim=1)   # (B,K,3,H,W), (B,K,1,H,W)
        recon = (masks * rgb).sum(dim=1)                           # in [-1, 1] space, like the inputs
        return recon, masks, rgb


class SlotAutoencoder(nn.Module):
    def __init__(self, cfg: SAConfig):
        super().__init__()
        self.encoder = SlotEncoder(cfg.encoder, cfg.eval_iters)
        self.decoder = SpatialBroadcastDecoder(cfg.decoder, cfg.encoder.slot_dim, cfg.encoder.resolution,
                                               cfg.encoder.slot_frame, cfg.encoder.slot_moments)
        if cfg.encoder.weight_init == "xavier":   # one init scheme for the whole model
            xavier_init_(self.decoder)
        if self.decoder.moment_proj is not None:  # starts as the frame-only model; shape enters as its gradient asks
            nn.init.zeros_(self.decoder.moment_proj.weight)   # 20-min suite's worst family 0.734, Glorot's 0.708
            nn.init.zeros_(self.decoder.moment_proj.bias)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        slots, attn = self.encoder(images)
        recon, masks, rgb = self.decoder(slots)
        loss = F.mse_loss(recon.float(), images * 2 - 1)
        return dict(loss=loss, recon=recon, masks=masks, rgb=rgb, slots=slots, attn=attn)


# ----------------------------------------------------------------------------------------------------------
# training

def lr_at(step: int, cfg: SAConfig, progress: float = 0.0) -> float:
    """The paper's warm-up and step decay, times the cool-down at the end of the budget (progress: its share
    spent, in steps or minutes)."""
    return (trainlib.lr_warmup_step_decay(step, cfg.lr, cfg.warmup, cfg.decay_every, cfg.decay_rate)
            * trainlib.cooldown_factor(progress, cfg.cooldown))


def train_step(step_model: nn.Module, model: SlotAutoencoder, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, images: torch.Tensor, step: int, cfg: SAConfig, progress: float = 0.0,
               world_size: int = 1, ema: trainlib.EMA | None = None) -> tuple[torch.Tensor, str | None]:
    """One optimiser step at lr_at(step, progress) (step_model: TrainLoop.step_model's autocast / compiled / DDP view
    of model; progress: the share of the budget spent), then the EMA of the weights when there is one; returns the
    loss and, when the step was not applied, what was not finite (trainlib.optimizer_step)."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg, progress)
    loss = step_model(images)["loss"]
    problem = trainlib.optimizer_step(loss, opt, scaler, model, cfg.grad_clip, world_size)
    if ema is not None and problem is None:
        ema.update(model)
    return loss, problem


def checkpoint_state(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, step: int,
                     cfg: SAConfig, ema: trainlib.EMA | None = None) -> dict:
    """"model" holds the trained weights, "ema" (when kept) the averaged ones that `load` returns for evaluation."""
    return trainlib.with_ema(dict(kind="sa", model=model.state_dict(), optimizer=opt.state_dict(),
                                  scaler=scaler.state_dict(), step=step, config=asdict(cfg), rng=trainlib.rng_state()),
                             ema)


@torch.no_grad()
def evaluate_masks(model: SlotAutoencoder, scenes: Scenes, cfg: SAConfig, device: torch.device,
                   limit: int | None = None, progress: bool = False) -> dict[str, float]:
    """Val loss, ARI, FG-ARI and mBO between ground truth and argmax-over-slots decoder masks."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)   # same Gaussian slot draws every eval; the training RNG stream is left untouched
        return _evaluate_masks(model, scenes, cfg, device, limit, progress)


def attention_masks(attn: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Segmentation (B,H,W) from the last iteration's attention (B,K,N) over a square feature map: upsampled
    bilinearly, argmax over slots (how SlotDiffusion, which has no mask decoder, is scored)."""
    b, k, n = attn.shape
    side = math.isqrt(n)
    maps = attn.float().view(b, k, side, side)
    if (side, side) != (height, width):
        maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
    return maps.argmax(dim=1)


def decoder_masks(masks: torch.Tensor) -> torch.Tensor:
    """Segmentation (B,H,W) from the decoder's alpha masks (B,K,1,H,W): argmax over slots (how sa.py is scored)."""
    return masks.squeeze(2).argmax(dim=1)


def _evaluate_masks(model, scenes, cfg, device, limit, progress) -> dict[str, float]:
    model.eval()
    n = min(len(scenes), limit) if limit else len(scenes)
    subset = scenes.head(n)
    loss, scores = 0.0, metrics.SegmentationScores()
    batches = iterate_batches(subset, cfg.batch_size, device)
    for images, true_masks in tqdm(batches, total=math.ceil(n / cfg.batch_size), desc="eval", disable=not progress,
                                   leave=False):
        with trainlib.autocast(device, cfg.amp):
            out = model(images)
        loss += out["loss"].item() * len(images)
        scores.update(true_masks, decoder_masks(out["masks"]))
    model.train()
    return dict(val_loss=loss / n, **scores.summary())


def train(cfg: SAConfig, resume: str | None = None, overwrite: bool = False) -> Path | None:
    """Trains, writing ckpt.pt, metrics.jsonl and loss_curves.png to cfg.out; returns the checkpoint path
    (None on the non-master DDP ranks, which do not evaluate)."""
    ddp = trainlib.setup_distributed(cfg.device)
    device, master = ddp.device, ddp.is_master
    if master:
        trainlib.prepare_out(cfg.out, resume, overwrite)
    torch.manual_seed(cfg.seed + ddp.rank)

    train_set = load_split(cfg.data, "train", cfg.encoder.resolution, cfg.num_train)
    val_set = load_split(cfg.data, "val", cfg.encoder.resolution, cfg.num_val)
    check_resolution(train_set, cfg.encoder)
    cfg = replace(cfg, encoder=with_slots_for(train_set, cfg.encoder))
    check_memory(cfg, device)

    model = SlotAutoencoder(cfg).to(device)
    opt = trainlib.adam(model.parameters(), lr=cfg.lr)
    scaler = trainlib.make_grad_scaler(device, cfg.amp)
    start = 0
    if resume:
        state = trainlib.load_checkpoint(resume, map_location=device, kind="sa")
        for part in ("encoder", "decoder"):
            cli.check_unchanged(getattr(cfg, part), state["config"][part], "the model", resume)
        start = trainlib.restore(state, resume, master, model=model, optimizer=opt, scaler=scaler)
    ema = trainlib.make_ema(model, cfg.ema_decay)
    if resume:
        trainlib.restore_ema(ema, state, resume, master)
    loop = trainlib.TrainLoop(cfg, start, Path(cfg.out), script="sa.py", title="Slot Attention + SBD",
                              resumed=bool(resume), master=master, world_size=ddp.world_size, device=device,
                              images_per_step=cfg.batch_size * ddp.world_size, epoch_size=len(train_set))

    batch = lambda step: get_batch(train_set, step, cfg.batch_size, cfg.seed, device, ddp.rank, ddp.world_size)[0]
    first = batch(start)
    step_model = loop.step_model(model, loss_of=lambda view: view(first)["loss"])
    if ddp.world_size > 1:
        step_model = nn.parallel.DistributedDataParallel(step_model, device_ids=[ddp.local_rank] if device.type == "cuda" else None)
    for step in loop.steps():
        progress = loop.progress(step)
        loss, problem = train_step(step_model, model, opt, scaler, batch(step), step, cfg, progress, ddp.world_size,
                                   ema)
        loop.end_step(step + 1, loss, lr_at(step, cfg, progress),
                      evaluate=lambda: evaluate_masks(trainlib.scored_model(model, ema), val_set, cfg, device,
                                                      limit=cfg.eval_images),
                      state=lambda: checkpoint_state(model, opt, scaler, step + 1, cfg, ema), problem=problem)
    if ddp.world_size > 1:
        torch.distributed.destroy_process_group()
    return loop.ckpt if master else None


def with_slots_for(scenes: Scenes, cfg: EncoderConfig) -> EncoderConfig:
    """cfg with --slots 0 resolved to the most objects in one of the scenes + 1 (one slot for the background)."""
    if cfg.slots:
        return cfg
    most = int(np.asarray(scenes.masks).reshape(len(scenes), -1).max(axis=1).max())
    if most == 0:
        raise InputError(f"--slots 0 counts the objects in the training masks, but {scenes.name} has none marked "
                         f"(no masks/ folder?); pass --slots N: the most objects in a scene + 1")
    print(f"--slots 0: {most + 1} slots (the most objects in a scene of {scenes.name} is {most}, + 1 for the background)")
    return replace(cfg, slots=most + 1)


def check_resolution(scenes: Scenes, cfg: EncoderConfig) -> None:
    h, w = scenes.images.shape[1:3]
    if (h, w) != (cfg.resolution, cfg.resolution):
        raise InputError(f"{scenes.name} has {h}x{w} images but --resolution is {cfg.resolution}; "
                         f"pass --resolution {h} or regenerate the data")


# ----------------------------------------------------------------------------------------------------------
# evaluation: segmentation metrics, pictures, compositional generation + FID

@torch.no_grad()
def save_samples(model: SlotAutoencoder, scenes: Scenes, cfg: SAConfig, device: torch.device, path: Path,
                 count: int = 8) -> None:
    """One row per val image: input | reconstruction | true masks | predicted masks | each slot's masked render."""
    model.eval()
    images, true_masks = next(iterate_batches(scenes.head(count), count, device))
    with trainlib.autocast(device, cfg.amp):
        out = model(images)
    masks = out["masks"].float()
    per_slot = masks * out["rgb"].float() + (1 - masks)            # each slot on a white background
    rows = []
    for i in range(len(images)):
        rows += [to_uint8(images[i:i + 1] * 2 - 1)[0], to_uint8(out["recon"][i:i + 1])[0],
                 colorize_masks(true_masks[i].cpu().numpy()), colorize_masks(decoder_masks(masks[i:i + 1])[0].cpu().numpy())]
        rows += list(to_uint8(per_slot[i]))
    labels = ["input", "recon", "true", "pred"] + [f"slot {k}" for k in range(cfg.encoder.slots)]
    save_grid(np.stack(rows), str(path), nrow=4 + cfg.encoder.slots, labels=labels)
    model.train()


@torch.no_grad()
def slot_library(encoder: SlotEncoder, scenes: Scenes, batch_size: int, device: torch.device, amp: bool) -> torch.Tensor:
    """All K slots of every image of a split, (N * K, D): what compositional generation samples from."""
    encoder.eval()
    chunks = []
    for images, _ in tqdm(iterate_batches(scenes, batch_size, device), total=math.ceil(len(scenes) / batch_size),
                          desc="slot library", leave=False):
        with trainlib.autocast(device, amp):
            slots, _ = encoder(images)
        chunks.append(slots.float().flatten(0, 1).cpu())
    return torch.cat(chunks)


def composed_slots(encoder: SlotEncoder, train_set: Scenes, n: int, cfg: SAConfig | slotdiff.SDConfig,
                   device: torch.device) -> torch.Tensor:
    """(n, K, D) slot sets for new scenes: slot library of the train split -> k-means (k = K) -> one slot from
    each cluster. Shared by sa.py, slotdiff.py and export.py (cfg: SAConfig or SDConfig)."""
    library = slot_library(encoder, train_set, cfg.batch_size, device, cfg.amp)
    return metrics.compose_slots(library, k=cfg.encoder.slots, n=n, mode=cfg.comp_sample, seed=cfg.seed)


@torch.no_grad()
def compositional_generation(model: SlotAutoencoder, train_set: Scenes, n: int, cfg: SAConfig, device: torch.device,
                             decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """composed_slots -> Spatial Broadcast Decoder (or decode(slots) -> images, e.g. export.py's ONNX Runtime
    decoder). (n, H, W, 3) uint8."""
    slots = composed_slots(model.encoder, train_set, n, cfg, device)
    images = []
    for chunk in tqdm(slots.split(cfg.batch_size), desc="decode", leave=False):
        if decode is None:
            with trainlib.autocast(device, cfg.amp):
                recon, _, _ = model.decoder(chunk.to(device))
        else:
            recon = decode(chunk.to(device))
        images.append(to_uint8(recon))
    return np.concatenate(images)


@torch.no_grad()
def reconstructions(model: SlotAutoencoder, scenes: Scenes, cfg: SAConfig, device: torch.device) -> np.ndarray:
    """Every image decoded from its own slots, (N, H, W, 3) uint8: the FID these get is the floor that
    compositional generation (slots from different images) is measured against."""
    model.eval()
    images = []
    for batch, _ in tqdm(iterate_batches(scenes, cfg.batch_size, device), total=math.ceil(len(scenes) / cfg.batch_size),
                         desc="reconstruct", leave=False):
        with trainlib.autocast(device, cfg.amp):
            images.append(to_uint8(model(batch)["recon"]))
    model.train()
    return np.concatenate(images)


def load(ckpt: str | Path, cfg: SAConfig | None = None, device: torch.device | str = "cpu"
         ) -> tuple[SAConfig, SlotAutoencoder, dict]:
    """A sa.py checkpoint: its config (or cfg: the checkpoint's with flags applied, which may change evaluation
    settings but not the model's), the model (its EMA weights when it kept them) in eval mode on `device`, and the
    checkpoint's dict."""
    state = trainlib.load_checkpoint(ckpt, map_location=device, kind="sa")
    cfg = cfg or cli.config_from_checkpoint(SAConfig, state["config"], ckpt)
    cli.check_unchanged(cfg.encoder, state["config"]["encoder"], "the model", ckpt)
    cli.check_unchanged(cfg.decoder, state["config"]["decoder"], "the model", ckpt)
    model = SlotAutoencoder(cfg).to(device)
    trainlib.load_weights(model, trainlib.scored_weights(state), ckpt)
    return cfg, model.eval(), state


def save_and_score_composed(generated: np.ndarray, val_set: Scenes, out: Path, device: torch.device
                            ) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    """Writes composed scenes to out/comp_gen/ and the first 64 to out/comp_grid.png; returns their FID against the
    val images and the val Inception statistics (cached by content), for further comparisons (slotdiff.py too)."""
    metrics.save_images(generated, str(out / "comp_gen"))
    save_grid(generated[:64], str(out / "comp_grid.png"), nrow=8)
    val_stats = metrics.fid_stats(val_set.images, device=str(device), name="val", cache_dir=".cache")
    return metrics.fid(val_stats, metrics.fid_stats(generated, str(device), name="composed")), val_stats


def evaluate(ckpt: str | Path, cfg: SAConfig | None = None, out: str | Path | None = None) -> dict:
    """Full evaluation of a checkpoint (with its own config unless one is given); writes val_metrics.json,
    samples.png, comp_grid.png and the generated images in comp_gen/ to `out` (default: beside the checkpoint)."""
    device = trainlib.pick_device(cfg.device if cfg else "auto")
    cfg, model, state = load(ckpt, cfg, device)
    out = Path(out or Path(ckpt).parent)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)                      # Gaussian slot init: make eval repeatable

    val_set = load_split(cfg.data, "val", cfg.encoder.resolution, cfg.num_val)
    train_set = load_split(cfg.data, "train", cfg.encoder.resolution, cfg.num_train)
    check_resolution(val_set, cfg.encoder)
    result = evaluate_masks(model, val_set, cfg, device, progress=True)
    save_samples(model, val_set, cfg, device, out / "samples.png")

    n = cfg.num_gen or len(val_set)
    generated = compositional_generation(model, train_set, n, cfg, device)
    result["fid"], val_stats = save_and_score_composed(generated, val_set, out, device)
    result["recon_fid"] = metrics.fid(val_stats, metrics.fid_stats(reconstructions(model, val_set, cfg, device),
                                                                   str(device), name="reconstructed"))
    result.update(step=state["step"], val_images=len(val_set), generated_images=n, comp_sample=cfg.comp_sample,
                  objects_per_scene=float(np.mean([len(np.unique(m)) - 1 for m in val_set.masks])))
    (out / "val_metrics.json").write_text(json.dumps(result, indent=2))
    print(f"val ({len(val_set)} images): ARI {result['ari']:.4f}  FG-ARI {result['fg_ari']:.4f}  mBO {result['mbo']:.4f}  "
          f"loss {result['val_loss']:.5f}\ncompositional FID ({n} generated vs {len(val_set)} val, "
          f"{cfg.comp_sample} sampling): {result['fid']:.2f}   reconstruction FID (val decoded from its own "
          f"slots): {result['recon_fid']:.2f}\nwrote {out}/val_metrics.json, samples.png, "
          f"comp_grid.png, loss_curves.png")
    return result


# ----------------------------------------------------------------------------------------------------------
# command line: every config field is a flag (--slot-init learned, --compile 0, ...); presets are override dicts

def main(argv: list[str] | None = None) -> None:
    cli.run_command_line(argv, SAConfig, PRESETS, __doc__, "sa", validate, train, evaluate,
                         eval_needs=metrics.require_fid)


if __name__ == "__main__":
    main()
