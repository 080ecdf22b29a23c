"""Export the trained decoders to ONNX / TorchScript / torch.export, and sample with ONNX Runtime.

    python export.py --ckpt runs/sa/ckpt.pt --format onnx         # Spatial Broadcast Decoder: slots -> image, masks
    python export.py --ckpt runs/slotdiff/ckpt.pt --format onnx   # UNet denoiser, one DDPM step, VAE decoder
    python export.py --ckpt CKPT --format torchscript|pt2 [--fp16]
    python export.py fid --ckpt runs/slotdiff/ckpt.pt [--backend auto|onnxruntime|torch]   # generation + FID
    python export.py fid --ckpt runs/slotdiff/ckpt.pt --sampler dpm-solver++ --sample-steps 20
    python export.py fid-sa --ckpt runs/sa/ckpt.pt

Files land next to the checkpoint, named after it: runs/sa/ckpt_decoder.onnx, runs/slotdiff/ckpt_unet.onnx, ...
Every graph has a dynamic batch dimension (K, the image and latent sizes are fixed by the checkpoint) and is
checked after export against the PyTorch module on random inputs of another batch size (max abs diff printed),
then renamed into place. ONNX files carry the hash of the checkpoint they come from: `fid` re-exports a stale one
and refuses another model's file in its place.

Choices, and why:
  * ONNX comes from the dynamo exporter (torch.onnx.export(dynamo=True), opset 18). The legacy TorchScript-based
    exporter is deprecated and gives a graph as fast under ORT but littered with Shape/Gather/Constant chains;
    opset 23 would turn SDPA and GroupNorm into single Attention / GroupNormalization nodes, but ORT's CPU
    provider expands GroupNormalization back into ~8 primitive ops and runs the graph ~25% slower than the
    opset-18 InstanceNormalization form.
  * ONNX files get the Spatial Broadcast Decoder's stride-1 transposed convolutions as the equivalent plain
    convolutions (conv_transpose_as_conv): ORT's CPU ConvTranspose kernel hardly uses more than one thread.
  * The VAE decoder graph includes the codebook quantisation (nearest code, then decode), exactly
    vae.VQVAE.decode: the latents a sampler produces go in, an image in about [-1, 1] comes out.
  * For the ORT sampler a second slotdiff graph, ddpm_step, holds one whole ancestral step (UNet + posterior
    update): per step the host only draws the noise and binds tensors. Noise comes from torch, with the
    generator and order of slotdiff.Diffusion.sample, so both samplers give the same images for a seed. A DDIM
    step has the same form (no noise), so it runs on that graph too; DPM-Solver++ keeps the previous step's x0,
    so there ORT runs the unet graph and slotdiff.Diffusion.sample does the update in torch (a few elementwise
    ops per step beside the UNet).
  * --fp16 keeps float32 graph inputs and outputs and runs the network in fp16 inside (weights cast, a cast at
    the entrance of every layer), so the sampler's 1000-step state and update stay fp32, as under autocast.
    It is meant for GPUs; ORT's CPU provider runs fp16 graphs by casting most ops back to fp32, so the CPU
    check only shows the graph is sound and its fp16 weights are close, not how fp16 arithmetic behaves.
  * `fid` samples on ONNX Runtime's CUDA provider on a GPU. On a CPU it times 5 DDPM steps of ONNX Runtime fp32
    and of PyTorch (compiled unless the checkpoint was trained with --compile 0, as the `cpu` preset is; bf16
    where the CPU has it) and uses the faster: with bf16 instructions compiled PyTorch is faster (1.4x on the
    2-core test machine, docs/results.md), and no ORT session setting closed the gap there
    (graph optimisation level: ALL with its NCHWc layouts is 2x BASIC/EXTENDED; thread spinning on: 1.1x off).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import metrics
import sa
import slotdiff
import trainlib
import vae
from data import load_split, save_grid
from errors import InputError

if TYPE_CHECKING:   # for annotations only: onnxruntime is imported where a session is made
    import onnxruntime as ort

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "pt2": ".pt2"}
OPSET = 18
BACKENDS = ("auto", "onnxruntime", "torch")
PROBE_STEPS = 5   # DDPM steps each backend is timed on before `fid --backend auto` picks one (5 divides T=1000)
SOURCE_KEY = "source_checkpoint_sha256"   # ONNX metadata: which checkpoint a graph was exported from
NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


# ----------------------------------------------------------------------------------------------------------
# loading a checkpoint of either model: each checkpoint names its kind, and its script loads it

def load_any(ckpt: str | Path, device: torch.device = torch.device("cpu")
             ) -> tuple[str, sa.SAConfig | slotdiff.SDConfig, nn.Module, vae.VQVAE | None]:
    """("sa", cfg, model, None) or ("slotdiff", cfg, model, vqvae) for a checkpoint of either script."""
    state = trainlib.load_checkpoint(ckpt)
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "slotdiff":
        cfg, model, vqvae, _ = slotdiff.load(ckpt, device=device)
        return kind, cfg, model, vqvae
    if kind == "sa":
        cfg, model, _ = sa.load(ckpt, device=device)
        return kind, cfg, model, None
    what = f"a {trainlib.SCRIPTS[kind]} checkpoint" if kind in trainlib.SCRIPTS else "not a checkpoint of this project"
    raise InputError(f"{ckpt} is {what}; pass the ckpt.pt that sa.py or slotdiff.py writes")


# ----------------------------------------------------------------------------------------------------------
# the graphs

@dataclass
class Graph:
    """One module to export: its inputs for a batch size (dim 0 is the batch, except for `unbatched` inputs)."""
    name: str
    module: nn.Module
    make_inputs: Callable[[int], dict[str, torch.Tensor]]
    output_names: list[str]
    unbatched: tuple[str, ...] = ()
    decompose_attention: bool = False  # opset 18's SDPA translation takes 4D inputs only; the VAE's is 3D


class DDPMStep(nn.Module):
    """One ancestral step x_t -> x_{t-1} of slotdiff's sampler as one graph. The update is linear in
    (x_t, eps, noise), so its per-step coefficients (c_x, c_eps, sigma) come in as an input."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, slots: torch.Tensor, noise: torch.Tensor,
                coefs: torch.Tensor) -> torch.Tensor:
        return slotdiff.Diffusion.ancestral_step(x, self.unet(x, t, slots).float(), coefs, noise)


class QuantizedDecoder(nn.Module):
    """vae.VQVAE.decode as a module to export: nearest codebook entries in one search, then the decoder."""

    def __init__(self, vqvae: vae.VQVAE):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vqvae.decode(latents, chunk=None)


def to_float16(module: nn.Module) -> nn.Module:
    """A copy of the module that computes in fp16 but takes and returns float32 tensors. Every layer with weights
    casts its float inputs to fp16 first (tensors made inside the model, like the UNet's fp32 timestep embedding,
    would otherwise meet fp16 weights); hooks, not a wrapper, so the forward signature stays the same."""
    def inputs_to_half(layer, args):
        return tuple(a.half() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def outputs_to_float(module, args, out):
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    module = copy.deepcopy(module).half()
    for layer in module.modules():
        if any(p.is_floating_point() for p in layer.parameters(recurse=False)):
            layer.register_forward_pre_hook(inputs_to_half)
    module.register_forward_hook(outputs_to_float)
    return module


def conv_transpose_as_conv(module: nn.Module) -> nn.Module:
    """A copy in which every stride-1 ConvTranspose2d is the equivalent Conv2d (kernel flipped, in/out channels
    swapped, padding k-1-p): the same function, but ORT's CPU ConvTranspose is a GEMM + col2im that barely uses a
    second thread while its Conv has blocked multi-threaded kernels (the Spatial Broadcast Decoder's 5x5
    full-resolution layer, most of its FLOPs, runs ~1.5x faster). Stride-2 layers are left as they are."""
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, layer in parent.named_children():
            if (isinstance(layer, nn.ConvTranspose2d) and layer.stride == (1, 1) and layer.dilation == (1, 1)
                    and layer.groups == 1 and layer.output_padding == (0, 0)):
                (kh, kw), (ph, pw) = layer.kernel_size, layer.padding
                conv = nn.Conv2d(layer.in_channels, layer.out_channels, (kh, kw), padding=(kh - 1 - ph, kw - 1 - pw),
                                 bias=layer.bias is not None)
                with torch.no_grad():
                    conv.weight.copy_(layer.weight.transpose(0, 1).flip(2, 3))
                    if layer.bias is not None:
                        conv.bias.copy_(layer.bias)
                setattr(parent, name, conv)
    return module


def sa_graphs(cfg: sa.SAConfig, model: sa.SlotAutoencoder) -> list[Graph]:
    def inputs(batch: int) -> dict[str, torch.Tensor]:
        return dict(slots=sa.example_slots(cfg.encoder, batch))
    return [Graph("decoder", model.decoder, inputs, ["image", "masks", "rgb"])]


def slotdiff_graphs(cfg: slotdiff.SDConfig, model: slotdiff.SlotDiffusion, vqvae: vae.VQVAE, with_step: bool
                    ) -> list[Graph]:
    channels, size = vqvae.cfg.embed_dim, cfg.encoder.resolution // vqvae.cfg.downsample
    timesteps = cfg.diffusion.timesteps
    middle = model.diffusion.step_coefficients()[1][timesteps // 2].float()  # any real step's

    def unet_inputs(batch: int) -> dict[str, torch.Tensor]:
        return dict(x=torch.randn(batch, channels, size, size),
                    t=torch.randint(0, timesteps, (batch,)),
                    slots=sa.example_slots(cfg.encoder, batch))

    def step_inputs(batch: int) -> dict[str, torch.Tensor]:
        return dict(**unet_inputs(batch), noise=torch.randn(batch, channels, size, size), coefs=middle)

    def latents(batch: int) -> dict[str, torch.Tensor]:
        return dict(latents=torch.randn(batch, channels, size, size))

    graphs = [Graph("unet", model.unet, unet_inputs, ["eps"]),
              Graph("vae_decoder", QuantizedDecoder(vqvae), latents, ["image"], decompose_attention=True)]
    if with_step:
        graphs.insert(1, Graph("ddpm_step", DDPMStep(model.unet), step_inputs, ["x_prev"], unbatched=("coefs",)))
    return graphs


# ----------------------------------------------------------------------------------------------------------
# export and check

def export_graph(graph: Graph, path: Path, fmt: str) -> None:
    inputs = graph.make_inputs(2)   # batch 2: torch.export specialises a dimension whose example size is 1
    args = tuple(inputs.values())
    if fmt == "torchscript":        # deprecated in torch 2.14 (it warns), kept because users ask for it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(graph.module, args, check_trace=False).save(str(path))
        return
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dynamic = tuple(None if name in graph.unbatched else {0: batch} for name in inputs)
    program = torch.export.export(graph.module, args, dynamic_shapes=dynamic)
    if fmt == "pt2":
        torch.export.save(program, str(path))
        return
    if graph.decompose_attention:  # into matmul + softmax, as fast under ORT (but slower to export)
        program = program.run_decompositions()
    torch.onnx.export(program, args, str(path), dynamo=True, opset_version=OPSET, external_data=False,
                      input_names=list(inputs), output_names=graph.output_names, verbose=False)


def ort_runs_on(device: torch.device) -> bool:
    """ONNX Runtime runs on the CPU always, on a GPU only in a build with the CUDA provider (onnxruntime-gpu; the
    plain onnxruntime package has none)."""
    import onnxruntime as ort
    return device.type != "cuda" or "CUDAExecutionProvider" in ort.get_available_providers()


def require_ort_on(device: torch.device) -> None:
    import onnxruntime as ort
    if not ort_runs_on(device):
        raise InputError(f"ONNX Runtime {ort.__version__} has no CUDA provider (providers: "
                         f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu (requirements.txt), "
                         f"or sample with --backend torch, or pass --device cpu")


def ort_session(path: str | Path, device: torch.device = torch.device("cpu"), threads: int | None = None
                ) -> ort.InferenceSession:
    """ORT session tuned for speed: all graph optimisations, one intra-op thread per core (or `threads`) on the
    CPU; on CUDA it runs on torch's current stream, so torch and ORT kernels are ordered without host syncs."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    require_ort_on(device)
    if device.type == "cuda":
        ort.preload_dlls()  # the CUDA / cuDNN libraries of the nvidia-* wheels torch came with
        stream = torch.cuda.current_stream(device).cuda_stream
        cuda = dict(device_id=str(device.index or 0), user_compute_stream=str(stream))
        providers = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    if providers[0] != "CPUExecutionProvider" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise InputError(f"ONNX Runtime {ort.__version__} could not load its CUDA provider (see the warning above); "
                         f"install the onnxruntime-gpu build for your CUDA version, or pass --device cpu")
    return session


def run_bound(session: ort.InferenceSession, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
    """One ORT run that reads `inputs` and writes into the preallocated, contiguous `outputs` in place, all torch
    tensors on the session's device (I/O binding: no copy between host and GPU)."""
    binding = session.io_binding()
    inputs = {name: tensor.contiguous() for name, tensor in inputs.items()}  # referenced until the run is over
    for bind, tensors in ((binding.bind_input, inputs), (binding.bind_output, outputs)):
        for name, tensor in tensors.items():
            bind(name, tensor.device.type, tensor.device.index or 0, NUMPY_DTYPES[tensor.dtype], tuple(tensor.shape),
                 tensor.data_ptr())
    session.run_with_iobinding(binding)


def run_exported(path: Path, fmt: str, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    if fmt == "onnx":
        session = ort_session(path)
        return [torch.from_numpy(o) for o in session.run(None, {k: v.numpy() for k, v in inputs.items()})]
    with warnings.catch_warnings():  # torch.jit.load warns that TorchScript is deprecated: we know
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    with torch.no_grad():
        out = module(*inputs.values())
    return list(out) if isinstance(out, tuple) else [out]


def check_export(graph: Graph, path: Path, fmt: str, reference: nn.Module, seed: int = 0) -> float:
    """Max abs difference between the exported graph and the float32 PyTorch module on random inputs of batch 3
    (not the export's 2: this also proves the batch is dynamic). ONNX files pass onnx.checker first."""
    if fmt == "onnx":
        import onnx
        onnx.checker.check_model(str(path), full_check=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        inputs = graph.make_inputs(3)
    with torch.no_grad():
        expected = reference(*inputs.values())
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    got = run_exported(path, fmt, inputs)
    return max((g.float() - e.float()).abs().max().item() for g, e in zip(got, expected))


def export_checkpoint(ckpt: str | Path, fmt: str = "onnx", fp16: bool = False,
                      tolerance: float | None = None) -> dict[str, tuple[Path, float]]:
    """Exports every graph of a sa.py or slotdiff.py checkpoint next to it; returns {name: (path, max abs diff)}.
    Raises InputError when an export differs from PyTorch by more than `tolerance` (1e-3 fp32, 5e-2 fp16)."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    tolerance = tolerance if tolerance is not None else 5e-2 if fp16 else 1e-3
    kind, cfg, model, vqvae = load_any(ckpt)
    graphs = sa_graphs(cfg, model) if kind == "sa" else slotdiff_graphs(cfg, model, vqvae, with_step=fmt == "onnx")
    ckpt = Path(ckpt)
    source = trainlib.file_hash(ckpt)
    results = {}
    for graph in graphs:
        path = graph_path(ckpt, graph.name, fmt, fp16)
        partial = path.with_name(f".partial-{path.name}")  # renamed into place once checked: never half-written
        start = time.perf_counter()
        module = conv_transpose_as_conv(graph.module) if fmt == "onnx" else graph.module
        exported = replace(graph, module=to_float16(module) if fp16 else module)
        try:
            export_graph(exported, partial, fmt)
            if fmt == "onnx":
                stamp_source(partial, source)
            diff = check_export(exported, partial, fmt, graph.module)
            if not diff <= tolerance:
                raise InputError(f"the export of {graph.name} differs from the PyTorch model by {diff:.2e} > "
                                 f"{tolerance:.0e}; this is a bug in the export (please report it)")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        print(f"{kind} {graph.name}: wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, "
              f"{time.perf_counter() - start:.0f} s); max abs diff vs PyTorch fp32 {diff:.2e}", flush=True)
        results[graph.name] = (path, diff)
    return results


def graph_path(ckpt: Path, name: str, fmt: str = "onnx", fp16: bool = False) -> Path:
    return ckpt.with_name(f"{ckpt.stem}_{name}{'_fp16' if fp16 else ''}{FORMATS[fmt]}")


def stamp_source(path: Path, source: str) -> None:
    """Writes into the ONNX file's metadata the content hash of the checkpoint it comes from, so that a graph
    exported before the checkpoint changed is known to be stale."""
    import onnx
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {SOURCE_KEY: source})
    onnx.save(model, str(path))


def onnx_header(path: Path) -> tuple[str | None, str]:
    """From one read of an ONNX file: the checkpoint hash stamped in it (None when it has none: not written by
    this script) and its inputs as 'name[dims]', a dynamic first dimension named 'batch' (the exporter calls it
    s0...)."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    described = []
    for tensor in model.graph.input:
        dims = [d.dim_param or str(d.dim_value) for d in tensor.type.tensor_type.shape.dim]
        if dims and tensor.type.tensor_type.shape.dim[0].dim_param:
            dims[0] = "batch"
        described.append(f"{tensor.name}[{','.join(dims)}]")
    return {p.key: p.value for p in model.metadata_props}.get(SOURCE_KEY), ", ".join(described)


def expected_inputs(graph: Graph) -> str:
    """The inputs the graph's ONNX file has, in onnx_header's format."""
    described = []
    for name, tensor in graph.make_inputs(1).items():
        dims = [str(d) for d in tensor.shape]
        if name not in graph.unbatched:
            dims[0] = "batch"
        described.append(f"{name}[{','.join(dims)}]")
    return ", ".join(described)


# ----------------------------------------------------------------------------------------------------------
# sampling with ONNX Runtime

@torch.no_grad()
def ort_sample(session: ort.InferenceSession, diffusion: slotdiff.Diffusion, slots: torch.Tensor,
               latent_shape: tuple[int, int, int], seed: int = 0, steps: int | None = None, sampler: str = "ddpm",
               progress: bool = True) -> torch.Tensor:
    """slotdiff.Diffusion.sample with the ddpm_step graph on ONNX Runtime: same chain, same noise for a seed.
    Everything stays on the slots' device (CPU, or the GPU with the CUDA provider): the latents ping-pong between
    two buffers that ORT reads and writes in place, and the noise is drawn there by torch."""
    device, batch = slots.device, slots.shape[0]
    ts, coefs = diffusion.step_coefficients(steps, sampler)   # validates steps
    steps = len(ts)
    ts, coefs = ts.to(device)[:, None].expand(-1, batch).contiguous(), coefs.float().to(device)
    generator = torch.Generator(device).manual_seed(seed)
    x = torch.randn((batch, *latent_shape), generator=generator, device=device)
    x_next, noise = torch.empty_like(x), torch.empty_like(x)
    slots = slots.float().contiguous()
    draws = (coefs[:, 2] != 0).tolist()
    for i in tqdm(range(steps), desc=f"{sampler} (onnxruntime)", disable=not progress, leave=False):
        if draws[i]:   # as Diffusion.sample: no noise (and no draw from the generator) where sigma is 0
            torch.randn(x.shape, generator=generator, device=device, out=noise)
        else:
            noise.zero_()
        run_bound(session, dict(x=x, t=ts[i], slots=slots, noise=noise, coefs=coefs[i]), dict(x_prev=x_next))
        x, x_next = x_next, x
    return x


def ort_decode(session: ort.InferenceSession, inputs: dict[str, torch.Tensor], output: str, shape: tuple[int, ...]
               ) -> torch.Tensor:
    """One output of a decoder graph, written by ORT into a torch tensor on the inputs' device."""
    first = next(iter(inputs.values()))
    out = torch.empty(shape, device=first.device)
    run_bound(session, {k: v.float() for k, v in inputs.items()}, {output: out})
    return out


# ----------------------------------------------------------------------------------------------------------
# compositional generation through the exported graphs + FID

def onnx_file(ckpt: Path, graph: Graph) -> Path:
    """The checkpoint's ONNX file of `graph`, exported when missing and re-exported when stale (stamped with
    another checkpoint's hash, or written before files were stamped). A file of another model in its place
    (other inputs, no stamp) is refused, not overwritten."""
    path = graph_path(ckpt, graph.name)
    if path.exists():
        try:
            source, found = onnx_header(path)
        except Exception:   # truncated or not ONNX at all: nothing worth keeping
            source, found = None, None
        if source == trainlib.file_hash(ckpt):
            return path
        if source is None and found is not None and found != expected_inputs(graph):
            raise InputError(f"{path} is not an export of {ckpt}: its inputs are {found}, this checkpoint's "
                             f"{graph.name} takes {expected_inputs(graph)}; move it away and run again")
        print(f"{path} was exported from {'another version of' if source else 'an unknown'} checkpoint; "
              f"re-exporting it from {ckpt}", flush=True)
    export_checkpoint(ckpt, "onnx")
    return path


def require_checkpoint(ckpt: Path, how_to_train: str) -> None:
    if not ckpt.is_file():
        raise InputError(f"checkpoint {ckpt} does not exist; train it first: {how_to_train}, or pass --ckpt PATH")


def fid_sa(ckpt: Path, num_gen: int | None, device: torch.device) -> float:
    """sa.py's compositional generation with the Spatial Broadcast Decoder on ONNX Runtime, then FID."""
    require_checkpoint(ckpt, "`make demo` (or `python sa.py --preset cpu --out runs/sa`)")
    cfg, model, _ = sa.load(ckpt, device=device)
    session = ort_session(onnx_file(ckpt, sa_graphs(cfg, model)[0]), device)
    resolution = cfg.encoder.resolution
    train_set = load_split(cfg.data, "train", resolution, cfg.num_train)
    val_set = load_split(cfg.data, "val", resolution, cfg.num_val)
    sa.check_resolution(val_set, cfg.encoder)
    torch.manual_seed(cfg.seed)  # the Gaussian slot initialisation, as sa.evaluate

    def decode(slots: torch.Tensor) -> torch.Tensor:
        return ort_decode(session, dict(slots=slots), "image", (len(slots), 3, resolution, resolution))
    images = sa.compositional_generation(model, train_set, num_gen or cfg.num_gen or len(val_set), cfg, device, decode)
    return report_fid(images, val_set.images, ckpt, device)


def ort_sampler(ckpt: Path, cfg: slotdiff.SDConfig, model: slotdiff.SlotDiffusion, vqvae: vae.VQVAE,
                device: torch.device) -> tuple[Callable, Callable]:
    """sample(slots, latent_shape, seed, steps=None, progress=True) and decode(latents) for slotdiff.generate, on
    ONNX Runtime (as slotdiff.pytorch_sampler's sample on PyTorch), with cfg.sampler."""
    graphs = {graph.name: graph for graph in slotdiff_graphs(cfg, model, vqvae, with_step=True)}
    multistep = cfg.sampler == "dpm-solver++"
    step_session = ort_session(onnx_file(ckpt, graphs["unet" if multistep else "ddpm_step"]), device)
    decoder_session = ort_session(onnx_file(ckpt, graphs["vae_decoder"]), device)
    resolution = cfg.encoder.resolution

    def unet(x: torch.Tensor, t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        eps = torch.empty_like(x)
        run_bound(step_session, dict(x=x, t=t, slots=slots.float()), dict(eps=eps))
        return eps

    def sample(slots: torch.Tensor, shape: tuple[int, int, int], seed: int, steps: int | None = None,
               progress: bool = True) -> torch.Tensor:
        steps = steps or cfg.sample_steps
        if multistep:
            return model.diffusion.sample(unet, slots, shape, seed=seed, steps=steps, sampler=cfg.sampler,
                                          progress=progress)
        return ort_sample(step_session, model.diffusion, slots, shape, seed=seed, steps=steps, sampler=cfg.sampler,
                          progress=progress)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return ort_decode(decoder_session, dict(latents=latents), "image", (len(latents), 3, resolution, resolution))
    return sample, decode


def ms_per_step(samplers: dict[str, Callable], slots: torch.Tensor, shape: tuple[int, int, int],
                steps: int = PROBE_STEPS, rounds: int = 2) -> dict[str, float]:
    """Milliseconds per DDPM step of each sampler, timed on `steps`-step chains on these slots: best of `rounds`,
    interleaved, after a warm-up call (compilation, ORT's first allocations). Chains, not single steps: ORT's
    threads spin for a while after a run, which would slow a PyTorch step timed right after it."""
    best = {}
    for name, sample in samplers.items():
        sample(slots, shape, 0, steps=steps, progress=False)
        best[name] = math.inf
    for _ in range(rounds):
        for name, sample in samplers.items():
            start = time.perf_counter()
            sample(slots, shape, 0, steps=steps, progress=False)
            best[name] = min(best[name], (time.perf_counter() - start) * 1000 / steps)
    return best


def torch_label(cfg: slotdiff.SDConfig, device: torch.device, compiled: bool) -> str:
    return f"PyTorch {'compiled' if compiled else 'eager'} {trainlib.precision(device, cfg.amp)}"


def pick_sampler(backend: str, ckpt: Path, cfg: slotdiff.SDConfig, model: slotdiff.SlotDiffusion, vqvae: vae.VQVAE,
                 device: torch.device, slots: torch.Tensor) -> tuple[str, Callable, Callable | None]:
    """(its name, sample, decode) on the chosen backend. "auto" is ONNX Runtime on a GPU (CUDA provider, I/O
    binding); on a CPU it times a few DDPM steps of each backend on `slots` (one sampling batch) and takes the
    faster, since which one wins depends on the processor (ORT's CPU provider has no bf16 kernels, inductor has)."""
    batch = len(slots)
    torch_name = torch_label(cfg, device, cfg.compile)
    on_ort = on_torch = None   # the samplers the timing made, reused
    if backend == "auto" and device.type == "cuda" and ort_runs_on(device):
        backend, why = "onnxruntime", "ONNX Runtime's CUDA provider with I/O binding, the GPU path"
    elif backend == "auto" and device.type == "cuda":
        backend, why = "torch", "this ONNX Runtime has no CUDA provider; onnxruntime-gpu would sample there"
    elif backend == "auto":
        on_ort, on_torch = ort_sampler(ckpt, cfg, model, vqvae, device), slotdiff.pytorch_sampler(model, cfg, device)
        print(f"timing {cfg.sampler} steps of ONNX Runtime fp32 and {torch_name} at batch {batch}...", flush=True)
        shape = (vqvae.cfg.embed_dim, *[cfg.encoder.resolution // vqvae.cfg.downsample] * 2)
        times = ms_per_step(dict(onnxruntime=on_ort[0], torch=on_torch), slots.to(device), shape)
        backend = min(times, key=times.get)
        torch_name = torch_label(cfg, device, on_torch.compiled)   # its first call may have fallen back to eager
        why = (f"{times['torch']:.1f} ms/step vs ONNX Runtime fp32 {times['onnxruntime']:.1f}" if backend == "torch"
               else f"{times['onnxruntime']:.1f} ms/step vs {torch_name} {times['torch']:.1f}")
        why += f", measured just now at batch {batch}"
    else:
        why = "--backend"
    label = torch_name if backend == "torch" else "ONNX Runtime"
    print(f"sampling backend: {label} ({why})", flush=True)
    if backend == "torch":   # decode None: slotdiff.generate's VAE decoder
        return label, on_torch or slotdiff.pytorch_sampler(model, cfg, device), None
    return label, *(on_ort or ort_sampler(ckpt, cfg, model, vqvae, device))


def fid_slotdiff(ckpt: Path, num_gen: int | None, sample_steps: int | None, device: torch.device,
                 backend: str = "auto", sampler: str | None = None) -> float:
    """slotdiff.py's compositional generation (the checkpoint's sampler, 1000-step DDPM by default, or `sampler`
    with `sample_steps`; VAE decode) on the fastest backend, then FID."""
    require_checkpoint(ckpt, "`python slotdiff.py --preset cpu --out runs/slotdiff`")
    cfg, model, vqvae, _ = slotdiff.load(ckpt, device=device)
    cfg = replace(cfg, sampler=sampler or cfg.sampler, sample_steps=sample_steps or cfg.sample_steps)
    slotdiff.check_sample_steps(cfg.sample_steps or cfg.diffusion.timesteps, cfg.sampler, cfg.diffusion.timesteps)
    resolution = cfg.encoder.resolution
    train_set = load_split(cfg.data, "train", resolution, cfg.num_train)
    val_set = load_split(cfg.data, "val", resolution, cfg.num_val)
    sa.check_resolution(val_set, cfg.encoder)
    torch.manual_seed(cfg.seed)
    slots = sa.composed_slots(model.encoder, train_set, num_gen or cfg.num_gen or len(val_set), cfg, device)
    chunk = slots[:slotdiff.sampling_chunk(len(slots), cfg.sample_batch)]   # timed at the shape generate samples
    label, sample, decode = pick_sampler(backend, ckpt, cfg, model, vqvae, device, chunk)
    images = slotdiff.generate(model, vqvae, slots, cfg, device, sample=sample, decode=decode)
    if decode is None:   # PyTorch: its first call may have found the compiled UNet wrong and sampled eagerly
        label = torch_label(cfg, device, sample.compiled)
    return report_fid(images, val_set.images, ckpt, device, f"{label}, {slotdiff.sampler_name(cfg)}")


def report_fid(generated: np.ndarray, real: np.ndarray, ckpt: Path, device: torch.device,
               backend: str = "ONNX Runtime") -> float:
    grid = ckpt.with_name(f"{ckpt.stem}_comp_grid_fid.png")   # the first 64 of the images FID compares
    save_grid(generated[:64], str(grid), nrow=8)
    real_stats = metrics.fid_stats(real, device=str(device), name="val", cache_dir=".cache")
    score = metrics.fid(real_stats, generated, device=str(device))
    print(f"compositional FID, generated with {backend} ({len(generated)} generated vs {len(real)} val images): "
          f"{score:.2f}\nwrote {grid}")
    return score


# ----------------------------------------------------------------------------------------------------------
# command line

def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("export", "fid", "fid-sa") else "export"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_ckpt = {"export": None, "fid": f"{slotdiff.SDConfig.out}/ckpt.pt", "fid-sa": f"{sa.SAConfig.out}/ckpt.pt"}
    p.add_argument("--ckpt", default=default_ckpt[command], help="a checkpoint written by sa.py or slotdiff.py")
    p.add_argument("--format", choices=sorted(FORMATS), default="onnx", help="export: the file format")
    p.add_argument("--fp16", action="store_true", help="export: fp16 network inside float32 inputs/outputs (GPU)")
    p.add_argument("--num-gen", type=int, help="fid: images to generate (default: as many as val images)")
    p.add_argument("--sampler", choices=slotdiff.SAMPLERS, help="fid: the sampler (default: the checkpoint's, ddpm)")
    p.add_argument("--sample-steps", type=int, help="fid: steps of the sampler's chain (default: all T)")
    p.add_argument("--device", default="auto", help="fid: where the encoder and ONNX Runtime run")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="fid: sampling on ONNX Runtime, PyTorch, or (auto) the faster of the two, timed on this "
                        "machine (ONNX Runtime's CUDA provider on a GPU)")
    args = p.parse_args(argv)
    try:
        if not args.ckpt:
            raise InputError("export needs --ckpt PATH (e.g. runs/sa/ckpt.pt or runs/slotdiff/ckpt.pt)")
        if command == "export":
            export_checkpoint(args.ckpt, args.format, args.fp16)
            return
        metrics.require_fid()
        device = trainlib.pick_device(args.device)
        if command == "fid-sa" or args.backend == "onnxruntime":
            require_ort_on(device)   # before the export and the slot library, not after them
        if command == "fid":
            fid_slotdiff(Path(args.ckpt), args.num_gen, args.sample_steps, device, args.backend, args.sampler)
        else:
            fid_sa(Path(args.ckpt), args.num_gen, device)
    except InputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
