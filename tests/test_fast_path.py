"""The fast path (model.fast_path): the same forward compiled (and on CUDA captured as CUDA graphs) equals the
eager forward it replaces. CPU: fp32 rollouts within 1e-5 relative in every rollout mode. GPU (-m gpu, skipped
with the reason where CUDA is absent): the same at Wan2.1-1.3B width and token count, in fp32 and in bf16, plus the
cache, mask and torchrun checks of docs/performance.md."""
import os

import pytest
import torch

import model as M
from test_camera import random_cameras

CI = os.environ.get("CI") == "true"
needs_compiler = pytest.mark.skipif(not M.compiler_available() and not CI,
                                    reason="torch.compile on the CPU needs a C++ compiler (apt-get install g++)")


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def small_model(frames_per_block=1, camera_dims=0, seed=0, **overrides):
    """A 2-layer model of the toy's shape with every weight random (Wan zero-inits the head)."""
    torch.manual_seed(seed)
    cfg = M.WanConfig.from_preset("toy", num_layers=2, frames_per_block=frames_per_block, camera_dims=camera_dims,
                                  **overrides)
    model = M.CausalWanModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def rollout(model, noise, context, *, device="cpu", window=None, switch=None, cameras=None, steps=(1000, 500)):
    """A frame-/chunk-wise few-step rollout with the ASD first block; switch = (frame, new context, mode)."""
    before_block = None
    if switch is not None:
        def before_block(r, start):
            if start == switch[0]:
                r.set_context(switch[1], mode=switch[2])
    return M.generate(model, noise, context, steps=M.warp_timesteps(list(steps)),
                      first_block_steps=M.warp_timesteps([1000, 750, 500, 250]), window=window,
                      generator=torch.Generator(device).manual_seed(5), before_block=before_block, cameras=cameras)


# -----------------------------------------------------------------------------
# pieces every path shares (no compiler needed)


def test_rope_table_rows_equal_rope_angles_as_the_table_grows():
    M._rope_tables.clear()
    small = M.rope_table(24, 3, 2, 2, 1024, "cpu", theta=100.0)
    big = M.rope_table(24, 40, 2, 2, 1024, "cpu", theta=100.0)  # regrows past the first table
    for frames, (cos, sin) in ((3, small), (40, big)):
        angles = M.rope_angles(24, frames, 2, 2, 0, theta=100.0)
        assert torch.equal(cos, torch.cos(angles).float()) and torch.equal(sin, torch.sin(angles).float())
    rows = M.rope_angles(24, 5, 2, 2, start_frame=7, theta=100.0)  # frames 7..11 are rows 7·4 .. 12·4
    assert torch.equal(big[0][7 * 4:12 * 4], torch.cos(rows).float())
    with pytest.raises(AssertionError, match="RoPE range"):
        M.rope_table(24, 1025, 2, 2, 1024, "cpu")


def test_text_keys_keep_their_memory_across_prompts():
    model = small_model()
    cache = M.KVCache(model.cfg, 1, 4, 64)
    x, t = torch.randn(1, 1, 12, 16, 16), torch.full((1, 1), 500.0)
    first, second = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    with torch.no_grad():
        model(x, t, first, cache=cache, start_frame=0)
        addresses = [kv[0].data_ptr() for kv in cache.context_kv]
        old = cache.context_kv[0][0].clone()
        cache.forget_text()
        assert not cache.text_ready()
        model(x, t, second, cache=cache, start_frame=0)
    assert cache.text_ready() and [kv[0].data_ptr() for kv in cache.context_kv] == addresses
    assert not torch.equal(cache.context_kv[0][0], old)  # same memory, the new prompt's keys


def test_graph_key_names_every_address_a_captured_call_reads():
    model = small_model()
    cache = M.KVCache(model.cfg, 1, 4, 64)
    x, t, context = torch.randn(1, 1, 12, 16, 16), torch.full((1, 1), 500.0), torch.randn(1, 16, 32)
    with torch.no_grad():
        model(x, t, context, cache=cache, start_frame=0)
    tokens, e0, e = torch.zeros(1, 64, 128), torch.zeros(1, 1, 6, 128), torch.zeros(1, 1, 128)
    cos, sin = M.rope_table(model.cfg.head_dim, 2, 8, 8, 1024, "cpu")

    def key(position=1, c=cache, rope=(cos[64:], sin[64:])):
        return M.graph_key((tokens, e0, e, None, *rope, None, c, position, None), c)

    assert key() == key()
    assert key(position=2) != key()
    assert key(rope=(cos[:64].clone(), sin[:64])) != key()
    other = M.KVCache(model.cfg, 1, 4, 64)
    other.context_kv = cache.context_kv
    assert key(c=other) != key()  # other cache buffers
    cache.text_buffers[0] = cache.context_kv[0] = tuple(kv.clone() for kv in cache.context_kv[0])
    assert key() != M.graph_key((tokens, e0, e, None, cos[64:], sin[64:], None, other, 1, None), other)


# -----------------------------------------------------------------------------
# CPU: compiled == eager (fp32, 1e-5 relative)


@needs_compiler
@pytest.mark.parametrize("frames_per_block, window, switch", [(1, None, None), (3, None, None), (1, 4, "recache"),
                                                              (1, 4, "cross_attn")])
def test_compiled_rollout_equals_eager(frames_per_block, window, switch):
    """fp32: the compiled pieces fuse the same operations in another order; 1e-5 relative bounds what that can
    change over a 6-frame rollout (measured: ~1e-7)."""
    model = small_model(frames_per_block)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 6, 12, 16, 16, generator=g)
    context, other = torch.randn(1, 16, 32, generator=g), torch.randn(1, 16, 32, generator=g)
    change = None if switch is None else (3, other, switch)
    assert M.fast_path(model, compile=False) == "eager forward" or "no C++" in M.fast_path(model, compile=False)
    eager = rollout(model, noise, context, window=window, switch=change)
    assert "compiled blocks" in M.fast_path(model, compile=True)
    fast = rollout(model, noise, context, window=window, switch=change)
    M.fast_path(model, compile=False)
    assert not any(b.compiled for b in model.blocks)
    assert rel_err(fast, eager) <= 1e-5
    assert not torch.equal(fast[:, 0], fast[:, 1])  # the rollout is not trivially constant


@needs_compiler
def test_compiled_camera_rollout_equals_eager():
    model = small_model(camera_dims=8, num_heads=4)  # head_dim 32: 12 frame-axis RoPE channels
    g = torch.Generator().manual_seed(2)
    noise, context = torch.randn(1, 4, 12, 16, 16, generator=g), torch.randn(1, 16, 32, generator=g)
    cameras = random_cameras(g, 1, 4)
    eager = rollout(model, noise, context, cameras=cameras)
    M.fast_path(model, compile=True)
    fast = rollout(model, noise, context, cameras=cameras)
    M.fast_path(model, compile=False)
    assert rel_err(fast, eager) <= 1e-5


def test_fast_path_refuses_graphs_off_cuda():
    with pytest.raises(AssertionError, match="CUDA graphs need"):
        M.fast_path(small_model(), compile=False, cuda_graphs=True)


# -----------------------------------------------------------------------------
# GPU (pytest -m gpu): Wan2.1-1.3B width, 480x832 latents (1,560 tokens per frame), 2 layers

WAN_SHAPE = (60, 104)


def wan_model(frames_per_block=1, dtype=torch.float32, layers=2):
    torch.manual_seed(0)
    cfg = M.WanConfig.from_preset("wan2.1-t2v-1.3b", num_layers=layers, frames_per_block=frames_per_block)
    model = M.CausalWanModel(cfg)
    torch.nn.init.normal_(model.head.head.weight, std=0.02)
    return model.to("cuda", dtype).eval()


def wan_inputs(num_frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, num_frames, 16, *WAN_SHAPE, generator=g).cuda()
    context = torch.randn(1, 512, 4096, generator=g).cuda()
    context[:, 20:] = 0
    return noise, context


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("frames_per_block, window", [(1, None), (3, None), (1, 3)])
@pytest.mark.usefixtures("no_tf32")
def test_gpu_fast_path_equals_eager_fp32(frames_per_block, window):
    """fp32 on CUDA: compiled pieces + CUDA graphs against the eager forward, 1e-5 relative; the graphs were
    captured and replayed (rollout 2 replays what rollout 1 captured)."""
    model = wan_model(frames_per_block)
    noise, context = wan_inputs(6)
    eager = rollout(model, noise, context, device="cuda", window=window)
    M.fast_path(model)
    first, again = (rollout(model, noise, context, device="cuda", window=window) for _ in range(2))
    graphs = model.cuda_graphs
    M.fast_path(model, compile=False, cuda_graphs=False)
    assert graphs.captures > 0 and graphs.replays > 0
    assert rel_err(first, eager) <= 1e-5 and rel_err(again, eager) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.usefixtures("no_tf32")
def test_gpu_fast_path_bf16_within_the_eager_bf16_error():
    """bf16 (as sample.py runs on CUDA). The eager path rounds to bf16 after every matmul and at every explicit
    cast; the compiled pieces round at the same casts and may keep a fused intermediate in fp32, never less.
    So measured against the fp32 model, the fast path's error is the same kind as the eager bf16 error: bound
    it by twice that error (rounding errors of independent placements add in quadrature, sqrt(2) < 2)."""
    noise, context = wan_inputs(4, seed=3)
    reference = rollout(wan_model(dtype=torch.float32), noise, context, device="cuda")
    model = wan_model(dtype=torch.bfloat16)
    eager = rollout(model, noise, context, device="cuda")
    M.fast_path(model)
    fast = rollout(model, noise, context, device="cuda")
    fast = rollout(model, noise, context, device="cuda")  # replayed graphs
    M.fast_path(model, compile=False, cuda_graphs=False)
    eager_error, fast_error = rel_err(eager, reference), rel_err(fast, reference)
    assert 0 < eager_error < 0.1, eager_error  # bf16 is visibly not fp32, and not broken
    assert fast_error <= 2 * eager_error, (fast_error, eager_error)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("frames_per_block", [1, 3])
def test_gpu_cache_equals_block_causal_forward(frames_per_block):
    """Wan shape, fp32: the block-by-block cached forward (SDPA over the cache) equals one block-causal forward
    (flex_attention with a BlockMask on CUDA); both sum the same fp32 products in another order."""
    model = wan_model(frames_per_block)
    F_ = 2 * frames_per_block
    x, context = wan_inputs(F_, seed=1)
    t = torch.full((1, F_), 600.0, device="cuda")
    with torch.no_grad():
        full = model(x, t, context, causal=True)
        cache = M.KVCache(model.cfg, 1, F_, model.tokens_per_frame(*WAN_SHAPE), "cuda")
        blocks = [model(x[:, f:f + frames_per_block], t[:, f:f + frames_per_block], context, cache=cache,
                        start_frame=f) for f in range(0, F_, frames_per_block)]
    assert rel_err(torch.cat(blocks, 1), full) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.usefixtures("no_tf32")
def test_gpu_flex_block_mask_equals_dense_mask():
    """Block-causal and teacher-forcing forwards at Wan shape: flex_attention with a BlockMask against SDPA with
    the dense boolean mask built from the same rule (fp32)."""
    model = wan_model(1, layers=1)
    x, context = wan_inputs(3, seed=2)
    clean, _ = wan_inputs(3, seed=4)
    t = torch.tensor([[900.0, 500.0, 100.0]], device="cuda")
    outputs = {}
    saved = M.ATTENTION_BACKEND
    try:
        for backend in ("flex", "dense"):
            M.set_attention_backend(backend)
            with torch.no_grad():
                outputs[backend] = (model(x, t, context, causal=True), model(x, t, context, clean_x=clean))
    finally:
        M.set_attention_backend(saved)
    for flex, dense in zip(outputs["flex"], outputs["dense"]):
        assert rel_err(flex, dense) <= 1e-4
