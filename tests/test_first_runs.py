"""What a new user meets first: the sampler decides from the checkpoint what it is (and refuses what would be a
wrong result), a missing run is one line naming the command that makes it, `--key value` works like
`--key=value`, and every stage starts from an official Causal-Forcing .pt with the architecture of model_preset."""
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import model as M
import sample
import stage1_teacher_forcing as S1
import stage2_causal_cd as S2
import stage3_asym_dmd as S3

REPO = Path(__file__).resolve().parents[1]


def tiny_model(causal, seed=0):
    torch.manual_seed(seed)
    cfg = M.WanConfig.from_preset("toy", num_layers=1, causal=causal)
    net = M.CausalWanModel(cfg)
    torch.nn.init.normal_(net.head.head.weight, std=0.02)  # a fresh head predicts 0; make outputs depend on inputs
    return net


def save_ours(net, root, stage):
    run_config = dict(text_encoder="toy", codec="toy", num_frames=3)
    return common.save_checkpoint(str(root), 1, {"model": net.state_dict()}, {"step": 1},
                                  {"model_config": asdict(net.cfg), "run_config": run_config, "stage": stage})


def save_official(state_dict, path, key="generator"):
    """The official release format: a torch.save'd dict {'generator' | 'generator_ema': state dict} whose keys
    carry the training wrapper's 'model.' prefix, and no config.json beside it."""
    torch.save({key: {f"model.{k}": v for k, v in state_dict.items()}}, path)
    return str(path)


# -----------------------------------------------------------------------------
# the sampler decides from the checkpoint what it is


@pytest.mark.parametrize("stage, fmt, use_ema, causal, kind", [
    ("stage3_dmd", "ours", False, True, "few_step"), ("stage2_cd", "ours", True, True, "few_step"),
    ("stage2_ode", "ours", False, True, "few_step"), ("stage1", "ours", True, True, "ar_diffusion"),
    ("stage1", "ours", False, False, "bidirectional"), (None, "wan", False, True, "bidirectional"),
    (None, "diffusers", False, True, "bidirectional"), (None, "ours", False, False, "bidirectional"),
    (None, "official-pt", True, True, "few_step"), (None, "official-pt", False, True, None)])
def test_checkpoint_kind(stage, fmt, use_ema, causal, kind):
    assert sample.checkpoint_kind(stage, fmt, use_ema, causal) == kind


def test_bidirectional_base_is_sampled_as_a_whole_clip_and_a_frame_wise_rollout_is_refused(tmp_path):
    base = save_ours(tiny_model(causal=False), tmp_path / "base", "stage1")
    model, info = sample.load_for_inference(base)
    assert info["kind"] == "bidirectional" and not model.cfg.causal
    how = sample.choose_sampling(info)
    assert how.mode == "multi_step" and how.sample_steps == 40 and how.cfg == 3.0
    with pytest.raises(sample.SampleError, match="bidirectional model") as error:
        sample.choose_sampling(info, steps=2)
    assert "\n" not in str(error.value)
    with pytest.raises(sample.SampleError, match="bidirectional model"):  # the first run, end to end
        sample.main(["--ckpt", base, "--prompt", "a red circle moves left quickly", "--steps", "2",
                     "--out", str(tmp_path / "out"), "--quiet"])
    assert not (tmp_path / "out").exists()


def test_sample_latents_runs_each_kind_through_its_own_sampler():
    """The dispatcher is pinned against model.py's samplers called directly (same process, same arithmetic)."""
    noise = torch.randn(2, 3, 12, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    uncond = torch.zeros_like(context)
    bidirectional, causal = tiny_model(causal=False).eval(), tiny_model(causal=True, seed=1).eval()
    how = sample.Sampling("multi_step", sample_steps=3, cfg=2.0)
    steps = M.timestep_grid(3, 5.0).tolist()
    assert torch.equal(sample.sample_latents(bidirectional, how, noise, context, uncond),
                       M.generate_bidirectional(bidirectional, noise, context, steps=steps, uncond_context=uncond,
                                                guidance_scale=2.0))
    assert torch.equal(sample.sample_latents(causal, how, noise, context, uncond),
                       M.generate(causal, noise, context, steps=steps, sampler="euler", uncond_context=uncond,
                                  guidance_scale=2.0))
    few = sample.Sampling()  # the defaults: 2 steps, first frame 4 steps, shift 5
    got = sample.sample_latents(causal, few, noise, context, generator=torch.Generator().manual_seed(2))
    want = M.generate(causal, noise, context, steps=M.warp_timesteps([1000, 500]),
                      first_block_steps=M.warp_timesteps([1000, 750, 500, 250]), generator=torch.Generator().manual_seed(2))
    assert torch.equal(got, want)
    with pytest.raises(AssertionError, match="causal"):
        sample.sample_latents(bidirectional, few, noise, context)


def test_official_pt_without_ema_must_say_what_it_is(tmp_path):
    """An official .pt with only 'generator' weights is the Stage-1 model or a student: refused in one line
    until --steps or --sample_steps says which; with 'generator_ema' (+ --use_ema) it is a student."""
    torch.manual_seed(0)
    net = M.CausalWanModel(M.WanConfig.from_preset("toy"))  # 'toy' supplies the architecture, as a preset
    plain = save_official(net.state_dict(), tmp_path / "plain.pt")
    ema = save_official(net.state_dict(), tmp_path / "ema.pt", key="generator_ema")
    _, info = sample.load_for_inference(plain, wan_dir="toy")
    assert info["kind"] is None and info["format"] == "official-pt"
    with pytest.raises(sample.SampleError, match="--steps 2 .* or --sample_steps 40") as error:
        sample.choose_sampling(info)
    assert "\n" not in str(error.value)
    assert sample.choose_sampling(info, steps=1).steps == (1000,)
    assert sample.choose_sampling(info, sample_steps=8).mode == "multi_step"
    model, info = sample.load_for_inference(ema, use_ema=True, wan_dir="toy")
    assert info["kind"] == "few_step" and sample.choose_sampling(info).steps == (1000, 500)
    reference = net.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


# -----------------------------------------------------------------------------
# a missing run: one line naming the command that makes it


def test_how_to_make_names_the_config_that_writes_a_run(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert common.how_to_make("runs/toy/tf") == "make it with: python stage1_teacher_forcing.py --config configs/toy/tf.yaml"
    assert common.how_to_make("runs/toy/cd/") == "make it with: python stage2_causal_cd.py --config configs/toy/cd.yaml"
    assert common.how_to_make("runs/toy/dmd_2step").endswith("stage3_asym_dmd.py --config configs/toy/dmd_2step.yaml")
    monkeypatch.setenv("WORLD_SIZE", "8")  # under torchrun the command is a torchrun command
    assert common.how_to_make("runs/tf") == \
        "make it with: torchrun --nproc_per_node=8 stage1_teacher_forcing.py --config configs/tf.yaml"
    assert common.how_to_make("runs/never_made_by_any_config") is None


def test_stage2_without_its_teacher_is_one_line(tmp_path):
    missing = str(tmp_path / "tf")
    with pytest.raises(common.CheckpointError, match="teacher .* not found"):
        S2.main(common.load_config(S2.Config, ["--config", str(REPO / "configs/toy/cd.yaml"), "--teacher", missing,
                                               "--out_dir", str(tmp_path / "cd")]))
    result = subprocess.run([sys.executable, str(REPO / "stage2_causal_cd.py"), "--config", "configs/toy/cd.yaml",
                             "--teacher", missing, "--out_dir", str(tmp_path / "cd")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("stage2_causal_cd.py: error: teacher (Stage-1 AR diffusion model)")


# -----------------------------------------------------------------------------
# --key value and --key=value


def test_key_value_with_a_space_equals_key_equals_value():
    spaced = common.load_config(S2.Config, ["--out_dir", "runs/x", "--lr", "1e-4", "--resume", "true",
                                            "--sample_steps", "[1000, 500]"])
    joined = common.load_config(S2.Config, ["--out_dir=runs/x", "--lr=1e-4", "--resume=true",
                                            "--sample_steps=[1000, 500]"])
    assert spaced == joined and spaced.out_dir == "runs/x" and spaced.lr == 1e-4 and spaced.resume is True
    neg = common.load_config(S3.Config, ["--dmd_min_t", "-1"])  # a value may start with a single dash
    assert neg.dmd_min_t == -1.0
    for argv, message in ((["--lr"], "--lr has no value"), (["--lr", "--out_dir=x"], "--lr has no value"),
                          (["lr=1"], "cannot parse argument")):
        with pytest.raises(common.ConfigError, match=message):
            common.load_config(S2.Config, argv)


# -----------------------------------------------------------------------------
# every stage starts from an official .pt, its architecture from model_preset


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from prepare_data import prepare_toy
    out = tmp_path_factory.mktemp("first_runs_data")
    prepare_toy(4, str(out), seed=0, shard_size=4)
    return str(out)


def official_toy_pt(path, causal, seed, key="generator"):
    torch.manual_seed(seed)
    net = M.CausalWanModel(M.WanConfig.from_preset("toy", causal=causal))
    return save_official(net.state_dict(), path, key), net.state_dict()


COMMON = dict(text_encoder="toy", codec="toy", device="cpu", mixed_precision="false",
              activation_checkpointing="false", max_steps=1, grad_accum=1, log_every=1, save_every=1, sample_every=0)


def args_of(**kw):
    return [f"--{k}={v}" for k, v in {**COMMON, **kw}.items()]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_stage_starts_from_official_pt_files(toy_data, tmp_path):
    """lr = 0 (and AdamW's decoupled weight decay scaled by it), so each saved network must equal the .pt it
    was initialised from: proof that the file was read, with the preset's architecture, not left at random init."""
    base_pt, base_sd = official_toy_pt(tmp_path / "base.pt", causal=False, seed=0)
    ar_pt, ar_sd = official_toy_pt(tmp_path / "ar.pt", causal=True, seed=1)
    student_pt, student_sd = official_toy_pt(tmp_path / "dmd.pt", causal=True, seed=2, key="generator_ema")

    out1 = str(tmp_path / "tf")
    S1.main(common.load_config(S1.Config, args_of(model_preset="toy", init_from=base_pt, data_dir=toy_data, lr=0.0,
                                                  batch_size=1, out_dir=out1)))
    assert same_weights(load_file(os.path.join(common.latest_checkpoint(out1), "model.safetensors")), base_sd)

    out2 = str(tmp_path / "cd")
    S2.main(common.load_config(S2.Config, args_of(model_preset="toy", teacher=ar_pt, data_dir=toy_data, lr=0.0,
                                                  batch_size=1, out_dir=out2)))
    assert same_weights(load_file(os.path.join(common.latest_checkpoint(out2), "model.safetensors")), ar_sd)

    out3 = str(tmp_path / "dmd")
    S3.main(common.load_config(S3.Config, args_of(
        model_preset="toy", real_model_preset="toy", generator=student_pt, generator_use_ema="true",
        real_score=base_pt, fake_score=base_pt, prompts=toy_data, num_frames=3, latent_height=16, latent_width=16,
        lr=0.0, critic_lr=0.0, critic_updates=1, batch_size=1, out_dir=out3)))
    saved = common.latest_checkpoint(out3)
    assert same_weights(load_file(os.path.join(saved, "model.safetensors")), student_sd)
    assert same_weights(load_file(os.path.join(saved, "critic.safetensors")), base_sd)

    # without the right preset the .pt does not fit, and that is one line, not a silent partial load
    with pytest.raises(common.CheckpointError, match="shape mismatch") as error:
        S2.main(common.load_config(S2.Config, args_of(teacher=ar_pt, data_dir=toy_data, out_dir=str(tmp_path / "x"))))
    assert "\n" not in str(error.value)
