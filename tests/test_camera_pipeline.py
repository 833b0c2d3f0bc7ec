"""The action-conditioned world model (paper §3.3) through the three stages: the Stage-2/3 losses and the
self-rollout pass every frame's camera to every network call (checked against manual computations), and the
CLIs run end to end on camera-world shards (base -> teacher forcing -> causal CD -> DMD), refusing data and
models that disagree about cameras."""
import os

import pytest
import torch
from helpers import REPO, cli_args, read_metrics, run_script, tiny_checkpoint

import model as M
import stage2_causal_cd as S2
import stage3_asym_dmd as S3
from test_camera import camera_model, conditioning, random_cameras
from test_model import REORDER_TOL, rel_err

# ---- the losses with cameras, against manual computations ----


def test_cd_loss_with_cameras_equals_manual_computation():
    student, ema, teacher = camera_model(1, seed=0), camera_model(1, seed=1), camera_model(1, seed=2)
    g = torch.Generator().manual_seed(0)
    x_gt, noise = torch.randn(2, 3, 4, 4, 6, generator=g), torch.randn(2, 3, 4, 4, 6, generator=g)
    cond, uncond = torch.randn(2, 8, 16, generator=g), torch.randn(2, 8, 16, generator=g)
    t, t_next = torch.tensor([[937.5] * 3, [625.0] * 3]), torch.tensor([[930.0] * 3, [600.0] * 3])
    cameras = random_cameras(g, 2, 3)
    loss, _ = S2.cd_loss(student, ema, teacher, x_gt, noise, t, t_next, cond, uncond, 3.0, torch.ones(2), cameras)
    with torch.no_grad():
        sig = lambda tt: (tt / 1000).view(2, 3, 1, 1, 1)  # noqa: E731
        run = lambda m, x, tt, c: m(x, tt, c, clean_x=x_gt, cameras=cameras)  # noqa: E731
        x_t = (1 - sig(t)) * x_gt + sig(t) * noise
        v = run(teacher, x_t, t, uncond) + 3 * (run(teacher, x_t, t, cond) - run(teacher, x_t, t, uncond))
        x_hat = x_t - (sig(t) - sig(t_next)) * v
        target = x_hat - sig(t_next) * run(ema, x_hat, t_next, cond)
        prediction = x_t - sig(t) * run(student, x_t, t, cond)
        expected = (prediction - target).pow(2).mean()
        without = S2.cd_loss(student, ema, teacher, x_gt, noise, t, t_next, cond, uncond, 3.0, torch.ones(2))[0]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(without.item() - expected.item()) > 1e-3 * expected.item()  # the cameras did reach the networks


def test_self_rollout_with_cameras_equals_generate_with_cameras():
    model = camera_model(1, seed=3).eval()
    g = torch.Generator().manual_seed(1)
    noise, context = torch.randn(2, 4, 4, 4, 6, generator=g), torch.randn(2, 8, 16, generator=g)
    cameras = random_cameras(g, 2, 4)
    two, four = M.warp_timesteps([1000, 500]), M.warp_timesteps([1000, 750, 500, 250])
    with torch.no_grad():
        ours = S3.self_rollout(model, noise, context, two, four, exit_first=3, exit_other=1,
                               generator=torch.Generator().manual_seed(5), cameras=cameras)
    reference = M.generate(model, noise, context, steps=two, first_block_steps=four,
                           generator=torch.Generator().manual_seed(5), cameras=cameras)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_dmd_scores_with_cameras_equal_manual_computation():
    real, fake = camera_model(1, seed=4), camera_model(1, seed=5)
    g = torch.Generator().manual_seed(2)
    x, noise = torch.randn(2, 3, 4, 4, 6, generator=g), torch.randn(2, 3, 4, 4, 6, generator=g)
    cond, uncond = torch.randn(2, 8, 16, generator=g), torch.randn(2, 8, 16, generator=g)
    t = torch.full((2, 3), 700.0)
    cameras = random_cameras(g, 2, 3)
    with torch.no_grad():
        run = lambda m, c, xx: m(xx, t, c, causal=False, cameras=cameras)  # noqa: E731
        x_real = S3.real_score_x0(real, x, t, cond, uncond, 4.0, cameras)
        v = run(real, uncond, x) + 4.0 * (run(real, cond, x) - run(real, uncond, x))
        assert rel_err(x_real, x - 0.7 * v) <= REORDER_TOL * conditioning(cameras)
        critic = S3.critic_loss(fake, x, noise, t, cond, cameras)
        x_t = 0.3 * x + 0.7 * noise
        expected = (run(fake, cond, x_t) - (noise - x)).pow(2).mean()
    assert critic.item() == pytest.approx(expected.item(), rel=1e-5)


# ---- the CLIs on camera-world shards ----


def stage_args(**values):
    common = dict(text_encoder="toy", codec="toy", device="cpu", mixed_precision=False, activation_checkpointing=False,
                  batch_size=2, grad_accum=1, max_steps=1, log_every=1, save_every=1, sample_every=1, num_samples=2)
    return cli_args(**{**common, **values})


@pytest.fixture(scope="module")
def camera_data(tmp_path_factory):
    from prepare_data import prepare_toy
    root = tmp_path_factory.mktemp("camera")
    prepare_toy(4, str(root / "camera"), seed=0, shard_size=4, world="camera")
    prepare_toy(4, str(root / "plain"), seed=0, shard_size=4)
    return root


@pytest.mark.parametrize("frames_per_block", [1, 3], ids=["frame-wise 2-step", "chunk-wise 4-step"])
def test_camera_pipeline_runs_end_to_end_and_logs_the_pan_error(camera_data, frames_per_block):
    # frame-wise 2-step (beyond the paper) and the paper's own chunk-wise 4-step world model (§3.3)
    root = camera_data / f"blocks_of_{frames_per_block}"
    data = str(camera_data / "camera")
    base = tiny_checkpoint(root / "base", seed=0, causal=False, stage="stage1", camera_dims=8)
    steps, first_block = ("[1000,500]", "[1000,750,500,250]") if frames_per_block == 1 else ("[1000,750,500,250]", "[]")
    run_script(REPO / "stage1_teacher_forcing.py", stage_args(
        model_preset="toy", init_from=base, causal=False, data_dir=data, out_dir=root / "base_run", sample_steps=2))
    run_script(REPO / "stage1_teacher_forcing.py", stage_args(
        init_from=base, causal=True, frames_per_block=frames_per_block, data_dir=data, out_dir=root / "tf",
        sample_steps=2))
    run_script(REPO / "stage2_causal_cd.py", stage_args(teacher=str(root / "tf"), data_dir=data, out_dir=root / "cd"))
    run_script(REPO / "stage3_asym_dmd.py", stage_args(
        generator=str(root / "cd"), real_score=base, fake_score=base, prompts=data, num_frames=12, latent_height=16,
        latent_width=16, denoising_steps=steps, first_block_steps=first_block, out_dir=root / "dmd"))
    for run in ("base_run", "tf", "cd", "dmd"):
        rows = [r for r in read_metrics(root / run) if "toybench/pan_error" in r]
        assert rows and 0 <= rows[-1]["toybench/pan_error"] < 10, run
        assert os.path.exists(root / run / "samples_0000001.png")
        config = M.config_from_checkpoint(str(root / run / "step_0000001"))
        assert config.camera_dims == 8, run
        assert config.frames_per_block == (1 if run == "base_run" else frames_per_block), run


def test_camera_channels_can_be_added_to_a_plain_base_and_mismatches_are_one_line_errors(camera_data):
    root = camera_data
    plain_base = tiny_checkpoint(root / "plain_base", seed=0, causal=False, stage="stage1")
    out = run_script(REPO / "stage1_teacher_forcing.py", stage_args(
        init_from=plain_base, causal=False, camera_dims=8, data_dir=str(root / "camera"), out_dir=root / "added",
        sample_every=0))
    assert "camera_dims=8" in out
    import subprocess
    import sys

    def fails(script, args):
        result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, capture_output=True, text=True)
        assert result.returncode != 0
        return result.stderr.strip().splitlines()[-1]
    message = fails("stage1_teacher_forcing.py", stage_args(
        init_from=str(root / "added"), causal=True, data_dir=str(root / "plain"), out_dir=root / "x"))
    assert "has no cameras" in message and "--world camera" in message
    message = fails("stage1_teacher_forcing.py", stage_args(
        init_from=plain_base, causal=True, data_dir=str(root / "camera"), out_dir=root / "y"))
    assert "carries cameras but the model has none" in message
    message = fails("stage1_teacher_forcing.py", stage_args(
        init_from=plain_base, camera_dims=6, data_dir=str(root / "camera"), out_dir=root / "z"))
    assert "multiple of 4" in message
    message = fails("stage3_asym_dmd.py", stage_args(
        generator=str(root / "added"), generator_use_ema=False, real_score=plain_base, fake_score=plain_base,
        prompts=str(root / "camera"), num_frames=12, latent_height=16, latent_width=16, out_dir=root / "w"))
    assert "must all take cameras or none" in message


# ---- toy_eval.py camera ----


def test_toy_eval_camera_scores_the_ground_truth_perfectly_and_a_frozen_clip_by_its_pans(tmp_path):
    import toy_eval
    import toyworld as tw
    items = [item for item in tw.camera_eval_set(1) if item["prompt"] in tw.heldout_prompts()[:4]]
    truth = torch.stack([tw.render_camera_clip(i["prompt"], i["seed"], pans=i["pans"])["video"] for i in items])
    row = toy_eval.camera_rows(truth, items)
    assert row["pan_error"] == 0.0 and row["semantic"] == 1.0 and row["revisit"] > 0.8
    frozen = truth[:, :1].expand_as(truth)  # ignores the camera: off by the commanded pan, every frame
    moving = [i for i, item in enumerate(items) if item["kind"] != "still"]
    expected = sum(sum((dx * dx + dy * dy) ** 0.5 for dx, dy in items[i]["pans"]) / 11 for i in moving) / len(moving)
    assert toy_eval.camera_rows(frozen, items)["pan_error"] == pytest.approx(expected, rel=1e-5)
    ckpt = tiny_checkpoint(tmp_path / "camera", seed=0, num_frames=12, camera_dims=8)
    png = str(tmp_path / "steered.png")
    rows = toy_eval.main(["camera", "--ckpt", ckpt, "--steps", "1", "--samples", "1", "--json", str(tmp_path / "c.json"),
                          "--png", png])
    assert list(rows)[:2] == ["ground truth", "ground truth, camera ignored"] and len(rows) == 3
    import imageio.v3 as iio
    strip = torch.from_numpy(iio.imread(png))  # 4 paths x (ground truth, generated) rows, 12 frames, scale 2
    assert strip.shape == (8 * 2 * tw.TOY_SIZE, 12 * 2 * tw.TOY_SIZE, 3)
    first = items[[i for i, item in enumerate(items) if item["kind"] != "still"][0]]  # the first pan path
    row = tw.render_camera_clip(first["prompt"], first["seed"], pans=first["pans"])["video"]  # [T, 3, H, W]
    expected = ((row.permute(2, 0, 3, 1).reshape(tw.TOY_SIZE, -1, 3) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(strip[:2 * tw.TOY_SIZE:2, ::2], expected)  # the top row is that path's ground truth
    plain = tiny_checkpoint(tmp_path / "plain", seed=0, num_frames=12)
    with pytest.raises(SystemExit, match="takes no cameras"):
        toy_eval.main(["camera", "--ckpt", plain, "--steps", "1", "--samples", "1"])
