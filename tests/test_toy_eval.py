"""toy_eval.py, split out of vbench_eval.py: each command has its own --help, `score` samples a checkpoint the way
the checkpoint says (and refuses a frame-wise rollout of a bidirectional model), and vbench_eval points there."""
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from helpers import tiny_frame_wise_checkpoint

import common
import model as M
import toy_eval
import vbench_eval

REPO = Path(__file__).resolve().parents[1]


def help_of(*args):
    result = subprocess.run([sys.executable, str(REPO / "toy_eval.py"), *args, "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_each_command_has_its_own_help():
    score, ablation = help_of("score"), help_of("ablation")
    assert "--ckpt" in score and "--sample_steps" in score and "--ablation" not in score
    assert "--ckpt" not in ablation and "Stage 3" in ablation
    assert "score" in help_of() and "ablation" in help_of()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_eval")
    student = tiny_frame_wise_checkpoint(root / "student", num_frames=12)
    torch.manual_seed(0)
    base = M.CausalWanModel(M.WanConfig.from_preset("toy", num_layers=1, causal=False))
    base_dir = common.save_checkpoint(str(root / "base"), 1, {"model": base.state_dict()}, {"step": 1},
                                      {"model_config": asdict(base.cfg), "stage": "stage1",
                                       "run_config": dict(text_encoder="toy", codec="toy")})
    return student, base_dir


def test_score_samples_a_student_with_its_few_step_rollout(checkpoints, tmp_path):
    student, _ = checkpoints
    out = tmp_path / "scores.json"
    scores = toy_eval.main(["score", "--ckpt", student, "--samples", "1", "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["sampling"] == "2-step, first block 1000,750,500,250"
    assert 0.0 <= written["total"] <= 1.0 and written["total"] == pytest.approx(scores["total"])
    assert len(scores["per_video"]) == 23  # the held-out prompts, once each


def test_score_refuses_a_frame_wise_rollout_of_a_bidirectional_model(checkpoints):
    _, base = checkpoints
    with pytest.raises(SystemExit, match="toy_eval.py: error: .* is a bidirectional model") as error:
        toy_eval.main(["score", "--ckpt", base, "--steps", "2", "--samples", "1"])
    assert "\n" not in str(error.value)


def test_compare_puts_the_shipped_teacher_beside_the_shipped_students(tmp_path):
    """make demo's table: the same prompts and noise through each shipped model, sampled the way it is made for."""
    import imageio.v3 as iio
    out, png = tmp_path / "compare.json", tmp_path / "compare.png"
    rows = toy_eval.main(["compare", "--prompts", "2", "--json", str(out), "--png", str(png)])
    written = json.loads(out.read_text())
    assert list(written) == list(rows) and len(rows) == 4
    assert [label.split(" (")[1] for label in rows] == [
        "40-step Euler, CFG 3)", "1-step, first block 1000,750,500,250)", "2-step, first block 1000,750,500,250)",
        "4-step, first block 1000,750,500,250)"]
    assert all(len(r["per_video"]) == 2 and 0.0 <= r["total"] <= 1.0 for r in rows.values())
    assert iio.imread(png).shape[:2] == (4 * 2 * 64, 12 * 64)  # 2 prompts x 4 models rows, 12 frames, scale 2


def test_vbench_eval_points_toy_users_to_toy_eval(capsys):
    with pytest.raises(SystemExit):
        vbench_eval.main(["--suite", "toy", "--ckpt", "x"])
    assert "toy_eval.py score" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["score", "--ckpt", "x", "--samples", "0"], "--samples must be at least 1"),
    (["camera", "--ckpt", "x", "--samples", "-1"], "--samples must be at least 1"),
    (["oracle", "--ckpt", "x", "--clips", "0"], "--clips must be at least 1"),
    (["compare", "--prompts", "0"], "--prompts must be in [1, 23]"),
    (["oracle", "--ckpt", "x", "--sigmas", "0.9,abc"], "--sigmas must be comma-separated noise levels in (0, 1]"),
    (["oracle", "--ckpt", "x", "--sigmas", "1.5"], "--sigmas must be comma-separated noise levels in (0, 1]"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        toy_eval.parse_args(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and "Traceback" not in err, err
