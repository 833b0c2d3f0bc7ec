"""Small things several test files need."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import common
import model as M
import toyworld

REPO = Path(__file__).resolve().parent.parent
HOOKED_RUN = str(Path(__file__).resolve().parent / "hooked_run.py")


def tiny_model_config(causal=True, camera_dims=0):
    """The tiny Wan-shaped config of the run tests (1 layer, 32 wide, toy channels and text): what they check
    (resume, kill, sharding, reduction) does not depend on width, and a step costs milliseconds. camera_dims 4
    or 8 (of its 8 frame-axis RoPE channels): a camera-conditioned (PRoPE) model."""
    return M.WanConfig(in_dim=12, out_dim=12, dim=32, ffn_dim=64, freq_dim=32, text_dim=toyworld.TOY_TEXT_DIM,
                       text_len=toyworld.TOY_TEXT_LEN, num_heads=2, num_layers=1, causal=causal,
                       camera_dims=camera_dims)


def tiny_random_model(seed, causal=True, camera_dims=0):
    """A tiny model with every weight random (also the head, which Wan zero-initialises): the output and every
    gradient depend on the inputs from the first step."""
    torch.manual_seed(seed)
    model = M.CausalWanModel(tiny_model_config(causal, camera_dims))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def tiny_checkpoint(out_dir, seed=0, causal=True, ema_seed=None, num_frames=None, stage="stage3_dmd", camera_dims=0):
    """A tiny random model saved as one of our training checkpoints (toy text encoder and codec), optionally
    with different EMA weights (from `ema_seed`). Returns the checkpoint directory."""
    model = tiny_random_model(seed, causal, camera_dims)
    weights = {"model": model.state_dict()}
    if ema_seed is not None:
        weights["ema"] = tiny_random_model(ema_seed, causal, camera_dims).state_dict()
    run_config = dict(text_encoder="toy", codec="toy", num_frames=num_frames)
    return common.save_checkpoint(str(out_dir), 1, weights, {"step": 1},
                                  {"model_config": asdict(model.cfg), "run_config": run_config, "stage": stage})


def tiny_frame_wise_checkpoint(root, num_frames):
    """A tiny random frame-wise model saved as one of our Stage-3 checkpoints, with the toy text encoder and
    pixel codec: the CLIs run end to end on it in well under a second per video."""
    return tiny_checkpoint(root / "run", seed=0, num_frames=num_frames)


def cli_args(**values):
    return [f"--{k}={'null' if v is None else v}" for k, v in values.items()]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def command(script, args, nproc=None, hook="none", event_file=""):
    """The command line of one stage run: plain `python` (nproc None) or `torchrun` with nproc ranks, through
    hooked_run.py when a hook is given. Every run gets one thread per process, so runs that are compared bit for bit do the same arithmetic
    (the thread count changes the CPU kernels' reduction order)."""
    target = [str(script)] if hook == "none" else [HOOKED_RUN, hook, str(event_file), str(script)]
    if nproc is None:
        return [sys.executable, *target, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, *args]


def run_script(script, args, nproc=None, timeout=600):
    """A stage script run to completion in fresh process(es) with one thread each; returns its stdout."""
    result = subprocess.run(command(script, args, nproc), cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def start_hooked(script, args, hook, event_file, nproc=None):
    """Start a run with a hooked_run.py hook and wait for its event file: the run is then paused at the hooked
    point (or, for sigterm_at_check, waiting for the signal). Fails if the run ends first. Its output goes to
    event_file + '.out' / '.err' (files, not pipes: a full pipe would stall the run before its event)."""
    with open(event_file + ".out", "w") as out, open(event_file + ".err", "w") as err:
        process = subprocess.Popen(command(script, args, nproc, hook, event_file), cwd=REPO, env=ONE_THREAD,
                                   stdout=out, stderr=err, start_new_session=True)
    while not os.path.exists(event_file):
        if process.poll() is not None:
            raise AssertionError(f"the run ended before reaching {hook}: {open(event_file + '.err').read()[-3000:]}")
        time.sleep(0.01)  # waiting for an event; no deadline tied to the machine's speed (pytest-level timeout)
    os.remove(event_file)
    return process


def kill_run(process, out_dir):
    """SIGKILL a run and every process of it, as a preemption does: the launcher's session, and (torchrun
    starts each rank in a session of its own) every process whose command line names this out_dir; wait until
    none is left, so nothing writes into out_dir afterwards."""
    os.killpg(process.pid, signal.SIGKILL)
    marker = f"--out_dir={out_dir}".encode()

    def run_processes():
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker in f.read() and int(pid) != os.getpid():
                        found.append(int(pid))
            except OSError:
                pass
        return found
    while survivors := run_processes():
        for pid in survivors:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    process.wait()


def read_metrics(out_dir):
    """Every row of a run's metrics.jsonl, in order."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(dir_a, dir_b, num_rows=None):
    """Two runs of the same config ended in the same state: the same last checkpoint, bit-identical weights in
    every safetensors file of it, and identical metrics rows (timings aside; `num_rows` of them if given)."""
    from safetensors.torch import load_file
    a_dir, b_dir = common.latest_checkpoint(dir_a), common.latest_checkpoint(dir_b)
    assert os.path.basename(a_dir) == os.path.basename(b_dir), (a_dir, b_dir)
    names = sorted(n for n in os.listdir(a_dir) if n.endswith(".safetensors"))
    assert names and names == sorted(n for n in os.listdir(b_dir) if n.endswith(".safetensors")), (a_dir, b_dir)
    for name in names:
        a, b = load_file(os.path.join(a_dir, name)), load_file(os.path.join(b_dir, name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    def rows(d):
        return [{k: v for k, v in r.items() if "sec" not in k} for r in read_metrics(d)]
    rows_a, rows_b = rows(dir_a), rows(dir_b)
    assert rows_a == rows_b, (rows_a, rows_b)
    assert num_rows is None or len(rows_a) == num_rows, f"{len(rows_a)} metrics rows, expected {num_rows}"


def kill_resume_equals_straight(script, args_for, tmp_path, straight, kills, nproc=None):
    """Fault injection for one stage: run `script` with args_for(out_dir), SIGKILL it at each hooked_run.py
    point of `kills` in turn (each run after the first resumes with --resume=true), finish it with a resume,
    and require the same state as the uninterrupted run in `straight` (bit-identical weights of every file of
    the last checkpoint, identical metrics rows). Returns the checkpoints each kill left as latest."""
    killed = str(tmp_path / "killed")
    left = []
    for i, hook in enumerate(kills):
        resume = ["--resume=true"] if i > 0 else []
        process = start_hooked(script, [*args_for(killed), *resume], hook, str(tmp_path / "event"), nproc)
        kill_run(process, killed)
        left.append(common.latest_checkpoint(killed))
        if hook.startswith("pause_in_write"):  # the kill tore a checkpoint write: its temporary directory is left
            assert any(n.startswith(".tmp_step_") for n in os.listdir(killed)), os.listdir(killed)
    run_script(script, [*args_for(killed), "--resume=true"], nproc)
    assert_same_run(straight, killed)
    assert not any(n.startswith(".tmp_step_") for n in os.listdir(killed))  # the next save cleaned up
    return left


# ---- comparing runs of different process layouts ----
#
# FSDP2 on 2 ranks and one process do the same mathematics in another order: each rank's batch-1 kernels block
# their sums differently from one process's batch-2 kernels, and the gradient is averaged across ranks. In fp32
# a sum of n terms computed in another order moves by at most n·u·Σ|terms| (u = 6e-8), and CPUs with other
# vector widths (AVX2, AVX-512, AMX) pick other orders. The bounds below follow from that, not from one CPU:
#  - the longest sums in these tiny runs have n <= 4,000 terms (weight gradients over batch x tokens), so one
#    sum moves by <= 2.4e-4 relative to Σ|terms|; independent errors of the <= 4 layers add in quadrature,
#    ~5e-4. Losses and squared gradient norms are sums of non-negative terms (Σ|terms| = the value), and
#    gradients are compared as whole tensors, ||g_a − g_b|| <= bound·||g_a||, so cancellation inside single
#    elements does not enter. We allow RELATIVE_ROUNDING = 1e-3 (measured here: <= 5e-6).
#  - a wrong reduction (a rank's gradient dropped, SUM for AVG, an accumulation counted twice, a sync after
#    the wrong micro-step) changes a gradient norm or a gradient by tens of percent (measured: 0.5x to 2x).
#  - post-Adam weights of the two layouts are not compared with a fixed tolerance: Adam's first step is
#    lr·g/(|g|+eps), so where g is at rounding level its sign, and a weight's step of up to lr, follows the
#    rounding. Instead each run's step is checked against its own recorded moments (assert_adam_step).
RELATIVE_ROUNDING = 1e-3


def optimizer_gradients(checkpoint, name):
    """The last gradient each parameter got, read back from Adam's state in a checkpoint: after step k,
    exp_avg = β1·m_{k−1} + (1 − β1)·g_k, so in a run with β1 = 0 it is the (clipped) gradient itself."""
    state = torch.load(os.path.join(checkpoint, "state.pt"), map_location="cpu", weights_only=True)
    return {k: v["exp_avg"] for k, v in state["optimizers"][name]["state"].items()}


def assert_close_across_processes(single, sharded, metric_keys, optimizers=("optimizer",), at_step=1):
    """The cross-layout comparison (see above) of the first `at_step` steps, before any weight has taken an Adam
    step whose rounding could differ: every metrics row's losses and gradient norms, and the gradient of every
    parameter (Adam state: run both with beta1 = 0) in the checkpoint of step `at_step`."""
    assert at_step == 1, "later steps start from weights Adam's first step may have moved by rounding"
    rows_a = [r for r in read_metrics(single) if r["step"] <= at_step]
    rows_b = [r for r in read_metrics(sharded) if r["step"] <= at_step]
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] and rows_a, (rows_a, rows_b)
    worst = {}
    for a, b in zip(rows_a, rows_b):
        for key in metric_keys:
            if key in a:
                assert abs(a[key] - b[key]) <= RELATIVE_ROUNDING * abs(a[key]), (a["step"], key, a[key], b[key])
                worst[key] = max(worst.get(key, 0.0), abs(a[key] - b[key]) / abs(a[key]))
    for run in (single, sharded):
        with open(os.path.join(run, f"step_{at_step:07d}", "config.json")) as f:
            assert json.load(f)["run_config"]["beta1"] == 0.0, f"{run}: exp_avg is the gradient only with beta1 = 0"
    for name in optimizers:
        ga = optimizer_gradients(os.path.join(single, f"step_{at_step:07d}"), name)
        gb = optimizer_gradients(os.path.join(sharded, f"step_{at_step:07d}"), name)
        assert ga.keys() == gb.keys() and ga, name
        for k in ga:
            err, norm = (ga[k] - gb[k]).norm().item(), ga[k].norm().item()
            assert norm > 0, f"{name}: parameter {k} got an all-zero gradient; the comparison would be vacuous"
            assert err <= RELATIVE_ROUNDING * norm, (name, k, err, norm)
            worst[f"{name} gradient"] = max(worst.get(f"{name} gradient", 0.0), err / norm)
    print("largest relative differences (bound %.0e): " % RELATIVE_ROUNDING
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def assert_adam_step(before, after, state, lr, weight_decay, beta1, beta2, eps=1e-8):
    """One run's optimizer step did what AdamW does with the moments it recorded: for every parameter,
    after = before·(1 − lr·wd) − lr/(1 − β1^k) · m / (sqrt(v/(1 − β2^k)) + eps), k = its step count. Checked in
    float64 against the fp32 result: the update takes <= 6 roundings, so |error| <= 8u·(|before| + |update|)."""
    u = torch.finfo(torch.float32).eps / 2
    assert state.keys() <= before.keys() and state, sorted(state)[:3]
    for k, s in state.items():
        step = float(s["step"])
        m, v = s["exp_avg"].double(), s["exp_avg_sq"].double()
        update = lr / (1 - beta1 ** step) * m / (v.sqrt() / math.sqrt(1 - beta2 ** step) + eps)
        expected = before[k].double() * (1 - lr * weight_decay) - update
        err = (after[k].double() - expected).abs()
        assert (err <= 8 * u * (before[k].double().abs() + update.abs()) + 1e-30).all(), \
            (k, err.max().item(), update.abs().max().item())


def assert_preview_grid(out_dir, step, videos, prompts, tmp_path):
    """A run's preview grid at `step` is exactly the PNG of `videos` (rows = videos, columns = frames, scale 2),
    and its one ToyBench row scores exactly those videos."""
    import os

    import imageio.v3 as iio
    import numpy as np
    import pytest
    path = os.path.join(out_dir, f"samples_{step:07d}.png")
    expected = common.save_png_grid(videos, str(tmp_path / "expected.png"), scale=2)
    assert np.array_equal(iio.imread(path), iio.imread(expected)), path
    rows = [r for r in read_metrics(out_dir) if "toybench/total" in r]
    assert [r["toybench/total"] for r in rows] == [pytest.approx(toyworld.score(videos, prompts)["total"])]
