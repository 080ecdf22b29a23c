"""Export of tiny sa.py / slotdiff.py checkpoints to every format, checked against the PyTorch modules and against
closed forms; the ONNX Runtime DDPM sampler against slotdiff's; clear errors for bad checkpoints."""
import dataclasses
import math
import re
from dataclasses import asdict

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import cli
import export
import sa
import slotdiff
import trainlib
import vae
from errors import InputError
from helpers import randomise_zero_inits


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny checkpoints with the dict layout the training scripts write (sa.checkpoint_state and
    slotdiff.checkpoint_state without the optimiser state, which export never reads)."""
    folder = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    encoder = dict(slots=3, slot_dim=8, slot_mlp_hidden=16, enc_channels=8)
    sa_cfg = cli.make_config(sa.SAConfig, encoder, dict(resolution=16, dec_channels=8))
    trainlib.save_checkpoint(dict(kind="sa", model=sa.SlotAutoencoder(sa_cfg).state_dict(), step=1,
                                  config=asdict(sa_cfg)), folder / "sa.pt")
    framed_cfg = dataclasses.replace(sa_cfg, encoder=dataclasses.replace(sa_cfg.encoder, slot_frame=True,
                                                                         slot_moments=True))
    framed = sa.SlotAutoencoder(framed_cfg)
    torch.nn.init.normal_(framed.decoder.moment_proj.weight)   # as after training: the shape reaches the masks
    trainlib.save_checkpoint(dict(kind="sa", model=framed.state_dict(), step=1, config=asdict(framed_cfg)),
                             folder / "sa_framed.pt")
    vae_cfg = cli.make_config(vae.TrainConfig, dict(ch=32, ch_mult=(1,), num_res_blocks=1, n_embed=16))
    trainlib.save_checkpoint(dict(kind="vae", model=vae.VQVAE(vae_cfg.model).state_dict(), config=asdict(vae_cfg),
                                  step=1), folder / "vae.pt")
    sd_cfg = cli.make_config(slotdiff.SDConfig, encoder, dict(
        resolution=8, vae=str(folder / "vae.pt"), base_channels=16, channel_mult=(1,), num_res_blocks=1, head_dim=8,
        dropout=0.0))
    model = slotdiff.SlotDiffusion(sd_cfg, vae_cfg.model.embed_dim)
    randomise_zero_inits(model)
    trainlib.save_checkpoint(dict(kind="slotdiff", model=model.state_dict(), step=1, config=asdict(sd_cfg),
                                  vae_hash=trainlib.file_hash(folder / "vae.pt")), folder / "sd.pt")
    return folder


@pytest.fixture(scope="module")
def sd_onnx(ckpts):
    return export.export_checkpoint(ckpts / "sd.pt", "onnx")


def loaded_slotdiff(ckpts):
    cfg, model, vqvae, _ = slotdiff.load(ckpts / "sd.pt")
    return cfg, model, vqvae


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------------------------
# export: every format, checked against the PyTorch modules at a batch size the export never saw

@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_sa_decoder_exports_and_matches_pytorch(ckpts, fmt):
    results = export.export_checkpoint(ckpts / "sa.pt", fmt)
    path, diff = results["decoder"]
    assert set(results) == {"decoder"} and path == ckpts / f"sa_decoder{export.FORMATS[fmt]}" and diff <= 1e-5
    _, model, _ = sa.load(ckpts / "sa.pt")
    slots = torch.randn(5, 3, 8)
    with torch.no_grad():
        expected = model.decoder(slots)
    got = export.run_exported(path, fmt, dict(slots=slots))
    assert [tuple(g.shape) for g in got] == [(5, 3, 16, 16), (5, 3, 1, 16, 16), (5, 3, 3, 16, 16)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1].sum(1), torch.ones(5, 1, 16, 16))  # masks are a softmax over the slots
    if fmt == "onnx":
        graph = onnx.load(str(path))
        onnx.checker.check_model(graph, full_check=True)
        assert graph.opset_import[0].version == export.OPSET
        assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic, dynamic batch


def test_sa_decoder_with_slot_frames_and_moments_exports_and_matches_pytorch(ckpts):
    path, diff = export.export_checkpoint(ckpts / "sa_framed.pt", "onnx")["decoder"]
    assert diff <= 1e-5
    cfg, model, _ = sa.load(ckpts / "sa_framed.pt")
    slots = sa.example_slots(cfg.encoder, 5)
    assert slots.shape == (5, 3, 8 + 4 + 12)
    with torch.no_grad():
        expected = model.decoder(slots)
    for g, e in zip(export.run_exported(path, "onnx", dict(slots=slots)), expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_slotdiff_onnx_unet_and_vae_decoder_match_pytorch(ckpts, sd_onnx):
    assert set(sd_onnx) == {"unet", "ddpm_step", "vae_decoder"}
    assert all(diff <= 1e-4 for _, diff in sd_onnx.values())
    cfg, model, vqvae = loaded_slotdiff(ckpts)
    x, t, slots = torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999]), torch.randn(4, 3, 8)
    (eps,) = session(sd_onnx["unet"][0]).run(None, dict(x=x.numpy(), t=t.numpy(), slots=slots.numpy()))
    with torch.no_grad():
        expected = model.unet(x, t, slots)
    assert expected.abs().max() > 0.1  # a non-trivial network
    np.testing.assert_allclose(eps, expected.numpy(), atol=1e-4, rtol=1e-4)
    # the decoder graph includes the quantisation: it must equal VQVAE.decode (chunked codebook search) itself
    latents = torch.randn(4, 3, 8, 8)
    (image,) = session(sd_onnx["vae_decoder"][0]).run(None, dict(latents=latents.numpy()))
    with torch.no_grad():
        np.testing.assert_allclose(image, vqvae.decode(latents).numpy(), atol=1e-4, rtol=1e-4)


def test_ddpm_step_graph_is_algorithm_2_of_ho_et_al(ckpts, sd_onnx):
    """x_{t-1} = (x_t - beta_t / sqrt(1 - a_bar_t) eps) / sqrt(alpha_t) + sigma_t z, computed here in float64 from
    the betas of the linear schedule, with sigma_t^2 = (1 - a_bar_{t-1}) / (1 - a_bar_t) beta_t."""
    cfg, model, _ = loaded_slotdiff(ckpts)
    schedule = cfg.diffusion
    betas = np.linspace(schedule.beta_start, schedule.beta_end, schedule.timesteps)
    a_bars = np.cumprod(1 - betas)
    ts, coefs = model.diffusion.step_coefficients()
    step = session(sd_onnx["ddpm_step"][0])
    for i in (0, 500, schedule.timesteps - 1):   # the first step run (t = T-1), one in the middle, the last (t = 0)
        t = int(ts[i])
        assert t == schedule.timesteps - 1 - i
        x, z, slots = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8)
        with torch.no_grad():
            eps = model.unet(x, torch.full((2,), t), slots).double().numpy()
        a_bar, a_bar_prev, beta = a_bars[t], a_bars[t - 1] if t > 0 else 1.0, betas[t]
        sigma = math.sqrt((1 - a_bar_prev) / (1 - a_bar) * beta)
        expected = ((x.double().numpy() - beta / math.sqrt(1 - a_bar) * eps) / math.sqrt(1 - beta)
                    + sigma * z.double().numpy())
        (got,) = step.run(None, dict(x=x.numpy(), t=np.full(2, t), slots=slots.numpy(), noise=z.numpy(),
                                     coefs=coefs[i].float().numpy()))
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert coefs[-1, 2] == 0  # the last step adds no noise


def test_ort_sampler_equals_pytorch_sampler_for_the_same_seed(ckpts, sd_onnx):
    cfg, model, _ = loaded_slotdiff(ckpts)
    step = export.ort_session(sd_onnx["ddpm_step"][0])
    slots = torch.randn(3, 3, 8)
    expected = model.diffusion.sample(model.unet, slots, (3, 8, 8), seed=7, steps=5, progress=False)
    got = export.ort_sample(step, model.diffusion, slots, (3, 8, 8), seed=7, steps=5, progress=False)
    torch.testing.assert_close(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)
    other_seed = export.ort_sample(step, model.diffusion, slots, (3, 8, 8), seed=8, steps=5, progress=False)
    assert (other_seed - got).abs().max() > 0.1


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_slotdiff_torch_formats_match_pytorch(ckpts, fmt):
    results = export.export_checkpoint(ckpts / "sd.pt", fmt)
    assert set(results) == {"unet", "vae_decoder"}   # the one-step graph is for the ORT sampler only
    _, model, vqvae = loaded_slotdiff(ckpts)
    x, t, slots = torch.randn(5, 3, 8, 8), torch.randint(0, 1000, (5,)), torch.randn(5, 3, 8)
    with torch.no_grad():
        (eps,) = export.run_exported(results["unet"][0], fmt, dict(x=x, t=t, slots=slots))
        torch.testing.assert_close(eps, model.unet(x, t, slots), atol=1e-5, rtol=1e-5)
        (image,) = export.run_exported(results["vae_decoder"][0], fmt, dict(latents=x))
        torch.testing.assert_close(image, vqvae.decode(x), atol=1e-4, rtol=1e-4)


def test_fp16_export_keeps_float32_interface_and_stays_close(ckpts):
    """Loosely: ORT's CPU provider computes most fp16 ops in fp32, so this checks the graph and its fp16 weights."""
    path, diff = export.export_checkpoint(ckpts / "sa.pt", "onnx", fp16=True)["decoder"]
    assert path.name == "sa_decoder_fp16.onnx" and diff < 5e-2
    graph = onnx.load(str(path))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [w for w in graph.graph.initializer if w.name.endswith("weight")]
    assert weights and all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)


# ----------------------------------------------------------------------------------------------------------
# bad input

def test_missing_or_foreign_checkpoint_is_a_clear_input_error(ckpts, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        export.export_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(InputError, match="is a vae.py checkpoint; pass the ckpt.pt that sa.py or slotdiff.py"):
        export.export_checkpoint(ckpts / "vae.pt")   # a real checkpoint, but of the VQ-VAE
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="unreadable"):
        export.export_checkpoint(tmp_path / "corrupt.pt")
    with pytest.raises(InputError, match="--format"):
        export.export_checkpoint(ckpts / "sa.pt", "tflite")


def test_weights_that_do_not_fit_the_config_are_an_input_error(ckpts, tmp_path):
    state = trainlib.load_checkpoint(ckpts / "sa.pt")
    state["config"]["decoder"]["dec_channels"] = 16
    trainlib.save_checkpoint(state, tmp_path / "edited.pt")
    with pytest.raises(InputError, match="do not match the config"):
        export.export_checkpoint(tmp_path / "edited.pt")


def test_cli_reports_errors_without_traceback(ckpts, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--ckpt", str(tmp_path / "nope.pt")])
    assert str(exit_info.value.code).startswith("error: checkpoint") and "does not exist" in str(exit_info.value.code)
    with pytest.raises(SystemExit) as exit_info:
        export.main(["fid-sa", "--ckpt", str(ckpts / "sd.pt")])
    assert "is a slotdiff.py checkpoint, not a sa.py one" in str(exit_info.value.code)


def test_conv_transpose_rewrite_is_the_same_function():
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 6, 5, padding=2), torch.nn.ReLU(),
                                 torch.nn.ConvTranspose2d(6, 3, (3, 5), padding=(1, 1)),
                                 torch.nn.ConvTranspose2d(3, 2, 5, stride=2, padding=2, output_padding=1))
    rewritten = export.conv_transpose_as_conv(layers)
    assert [type(m).__name__ for m in rewritten] == ["Conv2d", "ReLU", "Conv2d", "ConvTranspose2d"]
    x = torch.randn(2, 4, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), layers(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# fid's graphs: stale ones re-exported, another model's refused; the sampling backend

def sd_copy(ckpts, folder):
    """A private copy of the slotdiff checkpoint (these tests rewrite the files next to it)."""
    ckpt = folder / "sd.pt"
    ckpt.write_bytes((ckpts / "sd.pt").read_bytes())
    return ckpt


def test_stale_onnx_graph_is_re_exported_and_a_foreign_one_refused(ckpts, tmp_path, capsys):
    ckpt = sd_copy(ckpts, tmp_path)
    cfg, model, vqvae = loaded_slotdiff(ckpts)
    graph = next(g for g in export.slotdiff_graphs(cfg, model, vqvae, with_step=True) if g.name == "ddpm_step")
    path = export.onnx_file(ckpt, graph)   # missing: exported, stamped with the checkpoint's hash
    source, inputs = export.onnx_header(path)
    assert source == trainlib.file_hash(ckpt)
    assert inputs == export.expected_inputs(graph) == \
        "x[batch,3,8,8], t[batch], slots[batch,3,8], noise[batch,3,8,8], coefs[3]"
    assert not list(tmp_path.glob(".partial-*"))   # written under another name, then renamed into place
    written = path.stat().st_mtime_ns
    assert export.onnx_file(ckpt, graph) == path and path.stat().st_mtime_ns == written   # fresh: kept

    state = trainlib.load_checkpoint(ckpt)     # the checkpoint changes (training went on): the graph is stale
    state["model"]["unet.out.2.weight"] = state["model"]["unet.out.2.weight"] + 0.5
    trainlib.save_checkpoint(state, ckpt)
    capsys.readouterr()
    export.onnx_file(ckpt, graph)
    assert "was exported from another version of checkpoint; re-exporting" in capsys.readouterr().out
    assert export.onnx_header(path)[0] == trainlib.file_hash(ckpt)
    step = export.ort_session(path)
    x, slots, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8), torch.full((2,), 500)
    coefs = model.diffusion.step_coefficients()[1][499].float()
    _, new_model, _ = loaded_slotdiff(tmp_path)
    with torch.no_grad():
        expected = export.DDPMStep(new_model.unet)(x, t, slots, torch.zeros_like(x), coefs)
    (got,) = step.run(None, dict(x=x.numpy(), t=t.numpy(), slots=slots.numpy(), noise=np.zeros((2, 3, 8, 8),
                                 np.float32), coefs=coefs.numpy()))
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4)   # the new weights are in the graph

    foreign = export.export_checkpoint(ckpts / "sa.pt", "onnx")["decoder"][0]   # another model's graph, unstamped
    path.write_bytes(foreign.read_bytes())
    import onnx as onnx_lib
    unstamped = onnx_lib.load(str(path))
    del unstamped.metadata_props[:]
    onnx_lib.save(unstamped, str(path))
    with pytest.raises(InputError, match=r"is not an export of .*sd.pt: its inputs are slots\[batch,3,8\], this "
                                         r"checkpoint's ddpm_step takes x\[batch,3,8,8\], t\[batch\]"):
        export.onnx_file(ckpt, graph)
    assert export.onnx_header(path)[1] == "slots[batch,3,8]"   # refused, not overwritten


def test_sampling_backends_give_the_same_samples_and_auto_says_which_it_took(ckpts, tmp_path, capsys):
    ckpt = sd_copy(ckpts, tmp_path)
    cfg, model, vqvae = loaded_slotdiff(ckpts)
    cfg = dataclasses.replace(cfg, amp=False, compile=False, sample_steps=5)   # fp32 both: comparable exactly
    slots = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0))
    samples = {}
    for backend in ("onnxruntime", "torch"):
        label, sample, decode = export.pick_sampler(backend, ckpt, cfg, model, vqvae, torch.device("cpu"), slots)
        assert label == {"onnxruntime": "ONNX Runtime", "torch": "PyTorch eager fp32"}[backend]
        samples[backend] = sample(slots, (3, 8, 8), 3)
        assert (decode is None) == (backend == "torch")   # None: slotdiff.generate decodes with the VQ-VAE
    assert samples["torch"].abs().max() > 0.1
    # the tolerance of the ORT-sampler test above: a 5-step chain's strides amplify float32 rounding
    torch.testing.assert_close(samples["onnxruntime"], samples["torch"],
                               atol=1e-4 * samples["torch"].abs().max().item(), rtol=1e-4)
    capsys.readouterr()
    export.pick_sampler("auto", ckpt, cfg, model, vqvae, torch.device("cpu"), slots)
    chosen = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(r"sampling backend: (ONNX Runtime|PyTorch eager fp32) \([\d.]+ ms/step vs "
                        r"(PyTorch eager fp32|ONNX Runtime fp32) [\d.]+, measured just now at batch 4\)", chosen)


def test_auto_names_pytorch_eager_when_the_compiled_unet_fell_back_on_its_first_call(ckpts, tmp_path, monkeypatch,
                                                                                     capsys):
    monkeypatch.chdir(tmp_path)   # the compile time is recorded under ./.cache/inductor
    monkeypatch.setattr(trainlib, "compile_model",
                        lambda module, enabled=True: lambda x, t, slots: module(x, t, slots) * float("nan"))
    ckpt = sd_copy(ckpts, tmp_path)
    cfg, model, vqvae = loaded_slotdiff(ckpts)
    cfg = dataclasses.replace(cfg, amp=False, compile=True, sample_steps=5)
    slots = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0))
    label, sample, _ = export.pick_sampler("auto", ckpt, cfg, model, vqvae, torch.device("cpu"), slots)
    out = capsys.readouterr().out
    assert "the compiled sampling UNet disagreed with eager" in out and "PyTorch compiled" not in out.splitlines()[-1]
    assert "PyTorch eager fp32" in out.splitlines()[-1] and label in ("ONNX Runtime", "PyTorch eager fp32")


def test_ode_samplers_give_the_same_samples_on_both_backends(ckpts, tmp_path):
    """DDIM runs on the ddpm_step graph (its rows have sigma 0), DPM-Solver++ on the unet graph with the update in
    torch: each must give the images the PyTorch sampler gives for a seed."""
    ckpt = sd_copy(ckpts, tmp_path)
    cfg, model, vqvae = loaded_slotdiff(ckpts)
    slots = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0))
    for sampler in ("ddim", "dpm-solver++"):
        cfg = dataclasses.replace(cfg, amp=False, compile=False, sampler=sampler, sample_steps=4)
        samples = {backend: export.pick_sampler(backend, ckpt, cfg, model, vqvae, torch.device("cpu"), slots)[1](
            slots, (3, 8, 8), 3) for backend in ("onnxruntime", "torch")}
        assert samples["torch"].abs().max() > 0.1
        torch.testing.assert_close(samples["onnxruntime"], samples["torch"],
                                   atol=1e-4 * samples["torch"].abs().max().item(), rtol=1e-4)


def test_pytorch_sampler_announces_and_times_its_compilation_once(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)   # the compile time is recorded under ./.cache/inductor
    monkeypatch.setattr(trainlib, "compile_model", lambda model, enabled=True: model)   # the path, not inductor
    cfg, model, _ = loaded_slotdiff(ckpts)
    cfg = dataclasses.replace(cfg, compile=True, amp=False, sample_steps=5)
    sample = slotdiff.pytorch_sampler(model, cfg, torch.device("cpu"))
    slots = torch.randn(2, 3, 8)
    first = sample(slots, (3, 8, 8), 4, progress=False)
    assert "compiling the sampling UNet (first run in this folder only" in capsys.readouterr().out
    assert slotdiff.SAMPLER_TITLE in trainlib.compile_times()
    torch.testing.assert_close(first, model.diffusion.sample(model.unet, slots, (3, 8, 8), seed=4, steps=5,
                                                             progress=False))   # the warm-up call changes nothing
    torch.testing.assert_close(sample(slots, (3, 8, 8), 4, progress=False), first)
    assert sample(slots, (3, 8, 8), 4, steps=1, progress=False).shape == first.shape   # a shorter chain on request
    assert "compiling" not in capsys.readouterr().out   # once per sampler


def test_onnxruntime_without_a_cuda_provider_is_named_before_any_work(ckpts, monkeypatch, capsys):
    """The plain onnxruntime package (an H200 machine's image had 1.30 with only the CPU and Azure providers) on a
    GPU: sampling with --backend onnxruntime is refused in one line naming onnxruntime-gpu, before the export."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert not export.ort_runs_on(torch.device("cuda")) and export.ort_runs_on(torch.device("cpu"))
    with pytest.raises(InputError, match="has no CUDA provider .*install onnxruntime-gpu"):
        export.require_ort_on(torch.device("cuda"))
    export.require_ort_on(torch.device("cpu"))
    monkeypatch.setattr(export.trainlib, "pick_device", lambda name: torch.device("cuda"))
    with pytest.raises(SystemExit, match="has no CUDA provider"):
        export.main(["fid", "--ckpt", str(ckpts / "sd.pt"), "--backend", "onnxruntime"])
