"""Numerical health and preemption: a non-finite step is never applied and a run of them stops training in one line;
the compiled + AMP path the presets train on is checked against eager (here for real, compiled); SIGTERM checkpoints
and `--resume auto` continues; nothing an earlier run left blocks a restart."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
import sa
import slotdiff
import trainlib
import vae
from helpers import SA_SMALL, SD_TINY, records, save_tiny_vae

ROOT = Path(__file__).resolve().parents[1]


def nan_gradient(parameter: torch.Tensor) -> torch.Tensor:
    """0 in value, NaN in the gradient of `parameter`: d sqrt(x)/dx at 0 is inf, times the 0 of the chain rule."""
    return torch.sqrt(parameter.sum() * 0)


# ----------------------------------------------------------------------------------------------------------
# the non-finite guard

def test_a_step_with_a_non_finite_loss_or_gradient_is_not_applied():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt, scaler = trainlib.adam(net.parameters(), lr=0.1), trainlib.make_grad_scaler(torch.device("cpu"), False)
    x = torch.randn(4, 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    problem = trainlib.optimizer_step(net(x).mean() * float("nan"), opt, scaler, net)
    assert problem == "the loss was nan"
    problem = trainlib.optimizer_step(net(x).mean() + nan_gradient(net.bias), opt, scaler, net, grad_clip=1.0)
    assert problem == "the gradients of bias (1 of 2 tensors) were not finite"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())   # neither step moved a weight
    assert opt.state_dict()["state"] == {}                                        # nor the optimiser's moments
    assert trainlib.optimizer_step(net(x).mean(), opt, scaler, net) is None       # a finite step is applied
    assert not torch.equal(before["bias"], net.bias)


def test_a_diverging_run_stops_in_one_line_and_keeps_its_last_good_checkpoint(tmp_path):
    """The issue's command (lr 1e9 gives NaN within a few steps), with a checkpoint every step: one line, exit 1, no
    traceback, no evaluation, and the checkpoint left is finite and loadable."""
    run = subprocess.run([sys.executable, str(ROOT / "sa.py"), "--resolution", "32", "--num-train", "64", "--num-val",
                          "16", "--compile", "0", "--steps", "60", "--batch-size", "4", "--warmup", "0", "--lr", "1e9",
                          "--ckpt-every", "1", "--out", "X"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    message = run.stderr.strip().splitlines()[-1]
    assert message.startswith("error: training stopped at step") and "3 steps in a row" in message
    assert "keeps the last good weights" in message and "a lower --lr" in message
    stopped = int(message.split("step ")[1].split(":")[0])
    assert stopped < 60 and not (tmp_path / "X" / "val_metrics.json").exists()
    state = trainlib.load_checkpoint(tmp_path / "X" / "ckpt.pt", kind="sa")
    assert trainlib.all_finite(state["model"]) and state["step"] == stopped - 1 and not state["finished"]
    skipped = [r["step"] for r in records(tmp_path / "X") if "skipped_step" in r]
    assert skipped == [stopped - 2, stopped - 1, stopped]


def test_a_vae_that_diverges_is_never_marked_finished(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        vae.main(["--resolution", "16", "--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1", "--n-embed", "16",
                  "--num-train", "8", "--num-val", "4", "--batch-size", "4", "--steps", "50", "--warmup", "0",
                  "--lr", "1e12", "--ckpt-every", "1", "--amp", "0", "--device", "cpu", "--out", "v", "--no-eval"])
    assert str(stop.value.code).startswith("error: training stopped at step")
    state = trainlib.load_checkpoint(tmp_path / "v" / "ckpt.pt", kind="vae")
    assert not state["finished"] and trainlib.all_finite(state["model"])


def test_non_finite_weights_are_never_saved_over_a_checkpoint(tmp_path):
    loop = trainlib.TrainLoop(sa.SAConfig(), 0, tmp_path, script="sa.py", title="t")
    loop.save({"model": {"w": torch.ones(2)}, "step": 1}, 1)
    loop.save({"model": {"w": torch.tensor([1.0, math.inf])}, "step": 2}, 2)
    assert trainlib.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 1


# ----------------------------------------------------------------------------------------------------------
# the compiled path, checked against eager

class WrongGradient(torch.nn.Module):
    """A stand-in for a miscompiled view: the same forward values, a NaN gradient for one parameter."""

    def __init__(self, view: torch.nn.Module, parameter: torch.Tensor):
        super().__init__()
        self.view, self.parameter = view, parameter

    def forward(self, *args):
        out = self.view(*args)
        return {**out, "loss": out["loss"] + nan_gradient(self.parameter)}


def test_check_compiled_names_a_wrong_gradient_and_passes_a_right_one():
    torch.manual_seed(0)
    cfg = cli.make_config(sa.SAConfig, dict(resolution=16, slots=3, slot_dim=8,
                                            slot_mlp_hidden=8, enc_channels=8, dec_channels=8, amp=False))
    model, images, cpu = sa.SlotAutoencoder(cfg), torch.rand(2, 3, 16, 16), torch.device("cpu")
    loss_of = lambda view: view(images)["loss"]
    eager = trainlib.Autocast(model, cpu, False)
    assert trainlib.check_compiled(model, eager, loss_of, cpu, amp=False).ok
    gru = model.encoder.slot_attention.gru.weight_ih
    check = trainlib.check_compiled(model, WrongGradient(eager, gru), loss_of, cpu, amp=False)
    assert not check.ok and check.reason == "its gradient of encoder.slot_attention.gru.weight_ih is not finite"
    assert model.encoder.slot_attention.gru.weight_ih.grad is None   # the check leaves no gradients behind


def test_a_compiled_step_that_disagrees_with_eager_trains_eagerly_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainlib, "compile_model",
                        lambda view, enabled=True: WrongGradient(view, view.model.decoder.cnn[0].weight))
    sa.main([*SA_SMALL, "--compile", "1", "--steps", "3", "--out", "run"])
    said = capsys.readouterr().out
    assert ("the compiled training step disagreed with eager on the first batch: its gradient of "
            "decoder.cnn.0.weight is not finite; training eagerly instead") in said
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["compile"] is False and "decoder.cnn.0.weight" in config["compile_fallback"]
    assert "not finite" in records(tmp_path / "run")[0]["compile_check"]
    assert trainlib.load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"] == 3   # and it trained, finite


def test_a_compiled_sampling_unet_that_disagrees_with_eager_samples_eagerly(monkeypatch, capsys):
    torch.manual_seed(0)
    cfg = cli.make_config(slotdiff.SDConfig, dict(resolution=16, slots=2, slot_dim=8, enc_channels=8,
                                                  base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                                  head_dim=8, compile=True, amp=False))
    model = slotdiff.SlotDiffusion(cfg, 3)

    class Broken(torch.nn.Module):
        def forward(self, x, t, slots):
            return model.unet(x, t, slots) * float("nan")
    monkeypatch.setattr(trainlib, "compile_model", lambda module, enabled=True: Broken())
    sample = slotdiff.pytorch_sampler(model, cfg, torch.device("cpu"))
    latents = sample(torch.randn(2, 2, 8), (3, 4, 4), seed=0, steps=2, progress=False)
    assert "the compiled sampling UNet disagreed with eager: its output is not finite; sampling eagerly" in \
        capsys.readouterr().out
    assert torch.isfinite(latents).all() and sample.compiled is False   # what export.py fid's label reports


def test_the_cpu_presets_compiled_amp_path_is_finite_agrees_with_eager_and_resumes_exactly(tmp_path, monkeypatch,
                                                                                          capsys):
    """sa.py --preset cpu as make demo trains it (torch.compile + --amp: bf16 where the CPU has it), on little data:
    the start-up check passes, the losses are finite and follow eager's, and a resumed compiled run continues
    bit-exactly."""
    monkeypatch.chdir(tmp_path)
    small = ["--preset", "cpu", "--num-train", "16", "--num-val", "8", "--batch-size", "4", "--log-every", "1",
             "--eval-every", "100", "--ckpt-every", "2", "--max-minutes", "0", "--no-eval", "--device", "cpu"]
    sa.main([*small, "--steps", "4", "--out", "compiled"])
    said = capsys.readouterr().out
    assert "compiling the training step" in said and "disagreed" not in said
    assert records(tmp_path / "compiled")[0]["compile_check"] == "passed"
    sa.main([*small, "--steps", "4", "--compile", "0", "--out", "eager"])
    compiled, eager = ([r["train_loss"] for r in records(tmp_path / run) if "train_loss" in r]
                       for run in ("compiled", "eager"))
    assert len(compiled) == 4 and all(math.isfinite(v) for v in compiled)
    assert compiled == pytest.approx(eager, rel=0.02)   # bf16 rounding apart, the same training
    sa.main([*small, "--steps", "2", "--out", "split"])
    sa.main([*small, "--steps", "4", "--resume", "split/ckpt.pt", "--out", "split"])
    whole, split = (trainlib.load_checkpoint(tmp_path / run / "ckpt.pt")["model"] for run in ("compiled", "split"))
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_slotdiffs_paper_path_compiled_with_amp_trains_finite(tmp_path, monkeypatch, capsys):
    """slotdiff.py's paper preset path (torch.compile + --amp) at toy size: the training step passes its check against
    eager and gives finite losses (the sampling UNet's check is the fake-compiler test above: compiling it for real
    too would cost CI another minute). One UNet level (ResBlocks and the middle's slot transformer, no resampling):
    compiling SD_TINY's two takes 160 s on 2 cores, one 105 s."""
    monkeypatch.chdir(tmp_path)
    save_tiny_vae("v.pt")
    slotdiff.main([*SD_TINY, "--channel-mult", "1", "--log-every", "1", "--compile", "1", "--amp", "1", "--vae", "v.pt",
                   "--steps", "3", "--out", "run", "--no-eval"])
    said = capsys.readouterr().out
    assert "compiling the training step" in said and "disagreed" not in said
    assert records(tmp_path / "run")[0]["compile_check"] == "passed"
    losses = [r["train_loss"] for r in records(tmp_path / "run") if "train_loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


# ----------------------------------------------------------------------------------------------------------
# preemption and restarts

def test_sigterm_checkpoints_the_current_step_and_the_same_command_with_resume_auto_continues(tmp_path):
    command = [sys.executable, str(ROOT / "sa.py"), *SA_SMALL, "--steps", "100000", "--log-every", "1",
               "--ckpt-every", "100000", "--out", "run", "--resume", "auto"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 5) and time.monotonic() < deadline:
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    said = job.communicate(timeout=120)[0]
    assert job.returncode == 128 + signal.SIGTERM and "no checkpoint in run yet; starting a new run" in said
    stopped = trainlib.load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"]
    assert f"stopped at step {stopped} (SIGTERM)" in said and stopped >= 5
    assert max(r["step"] for r in records(tmp_path / "run")) == stopped   # the checkpoint is the current step
    requeued = [*command[:command.index("100000")], str(stopped + 2), *command[command.index("100000") + 1:]]
    again = subprocess.run(requeued, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "--resume auto: continuing run/ckpt.pt" in again.stdout
    assert f"resumed from run/ckpt.pt at step {stopped}" in again.stdout
    assert trainlib.load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"] == stopped + 2
    done = subprocess.run(requeued, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "is a finished run; nothing left to train" in done.stdout


def test_a_run_killed_before_its_first_checkpoint_does_not_block_the_next(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 5, "train_loss": 0.1}\n')
    sa.main([*SA_SMALL, "--steps", "2", "--out", "run"])
    assert "ended before its first checkpoint; starting afresh" in capsys.readouterr().out
    assert trainlib.load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"] == 2
    assert max(r["step"] for r in records(tmp_path / "run")) == 2   # the dead run's log is gone


def test_a_vae_killed_in_its_first_steps_is_trained_again_by_the_next_slotdiff_run(tmp_path, monkeypatch):
    """vae.train (here only its first check, prepare_out) on the VQ-VAE cache folder a killed first run left with
    nothing but its log: the next slotdiff.py run trains it again instead of stopping."""
    monkeypatch.chdir(tmp_path)
    cfg = cli.make_config(slotdiff.SDConfig, dict(resolution=16, num_train=8, num_val=4, device="cpu"))
    train_set = slotdiff.load_split(cfg.data, "train", 16, 8)
    started = []
    monkeypatch.setattr(vae, "train", lambda vae_cfg, resume=None: started.append(
        trainlib.prepare_out(vae_cfg.out, resume, overwrite=False)))
    slotdiff.ensure_vae(cfg, train_set)
    (started[0] / "metrics.jsonl").write_text('{"step": 3, "train_loss": 1.0}\n')   # killed before its checkpoint
    slotdiff.ensure_vae(cfg, train_set)
    assert started == [started[0]] * 2


def test_resume_into_another_runs_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sa.main([*SA_SMALL, "--steps", "2", "--out", "a"])
    sa.main([*SA_SMALL, "--steps", "2", "--out", "b"])
    with pytest.raises(SystemExit) as refused:
        sa.main([*SA_SMALL, "--steps", "4", "--resume", "a/ckpt.pt", "--out", "b"])
    assert "--out b already holds another run" in str(refused.value.code)
    assert trainlib.load_checkpoint(tmp_path / "b" / "ckpt.pt")["step"] == 2
    sa.main([*SA_SMALL, "--steps", "4", "--resume", "a/ckpt.pt", "--out", "c"])   # a new folder is fine
    assert trainlib.load_checkpoint(tmp_path / "c" / "ckpt.pt")["step"] == 4
