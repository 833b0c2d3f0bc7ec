"""Small things several test files need."""
from dataclasses import asdict

import torch

import common
import model as M
import toyworld


def tiny_frame_wise_checkpoint(root, num_frames):
    """A tiny random frame-wise model (1 layer, 32 wide) saved as one of our Stage-3 checkpoints, with the toy
    text encoder and pixel codec: the CLIs run end to end on it in well under a second per video."""
    torch.manual_seed(0)
    cfg = M.WanConfig(in_dim=12, out_dim=12, dim=32, ffn_dim=64, freq_dim=32, text_dim=toyworld.TOY_TEXT_DIM,
                      text_len=toyworld.TOY_TEXT_LEN, num_heads=2, num_layers=1, causal=True)
    model = M.CausalWanModel(cfg)
    with torch.no_grad():  # away from the zero-initialised head, so outputs depend on the inputs
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run_config = dict(text_encoder="toy", codec="toy", num_frames=num_frames)
    return common.save_checkpoint(str(root / "run"), 1, {"model": model.state_dict()}, {"step": 1},
                                  {"model_config": asdict(cfg), "run_config": run_config, "stage": "stage3_dmd"})


def run_script(script, args, timeout=600):
    """A stage script in a fresh process with one thread: bit-exact comparisons need every run to do the same
    arithmetic, and the thread count changes the CPU kernels' reduction order."""
    import os
    import subprocess
    import sys
    result = subprocess.run([sys.executable, str(script), *args], cwd=os.path.dirname(script), capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def read_metrics(out_dir):
    """Every row of a run's metrics.jsonl, in order."""
    import json
    import os
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(dir_a, dir_b, num_rows=None):
    """Two runs of the same config ended in the same state: the same last checkpoint, bit-identical weights in
    every safetensors file of it, and identical metrics rows (timings aside; `num_rows` of them if given)."""
    import os

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


def sigkill_resume_equals_straight(script, args_for, tmp_path, kill_after_rows, seed=0):
    """Fault injection for one stage: start `script` with args_for(out_dir), SIGKILL it at a random moment after
    `kill_after_rows` rows of metrics.jsonl, resume with --resume=true, run the same config uninterrupted, and
    require bit-identical weights (every safetensors file of the last checkpoint) and identical metrics rows
    (timings aside). Returns the checkpoint the kill left as latest."""
    import os
    import random
    import subprocess
    import sys
    import time
    killed, straight = str(tmp_path / "killed"), str(tmp_path / "straight")
    metrics = os.path.join(killed, "metrics.jsonl")
    process = subprocess.Popen([sys.executable, str(script), *args_for(killed)], cwd=os.path.dirname(script),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and \
            not (os.path.isfile(metrics) and len(open(metrics).readlines()) >= kill_after_rows):
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0.0, 0.5))
    assert process.poll() is None, "the run ended before it could be killed; give it more steps"
    process.kill()
    process.wait()
    killed_at = common.latest_checkpoint(killed)
    run_script(script, [*args_for(killed), "--resume=true"])
    run_script(script, args_for(straight))
    assert_same_run(straight, killed)
    return killed_at
