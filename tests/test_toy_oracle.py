"""The toy world's exact (Bayes) denoiser, and the CPU precision choice of training."""
import math
import os
import random

import pytest
import torch

import common
import model as M
import toyworld as tw

MOVES = [dict(colour="red", shape="circle", motion="left", speed="quickly"),
         dict(colour="blue", shape="square", motion="up", speed="slowly"),
         dict(colour="green", shape="triangle", motion="bounce", speed="quickly"),
         dict(colour="cyan", shape="circle", motion="still", speed=None)]


@pytest.mark.parametrize("obj", MOVES, ids=lambda o: o["motion"])
def test_start_positions_are_exactly_what_the_renderer_draws(obj):
    rng = random.Random(0)
    drawn = {tw._random_start(obj, rng) for _ in range(20000)}
    assert drawn == set(tw.start_positions(obj)), "the exact denoiser's prior must be the renderer's"


def test_exact_x0_by_hand():
    # two candidates ±1 in one dimension, x_t = 0.3, σ = 0.5: the likelihood ratio is
    # exp(-(0.3 - 0.5)² / 0.5) / exp(-(0.3 + 0.5)² / 0.5) = e^1.2, so E[x0] = tanh(0.6)
    x0 = tw.exact_x0(torch.tensor([0.3]), 0.5, torch.tensor([[1.0], [-1.0]]))
    assert abs(x0.item() - math.tanh(0.6)) < 1e-6


def test_exact_x0_limits():
    obj = MOVES[0]
    cands = tw.ToyCodec().encode(tw.candidate_clips(obj)).flatten(1)        # [N, D] latents
    true = cands[17]
    noise = torch.randn(true.shape, generator=torch.Generator().manual_seed(0))
    # σ -> 0: the posterior collapses on the clip that was noised
    x_t = 0.99 * true + 0.01 * noise
    assert torch.equal(tw.exact_x0(x_t, 0.01, cands), true)
    # σ = 1: x_t carries no information, the answer is the prompt's mean clip
    assert torch.allclose(tw.exact_x0(noise, 1.0, cands), cands.mean(0), atol=1e-6)


def test_exact_denoiser_beats_the_shipped_base():
    """The Bayes estimator has the lowest expected loss of any denoiser: on the same draws it must not lose to
    a trained model (averaged over clips; the margin at σ 0.9 is ~20x for the shipped base)."""
    torch.manual_seed(0)
    net = M.CausalWanModel(M.config_from_checkpoint("checkpoints/toy/base"))
    M.load_weights(net, "checkpoints/toy/base")
    net.eval()
    codec, text = tw.ToyCodec(), tw.ToyTextEncoder()
    rng = random.Random(1)
    objs = [dict(MOVES[i % 2], colour=c) for i, c in enumerate(["red", "green", "blue", "white"])]
    x0 = codec.encode(torch.stack([tw.draw([o], tw.place([o], rng)) for o in objs]))   # [4, T, C, h, w]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    sigma = 0.9
    t = torch.full(x0.shape[:2], sigma * 1000)
    x_t = M.add_noise(x0, noise, t)
    with torch.no_grad():
        v = net(x_t, t, text.encode([tw.make_prompt([o]) for o in objs]), causal=False)
    model_loss = (v - (noise - x0)).pow(2).mean().item()
    exact = torch.stack([tw.exact_x0(x_t[i].flatten(), sigma, codec.encode(tw.candidate_clips(o)).flatten(1))
                         for i, o in enumerate(objs)]).view_as(x0)
    exact_loss = ((exact - x0) ** 2).mean().item() / sigma ** 2   # v-space: v̂ - v = (x0 - x̂0) / σ
    assert exact_loss < model_loss, (exact_loss, model_loss)


# ---- precision of CPU training ----

def test_compute_dtype_follows_the_cpu(monkeypatch):
    cpu = common.Dist(device=torch.device("cpu"))
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: True)
    assert common.compute_dtype(cpu, True) == torch.bfloat16
    assert common.compute_dtype(cpu, False) == torch.float32, "mixed_precision=false pins fp32 on any CPU"
    with common.autocast_context(cpu, True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: False)
    assert common.compute_dtype(cpu, True) == torch.float32
    with common.autocast_context(cpu, True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs /proc/cpuinfo to read the CPU flags")
def test_native_bf16_detection_agrees_with_the_cpu_flags():
    with open("/proc/cpuinfo") as f:
        flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    assert common.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags), flags


def test_oracle_gap_of_the_exact_denoiser_is_one():
    """toy_eval.oracle_gap against a 'model' that is the exact denoiser itself (v = (x_t − x̂0)/σ) and ignores the
    prompt: its loss equals the exact loss (gap 1), and the direction word is worth nothing to it."""
    import toy_eval
    codec, text = tw.ToyCodec(), tw.ToyTextEncoder()
    objs = [dict(colour="red", shape="circle", motion="left", speed="quickly"),
            dict(colour="blue", shape="square", motion="down", speed="quickly")]
    rng = random.Random(3)
    x0 = codec.encode(torch.stack([tw.draw([o], tw.place([o], rng)) for o in objs]))
    cands = [codec.encode(tw.candidate_clips(o)).flatten(1) for o in objs]
    opened = [codec.encode(torch.cat([tw.candidate_clips(dict(o, motion=m)) for m in ("left", "right", "up", "down")])).flatten(1)
              for o in objs]

    def candidates(i, open_direction):
        return opened[i] if open_direction else cands[i]

    def exact_model(x_t, t, context, causal):   # one call holds every clip (batch_size 16 > 2 clips)
        sigma = t[0, 0].item() / 1000
        x0_hat = torch.stack([tw.exact_x0(x.flatten(), sigma, cands[i]) for i, x in enumerate(x_t)])
        return (x_t - x0_hat.view_as(x_t)) / sigma

    # at σ <= 0.9 both losses are ~1e-12 here (the clip is found exactly) and their ratio is rounding noise
    rows = toy_eval.oracle_gap(exact_model, text, x0, [tw.make_prompt([o]) for o in objs], candidates,
                               [0.97, 0.95], seed=5)
    for sigma, r in rows.items():
        assert abs(r["gap"] - 1) < 1e-4, (sigma, r)
        assert r["direction_model"] == 0.0 and r["direction_exact"] >= 0.0, (sigma, r)
    assert rows[0.95]["exact"] < rows[0.95]["exact_open"], "knowing the direction must help at high noise"


@pytest.fixture(scope="module")
def probe():
    """experiments/toy_world_probe.py as a module (experiments/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("probe", "experiments/toy_world_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("world", ["torus", "comet"])
def test_probe_worlds_judge_their_own_ground_truth(world, probe):
    """experiments/toy_world_probe.py: its direction judge passes ground-truth clips of every motion (across the
    wrap-around) and fails them reversed, and the exact denoiser's candidates contain the clip itself."""
    for motion, speed in (("left", "quickly"), ("right", "slowly"), ("up", "slowly"), ("down", "quickly"), ("still", None)):
        obj = dict(colour="red", shape="square", motion=motion, speed=speed)
        clip = probe.draw([obj], [(29, 30)], world)   # starts at the corner: the object wraps in the first frames
        prompt = tw.make_prompt([obj])
        assert probe.judge_direction(clip, prompt) == (1.0, 1.0), (world, prompt)
        if motion != "still":
            assert probe.judge_direction(clip.flip(0), prompt)[0] == 0.0, (world, prompt)
        cands = probe.candidates(obj, world)
        assert (cands == clip).flatten(1).all(1).sum() == 1, "the clip is exactly one of the candidates"


@pytest.mark.parametrize("world", ["v1", "torus"])
def test_transport_diagnostic_gives_frame_zero_clean_and_scores_the_rest(world, probe, monkeypatch, tmp_path):
    """experiments/toy_world_probe.py transport: frame 0 reaches the model clean (t = 0, the clip itself),
    frames 1.. at σ; the per-frame losses cover frames 1.. only; a model blind to the text scores the true and
    the flipped prompt the same."""
    import argparse
    import json

    import toy_eval
    seen = []

    class TextBlind(torch.nn.Module):
        def forward(self, x_t, t, context, causal):
            assert causal is False
            seen.append((x_t.clone(), t.clone()))
            return torch.zeros_like(x_t)

    monkeypatch.setattr(toy_eval, "load_model", lambda path, use_ema: (TextBlind(), path))
    out = tmp_path / "t.json"
    args = argparse.Namespace(ckpt="fake", use_ema=False, world=world, clips=3, sigmas="0.9", json=str(out))
    probe.transport(args)
    rows = json.loads(out.read_text())["rows"]["0.9"]
    assert len(rows["true"]) == tw.TOY_FRAMES - 1 and rows["true"] == rows["flipped"]
    x_t, t = seen[0]
    assert (t[:, 0] == 0).all() and (t[:, 1:] == 900.0).all()
    clean = tw.ToyCodec().decode(x_t[:, :1])   # a rendered frame: every pixel exactly -1 or +1
    assert ((clean.abs() - 1).abs() < 1e-6).all()
