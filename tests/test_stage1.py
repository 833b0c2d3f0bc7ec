"""Stage 1: the teacher-forcing loss by hand, timestep sampling, FSDP2 on 2 ranks == 1 process, exact resume."""
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import assert_same_run, read_metrics
from safetensors.torch import load_file

import common
import model as M
import stage1_teacher_forcing as S1

REPO = Path(__file__).resolve().parent.parent

# ---- the loss, by hand ----


class RecordingModel:
    """Stands in for the DiT: returns a fixed velocity and records what it was called with."""

    def __init__(self, v):
        self.v, self.calls = v, []

    def __call__(self, x, t, context, **kw):
        self.calls.append(dict(x=x.clone(), t=t.clone(), **kw))
        return self.v


def test_teacher_forcing_loss_by_hand():
    # B=1, F=2 frames, one element each, so every number can be written out
    x0 = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1, 1)
    noise = torch.tensor([0.5, 1.0]).view(1, 2, 1, 1, 1)
    t = torch.tensor([[200.0, 600.0]])
    weight = torch.tensor([[1.0, 0.5]])
    v = torch.tensor([0.0, 2.0]).view(1, 2, 1, 1, 1)
    stub = RecordingModel(v)
    loss, per_frame = S1.diffusion_loss(stub, x0, noise, t, weight, context=None, teacher_forcing=True)
    # x_t = (1-σ)x0 + σε: frame 0: 0.8·1 + 0.2·0.5 = 0.9; frame 1: 0.4·(−2) + 0.6·1 = −0.2
    assert stub.calls[0]["x"].flatten().tolist() == pytest.approx([0.9, -0.2])
    # target ε − x0 = [−0.5, 3]; squared errors [0.25, 1]; weighted mean (1·0.25 + 0.5·1)/2 = 0.375
    assert per_frame.flatten().tolist() == pytest.approx([0.25, 1.0])
    assert loss.item() == pytest.approx(0.375)
    # the clean context is the exact ground truth: never noised, never modified
    assert torch.equal(stub.calls[0]["clean_x"], x0) and torch.equal(stub.calls[0]["t"], t)
    loss_bidir, _ = S1.diffusion_loss(RecordingModel(v), x0, noise, t, weight, None, teacher_forcing=False)
    assert loss_bidir.item() == pytest.approx(0.375)


def test_teacher_forcing_loss_on_a_real_model_equals_manual_forward():
    torch.manual_seed(0)
    cfg = M.WanConfig(in_dim=4, out_dim=4, dim=48, ffn_dim=96, freq_dim=32, text_dim=16, text_len=8,
                      num_heads=2, num_layers=2)
    net = M.CausalWanModel(cfg)
    torch.nn.init.normal_(net.head.head.weight, std=0.1)
    x0, noise = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    t, weight, context = torch.rand(2, 3) * 1000, torch.rand(2, 3), torch.randn(2, 8, 16)
    loss, _ = S1.diffusion_loss(net, x0, noise, t, weight, context, teacher_forcing=True)
    sigma = (t / 1000).view(2, 3, 1, 1, 1)
    v = net((1 - sigma) * x0 + sigma * noise, t, context, clean_x=x0)
    expected = (((v - (noise - x0)) ** 2).mean(dim=(2, 3, 4)) * weight).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_block_timesteps_constant_within_blocks_and_on_the_grid():
    grid = M.timestep_grid(1000, 5.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        t, index = S1.sample_block_timesteps(g, 6, 3, grid, per_video=False)
        assert t[0] == t[1] == t[2] and t[3] == t[4] == t[5]
        assert torch.equal(t, grid[index]) and t.dtype == torch.float32
    draws = torch.stack([S1.sample_block_timesteps(g, 6, 1, grid, per_video=False)[0] for _ in range(200)])
    assert (draws[:, 0] != draws[:, 1]).any()  # frame-wise: each frame its own t
    video = S1.sample_block_timesteps(g, 6, 1, grid, per_video=True)[0]
    assert (video == video[0]).all()


def test_gaussian_weights_match_the_official_values():
    grid = M.timestep_grid(1000, 5.0)
    w = S1.gaussian_grid_weights(grid)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert w[0].item() == 0.0  # t = 1000 gets no weight
    at = lambda t: w[(grid - t).abs().argmin()].item()  # noqa: E731
    for t, expected in ((950, 0.32), (900, 0.63), (800, 1.21), (500, 2.08), (200, 1.21), (100, 0.64), (20, 0.13)):
        assert at(t) == pytest.approx(expected, abs=0.01), t


# ---- runs: FSDP2 equivalence and exact resume ----


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from prepare_data import prepare_toy
    out = tmp_path_factory.mktemp("toy_data")
    prepare_toy(8, str(out), seed=0, shard_size=8)
    return str(out)


def run_args(data_dir, out_dir, **overrides):
    args = dict(model_preset="toy", init_from=None, data_dir=data_dir, text_encoder="toy", codec="toy",
                device="cpu", mixed_precision=False, activation_checkpointing=False, lr=1e-3, beta1=0.9,
                text_dropout=0.5, max_steps=1, grad_accum=1, log_every=1, save_every=1, sample_every=0,
                out_dir=out_dir)
    args.update(overrides)
    return [f"--{k}={'null' if v is None else v}" for k, v in args.items()]


def final_weights(out_dir):
    return load_file(os.path.join(common.latest_checkpoint(out_dir), "model.safetensors"))


def test_two_rank_fsdp2_step_equals_single_process(toy_data, tmp_path):
    single = str(tmp_path / "single")
    S1.main(common.load_config(S1.Config, run_args(toy_data, single, batch_size=2, grad_accum=2)))
    fsdp = str(tmp_path / "fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "stage1_teacher_forcing.py"), *run_args(toy_data, fsdp, batch_size=1, grad_accum=2)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = final_weights(single), final_weights(fsdp)
    initial = M.CausalWanModel(M.WanConfig.from_preset("toy")).state_dict()
    assert a.keys() == b.keys()
    worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a)
    moved = max((a[k] - initial[k]).abs().max().item() for k in a if k in initial and "modulation" not in k)
    print(f"FSDP2 (2 ranks x 1 x accum 2) vs single process (1 x 2 x accum 2): max relative weight diff {worst:.2e}")
    assert worst <= 1e-5
    assert moved > 1e-4  # the step changed the weights, so the comparison is not vacuous


def test_resume_is_bit_identical(toy_data, tmp_path):
    straight = str(tmp_path / "straight")
    S1.main(common.load_config(S1.Config, run_args(toy_data, straight, max_steps=4, save_every=2, batch_size=2,
                                                   ema_decay=0.9)))
    resumed = str(tmp_path / "resumed")
    S1.main(common.load_config(S1.Config, run_args(toy_data, resumed, max_steps=2, save_every=2, batch_size=2,
                                                   ema_decay=0.9)))
    S1.main(common.load_config(S1.Config, run_args(toy_data, resumed, max_steps=4, save_every=2, batch_size=2,
                                                   ema_decay=0.9, resume=True)))
    assert_same_run(straight, resumed, num_rows=4)
    assert os.path.isfile(os.path.join(straight, "loss.png"))  # the loss curve written with each checkpoint


def test_existing_run_without_resume_is_refused(toy_data, tmp_path):
    out = str(tmp_path / "run")
    S1.main(common.load_config(S1.Config, run_args(toy_data, out)))
    with pytest.raises(SystemExit, match="--resume=true"):
        S1.main(common.load_config(S1.Config, run_args(toy_data, out)))


def test_unknown_config_key_fails_clearly():
    result = subprocess.run([sys.executable, str(REPO / "stage1_teacher_forcing.py"), "--learning_rate=1e-4"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "unknown config key 'learning_rate'" in result.stderr
    shutil.rmtree(REPO / "runs" / "stage1_tf", ignore_errors=True)


def test_sample_grid_png_and_toybench_row(toy_data, tmp_path):
    out = str(tmp_path / "run")
    S1.main(common.load_config(S1.Config, run_args(toy_data, out, sample_every=1, sample_steps=2, num_samples=2,
                                                   ema_decay=0.5)))
    assert os.path.isfile(os.path.join(out, "samples_0000001.png"))
    rows = read_metrics(out)
    assert any("toybench/total" in r for r in rows)


def nan_on_calls(monkeypatch, bad_calls):
    """Make diffusion_loss return NaN on the given (1-based) calls: a numerical fault injected into a real run."""
    real, calls = S1.diffusion_loss, [0]

    def faulty(*args, **kwargs):
        calls[0] += 1
        loss, per_frame = real(*args, **kwargs)
        return (loss * float("nan"), per_frame) if calls[0] in bad_calls else (loss, per_frame)
    monkeypatch.setattr(S1, "diffusion_loss", faulty)


def test_a_non_finite_step_is_skipped_and_logged(toy_data, tmp_path, monkeypatch):
    out = str(tmp_path / "nan_once")
    nan_on_calls(monkeypatch, {2})
    S1.main(common.load_config(S1.Config, run_args(toy_data, out, max_steps=3, batch_size=2, ema_decay=0.9)))
    weights = lambda step, name: load_file(os.path.join(out, f"step_{step:07d}", f"{name}.safetensors"))  # noqa: E731
    for name in ("model", "ema"):  # the faulty step left weights (and EMA) untouched; the next one trained
        assert all(torch.equal(weights(1, name)[k], weights(2, name)[k]) for k in weights(1, name)), name
        assert any(not torch.equal(weights(2, name)[k], weights(3, name)[k]) for k in weights(2, name)), name
        assert all(torch.isfinite(v).all() for v in weights(3, name).values())
    rows = read_metrics(out)
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 0]


def test_sec_per_step_is_the_mean_over_the_steps_since_the_last_row(toy_data, tmp_path, monkeypatch):
    """A fake clock ticks 1 s per optimizer step, so every row must say 1.0 s/step — also a last row after a
    partial interval (max_steps not a multiple of log_every) and the first row after an off-boundary resume.
    vbench_eval's Stage-2 cost multiplies this number by the step gap, so dividing by log_every undercounted."""
    clock = [1000.0]
    real_clip = common.clip_grad_norm

    def clip_and_tick(*args, **kwargs):  # called once per optimizer step
        clock[0] += 1.0
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(common, "clip_grad_norm", clip_and_tick)
    monkeypatch.setattr(S1, "time", types.SimpleNamespace(time=lambda: clock[0]))  # only this script's clock
    out = str(tmp_path / "timed")
    S1.main(common.load_config(S1.Config, run_args(toy_data, out, max_steps=3, log_every=2, save_every=3,
                                                   batch_size=2)))
    S1.main(common.load_config(S1.Config, run_args(toy_data, out, max_steps=6, log_every=2, save_every=3,
                                                   batch_size=2, resume=True)))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [2, 3, 4, 6]
    assert [r["sec_per_step"] for r in rows] == [1.0, 1.0, 1.0, 1.0]


def test_non_finite_steps_in_a_row_stop_the_run_with_one_line(toy_data, tmp_path, monkeypatch):
    out = str(tmp_path / "nan_always")
    nan_on_calls(monkeypatch, set(range(2, 100)))
    with pytest.raises(SystemExit, match=r"stopped at step 3: 2 non-finite steps in a row .*last good checkpoint: "
                                         r".*step_0000002.*--resume=true") as stop:
        S1.main(common.load_config(S1.Config, run_args(toy_data, out, max_steps=6, batch_size=2,
                                                       max_nonfinite_steps=2)))
    assert "\n" not in str(stop.value)
    assert common.latest_checkpoint(out).endswith("step_0000002")
    first, last = (load_file(os.path.join(out, f"step_{s:07d}", "model.safetensors")) for s in (1, 2))
    assert all(torch.equal(first[k], last[k]) and torch.isfinite(last[k]).all() for k in first)


def run_in_subprocess(args):
    """One stage-1 run in a fresh process with one thread. Bit-exact comparisons need every run to do the same
    arithmetic: a run in the pytest process uses all cores, and a different thread count changes the
    reduction order of the CPU kernels (and so the last bits) — which CI's 2-core machine showed."""
    result = subprocess.run([sys.executable, str(REPO / "stage1_teacher_forcing.py"), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(toy_data, tmp_path):
    import signal
    import time
    args = dict(max_steps=40, batch_size=1, save_every=100, ema_decay=0.9)
    interrupted = str(tmp_path / "interrupted")
    process = subprocess.Popen([sys.executable, str(REPO / "stage1_teacher_forcing.py"),
                                *run_args(toy_data, interrupted, **args)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = os.path.join(interrupted, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.isfile(metrics) and len(open(metrics).readlines()) >= 2):
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    stopped_at = int(common.latest_checkpoint(interrupted).rsplit("_", 1)[1])
    assert 2 <= stopped_at < 40 and "SIGTERM: saved step" in out, (stopped_at, out[-500:])
    run_in_subprocess(run_args(toy_data, interrupted, resume=True, **args))
    straight = str(tmp_path / "straight")
    run_in_subprocess(run_args(toy_data, straight, **args))
    assert_same_run(straight, interrupted, num_rows=40)


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(toy_data, tmp_path):
    """Fault injection: SIGKILL the run three times at random moments (a checkpoint is written after every
    step, so kills land inside checkpoint writes too), resume each time, and compare with a run never killed."""
    import random
    import time
    rng = random.Random(0)
    args = dict(max_steps=16, batch_size=1, save_every=1, ema_decay=0.9)
    killed = str(tmp_path / "killed")
    metrics = os.path.join(killed, "metrics.jsonl")
    torn_writes = 0
    for attempt in range(3):
        process = subprocess.Popen([sys.executable, str(REPO / "stage1_teacher_forcing.py"),
                                    *run_args(toy_data, killed, resume=True, **args)], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        start_rows = len(open(metrics).readlines()) if os.path.isfile(metrics) else 0
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None and \
                (not os.path.isfile(metrics) or len(open(metrics).readlines()) <= start_rows):
            time.sleep(0.01)
        if attempt == 0:  # the first kill waits for a checkpoint write in progress
            while time.time() < deadline and process.poll() is None and \
                    not any(name.startswith(".tmp_step_") for name in os.listdir(killed)):
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(0.0, 0.6))
        process.kill()
        process.wait()
        torn_writes += any(name.startswith(".tmp_step_") for name in os.listdir(killed))
    run_in_subprocess(run_args(toy_data, killed, resume=True, **args))
    straight = str(tmp_path / "straight")
    run_in_subprocess(run_args(toy_data, straight, **args))
    assert_same_run(straight, killed, num_rows=16)
    assert not any(name.startswith(".tmp_step_") for name in os.listdir(killed))  # the next save cleaned up
    print(f"3 SIGKILLs, {torn_writes} of them inside a checkpoint write")
    assert torn_writes >= 1  # the harness did exercise a torn checkpoint write


def test_two_rank_run_killed_then_resumed_matches_an_uninterrupted_two_rank_run(toy_data, tmp_path):
    """Fault injection under torchrun: SIGKILL the whole 2-rank job (launcher and both ranks) at a random moment
    after a few steps, resume with torchrun, and compare with a 2-rank run never killed: bit-identical."""
    import random
    import signal
    import time
    args = dict(max_steps=8, batch_size=1, save_every=1, ema_decay=0.9)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(REPO / "stage1_teacher_forcing.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = str(tmp_path / "killed")
    metrics = os.path.join(killed, "metrics.jsonl")
    process = subprocess.Popen([*torchrun, *run_args(toy_data, killed, **args)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and \
            not (os.path.isfile(metrics) and len(open(metrics).readlines()) >= 3):
        time.sleep(0.01)
    time.sleep(random.Random(1).uniform(0.0, 0.5))
    assert process.poll() is None, "the run ended before it could be killed; raise max_steps"
    # launcher and ranks at once, as a cluster preemption does. torchrun starts each rank in a session of its
    # own, so killing the launcher's group is not enough: every process whose command line names this run's
    # out_dir is killed, and the test waits until none is left (a surviving rank once kept writing metrics)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    marker = f"--out_dir={killed}".encode()

    def run_processes():
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker in f.read():
                        found.append(int(pid))
            except OSError:
                pass
        return found
    while time.time() < deadline and (survivors := run_processes()):
        for pid in survivors:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    assert not run_processes(), "ranks of the killed run are still alive"
    killed_at = common.latest_checkpoint(killed)
    assert killed_at is not None and not killed_at.endswith("step_0000008"), killed_at
    for out_dir, resume in ((killed, True), (str(tmp_path / "straight"), False)):
        result = subprocess.run([*torchrun, *run_args(toy_data, out_dir, resume=resume, **args)], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    straight = str(tmp_path / "straight")
    assert_same_run(straight, killed, num_rows=8)
    print(f"2-rank SIGKILL after {os.path.basename(killed_at)}, resumed: bit-identical to the uninterrupted run")
