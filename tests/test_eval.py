"""vbench_eval.py toy suite: sampling every kind of checkpoint, deterministic, scored by ToyBench."""
from dataclasses import asdict

import pytest
import torch

import common
import model as M
import toyworld
import vbench_eval


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
