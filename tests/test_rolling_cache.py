"""The rolling KV cache and the Rollout primitive (model.py): windowed cache == recomputation over the visible
frames, eviction keeps the sink, RoPE positions are slot indices, rollouts past the RoPE range, prompt switching."""
import pytest
import torch

import model as M

H, W = 4, 6  # latent grid: 2x3 tokens per frame


def tiny_model(num_layers=2, frames_per_block=1, rope_max_positions=1024, seed=0):
    """A small Wan-shaped model with every parameter random (Wan zero-inits the output head)."""
    torch.manual_seed(seed)
    cfg = M.WanConfig(in_dim=4, out_dim=4, dim=48, ffn_dim=96, freq_dim=32, text_dim=16, text_len=8, num_heads=2,
                      num_layers=num_layers, frames_per_block=frames_per_block, rope_max_positions=rope_max_positions)
    model = M.CausalWanModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def latents(model, num_frames, seed, B=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, num_frames, model.cfg.in_dim, H, W, generator=g)


def contexts(model, seed, B=2):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(B, model.cfg.text_len, model.cfg.text_dim, generator=g)
    context[:, 5:] = 0  # zero-padded after the prompt
    return context


# ---- windowed cache == recomputation ----


@pytest.mark.parametrize("frames_per_block,window,sink", [(1, 4, 1), (1, 5, 2), (2, 6, 2), (1, 3, 0)])
def test_windowed_cache_equals_recomputation_over_the_visible_frames(frames_per_block, window, sink):
    """After every eviction, the block at frame f run against the rolled cache equals a fresh block-causal forward
    over [the visible clean frames (sink, then the window), the block] at positions 0..n-1. One layer: a layer-0
    key/value depends only on its own frame, so the rolled cache must hold exactly what the recomputation holds
    (with more layers a window frame's deeper keys also remember frames it saw before they were evicted — the
    same in every rolling cache — so there the comparison would not be an identity)."""
    model = tiny_model(num_layers=1, frames_per_block=frames_per_block)
    K = frames_per_block
    clean, noisy, context = latents(model, 14, 1), latents(model, K, 2), contexts(model, 3)
    cache = M.KVCache(model.cfg, 2, window, model.tokens_per_frame(H, W), sink_frames=sink)
    zeros = torch.zeros(2, K)
    checked = 0
    with torch.no_grad():
        for f0 in range(0, clean.shape[1], K):
            # the next block at t=500 against the rolled cache, then its clean context pass (as a rollout does)
            out = model(noisy, torch.full((2, K), 500.0), context, cache=cache, start_frame=f0)
            visible = [f for f in cache.slot_frames if f < f0]  # what the block saw besides itself
            expected_visible = list(range(min(sink, f0))) + list(range(max(sink, f0 - (window - K - min(sink, f0))), f0))
            assert visible == sorted(set(expected_visible)), (f0, visible)
            sequence = torch.cat([clean[:, visible], noisy], dim=1)  # [B, n, C, H, W]
            t = torch.cat([torch.zeros(2, len(visible)), torch.full((2, K), 500.0)], dim=1)
            reference = model(sequence, t, context, causal=True)[:, -K:]
            # fp32 on both sides, same weights and inputs; only the summation order of the attention over <= 6x6
            # keys and of the matmuls differs (masked SDPA vs unmasked), a few ulps of O(1) outputs (~1e-7 each)
            assert (out - reference).abs().max().item() <= 1e-5, f0
            model(clean[:, f0:f0 + K], zeros, context, cache=cache, start_frame=f0)
            checked += int(f0 + K > window)
    assert checked >= 3, "the test must cover several evictions"


def test_rolling_cache_equals_the_absolute_cache_until_the_first_eviction():
    """Slots = absolute frames while nothing has been evicted: a whole rollout with a rolling cache as long as the
    video is bit-identical to the absolute cache (same ops on the same numbers; only where the rotation happens
    differs), for a multi-layer model, also with CFG and context noise."""
    model = tiny_model(num_layers=3)
    noise, context, uncond = latents(model, 6, 1), contexts(model, 2), contexts(model, 3)
    kw = dict(steps=[1000.0, 600.0], first_block_steps=[1000.0, 800.0, 400.0], uncond_context=uncond,
              guidance_scale=2.0, context_t=50.0)
    absolute = M.generate(model, noise, context, generator=torch.Generator().manual_seed(5), **kw)
    rolling = M.generate(model, noise, context, generator=torch.Generator().manual_seed(5), window=6, sink_frames=1,
                         **kw)
    assert torch.equal(absolute, rolling)
    shorter = M.generate(model, noise, context, generator=torch.Generator().manual_seed(5), window=4, sink_frames=1,
                         **kw)
    assert torch.equal(shorter[:, :4], absolute[:, :4]) and not torch.equal(shorter[:, 4:], absolute[:, 4:])


# ---- eviction, positions, bounded memory ----


def test_eviction_keeps_the_sink_and_the_most_recent_frames():
    model = tiny_model(num_layers=2)
    context = contexts(model, 2)
    S = model.tokens_per_frame(H, W)
    cache = M.KVCache(model.cfg, 2, 5, S, sink_frames=2)
    clean = latents(model, 20, 1)
    buffers = (cache.k.data_ptr(), cache.v.data_ptr(), cache.nbytes())
    with torch.no_grad():
        for f in range(20):
            model(clean[:, f:f + 1], torch.zeros(2, 1), context, cache=cache, start_frame=f)
            if f == 1:
                sink_k, sink_v = cache.k[:, :, :2 * S].clone(), cache.v[:, :, :2 * S].clone()
            expected = list(range(f + 1)) if f < 5 else [0, 1, f - 2, f - 1, f]
            assert cache.slot_frames == expected, (f, cache.slot_frames)
    assert torch.equal(cache.k[:, :, :2 * S], sink_k) and torch.equal(cache.v[:, :, :2 * S], sink_v), \
        "the sink's keys/values changed during eviction"
    assert (cache.k.data_ptr(), cache.v.data_ptr(), cache.nbytes()) == buffers, "the cache was reallocated"
    assert cache.filled_frames == 20
    # the window frames sit in slot order: slot 4 holds frame 19, whose layer-0 keys depend on frame 19 alone
    fresh = M.KVCache(model.cfg, 2, 5, S, sink_frames=2)
    with torch.no_grad():
        model(clean[:, 19:20], torch.zeros(2, 1), context, cache=fresh, start_frame=0)
    assert torch.equal(cache.v[0, :, 4 * S:5 * S], fresh.v[0, :, :S])


def test_rope_positions_are_slot_indices():
    """Keys are rotated at their slot (sink 0..s-1, window after it, the query block last), never at the absolute
    frame: the visible keys' table is rope_angles over slots 0..n-1, and shifting every absolute frame number by
    500 changes nothing."""
    model = tiny_model(num_layers=2)
    context, clean, noisy = contexts(model, 2), latents(model, 9, 1), latents(model, 1, 3)
    S = model.tokens_per_frame(H, W)
    outputs = []
    for offset in (0, 500):
        cache = M.KVCache(model.cfg, 2, 4, S, sink_frames=1)
        with torch.no_grad():
            model(clean[:, :1], torch.zeros(2, 1), context, cache=cache, start_frame=offset)  # the sink
            for f in range(1, 9):
                model(clean[:, f:f + 1], torch.zeros(2, 1), context, cache=cache, start_frame=offset + f)
            outputs.append(model(noisy, torch.full((2, 1), 700.0), context, cache=cache, start_frame=offset + 9))
        assert cache.slot_frames == [offset, offset + 7, offset + 8, offset + 9]
        angles = M.rope_angles(model.cfg.head_dim, 4, H // 2, W // 2, 0)  # [4·S, d/2]: slots 0..3
        assert torch.equal(cache.key_rope[0], torch.cos(angles).float())
        assert torch.equal(cache.key_rope[1], torch.sin(angles).float())
    assert torch.equal(outputs[0], outputs[1])


def test_rollout_runs_past_the_rope_range_with_a_rolling_cache_only():
    model = tiny_model(num_layers=1, rope_max_positions=8)
    noise, context = latents(model, 24, 1, B=1), contexts(model, 2, B=1)
    video = M.generate(model, noise, context, steps=[1000.0], window=6, sink_frames=1)
    assert video.shape == noise.shape and torch.isfinite(video).all()
    with pytest.raises(AssertionError, match="RoPE range"):
        M.generate(model, noise, context, steps=[1000.0])


def test_rolling_cache_refuses_gradients_and_bad_writes():
    model = tiny_model(num_layers=1)
    context, x = contexts(model, 2), latents(model, 3, 1)
    cache = M.KVCache(model.cfg, 2, 3, model.tokens_per_frame(H, W), sink_frames=1)
    with pytest.raises(AssertionError, match="inference"):
        model(x[:, :1], torch.zeros(2, 1), context, cache=cache, start_frame=0)
    with torch.no_grad():
        model(x[:, :1], torch.zeros(2, 1), context, cache=cache, start_frame=0)
        model(x[:, 1:2], torch.zeros(2, 1), context, cache=cache, start_frame=1)
        with pytest.raises(AssertionError, match="newest block"):
            model(x[:, :1], torch.zeros(2, 1), context, cache=cache, start_frame=0)  # not the newest block
    with pytest.raises(AssertionError, match="sink frames"):
        M.KVCache(model.cfg, 2, 3, model.tokens_per_frame(H, W), sink_frames=3)


# ---- prompt switching ----


def test_cross_attention_switch_keeps_the_frame_cache_and_changes_the_next_frame():
    model = tiny_model(num_layers=2)
    noise, old, new = latents(model, 5, 1), contexts(model, 2), contexts(model, 3)
    S = model.tokens_per_frame(H, W)

    def run(switch):
        rollout = M.Rollout(model, old, noise.shape[2:], steps=[1000.0, 500.0], window=4, sink_frames=1,
                            generator=torch.Generator().manual_seed(0))
        for f in range(4):
            rollout.step(noise[:, f:f + 1])
        before = rollout.cache.k.clone()
        if switch:
            rollout.set_context(new, mode="cross_attn")
        x = rollout.step(noise[:, 4:5])
        return rollout, before, x

    kept, before, x_kept = run(False)
    switched, before_switch, x_switched = run(True)
    assert torch.equal(before, before_switch)
    # the frames already in the cache keep their keys (the new block's own slot is the last one)
    assert torch.equal(switched.cache.k[:, :, :3 * S], kept.cache.k[:, :, :3 * S])
    assert not torch.allclose(x_switched, x_kept, atol=1e-3), "the new prompt did not reach the next frame"
    assert switched.cache.context is new


@pytest.mark.parametrize("window", [None, 4])
def test_recache_equals_a_fresh_rollout_that_wrote_the_visible_frames_under_the_new_prompt(window):
    """LongLive's re-cache: after set_context(new, 'recache') the next frame is bit-identical to a new rollout
    that writes the same visible frames (in slot order) under the new prompt and then steps. Layer-0 keys are
    computed before cross-attention, so only deeper layers change."""
    model = tiny_model(num_layers=2)
    noise, old, new = latents(model, 7, 1), contexts(model, 2), contexts(model, 3)
    kw = dict(steps=[1000.0, 500.0], window=window, sink_frames=1 if window else None, max_frames=8)
    rollout = M.Rollout(model, old, noise.shape[2:], generator=torch.Generator().manual_seed(0), **kw)
    frames = [rollout.step(noise[:, f:f + 1]) for f in range(6)]
    before = rollout.cache.k.clone()
    visible = sorted(rollout.visible)
    assert visible == ([0, 3, 4, 5] if window else list(range(6)))
    rollout.set_context(new, mode="recache")
    S, n = model.tokens_per_frame(H, W), len(visible)
    assert torch.equal(rollout.cache.k[0, :, :n * S], before[0, :, :n * S])
    assert not torch.allclose(rollout.cache.k[1, :, :n * S], before[1, :, :n * S])
    rollout.generator = torch.Generator().manual_seed(9)
    x = rollout.step(noise[:, 6:7])

    fresh = M.Rollout(model, new, noise.shape[2:], generator=torch.Generator().manual_seed(9), **kw)
    with torch.no_grad():
        for f in visible:
            fresh._context_pass(frames[f], f)
    fresh.frame = 6
    assert torch.equal(fresh.step(noise[:, 6:7]), x)


def test_close_releases_the_cache():
    model = tiny_model(num_layers=1)
    rollout = M.Rollout(model, contexts(model, 2), (4, H, W), steps=[1000.0], window=3)
    rollout.step(latents(model, 1, 1))
    rollout.close()
    assert rollout.cache is None and rollout.visible == {}


# ---- sample.py past the trained length ----


def test_sample_cli_rolls_past_the_trained_length_and_switches_prompts(tmp_path):
    import sample
    from helpers import tiny_frame_wise_checkpoint
    ckpt = tiny_frame_wise_checkpoint(tmp_path, num_frames=4)
    common = ["--ckpt", ckpt, "--prompt", "a red circle bounces slowly", "--quiet", "--first_frame_steps", "none",
              "--eager"]  # compared bit for bit with model.generate's eager forward below
    long = sample.main(common + ["--num_frames", "30", "--out", str(tmp_path / "long")])
    video = long["a red circle bounces slowly"]
    assert video.shape[0] == 30 and torch.isfinite(video).all()
    # the same rollout through model.generate with the rolling cache the CLI chose (window = trained 4 frames)
    model, info = sample.load_for_inference(ckpt)
    import encoders
    context = encoders.load_text_encoder("toy").encode(["a red circle bounces slowly"])
    noise = torch.randn((1, 30, 12, 16, 16), generator=torch.Generator().manual_seed(0))
    latents = M.generate(model.eval(), noise, context, steps=M.warp_timesteps([1000, 500]), window=4, sink_frames=1,
                         generator=torch.Generator().manual_seed(1))
    expected = encoders.load_codec("toy").decode(latents)[0]
    assert torch.equal(video, expected)  # same process, same arithmetic
    switched = sample.main(common + ["--num_frames", "8", "--switch", "4:a green square stays still",
                                     "--out", str(tmp_path / "switch")])["a red circle bounces slowly"]
    assert torch.equal(switched[:4], video[:4]) and not torch.equal(switched[4:8], video[4:8])
    for bad, message in ((["--switch", "x:a red circle"], "FRAME:PROMPT"), (["--switch", "9:a red circle"], "block boundary"),
                         (["--switch", "2:a purple dragon"], "vocabulary"), (["--window", "1"], "--window")):
        with pytest.raises(sample.SampleError, match=message):
            sample.main(common + ["--num_frames", "8", "--out", str(tmp_path / "bad"), *bad])
