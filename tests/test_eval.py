"""toy_eval.py: sampling every kind of checkpoint, deterministic, scored by ToyBench."""
from dataclasses import asdict

import pytest
import torch

import common
import model as M
import toyworld
import toy_eval as vbench_eval  # ToyBench moved from vbench_eval.py to toy_eval.py


@pytest.fixture(scope="module")
def toy_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    paths = {}
    for causal in (True, False):
        torch.manual_seed(0)
        cfg = M.WanConfig.from_preset("toy", num_layers=1, causal=causal)
        net = M.CausalWanModel(cfg)
        torch.nn.init.normal_(net.head.head.weight, std=0.02)
        run = root / f"run_{causal}"
        common.save_checkpoint(str(run), 1, {"model": net.state_dict()}, {"step": 1}, {"model_config": asdict(cfg)})
        paths[causal] = str(run)
    return paths


@pytest.mark.parametrize("causal, kw", [(True, dict(steps=[1000, 500])), (True, dict(sample_steps=2)),
                                        (False, dict(sample_steps=2))])
def test_sample_toy_every_kind_of_checkpoint(toy_checkpoints, causal, kw):
    model, _ = vbench_eval.load_model(toy_checkpoints[causal], use_ema=False)
    prompts = toyworld.heldout_prompts()[:3]
    a = vbench_eval.sample_toy(model, prompts, seed=1, **kw)
    b = vbench_eval.sample_toy(model, prompts, seed=1, **kw)
    assert a.shape == (3, toyworld.TOY_FRAMES, 3, toyworld.TOY_SIZE, toyworld.TOY_SIZE)
    assert torch.equal(a, b)
    scores = toyworld.score(a, prompts)
    assert 0.0 <= scores["total"] <= 1.0


def test_ground_truth_toy_videos_score_near_100():
    prompts = toyworld.heldout_prompts()
    videos = torch.stack([toyworld.render(p, seed=i) for i, p in enumerate(prompts)])
    assert toyworld.score(videos, prompts)["total"] >= 0.99


def test_stage2_cost_of_the_ablation_table(tmp_path):
    import json
    # an ODE run: trajectories logged once (step 0), then 20 regression steps logged every 10
    ode = tmp_path / "ode"
    common.save_checkpoint(str(ode), 20, {"model": {"w": torch.zeros(1)}}, {"step": 20}, {"stage": "stage2_ode"})
    rows = [{"step": 0, "ode/teacher_forwards": 1536.0, "ode/seconds": 300.0, "ode/bytes_written": 4e6},
            {"step": 10, "loss": 1.0, "sec_per_step": 2.0}, {"step": 20, "loss": 0.5, "sec_per_step": 3.0}]
    (ode / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # 300 s of trajectories + 10·2 + 10·3 s of training; 1,536 teacher forwards; 4 MB
    assert vbench_eval.stage2_cost(str(ode)) == dict(teacher_forwards=1536.0, seconds=350.0, bytes_stored=4e6)
    # a CD run: its teacher forwards are cumulative in every row, nothing stored
    cd = tmp_path / "cd"
    common.save_checkpoint(str(cd), 20, {"model": {"w": torch.zeros(1)}}, {"step": 20}, {"stage": "stage2_cd"})
    rows = [{"step": 0, "ode/teacher_forwards": 0.0, "ode/seconds": 0.0, "ode/bytes_written": 0.0},
            {"step": 10, "sec_per_step": 4.0, "teacher_forwards": 80.0},
            {"step": 20, "sec_per_step": 5.0, "teacher_forwards": 160.0}]
    (cd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert vbench_eval.stage2_cost(str(cd)) == dict(teacher_forwards=160.0, seconds=90.0, bytes_stored=0.0)
    # a Stage-1 model used directly as the Stage-3 initialisation costs nothing in Stage 2
    tf = tmp_path / "tf"
    common.save_checkpoint(str(tf), 5, {"model": {"w": torch.zeros(1)}}, {"step": 5}, {"stage": "stage1"})
    (tf / "metrics.jsonl").write_text(json.dumps({"step": 5, "sec_per_step": 9.0}) + "\n")
    assert vbench_eval.stage2_cost(str(tf)) == dict(teacher_forwards=0.0, seconds=0.0, bytes_stored=0.0)
