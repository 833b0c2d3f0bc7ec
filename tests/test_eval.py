"""toy_eval.py: sampling every kind of checkpoint, deterministic, scored by ToyBench."""
from dataclasses import asdict

import pytest
import torch

import common
import model as M
import toyworld
import toy_eval


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
    model, _ = toy_eval.load_model(toy_checkpoints[causal], use_ema=False)
    prompts = toyworld.heldout_prompts()[:3]
    a = toy_eval.sample_toy(model, prompts, seed=1, **kw)
    b = toy_eval.sample_toy(model, prompts, seed=1, **kw)
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
    assert toy_eval.stage2_cost(str(ode)) == dict(teacher_forwards=1536.0, seconds=350.0, bytes_stored=4e6)
    # a CD run: its teacher forwards are cumulative in every row, nothing stored
    cd = tmp_path / "cd"
    common.save_checkpoint(str(cd), 20, {"model": {"w": torch.zeros(1)}}, {"step": 20}, {"stage": "stage2_cd"})
    rows = [{"step": 0, "ode/teacher_forwards": 0.0, "ode/seconds": 0.0, "ode/bytes_written": 0.0},
            {"step": 10, "sec_per_step": 4.0, "teacher_forwards": 80.0},
            {"step": 20, "sec_per_step": 5.0, "teacher_forwards": 160.0}]
    (cd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert toy_eval.stage2_cost(str(cd)) == dict(teacher_forwards=160.0, seconds=90.0, bytes_stored=0.0)
    # a Stage-1 model used directly as the Stage-3 initialisation costs nothing in Stage 2
    tf = tmp_path / "tf"
    common.save_checkpoint(str(tf), 5, {"model": {"w": torch.zeros(1)}}, {"step": 5}, {"stage": "stage1"})
    (tf / "metrics.jsonl").write_text(json.dumps({"step": 5, "sec_per_step": 9.0}) + "\n")
    assert toy_eval.stage2_cost(str(tf)) == dict(teacher_forwards=0.0, seconds=0.0, bytes_stored=0.0)


# ---- the toy evaluation CLI and the ablation driver (make toy / make ablation), at a tiny size ----


def test_toy_evaluation_cli_scores_the_ema_students_videos(tmp_path):
    """`toy_eval.py score --ckpt RUN --use_ema --steps 2` (make toy): the few-step AR videos of the EMA
    weights on the held-out prompts (noise of prompt i from seed + i, first frame 4 steps), scored by ToyBench;
    --png shows them and --json holds the scores."""
    import json

    import imageio.v3 as iio
    import numpy as np
    from helpers import tiny_checkpoint
    run = tiny_checkpoint(tmp_path / "run", seed=0, ema_seed=1)
    out_json, out_png = str(tmp_path / "scores.json"), str(tmp_path / "strip.png")
    toy_eval.main(["score", "--ckpt", str(tmp_path / "run"), "--use_ema", "--steps", "2",
                      "--samples", "1", "--seed", "3", "--json", out_json, "--png", out_png])
    model = M.CausalWanModel(M.config_from_checkpoint(run)).eval()
    M.load_weights(model, run, use_ema=True)
    prompts = toyworld.heldout_prompts()
    shape = (toyworld.TOY_FRAMES, toyworld.TOY_LATENT_CHANNELS, toyworld.TOY_LATENT_SIZE, toyworld.TOY_LATENT_SIZE)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(3 + i))
                         for i in range(len(prompts))])
    text = toyworld.ToyTextEncoder()
    with torch.no_grad():
        latents = M.generate(model, noise, text.encode(prompts), steps=M.warp_timesteps([1000, 500], 5.0),
                             first_block_steps=M.warp_timesteps([1000, 750, 500, 250], 5.0),
                             generator=torch.Generator().manual_seed(3))
    videos = toyworld.ToyCodec().decode(latents)
    expected = common.save_png_grid(videos[:8], str(tmp_path / "expected.png"), scale=2)
    assert np.array_equal(iio.imread(out_png), iio.imread(expected))  # the same calls in this process
    with open(out_json) as f:
        scores = json.load(f)
    reference = toyworld.score(videos, prompts)
    assert scores["sampling"] == "2-step, first block 1000,750,500,250" and scores["checkpoint"] == run
    assert all(scores[k] == pytest.approx(reference[k]) for k in ("total", "quality", "semantic"))


def test_ablation_driver_trains_stage3_from_every_init_and_reports_the_stage2_cost(tmp_path):
    """`make ablation` in miniature, in a working directory of its own: a tiny Stage-1 run as runs/toy/tf,
    tiny scores as checkpoints/toy/base and the shipped toy configs cut to 2 steps. The driver must train the
    causal ODE and CD students, run Stage 3 from each init (the EMA weights where the run keeps them), score
    each and report each Stage-2 cost."""
    import json
    import subprocess
    import sys

    import yaml
    from helpers import ONE_THREAD, REPO, tiny_checkpoint
    from prepare_data import prepare_toy
    ws = tmp_path
    for script in ("stage2_causal_cd.py", "stage3_asym_dmd.py"):
        (ws / script).symlink_to(REPO / script)
    prepare_toy(8, str(ws / "data" / "toy"), seed=0, shard_size=8)
    tiny_checkpoint(ws / "runs" / "toy" / "tf", seed=0, ema_seed=1, stage="stage1")
    tiny_checkpoint(ws / "checkpoints" / "toy" / "base", seed=3, causal=False)
    (ws / "configs" / "toy").mkdir(parents=True)
    for name in ("ode", "cd", "dmd_1step"):
        with open(REPO / "configs" / "toy" / f"{name}.yaml") as f:
            config = yaml.safe_load(f)
        config.update(max_steps=2, save_every=2, log_every=1, sample_every=0, batch_size=2, mixed_precision=False)
        if name == "ode":
            config.update(ode_num_clips=4)
        if name == "dmd_1step":
            config.update(critic_updates=1, num_frames=3)
        (ws / "configs" / "toy" / f"{name}.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, str(REPO / "toy_eval.py"), "ablation",
                             "--steps", "1", "--samples", "1", "--json", "ablation.json"], cwd=ws,
                            capture_output=True, text=True, timeout=900, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(ws / "ablation.json") as f:
        rows = json.load(f)
    assert [(r["steps"], r["stage2_run"]) for r in rows] == [(1, "runs/toy/tf"), (1, "runs/toy/ode"),
                                                            (1, "runs/toy/cd")]
    cost = {r["stage2_run"]: r["stage2_cost"] for r in rows}
    assert cost["runs/toy/tf"] == dict(teacher_forwards=0.0, seconds=0.0, bytes_stored=0.0)
    assert cost["runs/toy/ode"]["teacher_forwards"] == 2 * 48 * 4  # cond + uncond, 48 Euler steps, 4 clips
    assert cost["runs/toy/ode"]["bytes_stored"] > 0
    assert cost["runs/toy/cd"]["teacher_forwards"] == 2 * 2 * 2 and cost["runs/toy/cd"]["bytes_stored"] == 0
    for r, out_dir, use_ema in zip(rows, ("dmd_1step_from_tf", "dmd_1step_from_ode", "dmd_1step"),
                                   (True, False, True)):  # the ODE regression keeps no EMA
        assert r["stage3_checkpoint"] == f"runs/toy/{out_dir}/step_0000002", r["stage3_checkpoint"]
        with open(ws / r["stage3_checkpoint"] / "config.json") as f:
            run_config = json.load(f)["run_config"]
        assert run_config["generator_use_ema"] is use_ema and run_config["generator"] == r["stage2_run"]
        assert 0.0 <= r["total"] <= 1.0
