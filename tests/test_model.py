"""Invariants of model.py (its docstring, README "Conventions"): masks, cache == block-causal, teacher forcing == cached context,
causality, generate() bookkeeping and the flow-matching helpers, with hand-computed values."""
import math
import subprocess
import sys
import warnings

import pytest
import torch

import model as M

# ---- helpers ----


def tiny_model(frames_per_block=1, seed=0, dtype=torch.float32):
    """A small Wan-shaped model with every parameter random (Wan zero-inits the output head)."""
    torch.manual_seed(seed)
    cfg = M.WanConfig(in_dim=4, out_dim=4, dim=48, ffn_dim=96, freq_dim=32, text_dim=16, text_len=8,
                      num_heads=2, num_layers=2, frames_per_block=frames_per_block)
    model = M.CausalWanModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype)


def inputs(model, B=2, num_frames=6, H=4, W=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    x = torch.randn(B, num_frames, cfg.in_dim, H, W, generator=g)
    context = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    context[0, 5:] = 0  # zero-padded after the prompt, two different lengths
    if B > 1:
        context[1, 3:] = 0
    return x, context, g


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# The same fp32 mathematics computed with other shapes (a KV cache vs one long sequence, another attention
# backend, cond+uncond batched vs apart) reorders sums: one of n <= 64 terms moves by <= n·u ≈ 4e-6 of its
# magnitude, and ~10 such sums in sequence through a 2-block model keep the relative error below ~4e-5 on any
# CPU. A wrong mask, cache slot or step changes the outputs by > 1e-3 (asserted where it could be vacuous).
REORDER_TOL = 1e-4


# ---- masks ----


def test_teacher_forcing_mask_matches_hand_example():
    # 3 frames of 2 tokens, frame-wise: rows = queries [clean 0..5 | noisy 6..11], the official teacher-forcing mask
    mask = M.dense_mask(M.teacher_forcing_rule(6, 2), 12).int()
    expected = torch.tensor([
        # clean c0 c0 c1 c1 c2 c2 | noisy n0 n0 n1 n1 n2 n2
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],  # noisy block 0 sees only itself
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],  # noisy block 1: clean block 0 + itself
        [1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1],  # noisy block 2: clean blocks 0-1 + itself
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1],
    ])
    assert torch.equal(mask, expected)


def test_block_causal_mask_chunkwise():
    # 4 frames of 1 token in blocks of 2: block 0 = frames 0-1, block 1 = frames 2-3
    mask = M.dense_mask(M.block_causal_rule(2), 4).int()
    assert torch.equal(mask, torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]))


# ---- the central invariants ----


@pytest.mark.parametrize("frames_per_block", [1, 3])
def test_cached_rollout_equals_block_causal_forward(frames_per_block):
    model = tiny_model(frames_per_block)
    x, context, g = inputs(model)
    t = torch.rand(2, 6, generator=g) * 1000  # distinct per-frame t, also within a chunk
    K = frames_per_block
    with torch.no_grad():
        full = model(x, t, context, causal=True)
        cache = M.KVCache(model.cfg, 2, 6, model.tokens_per_frame(4, 6))
        blocks = [model(x[:, f:f + K], t[:, f:f + K], context, cache=cache, start_frame=f) for f in range(0, 6, K)]
    cached = torch.cat(blocks, dim=1)
    assert rel_err(cached, full) <= REORDER_TOL
    assert cache.filled_frames == 6
    # the bidirectional forward differs (frames see the future), so the comparison above is not vacuous
    assert rel_err(model(x, t, context, causal=False), full) > 1e-3


@pytest.mark.parametrize("frames_per_block", [1, 3])
def test_teacher_forcing_equals_cached_inference_with_clean_context(frames_per_block):
    model = tiny_model(frames_per_block, seed=2)
    x_noisy, context, g = inputs(model, seed=3)
    clean = torch.randn(x_noisy.shape, generator=g)
    K = frames_per_block
    t = torch.rand(2, 6 // K, generator=g).repeat_interleave(K, dim=1) * 1000  # block-constant t
    with torch.no_grad():
        tf = model(x_noisy, t, context, clean_x=clean)
        S = model.tokens_per_frame(4, 6)
        for b0 in range(0, 6, K):
            cache = M.KVCache(model.cfg, 2, 6, S)
            for f in range(0, b0, K):  # context passes: clean frames < b0 at t = 0
                model(clean[:, f:f + K], torch.zeros(2, K), context, cache=cache, start_frame=f)
            out = model(x_noisy[:, b0:b0 + K], t[:, b0:b0 + K], context, cache=cache, start_frame=b0)
            assert rel_err(out, tf[:, b0:b0 + K]) <= REORDER_TOL, f"block at frame {b0}"


@pytest.mark.parametrize("mode", ["block_causal", "teacher_forcing"])
@pytest.mark.parametrize("frames_per_block", [1, 3])
def test_frame_outputs_never_depend_on_later_frames(mode, frames_per_block):
    model = tiny_model(frames_per_block, seed=4)
    x, context, g = inputs(model, seed=5)
    clean = torch.randn(x.shape, generator=g)
    t = torch.full((2, 6), 700.0)
    K = frames_per_block
    cut = K  # everything from the second block on is changed
    x2, clean2 = x.clone(), clean.clone()
    x2[:, cut:] = torch.randn(x2[:, cut:].shape, generator=g)
    clean2[:, cut:] = torch.randn(clean2[:, cut:].shape, generator=g)
    with torch.no_grad():
        kw = dict(clean_x=clean) if mode == "teacher_forcing" else dict(causal=True)
        kw2 = dict(clean_x=clean2) if mode == "teacher_forcing" else dict(causal=True)
        a, b = model(x, t, context, **kw), model(x2, t, context, **kw2)
    assert torch.equal(a[:, :cut], b[:, :cut])
    assert not torch.allclose(a[:, cut:], b[:, cut:])  # later frames did change


def test_teacher_forcing_noisy_block_ignores_its_own_and_later_clean_frames():
    model = tiny_model(1, seed=6)
    x, context, g = inputs(model, seed=7)
    clean = torch.randn(x.shape, generator=g)
    clean2 = clean.clone()
    clean2[:, 2:] = torch.randn(clean2[:, 2:].shape, generator=g)  # clean frames >= 2 change
    t = torch.full((2, 6), 400.0)
    with torch.no_grad():
        a, b = model(x, t, context, clean_x=clean), model(x, t, context, clean_x=clean2)
    assert torch.equal(a[:, :3], b[:, :3])  # noisy frame 2 sees clean frames 0-1 only
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_flex_blockmask_backend_equals_dense_on_cpu():
    model = tiny_model(1, seed=8)
    x, context, g = inputs(model, num_frames=3, seed=9)  # 3 frames x 6 tokens: not a multiple of 128
    t = torch.rand(2, 3, generator=g) * 1000
    with torch.no_grad():
        dense = (model(x, t, context, causal=True), model(x, t, context, clean_x=x * 0.5))
        try:
            M.set_attention_backend("flex")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # flex_attention warns that it runs uncompiled on CPU
                flex = (model(x, t, context, causal=True), model(x, t, context, clean_x=x * 0.5))
        finally:
            M.set_attention_backend("dense")
    for a, b in zip(dense, flex):
        assert rel_err(b, a) <= REORDER_TOL


def test_uniform_t_broadcast_and_per_frame_modulation():
    model = tiny_model(1)
    x, context, _ = inputs(model)
    with torch.no_grad():
        a = model(x, torch.tensor([300.0, 800.0]), context, causal=False)
        b = model(x, torch.tensor([[300.0] * 6, [800.0] * 6]), context, causal=False)
        t = torch.tensor([[300.0] * 6, [800.0] * 6])
        t[0, 4] = 900.0  # one frame's timestep changes only through its modulation ...
        c = model(x, t, context, causal=False)
    assert torch.equal(a, b)
    assert not torch.allclose(c[0], a[0])  # ... which reaches every frame through bidirectional attention
    assert torch.equal(c[1], a[1])


def test_context_is_not_masked_pad_rows_count():
    # Wan attends all text_len rows: the zero pad rows are part of the input (docs/wan_formats.md)
    model = tiny_model(1)
    x, context, _ = inputs(model)
    t = torch.full((2, 6), 500.0)
    shorter = context.clone()
    shorter[0, 4:] = 0
    with torch.no_grad():
        assert not torch.allclose(model(x, t, context, causal=False)[0], model(x, t, shorter, causal=False)[0])


# ---- KV cache ----


def test_kv_cache_rejects_gaps_and_overflow_and_resets():
    model = tiny_model(1)
    x, context, _ = inputs(model, num_frames=1)
    cache = M.KVCache(model.cfg, 2, 3, model.tokens_per_frame(4, 6))
    t = torch.full((2, 1), 500.0)
    with torch.no_grad():
        with pytest.raises(AssertionError, match="gap"):
            model(x, t, context, cache=cache, start_frame=1)
        for f in range(3):
            model(x, t, context, cache=cache, start_frame=f)
        with pytest.raises(AssertionError, match="cache size"):
            model(x, t, context, cache=cache, start_frame=3)
        assert cache.filled_frames == 3
        with pytest.raises(AssertionError, match="another context"):
            model(x, t, context.clone(), cache=cache, start_frame=0)  # cached text K/V belong to `context`
        cache.reset()
        assert cache.filled_frames == 0 and cache.context_kv[0] is None
        model(x, t, context.clone(), cache=cache, start_frame=0)  # after reset a new prompt is fine


def test_rerunning_a_block_overwrites_its_slots():
    model = tiny_model(1, seed=10)
    x, context, g = inputs(model, num_frames=2)
    S = model.tokens_per_frame(4, 6)
    t = torch.zeros(2, 1)
    with torch.no_grad():
        fresh = M.KVCache(model.cfg, 2, 2, S)
        model(x[:, :1], t, context, cache=fresh, start_frame=0)
        ref = model(x[:, 1:], t, context, cache=fresh, start_frame=1)
        reused = M.KVCache(model.cfg, 2, 2, S)
        model(torch.randn(x[:, :1].shape, generator=g), torch.full((2, 1), 999.0), context, cache=reused, start_frame=0)
        model(x[:, :1], t, context, cache=reused, start_frame=0)  # the context pass replaces the noisy K/V
        out = model(x[:, 1:], t, context, cache=reused, start_frame=1)
    assert torch.equal(out, ref)


def test_gradient_flows_through_the_current_block_only_and_cache_stays_constant():
    model = tiny_model(1, seed=11)
    x, context, _ = inputs(model, num_frames=3)
    S = model.tokens_per_frame(4, 6)
    cache = M.KVCache(model.cfg, 2, 3, S)
    t = torch.full((2, 1), 600.0)
    with torch.no_grad():
        model(x[:, :1], torch.zeros(2, 1), context, cache=cache, start_frame=0)
    x1 = x[:, 1:2].clone().requires_grad_(True)
    out = model(x1, t, context, cache=cache, start_frame=1)  # grad-enabled "exit step"
    assert not cache.k.requires_grad and not cache.v.requires_grad
    with torch.no_grad():  # later writes into the cache (context pass, next block) ...
        model(out.detach(), torch.zeros(2, 1), context, cache=cache, start_frame=1)
        model(x[:, 2:3], t, context, cache=cache, start_frame=2)
    out.square().sum().backward()  # ... do not break or change the backward pass
    assert x1.grad is not None and x1.grad.abs().sum() > 0
    assert model.blocks[0].cross_attn.k.weight.grad.abs().sum() > 0  # text path gets gradient too



def test_checkpointed_exit_steps_get_the_same_gradients_in_any_backward_order():
    """Two grad-enabled exit steps (blocks 1 and 2), each followed by its no-grad context pass, as in the
    Stage-3 self-rollout. With activation checkpointing the blocks are recomputed during backward; running
    block 1's backward first (the order that breaks a cache written by grad-enabled calls) must give the
    gradients of the plain, non-checkpointed run."""
    def grads(checkpointing, block1_first):
        model = tiny_model(1, seed=12)
        model.gradient_checkpointing = checkpointing
        x, context, _ = inputs(model, num_frames=3)
        cache = M.KVCache(model.cfg, 2, 3, model.tokens_per_frame(4, 6))
        t = torch.full((2, 1), 600.0)
        with torch.no_grad():
            model(x[:, :1], torch.zeros(2, 1), context, cache=cache, start_frame=0)
        outs = []
        for f in (1, 2):
            out = model(x[:, f:f + 1], t, context, cache=cache, start_frame=f)
            assert cache.filled_frames == f, "a grad-enabled call must not advance the cache"
            with torch.no_grad():
                model(out.detach() * 0.5, torch.zeros(2, 1), context, cache=cache, start_frame=f)
            outs.append(out)
        losses = [outs[0].square().sum(), (outs[1] * 3).sin().sum()]
        for loss in (losses if block1_first else losses[::-1]):
            loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = grads(False, False)
    for checkpointing, block1_first in ((True, True), (True, False), (False, True)):
        got = grads(checkpointing, block1_first)
        assert got.keys() == reference.keys()
        for name in reference:  # the same ops on the same shapes; only autograd's accumulation order may differ
            torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


# ---- generate() ----


class CallRecorder:
    """Wraps model.forward to record (start_frame, t) of every call."""

    def __init__(self, model):
        self.calls = []
        self.forward = model.forward
        model.forward = self

    def __call__(self, x, t, context, **kw):
        self.calls.append((kw.get("start_frame"), float(t[0, 0])))
        return self.forward(x, t, context, **kw)


def test_generate_calls_per_block_and_first_block_list():
    model = tiny_model(1)
    noise, context, _ = inputs(model, B=1, num_frames=4)
    recorder = CallRecorder(model)
    steps, first = M.warp_timesteps([1000, 500]), M.warp_timesteps([1000, 750, 500, 250])
    M.generate(model, noise, context[:1], steps=steps, first_block_steps=first, generator=torch.Generator().manual_seed(0))
    per_frame = {f: [t for s, t in recorder.calls if s == f] for f in range(4)}
    assert per_frame[0] == pytest.approx(first + [0.0])  # 4 steps + context pass at t=0
    for f in (1, 2, 3):
        assert per_frame[f] == pytest.approx(steps + [0.0])  # 2 steps + context pass
    assert len(recorder.calls) == 5 + 3 * 3


def test_generate_chunkwise_calls_and_prefix_skips_first_block_list():
    model = tiny_model(3)
    noise, context, g = inputs(model, B=1, num_frames=6)
    recorder = CallRecorder(model)
    steps = M.warp_timesteps([1000, 750, 500, 250])
    M.generate(model, noise, context[:1], steps=steps, generator=g)
    assert [s for s, _ in recorder.calls] == [0] * 5 + [3] * 5
    recorder.calls.clear()
    model1 = tiny_model(1)
    recorder = CallRecorder(model1)
    prefix = torch.randn(1, 1, 4, 4, 6, generator=g)  # I2V: one clean frame as context
    M.generate(model1, noise[:, :2], context[:1], steps=[1000.0], first_block_steps=steps, prefix=prefix, generator=g)
    assert recorder.calls == [(0, 0.0), (1, 1000.0), (1, 0.0), (2, 1000.0), (2, 0.0)]


def test_generate_is_deterministic_per_seed():
    model = tiny_model(1)
    noise, context, _ = inputs(model, B=1, num_frames=3)
    kw = dict(steps=M.warp_timesteps([1000, 500]), first_block_steps=M.warp_timesteps([1000, 750, 500, 250]))
    a = M.generate(model, noise, context[:1], generator=torch.Generator().manual_seed(7), **kw)
    b = M.generate(model, noise, context[:1], generator=torch.Generator().manual_seed(7), **kw)
    c = M.generate(model, noise, context[:1], generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_generate_cfg_one_euler_step_by_hand():
    model = tiny_model(1)
    noise, context, _ = inputs(model, B=1, num_frames=1)
    uncond = torch.zeros_like(context[:1])
    out = M.generate(model, noise, context[:1], steps=[800.0], sampler="euler", uncond_context=uncond,
                     guidance_scale=3.0)
    with torch.no_grad():
        t = torch.full((1, 1), 800.0)
        v_c, v_u = model(noise, t, context[:1], causal=True), model(noise, t, uncond, causal=True)
    expected = noise - 0.8 * (v_u + 3.0 * (v_c - v_u))  # x_0 = x_t + (σ_next − σ)·v with σ: 0.8 → 0
    assert rel_err(out, expected) <= REORDER_TOL


def test_generate_renoise_one_step_is_x0_prediction():
    model = tiny_model(1)
    noise, context, _ = inputs(model, B=1, num_frames=1)
    out = M.generate(model, noise, context[:1], steps=[1000.0])
    with torch.no_grad():
        v = model(noise, torch.full((1, 1), 1000.0), context[:1], causal=True)
    assert rel_err(out, noise - v) <= REORDER_TOL  # σ = 1: x0 = x_t − v


def test_generate_with_teacher_context_equals_teacher_forcing_euler():
    # two code paths, one answer: per-frame ODE conditioned on a ground-truth prefix (causal-ODE teacher)
    model = tiny_model(1, seed=12)
    noise, context, g = inputs(model, B=1, num_frames=3)
    gt = torch.randn(noise.shape, generator=g)
    grid = M.timestep_grid(4).tolist()
    out = M.generate(model, noise, context[:1], steps=grid, sampler="euler", teacher_context=gt)
    x = noise.clone()
    with torch.no_grad():
        for i, t in enumerate(grid):
            t_next = grid[i + 1] if i + 1 < len(grid) else 0.0
            v = model(x, torch.full((1, 3), t), context[:1], clean_x=gt)
            x = x + (t_next - t) / 1000 * v
    assert rel_err(out, x) <= REORDER_TOL


def test_generate_rejects_bad_step_lists():
    model = tiny_model(1)
    noise, context, _ = inputs(model, B=1, num_frames=1)
    for bad in ([], [500.0, 1000.0], [1200.0], [1000.0, 0.0]):
        with pytest.raises(AssertionError, match="descending"):
            M.generate(model, noise, context[:1], steps=bad)


# ---- flow-matching helpers and small functions, hand values ----


def test_warped_step_lists_and_cd_grid():
    assert M.warp_timesteps([1000, 750, 500, 250]) == pytest.approx([1000, 937.5, 833.3333, 625], abs=1e-3)
    assert M.warp_timesteps([1000, 500]) == pytest.approx([1000, 833.3333], abs=1e-3)
    grid = M.timestep_grid(48)
    assert grid.dtype == torch.float32 and len(grid) == 48
    assert grid[0].item() == 1000.0
    assert grid[12].item() == pytest.approx(937.5, abs=1e-3)
    assert grid[24].item() == pytest.approx(833.333, abs=1e-3)
    assert grid[36].item() == pytest.approx(625.0, abs=1e-3)
    assert grid[47].item() == pytest.approx(1000 * 5 / 48 / (1 + 4 / 48), abs=1e-3)  # 96.15
    assert grid[47].item() == pytest.approx(96.15, abs=1e-2)


def test_flow_helpers_hand_values():
    x0 = torch.tensor([2.0]).view(1, 1, 1, 1, 1)
    eps = torch.tensor([-1.0]).view(1, 1, 1, 1, 1)
    t = torch.tensor([[250.0]])
    x_t = M.add_noise(x0, eps, t)
    assert x_t.item() == pytest.approx(0.75 * 2.0 + 0.25 * -1.0)  # 1.25
    v = eps - x0  # -3
    assert M.x0_from_v(x_t, v, t).item() == pytest.approx(2.0)  # 1.25 − 0.25·(−3)
    assert M.v_from_x0(x_t, x0, t).item() == pytest.approx(-3.0)
    assert M.shift_sigma(0.5, 5.0) == pytest.approx(2.5 / 3.0)
    assert M.sigma_of(937.5, x0).item() == 0.9375  # exact, no grid lookup


def test_sinusoid_is_cos_first_in_float64():
    emb = M.sinusoidal_embedding(torch.tensor([0.0, 937.5]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    omega = [10000 ** (-k / 4) for k in range(4)]
    expected = [math.cos(937.5 * w) for w in omega] + [math.sin(937.5 * w) for w in omega]
    assert emb[1].tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(AssertionError, match="bf16"):
        M.sinusoidal_embedding(torch.tensor([1.0], dtype=torch.bfloat16), 8)


def test_rope_split_pairs_and_start_frame_offset():
    assert M.rope_axis_dims(128) == (44, 42, 42)
    assert M.rope_axis_dims(24) == (8, 8, 8)
    # frame position f turns pair 0 (frame axis) by f radians; the first pair is (x0, x1), interleaved
    angles = M.rope_angles(24, num_frames=3, h=1, w=1, start_frame=2)
    assert angles[:, 0].tolist() == [2.0, 3.0, 4.0]
    assert angles[0, 1].item() == pytest.approx(2 * 10000 ** (-2 / 8))
    assert angles[0, 4].item() == 0.0  # height axis at row 0
    x = torch.zeros(1, 1, 1, 24)
    x[..., 0] = 1.0
    a = M.rope_angles(24, 1, 1, 1, start_frame=1)
    y = M.apply_rope(x, a.cos().float(), a.sin().float())
    assert y[0, 0, 0, 0].item() == pytest.approx(math.cos(1.0)) and y[0, 0, 0, 1].item() == pytest.approx(math.sin(1.0))
    # the table for frames 2..3 is the slice of the table for frames 0..3
    long = M.rope_angles(24, 4, 2, 3)
    assert torch.equal(M.rope_angles(24, 2, 2, 3, start_frame=2), long[2 * 6:])
    with pytest.raises(AssertionError, match="RoPE range"):
        M.rope_angles(24, 2, 1, 1, start_frame=1023)


def test_presets_and_config_errors():
    assert M.WanConfig.from_preset("wan2.1-t2v-1.3b").head_dim == 128
    assert M.WanConfig.from_preset("wan2.1-t2v-14b").num_heads == 40
    toy = M.WanConfig.from_preset("toy")
    with torch.device("meta"):
        n = M.CausalWanModel(toy).num_params()
    assert 0.5e6 < n < 3e6
    with pytest.raises(AssertionError, match="unknown preset"):
        M.WanConfig.from_preset("wan2.2")
    with pytest.raises(AssertionError, match="unknown WanConfig keys"):
        M.WanConfig.from_dict({"dim": 64, "heads": 2})


def test_forward_input_errors_are_clear():
    model = tiny_model(3)
    x, context, _ = inputs(model, num_frames=4)
    t = torch.full((2, 4), 500.0)
    with torch.no_grad():
        with pytest.raises(AssertionError, match="whole number"):
            model(x, t, context, causal=True)
        with pytest.raises(AssertionError, match="zero-padded"):
            model(x[:, :3], t[:, :3], context[:, :5], causal=True)
        with pytest.raises(AssertionError, match="channels"):
            model(x[:, :3, :2], t[:, :3], context, causal=True)


def test_bf16_model_runs_close_to_fp32():
    model = tiny_model(1)
    x, context, _ = inputs(model)
    t = torch.full((2, 6), 500.0)
    with torch.no_grad():
        ref = model(x, t, context, causal=True)
        out = model.to(torch.bfloat16)(x, t, context, causal=True)
    # bf16 keeps 8 bits: each weight and activation rounds by <= 2^-9 ≈ 2e-3 relative, and ~10 rounded stages
    # in sequence stay below 2e-2 on any CPU; a precision bug (e.g. bf16 timesteps) is O(1)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 5e-2


def test_import_model_pulls_in_neither_diffusers_nor_transformers():
    code = "import sys, model; bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(__import__('pathlib').Path(M.__file__).parent))
    assert result.returncode == 0, result.stdout + result.stderr


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(1, seed=13)
        model.gradient_checkpointing = checkpointing
        x, context, _ = inputs(model)
        model(x, torch.full((2, 6), 500.0), context, clean_x=x * 0.5).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)  # recomputation runs the same ops and shapes


def test_generate_bidirectional_cfg_one_step_by_hand():
    model = tiny_model(1)
    noise, context, _ = inputs(model, B=1, num_frames=3)
    uncond = torch.zeros_like(context)
    out = M.generate_bidirectional(model, noise, context, steps=[600.0], uncond_context=uncond, guidance_scale=2.0)
    with torch.no_grad():
        t = torch.full((1, 3), 600.0)
        v_c, v_u = model(noise, t, context, causal=False), model(noise, t, uncond, causal=False)
    assert rel_err(out, noise - 0.6 * (v_u + 2.0 * (v_c - v_u))) <= REORDER_TOL
