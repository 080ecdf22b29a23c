"""VQ-VAE: the frozen image autoencoder whose latent space SlotDiffusion denoises in.

The architecture is the taming-transformers / latent-diffusion Encoder/Decoder that SlotDiffusion uses for
CLEVRTex (ch 64, ch_mult (1,2,4), 2 res blocks, single-head attention in the mid block, 3 latent channels,
4096-entry codebook), so the course's `vae_checkpoint.pth` loads into `VQVAE` key for key.

    encode:  image in [-1,1] -> Encoder -> quant_conv -> z (pre-quantisation, what SlotDiffusion diffuses)
    decode:  z -> nearest codebook entry -> post_quant_conv -> Decoder -> image (roughly [-1,1], not clamped)

Run as a script it trains a VQ-VAE on a dataset (see `main` at the bottom):
    python vae.py --data synthetic-clevr --preset cpu --out runs/vae
    python vae.py --resume runs/vae/ckpt.pt          # continue an interrupted training exactly
    python vae.py eval --ckpt runs/vae/ckpt.pt       # PSNR, codebook usage, reconstructions.png
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cli
import data
import trainlib
from errors import InputError


@dataclass
class VAEConfig:
    ch: int = 64                          # width of the first level; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...] = (1, 2, 4)  # one level per entry; each level but the last halves the resolution
    num_res_blocks: int = 2               # per encoder level (the decoder has one more, as in taming)
    in_channels: int = 3                  # RGB in and out
    z_channels: int = 3                   # encoder output / decoder input channels
    embed_dim: int = 3                    # codebook vector size (= latent channels SlotDiffusion sees)
    n_embed: int = 4096                   # codebook entries
    beta: float = 0.25                    # commitment loss weight (van den Oord et al. 2017)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


# ----------------------------------------------------------------------------------------------------------
# building blocks

class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = Normalize(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # a 1x1 projection only where the width changes, so the residual can be added
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of the feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C), as in taming
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pad right/bottom only: a stride-2 3x3 conv then maps H exactly to H/2 (taming's convention)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResNet block, attention, ResNet block at the lowest resolution (the only attention in the model)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: a stack of ResNet blocks, then an optional resampler. A container so the
    state-dict keys read `down.0.block.1...` / `up.2.upsample...` exactly like the course checkpoint."""

    def __init__(self, blocks: list[nn.Module], resample_name: str | None = None, resample: nn.Module | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name
        if resample_name is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.resample_name is None else getattr(self, self.resample_name)(x)


# ----------------------------------------------------------------------------------------------------------
# encoder, decoder, quantiser

class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_ch = cfg.ch
        for i, out_ch in enumerate(widths):
            blocks = [ResnetBlock(in_ch if j == 0 else out_ch, out_ch) for j in range(cfg.num_res_blocks)]
            last = i == len(widths) - 1
            self.down.append(Level(blocks, None if last else "downsample", None if last else Downsample(out_ch)))
            in_ch = out_ch
        self.mid = MidBlock(in_ch)
        self.norm_out = Normalize(in_ch)
        self.conv_out = nn.Conv2d(in_ch, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        in_ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, in_ch, 3, padding=1)
        self.mid = MidBlock(in_ch)
        # built from the lowest resolution up, but stored so that up[i] mirrors encoder level down[i]
        levels = []
        for i in reversed(range(len(widths))):
            out_ch = widths[i]
            blocks = [ResnetBlock(in_ch if j == 0 else out_ch, out_ch) for j in range(cfg.num_res_blocks + 1)]
            levels.insert(0, Level(blocks, "upsample" if i > 0 else None, Upsample(out_ch) if i > 0 else None))
            in_ch = out_ch
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(in_ch)
        self.conv_out = nn.Conv2d(in_ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    @torch.no_grad()
    def nearest(self, z: torch.Tensor, chunk: int | None = 16384) -> torch.Tensor:
        """Indices of the nearest codebook rows for z (N, D). Always fp32 (bf16 distances pick wrong codes),
        ||z||^2 - 2 z.e + ||e||^2 as one matmul per chunk of rows so (N, n_embed) never has to fit in memory at
        once; chunk=None is one matmul for all rows (a graph whose shape does not depend on N, for export)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            codes = self.embedding.weight.float()
            codes_sq = (codes * codes).sum(1)
            out = []
            for zc in ([z.float()] if chunk is None else z.float().split(chunk)):
                dist = torch.addmm(codes_sq, zc, codes.t(), alpha=-2.0) + (zc * zc).sum(1, keepdim=True)
                out.append(dist.argmin(1))
            return torch.cat(out)

    def forward(self, z: torch.Tensor, chunk: int | None = 16384) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, D, h, w) -> codebook vectors (B, D, h, w) float32 and their indices (B, h, w)."""
        B, D, h, w = z.shape
        indices = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, D), chunk).view(B, h, w)
        z_q = self.embedding(indices).permute(0, 3, 1, 2)
        return z_q, indices


# ----------------------------------------------------------------------------------------------------------
# the model

class VQVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)  # vae.quantize(z) -> (z_q, indices)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def _check_images(self, images: torch.Tensor) -> None:
        f = self.cfg.downsample
        if images.ndim != 4 or images.shape[1] != self.cfg.in_channels or images.shape[2] % f or images.shape[3] % f:
            raise InputError(f"VAE input has shape {tuple(images.shape)}; expected (B, {self.cfg.in_channels}, H, W) "
                             f"with H and W divisible by {f}: resize the images (e.g. --resolution 64 or 128)")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B,3,H,W) in [-1,1] -> pre-quantisation latents (B, embed_dim, H/f, W/f)."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    def decode(self, z: torch.Tensor, chunk: int | None = 16384) -> torch.Tensor:
        """latents (B, embed_dim, h, w) -> images in about [-1,1] (unclamped, like the reference). Quantises
        first, so diffusion samples (which are never exactly on the codebook) decode like real latents.
        chunk: rows per codebook search (None: all at once, the exportable form)."""
        z_q, _ = self.quantize(z, chunk)
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass -> (reconstruction, codebook loss, beta * commitment loss, indices (B,h,w)).
        The codebook loss pulls codes towards encoder outputs; the commitment loss keeps the encoder near its
        codes. Gradients reach the encoder through the straight-through estimator."""
        z = self.encode(images).float()
        z_q, indices = self.quantize(z)
        codebook_loss = F.mse_loss(z_q, z.detach())
        commitment_loss = self.cfg.beta * F.mse_loss(z, z_q.detach())
        z_st = z + (z_q - z).detach()  # forward: z_q; backward: identity to z
        recon = self.decoder(self.post_quant_conv(z_st))
        return recon, codebook_loss, commitment_loss, indices


# ----------------------------------------------------------------------------------------------------------
# loading checkpoints and caching latents

def _check_state_dict(model: VQVAE, state: dict, path: Path) -> None:
    """One InputError that lists what differs, instead of load_state_dict's wall of text."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise InputError(
            f"{path} is not a VQ-VAE checkpoint of this architecture: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}; pass the course's "
            f"vae_checkpoint.pth or a checkpoint written by `python vae.py`")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
             for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise InputError(f"{path} has {len(wrong)} tensors of the wrong shape for config {model.cfg} (first: "
                         f"{wrong[:3]}); checkpoints without a 'config' entry must use the default VAEConfig")


def load_vae(path: str | Path, map_location: str | torch.device = "cpu") -> VQVAE:
    """Load the course's vae_checkpoint.pth (a raw state dict, default VAEConfig) or a checkpoint written by
    this script (kind "vae", its model config inside its training config). Returns the model in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"VAE checkpoint {path} does not exist: train one with `python vae.py --preset cpu --out "
                         f"runs/vae` (writes runs/vae/ckpt.pt) or pass the course's vae_checkpoint.pth")
    ckpt = trainlib.load_checkpoint(path, map_location)
    if not isinstance(ckpt, dict):
        raise InputError(f"{path} holds a {type(ckpt).__name__}, not a state dict; pass the course's "
                         f"vae_checkpoint.pth or a checkpoint written by `python vae.py`")
    if "kind" in ckpt:   # one of this project's checkpoints: it must be a VAE's
        trainlib.check_kind(ckpt, "vae", path)
        cfg = cli.config_from_checkpoint(TrainConfig, ckpt["config"], path).model
        state = ckpt["model"]
    else:
        cfg, state = VAEConfig(), ckpt
    model = VQVAE(cfg)
    _check_state_dict(model, state, path)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def encode_scenes(vae: VQVAE, scenes: data.Scenes, batch_size: int, device: torch.device) -> torch.Tensor:
    """Latents (N, embed_dim, H/f, W/f) float32 on the CPU, in the order of `scenes`. SlotDiffusion trains on
    this cache: the VAE is frozen and there is no augmentation, so encoding every image once replaces
    re-encoding every batch (~12% of a reference training step). Moves `vae` to `device`; runs in fp32."""
    vae.to(device)
    batches = data.iterate_batches(scenes, batch_size, device)
    latents = [vae.encode(images * 2 - 1).float().cpu()
               for images, _ in tqdm(batches, total=math.ceil(len(scenes) / batch_size), unit="batch",
                                     desc=f"encoding {scenes.name}", dynamic_ncols=True)]
    return torch.cat(latents)


# ----------------------------------------------------------------------------------------------------------
# training: the VQ-VAE is trained once per dataset, before (and separately from) SlotDiffusion

@dataclass
class TrainConfig:
    # data
    data: str = "synthetic-clevr"  # a name of the embedded generator (synthetic-clevr, ...; data.SYNTHETIC) or a dataset folder
    resolution: int = 128
    num_train: int | None = None   # scenes to use (synthetic: to generate); None = the whole split / 5000
    num_val: int | None = None     # None = the whole split / 500
    # model
    model: VAEConfig = field(default_factory=VAEConfig)
    # optimisation (Adam, betas 0.9/0.99, warm-up + cosine)
    batch_size: int = 32
    lr: float = 2e-4
    warmup: int = 1000             # linear learning-rate warm-up steps before the cosine decay
    steps: int = 50_000
    restart_every: int = 50        # revive codes unused for this many steps (0: never)
    # system
    device: str = "auto"           # auto (cuda if available), cpu, cuda, cuda:1, ...
    amp: bool = True               # bf16 autocast (fp16 on pre-Ampere GPUs); the codebook search is always fp32
    seed: int = 0
    out: str = "runs/vae"          # folder for ckpt.pt, metrics.jsonl and the pictures
    log_every: int = 10
    eval_every: int = 200
    ckpt_every: int = 200
    max_minutes: float = 0.0       # wall-time budget for training (0 = none)


PRESETS = {
    # the course checkpoint's architecture at 128x128 (our training settings; the paper's VAE also used
    # perceptual and GAN losses, which need pretrained networks this project does not download)
    "paper": dict(resolution=128, model=VAEConfig(ch=64, ch_mult=(1, 2, 4), num_res_blocks=2, n_embed=4096),
                  batch_size=32, steps=50_000, lr=2e-4, warmup=1000),
    # a usable VAE on a 2-core CPU in minutes, at the cpu presets' 32x32 (docs/results.md, Part 2, the VQ-VAE)
    "cpu": dict(resolution=32,
                model=VAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,   # 32x32 -> 8x8 latents, half the width
                                n_embed=512),     # small enough that a few thousand scenes use all of the codebook
                batch_size=16,
                steps=12_000,                     # its own decode's reconstruction FID (the floor of SlotDiffusion's
                                                  # reconstructions) 38.6, against 70.0 at 4000 steps, 140 at 800
                lr=1e-3, warmup=100,
                max_minutes=20),                  # 18 min on an AVX-512 BF16 CPU; AVX2-only (4000 in 14.5 min): ~5500
}


def validate(cfg: TrainConfig) -> None:
    """Every setting checked before any work, each problem as one line naming the flag."""
    data.check_source(cfg.data)
    cli.check_ranges(cfg, positive=("resolution", "num_train", "num_val", "ch", "num_res_blocks", "in_channels",
                                    "z_channels", "embed_dim", "n_embed", "batch_size", "lr", "steps",
                                    "log_every", "eval_every", "ckpt_every"),
                     non_negative=("beta", "warmup", "restart_every", "seed", "max_minutes"))
    if cfg.model.ch % 32:
        raise InputError(f"--ch {cfg.model.ch} is not a multiple of 32 (GroupNorm uses 32 groups); use 32 or 64")
    if not cfg.model.ch_mult or min(cfg.model.ch_mult) < 1:
        raise InputError(f"--ch-mult {cfg.model.ch_mult}: need positive multipliers, e.g. 1,2,4")
    if cfg.resolution % cfg.model.downsample:
        raise InputError(f"--resolution {cfg.resolution} is not divisible by {cfg.model.downsample} "
                         f"(= 2**(len(ch_mult)-1)); use e.g. 64 or 128")


def vae_loss(model: VQVAE, images: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """images in [-1,1] -> (loss, its parts as floats, reconstruction, code indices). The reconstruction
    term is plain MSE: it is what PSNR measures, and without a perceptual loss L1 adds little."""
    recon, codebook_loss, commitment_loss, indices = model(images)
    recon_loss = F.mse_loss(recon.float(), images)
    loss = recon_loss + codebook_loss + commitment_loss
    parts = dict(recon_loss=recon_loss.item(), codebook_loss=codebook_loss.item(),
                 commitment_loss=commitment_loss.item())
    return loss, parts, recon, indices


@torch.no_grad()
def reseed_codes(model: VQVAE, images: torch.Tensor, dead: torch.Tensor) -> int:
    """Move the codebook rows flagged in `dead` onto random encoder outputs of this batch. At step 0 (all rows
    dead) this is a data-dependent init; later it revives codes no latent has picked for a while, which
    otherwise stay unused forever because only chosen codes receive gradient."""
    dead_rows = dead.nonzero().squeeze(1)
    if len(dead_rows):
        z = model.encode(images).float().permute(0, 2, 3, 1).reshape(-1, model.cfg.embed_dim)
        pick = torch.randint(len(z), (len(dead_rows),), device=z.device)
        model.quantize.embedding.weight[dead_rows] = z[pick]
    return len(dead_rows)


def psnr(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1,1] (peak-to-peak 2), reconstruction clamped to that range."""
    mse = (recon.float().clamp(-1, 1) - images).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate(model: VQVAE, scenes: data.Scenes, batch_size: int, device: torch.device, amp: bool) -> dict:
    """val_loss (same terms as the training loss), PSNR, and codebook usage: the fraction of codes used at
    least once, and the perplexity exp(H(code frequencies)) = the number of codes effectively in use."""
    model.eval()
    total, psnrs, counts = 0.0, [], torch.zeros(model.cfg.n_embed, device=device)
    for images, _ in data.iterate_batches(scenes, batch_size, device):
        images = images * 2 - 1
        with trainlib.autocast(device, amp):
            loss, _, recon, indices = vae_loss(model, images)
        total += loss.item() * len(images)
        psnrs.append(psnr(images, recon).cpu())
        counts += torch.bincount(indices.flatten(), minlength=model.cfg.n_embed)
    model.train()
    freq = counts / counts.sum()
    entropy = -(freq[freq > 0] * freq[freq > 0].log()).sum()
    return dict(val_loss=total / len(scenes), psnr=torch.cat(psnrs).mean().item(),
                codebook_usage=(counts > 0).float().mean().item(), perplexity=entropy.exp().item())


def save_reconstructions(model: VQVAE, scenes: data.Scenes, path: Path, device: torch.device, n: int = 8) -> None:
    """A PNG with n validation images on the top row and their reconstructions below."""
    images, _ = next(data.iterate_batches(scenes, n, device))
    with torch.no_grad():
        recon = model.decode(model.encode(images * 2 - 1))
    grid = data.to_uint8(torch.cat([images * 2 - 1, recon]))
    data.save_grid(grid, str(path), nrow=len(images), labels=["input", "recon"])


def checkpoint_state(model: VQVAE, optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig,
                     code_counts: torch.Tensor) -> dict:
    return dict(kind="vae", model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, config=asdict(cfg),
                code_counts=code_counts.cpu(), rng=trainlib.rng_state())


def train(cfg: TrainConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """Trains (or continues) a VQ-VAE; writes ckpt.pt, metrics.jsonl and loss_curves.png to cfg.out and returns
    the checkpoint path. Ctrl-C checkpoints and exits 130: an interrupted VAE is never taken for a trained one."""
    trainlib.prepare_out(cfg.out, resume, overwrite)
    device = trainlib.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    train_scenes = data.load_split(cfg.data, "train", cfg.resolution, limit=cfg.num_train)
    val_scenes = data.load_split(cfg.data, "val", cfg.resolution, limit=cfg.num_val)

    model = VQVAE(cfg.model).to(device)
    optimizer = trainlib.adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    scaler = trainlib.make_grad_scaler(device, cfg.amp)
    code_counts = torch.zeros(cfg.model.n_embed, device=device)  # code picks since the last restart
    start = 0
    if resume:
        state = trainlib.load_checkpoint(resume, map_location=device, kind="vae")
        cli.check_unchanged(cfg.model, state["config"]["model"], "the model", resume)
        start = trainlib.restore(state, resume, model=model, optimizer=optimizer)
        code_counts = state["code_counts"].to(device)
    print(f"VQ-VAE {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {cfg.model}, "
          f"{len(train_scenes)} train / {len(val_scenes)} val scenes at {cfg.resolution}px, device {device}, "
          f"{trainlib.precision(device, cfg.amp)}")
    loop = trainlib.TrainLoop(cfg, start, Path(cfg.out), script="vae.py", title="VQ-VAE", resumed=bool(resume),
                              device=device, images_per_step=cfg.batch_size, epoch_size=len(train_scenes))
    model.train()
    for step in loop.steps():
        images, _ = data.get_batch(train_scenes, step, cfg.batch_size, cfg.seed, device)
        images = images * 2 - 1
        if step == 0:
            reseed_codes(model, images, torch.ones(cfg.model.n_embed, dtype=torch.bool, device=device))
        elif cfg.restart_every and step % cfg.restart_every == 0:
            reseed_codes(model, images, code_counts == 0)
            code_counts.zero_()
        lr = trainlib.lr_warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps, spent=loop.spent)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with trainlib.autocast(device, cfg.amp):
            loss, _, _, indices = vae_loss(model, images)
        problem = trainlib.optimizer_step(loss, optimizer, scaler, model)
        code_counts += torch.bincount(indices.flatten(), minlength=cfg.model.n_embed)
        loop.end_step(step + 1, loss, lr, evaluate=lambda: evaluate(model, val_scenes, cfg.batch_size, device, cfg.amp),
                      state=lambda: checkpoint_state(model, optimizer, step + 1, cfg, code_counts), problem=problem)
    return loop.ckpt


def evaluate_checkpoint(ckpt: str | Path, cfg: TrainConfig | None = None, out: str | Path | None = None) -> dict:
    """PSNR and codebook usage on the val split; writes val_metrics.json and reconstructions.png to `out`
    (default: beside the checkpoint)."""
    state = trainlib.load_checkpoint(ckpt, kind="vae")
    cfg = cfg or cli.config_from_checkpoint(TrainConfig, state["config"], ckpt)
    device = trainlib.pick_device(cfg.device)
    model = load_vae(ckpt).to(device)
    val_scenes = data.load_split(cfg.data, "val", cfg.resolution, limit=cfg.num_val)
    result = dict(step=state["step"], **evaluate(model, val_scenes, cfg.batch_size, device, cfg.amp))
    out = Path(out or Path(ckpt).parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "val_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    save_reconstructions(model, val_scenes, out / "reconstructions.png", device)
    print(f"step {result['step']}: val PSNR {result['psnr']:.2f} dB, codebook usage {result['codebook_usage']:.1%} "
          f"(perplexity {result['perplexity']:.0f} of {cfg.model.n_embed}); wrote {out / 'val_metrics.json'}, "
          f"{out / 'reconstructions.png'} (inputs over reconstructions), {out / 'loss_curves.png'}")
    return result


def main(argv: list[str] | None = None) -> None:
    torch.set_float32_matmul_precision("high")
    cli.run_command_line(argv, TrainConfig, PRESETS, __doc__, "vae", validate, train, evaluate_checkpoint)


if __name__ == "__main__":
    main()
