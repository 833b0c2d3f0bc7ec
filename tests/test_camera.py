"""PRoPE camera conditioning in model.py (paper §3.3; Li et al. 2025): hand values of the projective transforms,
bit-identity without cameras, invariance to a rigid motion of all cameras, and agreement of the four attention
modes (bidirectional, block-causal, teacher forcing, KV cache incl. the rolling layout) with cameras."""
import pytest
import torch

import model as M
from test_model import REORDER_TOL, inputs, rel_err, tiny_model

# ---- helpers ----


def camera_model(frames_per_block=1, seed=0, camera_dims=8):
    """tiny_model (head_dim 24: 8 frame-axis RoPE channels) with its last `camera_dims` of them for PRoPE."""
    model = tiny_model(frames_per_block, seed)
    model.cfg = M.WanConfig(**{**vars(model.cfg), "camera_dims": camera_dims})
    return model


def random_rigid(g, shape, translation_scale=0.3):
    """Random rotations (det +1) and translations as 4x4 matrices [*shape, 4, 4]."""
    n = int(torch.tensor(shape).prod())
    Q, R = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[:, None, :]
    Q[torch.linalg.det(Q) < 0, :, 0] *= -1  # proper rotations only
    T = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    T[:, :3, :3] = Q
    T[:, :3, 3] = translation_scale * torch.randn(n, 3, generator=g, dtype=torch.float64)
    return T.reshape(*shape, 4, 4)


def random_cameras(g, B, num_frames):
    world_to_camera = random_rigid(g, (B, num_frames)).float()
    focal = 0.8 + 0.4 * torch.rand(B, num_frames, 2, generator=g)
    centre = 0.2 * torch.rand(B, num_frames, 2, generator=g) - 0.1
    K = torch.zeros(B, num_frames, 3, 3)
    K[..., 0, 0], K[..., 1, 1] = focal[..., 0], focal[..., 1]
    K[..., 0, 2], K[..., 1, 2] = centre[..., 0], centre[..., 1]
    K[..., 2, 2] = 1.0
    return world_to_camera, K


def conditioning(cameras):
    """max over frames of ‖P‖·‖P⁻¹‖ (spectral): how much a camera transform can amplify fp32 rounding."""
    P, P_inv = M.camera_projections(*cameras)
    return (torch.linalg.matrix_norm(P, 2) * torch.linalg.matrix_norm(P_inv, 2)).max().item()


def run_mode(model, mode, x, t, context, cameras, clean=None, sink_frames=None):
    """The model's output for all frames in one of the attention modes."""
    K = model.cfg.frames_per_block
    B, num_frames, _, H, W = x.shape
    with torch.no_grad():
        if mode == "bidirectional":
            return model(x, t, context, causal=False, cameras=cameras)
        if mode == "block_causal":
            return model(x, t, context, causal=True, cameras=cameras)
        if mode == "teacher_forcing":
            return model(x, t, context, clean_x=clean, cameras=cameras)
        cache = M.KVCache(model.cfg, B, num_frames, model.tokens_per_frame(H, W), sink_frames=sink_frames)
        blocks = []
        for f in range(0, num_frames, K):
            block_cameras = None if cameras is None else tuple(c[:, f:f + K] for c in cameras)
            blocks.append(model(x[:, f:f + K], t[:, f:f + K], context, cache=cache, start_frame=f,
                                cameras=block_cameras))
        return torch.cat(blocks, dim=1)


MODES = ["bidirectional", "block_causal", "teacher_forcing", "cached", "cached_rolling"]


def mode_args(mode):
    return ("cached", 1) if mode == "cached_rolling" else (mode, None)  # rolling: sink 1, no eviction in 6 frames


# ---- hand values ----


def test_projection_and_inverse_by_hand():
    # camera at world (1, 2, 3) rotated 90° about z; K = focal 2 (x) and 4 (y), principal point (0.1, -0.2)
    R = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    centre = torch.tensor([1.0, 2.0, 3.0])
    T = torch.eye(4)
    T[:3, :3] = R
    T[:3, 3] = -R @ centre  # world -> camera: R (X - centre)
    K = torch.tensor([[2.0, 0.0, 0.1], [0.0, 4.0, -0.2], [0.0, 0.0, 1.0]])
    P, P_inv = M.camera_projections(T[None, None], K[None, None])
    # a world point X maps to the image by K R (X - centre): X = (1, 3, 5) -> camera (-1, 0, 2) -> (-1.8, -0.4, 2)
    X = torch.tensor([1.0, 3.0, 5.0, 1.0])
    assert torch.allclose(P[0, 0] @ X, torch.tensor([-1.8, -0.4, 2.0, 1.0]), atol=1e-6)
    assert torch.allclose(P_inv[0, 0] @ P[0, 0], torch.eye(4), atol=1e-6)
    # normalised intrinsics of a 640x480 image with focal 320 px and the principal point at the centre
    K_n = M.normalised_intrinsics(320.0, 240.0, 320.0, 240.0, 640, 480)
    assert torch.equal(K_n, torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0]]))


def test_apply_camera_multiplies_each_four_channel_group_of_its_frame():
    x = torch.arange(2 * 3 * 1 * 12, dtype=torch.float32).reshape(1, 2 * 3, 1, 12)  # 2 frames x 3 tokens
    matrices = torch.stack([torch.eye(4), 2 * torch.eye(4)])[None].clone()  # frame 0: I, frame 1: 2I
    matrices[0, 0, 0, 1] = 1.0  # frame 0: channel 0 of a group += channel 1
    out = M.apply_camera(x, matrices, slice(4, 12))
    assert torch.equal(out[..., :4], x[..., :4])  # channels outside the slice untouched
    expected = x.clone()
    expected[:, :3, :, 4] += x[:, :3, :, 5]  # group 1, frame 0
    expected[:, :3, :, 8] += x[:, :3, :, 9]  # group 2, frame 0
    expected[:, 3:, :, 4:] *= 2  # frame 1
    assert torch.equal(out, expected)


def test_camera_channels_are_the_lowest_frame_frequencies_and_lose_rope():
    assert M.camera_channels(128, 16) == slice(28, 44)  # Wan: frame axis = channels 0..43
    assert M.camera_channels(64, 16) == slice(8, 24)  # toy preset: frame axis = channels 0..23
    plain = M.rope_angles(24, 3, 2, 2, start_frame=1)
    with_camera = M.rope_angles(24, 3, 2, 2, start_frame=1, camera_dims=4)
    assert torch.equal(with_camera[:, 2:4], torch.zeros(12, 2))  # frame pairs 2, 3 (channels 4..7) frozen
    assert (plain[:, 2:4] != 0).all()
    assert torch.equal(with_camera[:, :2], plain[:, :2]) and torch.equal(with_camera[:, 4:], plain[:, 4:])


# ---- the model with cameras ----


@pytest.mark.parametrize("mode", MODES)
def test_without_cameras_the_model_is_bit_identical(mode):
    base, with_dims = tiny_model(1, seed=3), camera_model(1, seed=3)
    x, context, g = inputs(base)
    t = torch.rand(2, 6, generator=g) * 1000
    clean = torch.randn(x.shape, generator=g)
    name, sink = mode_args(mode)
    a = run_mode(base, name, x, t, context, None, clean, sink)
    b = run_mode(with_dims, name, x, t, context, None, clean, sink)
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_moving_every_camera_by_one_rigid_motion_changes_nothing(mode):
    model = camera_model(1, seed=4)
    x, context, g = inputs(model, seed=5)
    t = torch.rand(2, 6, generator=g) * 1000
    clean = torch.randn(x.shape, generator=g)
    cameras = random_cameras(g, 2, 6)
    G = random_rigid(g, (2, 1), translation_scale=0.5).float()  # one motion per video
    moved = (cameras[0] @ torch.linalg.inv(G), cameras[1])  # T -> T·G⁻¹: every camera moved by G
    name, sink = mode_args(mode)
    a = run_mode(model, name, x, t, context, cameras, clean, sink)
    b = run_mode(model, name, x, t, context, moved, clean, sink)
    # mathematically equal; in fp32 the camera transforms amplify the reordering error of REORDER_TOL by at
    # most their conditioning ‖P‖·‖P⁻¹‖ (measured on both camera sets, about 2-6 here)
    bound = REORDER_TOL * max(conditioning(cameras), conditioning(moved))
    assert rel_err(b, a) <= bound
    # the relative cameras do matter: moving one frame's camera alone changes the outputs
    other = (cameras[0].clone(), cameras[1])
    other[0][:, 3] = random_rigid(g, (2,)).float()
    assert rel_err(run_mode(model, name, x, t, context, other, clean, sink), a) > 1e-3


def test_one_camera_for_every_frame_is_the_same_as_the_identity_camera():
    # all Pᵢ equal: every logit sees Pᵢ Pⱼ⁻¹ = I and every output Pᵢ Σ aᵢⱼ Pⱼ⁻¹ vⱼ = Σ aᵢⱼ vⱼ
    model = camera_model(1, seed=6)
    x, context, g = inputs(model, seed=7)
    t = torch.rand(2, 6, generator=g) * 1000
    one = random_cameras(g, 2, 1)
    same = tuple(c.expand(-1, 6, -1, -1).contiguous() for c in one)
    identity = (torch.eye(4).repeat(2, 6, 1, 1), torch.eye(3).repeat(2, 6, 1, 1))
    a = run_mode(model, "bidirectional", x, t, context, same)
    b = run_mode(model, "bidirectional", x, t, context, identity)
    assert rel_err(a, b) <= REORDER_TOL * conditioning(one)
    # and differs from the model without cameras: the camera channels lost their (frame) RoPE
    assert rel_err(run_mode(model, "bidirectional", x, t, context, None), b) > 1e-3


@pytest.mark.parametrize("frames_per_block", [1, 3])
def test_with_cameras_cached_rollout_equals_block_causal_forward(frames_per_block):
    model = camera_model(frames_per_block, seed=8)
    x, context, g = inputs(model, seed=9)
    t = torch.rand(2, 6, generator=g) * 1000
    cameras = random_cameras(g, 2, 6)
    full = run_mode(model, "block_causal", x, t, context, cameras)
    bound = REORDER_TOL * conditioning(cameras)
    assert rel_err(run_mode(model, "cached", x, t, context, cameras), full) <= bound
    assert rel_err(run_mode(model, "cached", x, t, context, cameras, sink_frames=1), full) <= bound


@pytest.mark.parametrize("frames_per_block", [1, 3])
def test_with_cameras_teacher_forcing_equals_cached_inference_with_clean_context(frames_per_block):
    model = camera_model(frames_per_block, seed=10)
    x, context, g = inputs(model, seed=11)
    clean = torch.randn(x.shape, generator=g)
    K = frames_per_block
    t = torch.rand(2, 6 // K, generator=g).repeat_interleave(K, dim=1) * 1000
    cameras = random_cameras(g, 2, 6)
    bound = REORDER_TOL * conditioning(cameras)
    with torch.no_grad():
        tf = model(x, t, context, clean_x=clean, cameras=cameras)
        S = model.tokens_per_frame(4, 6)
        for b0 in range(0, 6, K):
            cache = M.KVCache(model.cfg, 2, 6, S)
            for f in range(0, b0, K):  # context passes: clean frames < b0 at t = 0, each with its camera
                model(clean[:, f:f + K], torch.zeros(2, K), context, cache=cache, start_frame=f,
                      cameras=tuple(c[:, f:f + K] for c in cameras))
            out = model(x[:, b0:b0 + K], t[:, b0:b0 + K], context, cache=cache, start_frame=b0,
                        cameras=tuple(c[:, b0:b0 + K] for c in cameras))
            assert rel_err(out, tf[:, b0:b0 + K]) <= bound, f"block at frame {b0}"


def test_camera_gradients_reach_every_attention_weight():
    model = camera_model(1, seed=12).train()
    x, context, g = inputs(model, seed=13)
    cameras = random_cameras(g, 2, 6)
    model(x, torch.full((2, 6), 500.0), context, causal=False, cameras=cameras).square().mean().backward()
    for name, p in model.named_parameters():
        if "self_attn" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_camera_errors_are_clear():
    g = torch.Generator().manual_seed(0)
    plain = tiny_model(1)
    x, context, _ = inputs(plain)
    t = torch.full((2, 6), 500.0)
    cameras = random_cameras(g, 2, 6)
    with pytest.raises(AssertionError, match="no camera channels"):
        plain(x, t, context, cameras=cameras)
    model = camera_model(1)
    with pytest.raises(AssertionError, match="cover the 6 frames"):
        model(x, t, context, cameras=tuple(c[:, :5] for c in cameras))
    sheared = (cameras[0].clone(), cameras[1])
    sheared[0][0, 0, 0, 1] += 0.5
    with pytest.raises(AssertionError, match="not orthonormal"):
        model(x, t, context, cameras=sheared)
    with pytest.raises(AssertionError, match="multiple of 4"):
        M.WanConfig(dim=48, num_heads=2, camera_dims=6)
    with pytest.raises(AssertionError, match="multiple of 4"):
        M.WanConfig(dim=48, num_heads=2, camera_dims=12)  # more than the 8 frame-axis channels
    cache = M.KVCache(model.cfg, 2, 6, model.tokens_per_frame(4, 6))
    with torch.no_grad():
        model(x[:, :1], t[:, :1], context, cache=cache, start_frame=0, cameras=tuple(c[:, :1] for c in cameras))
        with pytest.raises(AssertionError, match="filled with cameras"):
            model(x[:, 1:2], t[:, 1:2], context, cache=cache, start_frame=1)


# ---- rollouts with cameras ----


def test_generate_with_cameras_and_teacher_context_equals_teacher_forcing_euler():
    # the per-block rollout passes each block's cameras, in the denoising calls and in the context pass
    model = camera_model(1, seed=14)
    noise, context, g = inputs(model, B=1, num_frames=3)
    gt = torch.randn(noise.shape, generator=g)
    cameras = random_cameras(g, 1, 3)
    grid = M.timestep_grid(4).tolist()
    out = M.generate(model, noise, context[:1], steps=grid, sampler="euler", teacher_context=gt, cameras=cameras)
    x = noise.clone()
    with torch.no_grad():
        for i, t in enumerate(grid):
            t_next = grid[i + 1] if i + 1 < len(grid) else 0.0
            x = x + (t_next - t) / 1000 * model(x, torch.full((1, 3), t), context[:1], clean_x=gt, cameras=cameras)
    assert rel_err(out, x) <= REORDER_TOL * conditioning(cameras)
    without = M.generate(model, noise, context[:1], steps=grid, sampler="euler", teacher_context=gt)
    assert rel_err(without, x) > 1e-3


def test_generate_with_a_prefix_takes_the_prefix_cameras_first():
    model = camera_model(1, seed=15)
    noise, context, g = inputs(model, B=1, num_frames=4)
    cameras = random_cameras(g, 1, 4)
    grid = [1000.0, 500.0]
    gen = lambda **kw: M.generate(model, noise[:, 1:], context[:1], steps=grid, generator=torch.Generator().manual_seed(1), **kw)
    # a clean prefix frame with camera 0, then three generated frames with cameras 1..3: the same as writing
    # the prefix into a rollout with camera 0 and stepping with cameras 1, 2, 3
    with_prefix = gen(prefix=noise[:, :1], cameras=cameras)
    rollout = M.Rollout(model, context[:1], noise.shape[2:], steps=grid, max_frames=4,
                        generator=torch.Generator().manual_seed(1))
    rollout.write_context(noise[:, :1], tuple(c[:, :1] for c in cameras))
    by_hand = torch.cat([rollout.step(noise[:, f:f + 1], cameras=tuple(c[:, f:f + 1] for c in cameras))
                         for f in range(1, 4)], dim=1)
    assert torch.equal(with_prefix, by_hand)
    shifted = gen(prefix=noise[:, :1], cameras=tuple(torch.roll(c, 1, dims=1) for c in cameras))
    assert rel_err(shifted, with_prefix) > 1e-3
    with pytest.raises(AssertionError, match="prefix and 3 generated"):
        gen(prefix=noise[:, :1], cameras=tuple(c[:, 1:] for c in cameras))


def test_bidirectional_sampling_with_cameras_and_cfg_runs_both_halves_with_the_cameras():
    model = camera_model(1, seed=16)
    noise, context, g = inputs(model, B=2)
    cameras = random_cameras(g, 2, 6)
    uncond = torch.zeros_like(context)
    out = M.generate_bidirectional(model, noise, context, steps=[1000.0], uncond_context=uncond,
                                   guidance_scale=3.0, cameras=cameras)
    with torch.no_grad():
        t = torch.full((2, 6), 1000.0)
        c = model(noise, t, context, causal=False, cameras=cameras)
        u = model(noise, t, uncond, causal=False, cameras=cameras)
    expected = noise - (u + 3.0 * (c - u))  # one Euler step from σ = 1 to 0
    assert rel_err(out, expected) <= REORDER_TOL * conditioning(cameras)


@pytest.mark.parametrize("window", [None, 4])
def test_recache_with_cameras_replays_each_frame_with_its_own_camera(window):
    model = camera_model(1, seed=17)
    noise, context, g = inputs(model, B=1, num_frames=7)
    new = torch.randn(context[:1].shape, generator=g)
    cameras = random_cameras(g, 1, 7)
    kw = dict(steps=[1000.0, 500.0], window=window, sink_frames=1 if window else None, max_frames=8)
    block = lambda f: tuple(c[:, f:f + 1] for c in cameras)
    rollout = M.Rollout(model, context[:1], noise.shape[2:], generator=torch.Generator().manual_seed(0), **kw)
    frames = [rollout.step(noise[:, f:f + 1], cameras=block(f)) for f in range(6)]
    visible = sorted(rollout.visible)
    assert sorted(rollout.visible_cameras) == visible
    rollout.set_context(new, mode="recache")
    rollout.generator = torch.Generator().manual_seed(9)
    x = rollout.step(noise[:, 6:7], cameras=block(6))
    fresh = M.Rollout(model, new, noise.shape[2:], generator=torch.Generator().manual_seed(9), **kw)
    with torch.no_grad():
        for f in visible:
            fresh._context_pass(frames[f], f, block(f))
    fresh.frame = 6
    assert torch.equal(fresh.step(noise[:, 6:7], cameras=block(6)), x)
