"""Toy world: grammar, renderer, held-out split, pixel codec, toy text encoder, ToyBench."""

import pytest
import torch

import toyworld as tw

METRICS = tw.SEMANTIC_KEYS + tw.QUALITY_KEYS + ("drift", "quality", "semantic", "total")


@pytest.fixture(scope="module")
def train_set():
    return tw.sample_training_videos(48, seed=3)


@pytest.fixture(scope="module")
def heldout_set():
    prompts = tw.heldout_prompts()
    return torch.stack([tw.render(p, seed=i) for i, p in enumerate(prompts)]), prompts


# ---- constants the model preset agrees on ----

def test_agreed_constants():
    assert (tw.TOY_FRAMES, tw.TOY_SIZE, tw.TOY_LATENT_CHANNELS, tw.TOY_TEXT_DIM, tw.TOY_TEXT_LEN) == (12, 32, 12, 32, 16)


# ---- grammar and renderer ----

def test_prompt_round_trip_and_rejects():
    objs = [dict(colour="red", shape="circle", motion="left", speed="quickly"),
            dict(colour="blue", shape="square", motion="still", speed=None)]
    prompt = tw.make_prompt(objs)
    assert prompt == "a red circle moves left quickly and a blue square stays still"
    assert tw.parse_prompt(prompt) == objs
    assert tw.parse_prompt("a green triangle bounces slowly")[0]["motion"] == "bounce"
    for bad in ["a red circle moves sideways quickly", "a red circle stays still slowly",
                "a red circle moves left quickly and a red square stays still", "a dog runs"]:
        with pytest.raises((ValueError, AssertionError)):
            tw.parse_prompt(bad)


def test_render_is_deterministic_palette_only_and_in_frame(train_set):
    videos, prompts, meta = train_set
    assert videos.shape == (48, tw.TOY_FRAMES, 3, tw.TOY_SIZE, tw.TOY_SIZE)
    assert set(videos.unique().tolist()) == {-1.0, 1.0}, "pure palette colours only (exact in fp16)"
    again, prompts2, _ = tw.sample_training_videos(8, seed=3, start=40)
    assert torch.equal(again, videos[40:]) and prompts2 == prompts[40:], "video i depends only on (seed, i)"
    other, _, _ = tw.sample_training_videos(8, seed=4, start=40)
    assert not torch.equal(other, videos[40:])
    assert torch.equal(tw.render(prompts[0], seed=7), tw.render(prompts[0], seed=7))
    # every object is fully visible in every frame: its pixel count never changes
    for v, m in zip(videos, meta):
        obj = m["objects"][0]
        colour = torch.tensor(tw.COLOURS[obj["colour"]]) * 2 - 1
        count = (v == colour.view(1, 3, 1, 1)).all(1).sum((1, 2))
        if len(m["objects"]) == 1:
            assert (count == tw.TEMPLATE_AREA[obj["shape"]]).all(), f"{obj}: {count.tolist()}"


def test_speeds_and_bounce():
    still = dict(colour="red", shape="square", motion="still", speed=None)
    assert len(set(tw.trajectory(still, 5, 5))) == 1
    fast = tw.trajectory(dict(colour="red", shape="square", motion="left", speed="quickly"), 22, 3)
    slow = tw.trajectory(dict(colour="red", shape="square", motion="down", speed="slowly"), 3, 0)
    assert fast[1][0] - fast[0][0] == -2 and slow[1][1] - slow[0][1] == 1
    bounce = [y for _, y in tw.trajectory(dict(colour="red", shape="square", motion="bounce", speed="quickly"), 0, 14)]
    k = bounce.index(max(bounce))
    assert max(bounce) == tw.MAX_POS and 0 < k < tw.TOY_FRAMES - 1 and bounce[-1] < bounce[k]
    with pytest.raises(AssertionError):   # a linear motion that would leave the frame is a bug, not clipped
        tw.trajectory(dict(colour="red", shape="square", motion="left", speed="quickly"), 10, 0)


def test_heldout_combinations_never_in_training():
    _, prompts, meta = tw.sample_training_videos(300, seed=0)
    triples = {(o["colour"], o["shape"], o["motion"]) for m in meta for o in m["objects"]}
    assert not triples & set(tw.HELDOUT)
    assert len(triples) > 90, "the rest of the grid is covered"
    assert any(" and " in p for p in prompts), "two-object clips occur"
    heldout = tw.heldout_prompts()
    assert len(heldout) == 23 and not set(heldout) & set(prompts)
    assert all(tw.is_heldout(tw.parse_prompt(p)[0]) for p in heldout)


# ---- codec ----

def test_codec_round_trip_is_exact(train_set):
    codec = tw.ToyCodec()
    videos = train_set[0][:4]
    z = codec.encode(videos)
    assert z.shape == (4, tw.TOY_FRAMES, tw.TOY_LATENT_CHANNELS, tw.TOY_LATENT_SIZE, tw.TOY_LATENT_SIZE)
    assert torch.equal(codec.decode(z), videos)
    assert torch.equal(codec.decode(z.half().float()), videos), "fp16 shards are lossless"
    # space-to-depth: channel (c, i, j) of latent pixel (y, x) is pixel (2y+i, 2x+j) of channel c
    assert z[0, 3, 2 * 4 + 1 * 2 + 0, 5, 7] == videos[0, 3, 2, 2 * 5 + 1, 2 * 7 + 0]
    decoder = codec.stream_decoder()
    streamed = torch.cat([decoder.decode_next(z[:, i:i + 1]) for i in range(z.shape[1])], 1)
    assert torch.equal(streamed, videos)
    assert codec.frames_to_latent_frames(12) == 12 and (codec.spatial_factor, codec.temporal_factor) == (2, 1)


# ---- text encoder ----

def test_toy_text_encoder_deterministic_padded_and_distinct():
    prompts = ["a red circle moves left quickly", "a red circle moves right quickly",
               "a red circle moves left quickly and a blue square stays still", tw.TOY_NEGATIVE_PROMPT]
    enc = tw.ToyTextEncoder()
    e = enc.encode(prompts)
    assert e.shape == (4, tw.TOY_TEXT_LEN, tw.TOY_TEXT_DIM) and e.dtype == torch.float32
    lengths = [7, 7, 13, 1]   # words + </s>
    for b, n in enumerate(lengths):
        assert (e[b, n:] == 0).all() and (e[b, :n].abs().sum(-1) > 0).all(), f"row {b}"
    assert torch.equal(e, tw.ToyTextEncoder().encode(prompts)), "same weights from the fixed seed"
    assert (e[0] - e[1]).abs().max() > 0.1, "one word apart must give different embeddings"
    # pin the weights: shipped toy checkpoints depend on these exact embeddings
    assert abs(e[0].abs().sum().item() - 178.98499) < 1e-2, e[0].abs().sum().item()
    with pytest.raises(AssertionError):
        enc.encode(["a red dog moves left quickly"])


# ---- ToyBench ----

def test_ground_truth_scores_perfect(train_set, heldout_set):
    for videos, prompts in [train_set[:2], heldout_set]:
        s = tw.score(videos, prompts)
        for k in METRICS:
            assert s[k] >= 0.95, f"{k} = {s[k]}"
        assert len(s["per_video"]) == len(prompts)


def test_noise_and_blank_score_low(heldout_set):
    videos, prompts = heldout_set
    noise = torch.rand(videos.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blank = -torch.ones_like(videos)
    for name, v in [("noise", noise), ("blank", blank)]:
        s = tw.score(v, prompts)
        assert s["total"] < 0.3 and s["semantic"] < 0.05 and s["persistence"] < 0.05, f"{name}: {s['total']}"
    assert tw.score(noise, prompts)["background"] < 0.05


def test_targeted_failures():
    prompt = "a red circle moves left quickly"
    video = tw.render(prompt, seed=0)[None]
    assert tw.score(video, [prompt])["total"] == 1.0
    wrong_colour = tw.score(video, ["a blue circle moves left quickly"])
    assert wrong_colour["colour"] == 0.0
    assert tw.score(video, ["a red square moves left quickly"])["shape"] < 0.05
    assert tw.score(video, ["a red circle moves left slowly"])["speed"] == 0.0
    reversed_ = tw.score(video.flip(1), [prompt])
    assert reversed_["direction"] == 0.0 and reversed_["colour"] == 1.0
    frozen = tw.score(video[:, :1].expand_as(video).contiguous(), [prompt])
    assert frozen["dynamic_degree"] == 0.0 and frozen["direction"] == 0.0
    # a still prompt is excluded from the dynamic degree, and a still clip passes its direction check
    still = "a green square stays still"
    s = tw.score(tw.render(still, seed=1)[None], [still])
    assert s["dynamic_degree"] is None and s["direction"] == 1.0 and s["total"] == 1.0


def test_robust_to_mild_noise_and_drift_detects_decay(heldout_set):
    videos, prompts = heldout_set
    noisy = (videos + 0.1 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    assert tw.score(noisy, prompts)["total"] > 0.95
    decayed = videos.clone()
    decayed[:, 8:] = -1   # objects vanish in the last third
    s = tw.score(decayed, prompts)
    assert s["drift"] < 0.6 and s["drift_gap"] > 0.4


def test_table(capsys, heldout_set):
    videos, prompts = heldout_set
    tw.print_table({"ground truth": tw.score(videos[:3], prompts[:3])})
    out = capsys.readouterr().out
    assert "ground truth" in out and "100.0" in out and "total" in out


def test_aggregate_by_hand_and_bootstrap_standard_error():
    def video(value, **overrides):
        return {**{k: value for k in tw.SEMANTIC_KEYS + tw.QUALITY_KEYS + ("drift", "drift_gap")}, **overrides}
    # semantic (1 + 0.5 + 0 + 1)/4 = 0.625; quality over the defined metrics (1 + 0.5 + 0.5)/3, dynamic None
    s = tw.aggregate([video(1.0, shape=0.5, direction=0.0, background=0.5, consistency=0.5, dynamic_degree=None)])
    assert s["semantic"] == 0.625 and abs(s["quality"] - 2 / 3) < 1e-12
    assert abs(s["total"] - (4 * 2 / 3 + 0.625) / 5) < 1e-12
    # 20 perfect and 20 failed videos: the total is the fraction of perfect ones, a Bernoulli(1/2) mean over 40
    # videos, whose standard error is sqrt(0.25 / 40) = 0.0791; identical videos have none
    mixed = [video(1.0)] * 20 + [video(0.0)] * 20
    assert tw.aggregate(mixed)["total"] == 0.5
    assert abs(tw.bootstrap_standard_error(mixed) - 0.0791) < 0.008
    assert tw.bootstrap_standard_error([video(0.7)] * 10) < 1e-12
