"""
The causal Wan2.1 DiT of Causal Forcing++ (arXiv 2605.15141), in one file.

Wan2.1-T2V is a bidirectional video diffusion transformer. Causal Forcing++ turns it into a frame-wise
autoregressive generator; the only architectural changes are (a) one timestep per frame (per-frame AdaLN
modulation) and (b) which tokens self-attention may see. This file holds the exact Wan2.1 network with
four ways to run it, chosen by the arguments of `CausalWanModel.forward`:

  bidirectional    causal=False                   every token sees every token (= original Wan / diffusers);
                                                  the toy base model and the Stage-3 real/fake scores.
  block-causal     causal=True                    a frame block sees itself and earlier blocks (one pass
                                                  over the whole video, "diffusion forcing" layout).
  teacher forcing  clean_x=...                    sequence [clean ‖ noisy]: noisy block b sees clean blocks
                                                  < b and itself; one pass = all AR conditionals (paper §2.2,
                                                  Stage 1 and the Stage-2 teacher/student).
  cached           cache=KVCache, start_frame=f   one block at a time against the keys/values of earlier
                                                  blocks (inference and Stage-3 self-rollout).

Every mode takes optional per-frame cameras (`cameras=`), injected through PRoPE as in the paper's
action-conditioned world model (§3.3); without them the model is exactly Wan.

The forward is also the fast path's: fast_path(model) compiles its token-local pieces and, on CUDA, replays cached
calls from CUDA graphs, without a second copy of the maths (docs/performance.md).

Below the network: the flow-matching helpers (σ = t/1000 exactly, x_t = (1-σ)x0 + σε, v = ε - x0),
`Rollout` (one block per step(); an optional rolling KV cache for rollouts of any length; prompt switching)
and `generate()` on top of it (the few-step frame-/chunk-wise rollout with the separate first-block step list
of the paper's ASD trick), and strict weight loading for the original Wan, diffusers, official Causal-Forcing /
Self-Forcing `.pt` files and our own checkpoints.

Parameter names are exactly Wan's (`blocks.0.self_attn.q.weight`, ...), so the released weights load with
strict checks. References: Wan2.1 `wan/modules/model.py` (architecture, numerics), Causal-Forcing
`causal_model.py` (cache semantics). docs/wan_formats.md has the checkpoint formats; docs/official_code.md
where and why this file differs from the official code.

Shape glossary
  B batch · F latent frames · C latent channels (16 for Wan, 12 for the toy codec) · H, W latent height/width
  h, w = H/2, W/2 token grid · S = h·w tokens per frame · L = F·S tokens · D model dim · N heads · d = D/N
  K = frames_per_block (1 frame-wise, 3 chunk-wise) · Lt = text_len text tokens · E = text_dim
"""

import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange

# -----------------------------------------------------------------------------
# attention backends, chosen in one place
#
# Masked attention (block-causal, teacher forcing) uses a dense boolean mask with SDPA on CPU and in the
# tests, and flex_attention with a BlockMask on CUDA (a dense mask over the 65,520 teacher-forcing tokens of
# a 480p video would be 4 GiB). Unmasked attention (bidirectional, cross-attention, cached inference) uses
# flash-attn when it is installed and the tensors are half precision on CUDA, SDPA otherwise. Nothing falls
# back at call time: the choice is made here and can be overridden with set_attention_backend().

try:
    from flash_attn import flash_attn_func  # optional, CUDA only (requirements-gpu.txt)
except ImportError:
    flash_attn_func = None

from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5 has no flex_attention; the dense backend still works
    create_block_mask = flex_attention = None

ATTENTION_BACKEND = "flex" if (torch.cuda.is_available() and flex_attention is not None) else "dense"
_compiled_flex_attention = None


def set_attention_backend(name):
    """'dense' (boolean mask + SDPA) or 'flex' (BlockMask + flex_attention) for masked attention."""
    global ATTENTION_BACKEND
    assert name in ("dense", "flex"), f"unknown attention backend {name!r}; use 'dense' or 'flex'"
    assert name == "dense" or flex_attention is not None, "flex_attention needs torch>=2.5"
    ATTENTION_BACKEND = name


def attention(q, k, v, mask=None):
    """Scaled dot-product attention. q [B, Lq, N, d], k/v [B, Lk, N, d] -> [B, Lq, N, d].
    mask: None (all keys), a bool tensor [Lq, Lk] (True = may attend) or a flex BlockMask."""
    if mask is None:
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            if flash_attn_func is not None:
                return flash_attn_func(q, k, v)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # explicit: cuDNN's per-call CPU cost is high
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)  # [B, Lq, N, d]
    if isinstance(mask, torch.Tensor):
        assert mask.dtype == torch.bool and mask.shape == (q.shape[1], k.shape[1]), \
            f"dense mask must be bool [{q.shape[1]}, {k.shape[1]}], got {mask.dtype} {tuple(mask.shape)}"
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask)
        return out.transpose(1, 2)
    global _compiled_flex_attention
    if q.is_cuda and _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    run = _compiled_flex_attention if q.is_cuda else flex_attention  # CPU eager: correct, slow, for tests
    out = run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)
    return out.transpose(1, 2)


# -----------------------------------------------------------------------------
# config and presets


@dataclass
class WanConfig:
    in_dim: int = 16          # latent channels in (16 for the Wan VAE)
    out_dim: int = 16         # latent channels out
    dim: int = 1536           # D
    ffn_dim: int = 8960
    freq_dim: int = 256       # width of the timestep sinusoid
    text_dim: int = 4096      # umT5-XXL width
    text_len: int = 512       # context is always zero-padded to this many rows (Wan pads to 512, no mask)
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6
    frames_per_block: int = 1  # K: 1 = frame-wise, 3 = chunk-wise
    causal: bool = True        # default attention when forward() is called without clean_x/cache
    rope_max_positions: int = 1024  # RoPE tables cover positions 0..1023 on each axis, as in Wan
    rope_theta: float = 10000.0  # RoPE base: pair k of an axis with D dims turns by theta^(-2k/D) per position (Wan)
    camera_dims: int = 0       # per head, the lowest-frequency frame-axis RoPE channels that carry PRoPE's
                               # camera transform when forward() gets cameras (multiple of 4; 0 = no cameras)

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        assert self.dim % self.num_heads == 0, f"dim {self.dim} not divisible by num_heads {self.num_heads}"
        head_dim = self.dim // self.num_heads
        assert head_dim % 2 == 0 and head_dim >= 12, f"head_dim {head_dim} must be even and >= 12 for 3-D RoPE"
        assert self.patch_size[0] == 1, "temporal patching is not supported: every frame needs its own timestep"
        assert self.frames_per_block >= 1, f"frames_per_block must be >= 1, got {self.frames_per_block}"
        frame_dims = head_dim - 4 * (head_dim // 6)  # rope_axis_dims(head_dim)[0], defined below
        assert self.camera_dims % 4 == 0 and 0 <= self.camera_dims <= frame_dims, \
            f"camera_dims {self.camera_dims} must be a multiple of 4 in [0, {frame_dims}] (the frame-axis RoPE " \
            f"channels of a {head_dim}-wide head)"

    @property
    def head_dim(self):
        return self.dim // self.num_heads

    @classmethod
    def from_preset(cls, name, **overrides):
        assert name in PRESETS, f"unknown preset {name!r}; choose one of {sorted(PRESETS)}"
        return cls(**{**asdict(PRESETS[name]), **overrides})

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        assert not unknown, f"unknown WanConfig keys {unknown}"
        return cls(**d)


PRESETS = {
    # Wan2.1-T2V-1.3B: 1,418,996,800 parameters
    "wan2.1-t2v-1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    # Wan2.1-T2V-14B (the Stage-3 real score): 14,288,491,584 parameters
    "wan2.1-t2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # the embedded toy world (toyworld.py): 32x32 RGB -> space-to-depth 2 -> 12 channels at 16x16, 64 tokens
    # per frame; a tiny frozen umT5 gives 32-wide text padded to 16 tokens. 1.24M parameters. Two heads of 64,
    # not four of 32: the model sees position only through RoPE, and at head_dim 32 each spatial axis gets 5
    # frequencies of which 3 barely turn across an 8-token grid; at 64 it has 10 (4-5 useful).
    "toy": WanConfig(in_dim=12, out_dim=12, dim=128, ffn_dim=512, text_dim=32, text_len=16,
                     num_heads=2, num_layers=4),
}

# -----------------------------------------------------------------------------
# small functions: timestep sinusoid and 3-D RoPE


def sinusoidal_embedding(t, dim):
    """Wan's timestep sinusoid: [cos(t·ω_k) | sin(t·ω_k)], ω_k = 10000^(-k/(dim/2)), on the raw 0..1000
    scale, computed in float64 as the original does (cos first). t [N] -> [N, dim] float32."""
    assert t.ndim == 1 and t.dtype in (torch.float32, torch.float64), \
        f"timesteps must be a 1-D float32/float64 tensor (never bf16), got {t.dtype} {tuple(t.shape)}"
    half = dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angle = t.to(torch.float64)[:, None] * omega[None, :]  # [N, half]
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1).float()  # [N, dim]


def rope_axis_dims(head_dim):
    """Real dims of the head given to (frame, height, width): d - 4(d//6), 2(d//6), 2(d//6); 44/42/42 at 128."""
    return head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)


def rope_angles(head_dim, num_frames, h, w, start_frame=0, max_positions=1024, device=None, camera_dims=0,
                theta=10000.0):
    """Rotation angle of every (token, pair) for the grid (frames start_frame.., rows, cols).
    Pair k of an axis with D real dims turns at position p by p·theta^(-2k/D) (theta = 10,000 in Wan).
    Returns [F·h·w, d/2] fp64.
    camera_dims > 0: the last camera_dims/2 frame-axis pairs get angle 0 (no rotation): PRoPE's camera
    transform owns those channels (apply_camera)."""
    assert 0 <= start_frame and start_frame + num_frames <= max_positions, \
        f"frames {start_frame}..{start_frame + num_frames - 1} exceed the RoPE range 0..{max_positions - 1}"
    assert h <= max_positions and w <= max_positions, f"token grid {h}x{w} exceeds the RoPE range {max_positions}"
    parts = []
    for n_pos, offset, axis_dim in zip((num_frames, h, w), (start_frame, 0, 0), rope_axis_dims(head_dim)):
        inv_freq = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim)
        pos = torch.arange(offset, offset + n_pos, dtype=torch.float64, device=device)
        parts.append(pos[:, None] * inv_freq[None, :])  # [n_pos, axis_dim/2]
    f_part, h_part, w_part = parts
    if camera_dims:
        f_part[:, f_part.shape[1] - camera_dims // 2:] = 0.0
    angles = torch.cat([
        f_part[:, None, None, :].expand(num_frames, h, w, -1),
        h_part[None, :, None, :].expand(num_frames, h, w, -1),
        w_part[None, None, :, :].expand(num_frames, h, w, -1),
    ], dim=-1)  # [F, h, w, d/2], frame-major token order
    return angles.reshape(num_frames * h * w, head_dim // 2)  # [L, d/2]


_rope_tables = {}


def rope_table(head_dim, num_frames, h, w, max_positions, device, camera_dims=0, theta=10000.0):
    """(cos, sin) fp32 [num_frames·h·w, d/2] for frames 0..num_frames-1: the first rows of one memoised table
    per grid, which grows (doubling, up to max_positions frames) when a longer one is asked for. Row for row
    equal to rope_angles: the angles are the same fp64 products. Frames p..p+n-1 are rows [p·h·w, (p+n)·h·w)."""
    assert num_frames <= max_positions, f"{num_frames} frames exceed the RoPE range of {max_positions} positions"
    key = (head_dim, h, w, str(device), camera_dims, theta)
    table = _rope_tables.get(key)
    if table is None or table[0].shape[0] < num_frames * h * w:
        have = 0 if table is None else table[0].shape[0] // (h * w)
        frames = min(max(num_frames, 2 * have, 16), max_positions)
        angles = rope_angles(head_dim, frames, h, w, 0, max_positions, device=device, camera_dims=camera_dims,
                             theta=theta)
        table = _rope_tables[key] = (torch.cos(angles).float(), torch.sin(angles).float())
    return table[0][:num_frames * h * w], table[1][:num_frames * h * w]


_rope_rows = {}


def rope_rows(head_dim, start_frame, num_frames, h, w, max_positions, device, camera_dims=0, theta=10000.0):
    """(cos, sin) fp32 [num_frames·h·w, d/2] of frames start_frame..start_frame+num_frames-1: rows of rope_table,
    kept as their own contiguous tensors per (grid, start_frame, num_frames). A rollout thus hands the model the
    same RoPE tensors at a given slot on every call: compiled code sees no changing offsets, and a CUDA graph
    captured at that slot reads them where they stay."""
    key = (head_dim, start_frame, num_frames, h, w, str(device), camera_dims, theta)
    if key not in _rope_rows:
        if len(_rope_rows) > 4096:  # many shapes seen (e.g. training with varying lengths): start over
            _rope_rows.clear()
        cos, sin = rope_table(head_dim, start_frame + num_frames, h, w, max_positions, device, camera_dims, theta)
        _rope_rows[key] = (cos[start_frame * h * w:].clone(), sin[start_frame * h * w:].clone())
    return _rope_rows[key]


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x[2j], x[2j+1]) by the angles behind cos/sin. Computed in fp32.
    x [B, L, N, d]; cos/sin [L, d/2] fp32 -> [B, L, N, d] in x's dtype."""
    B, L, N, d = x.shape
    assert cos.shape == (L, d // 2), f"RoPE table {tuple(cos.shape)} does not match {L} tokens x {d // 2} pairs"
    pairs = x.float().reshape(B, L, N, d // 2, 2)  # [B, L, N, d/2, 2]
    real, imag = pairs.unbind(-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]  # [1, L, 1, d/2]
    rotated = torch.stack([real * c - imag * s, real * s + imag * c], dim=-1)  # [B, L, N, d/2, 2]
    return rotated.reshape(B, L, N, d).type_as(x)


# -----------------------------------------------------------------------------
# PRoPE: cameras as relative positional encoding (Li et al. 2025, arXiv 2507.10496), the camera conditioning
# of the action-conditioned world model (paper §3.3)
#
# Every frame has a camera: world-to-camera T (4x4 rigid) and intrinsics K (3x3, in normalised image
# coordinates: x, y in [-0.5, 0.5] across the image; normalised_intrinsics converts pixels). P = lift(K)·T maps
# world points to the image (lift puts K in the top-left of a 4x4 identity). Inside self-attention, channel
# group g of a head (4 channels) of a token in frame i is transformed as
#     q ← Pᵢᵀ q,   k ← Pⱼ⁻¹ k,   v ← Pⱼ⁻¹ v,   and the attention output  o ← Pᵢ o,
# so a logit is qᵀ Pᵢ Pⱼ⁻¹ k and an output Pᵢ Σⱼ aᵢⱼ Pⱼ⁻¹ vⱼ: both depend on the cameras only through the
# relative projective transform Pᵢ Pⱼ⁻¹, which is unchanged when every camera moves by the same rigid motion
# (T → T·G⁻¹). The transform owns the last `camera_dims` frame-axis RoPE channels of every head (the lowest
# frequencies, which turn least across a clip); the other channels keep Wan's 3-D RoPE, which PRoPE reduces to
# within one image. Keys and values are transformed before they enter a KV cache, so a cached frame needs
# nothing but its own camera, and a query only its own.


def normalised_intrinsics(focal_x, focal_y, centre_x, centre_y, width, height):
    """Pixel intrinsics (focal lengths and principal point in pixels of a width x height image) -> the 3x3 K in
    normalised image coordinates the model takes. Tensors [...] -> [..., 3, 3]."""
    focal_x = torch.as_tensor(focal_x, dtype=torch.float32)
    K = torch.zeros(*focal_x.shape, 3, 3, dtype=torch.float32)
    K[..., 0, 0] = focal_x / width
    K[..., 1, 1] = torch.as_tensor(focal_y, dtype=torch.float32) / height
    K[..., 0, 2] = torch.as_tensor(centre_x, dtype=torch.float32) / width - 0.5
    K[..., 1, 2] = torch.as_tensor(centre_y, dtype=torch.float32) / height - 0.5
    K[..., 2, 2] = 1.0
    return K


def camera_projections(world_to_camera, intrinsics):
    """(P, P⁻¹) [B, F, 4, 4] of PRoPE for per-frame cameras, in fp32 (fp64 inputs stay fp64).
    world_to_camera [B, F, 4, 4] rigid (rotation, translation, bottom row 0 0 0 1); intrinsics [B, F, 3, 3]
    normalised (normalised_intrinsics), bottom row 0 0 1. The rigid inverse is taken in closed form."""
    assert world_to_camera.ndim == 4 and world_to_camera.shape[-2:] == (4, 4), \
        f"world_to_camera must be [B, F, 4, 4], got {tuple(world_to_camera.shape)}"
    assert intrinsics.shape == world_to_camera.shape[:2] + (3, 3), \
        f"intrinsics must be [B, F, 3, 3] = {tuple(world_to_camera.shape[:2]) + (3, 3)}, got {tuple(intrinsics.shape)}"
    dtype = torch.promote_types(world_to_camera.dtype, torch.float32)
    T, K = world_to_camera.to(dtype), intrinsics.to(dtype)
    R, translation = T[..., :3, :3], T[..., :3, 3:]  # [B, F, 3, 3], [B, F, 3, 1]
    bottom = T.new_tensor([0.0, 0.0, 0.0, 1.0])
    assert torch.equal(T[..., 3, :], bottom.expand_as(T[..., 3, :])), \
        "world_to_camera must be rigid 4x4 matrices with bottom row [0, 0, 0, 1]"
    eye3 = torch.eye(3, dtype=dtype, device=T.device)
    orthogonality = (R.transpose(-1, -2) @ R - eye3).abs().max().item()
    assert orthogonality < 1e-4, \
        f"world_to_camera rotations are not orthonormal (max |RᵀR - I| = {orthogonality:.2e}); pass rigid poses"
    assert torch.equal(K[..., 2, :], K.new_tensor([0.0, 0.0, 1.0]).expand_as(K[..., 2, :])), \
        "intrinsics must be 3x3 with bottom row [0, 0, 1]"
    lift = torch.eye(4, dtype=dtype, device=T.device).repeat(*T.shape[:2], 1, 1)  # [B, F, 4, 4]
    lift_inverse = lift.clone()
    lift[..., :3, :3] = K
    lift_inverse[..., :3, :3] = torch.linalg.inv(K)
    T_inverse = torch.zeros_like(T)
    T_inverse[..., :3, :3] = R.transpose(-1, -2)
    T_inverse[..., :3, 3:] = -R.transpose(-1, -2) @ translation
    T_inverse[..., 3, 3] = 1.0
    return lift @ T, T_inverse @ lift_inverse


def cameras_for_frames(cameras, start, count):
    """The (world_to_camera, intrinsics) of frames start..start+count-1 of a clip's cameras; None stays None."""
    return None if cameras is None else tuple(c[:, start:start + count] for c in cameras)


def cameras_twice(cameras):
    """The cameras of a batch repeated for its CFG twin [cond ‖ uncond]; None stays None."""
    return None if cameras is None else tuple(torch.cat([c, c]) for c in cameras)


def camera_channels(head_dim, camera_dims):
    """The slice of a head's channels PRoPE transforms: the last camera_dims of the frame-axis RoPE block."""
    frame_dims = rope_axis_dims(head_dim)[0]
    return slice(frame_dims - camera_dims, frame_dims)


def apply_camera(x, matrices, channels):
    """Multiply every 4-channel group in `channels` of every token by its frame's 4x4 matrix.
    x [B, F·S, N, d]; matrices [B, F, 4, 4] -> [B, F·S, N, d] in x's dtype (computed in fp32 or wider)."""
    B, L, N, d = x.shape
    num_frames = matrices.shape[1]
    assert matrices.shape == (B, num_frames, 4, 4) and L % num_frames == 0, \
        f"camera matrices {tuple(matrices.shape)} do not fit {L} tokens of batch {B}"
    dtype = torch.promote_types(x.dtype, matrices.dtype)
    part = x[..., channels].to(dtype).reshape(B, num_frames, L // num_frames, N, -1, 4)  # [B, F, S, N, g, 4]
    part = torch.einsum("bfij,bfsngj->bfsngi", matrices.to(dtype), part).reshape(B, L, N, -1)
    return torch.cat([x[..., :channels.start], part.to(x.dtype), x[..., channels.stop:]], dim=-1)


# -----------------------------------------------------------------------------
# norms (statistics in fp32, as in Wan)


class RMSNorm(nn.Module):
    """RMSNorm over the full width (all heads together): x·rsqrt(mean(x²)+eps) in fp32, then ·weight."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (affine parameters too) and cast back (Wan's WanLayerNorm)."""

    def forward(self, x):
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


# -----------------------------------------------------------------------------
# attention masks as index arithmetic: mask(q, kv) -> may attend. The same functions build the dense masks
# (broadcast aranges) and flex BlockMasks (mask_mod), so the two backends cannot disagree on the rule.


def block_causal_rule(tokens_per_block):
    """A query in block b sees keys of blocks 0..b (its own block bidirectionally)."""
    def rule(q, kv):
        return (q // tokens_per_block) >= (kv // tokens_per_block)
    return rule


def teacher_forcing_rule(tokens_per_half, tokens_per_block):
    """Sequence [clean ‖ noisy], each half tokens_per_half long. A clean query in block b sees clean blocks
    0..b (a context pass); a noisy query in block b sees clean blocks < b and its own noisy block b. It never
    sees its own clean copy, another noisy block or any future frame."""
    def rule(q, kv):
        q_noisy, kv_noisy = q >= tokens_per_half, kv >= tokens_per_half
        q_block = (q % tokens_per_half) // tokens_per_block
        kv_block = (kv % tokens_per_half) // tokens_per_block
        clean_query = ~kv_noisy & (kv_block <= q_block)
        noisy_query = (kv_noisy & (kv_block == q_block)) | (~kv_noisy & (kv_block < q_block))
        return torch.where(q_noisy, noisy_query, clean_query)
    return rule


def dense_mask(rule, length, device=None):
    """Evaluate a rule on every (query, key) pair -> bool [length, length]."""
    idx = torch.arange(length, device=device)
    return rule(idx[:, None], idx[None, :])


_block_mask_cache = {}


def attention_mask(kind, num_frames, tokens_per_frame, frames_per_block, device):
    """The mask for a masked forward, in the representation of the current backend. Cached by shape, so a
    teacher-forcing call can never reuse a block-causal mask or a mask of another length."""
    tokens_per_block = frames_per_block * tokens_per_frame
    if kind == "block_causal":
        length, rule = num_frames * tokens_per_frame, block_causal_rule(tokens_per_block)
    else:
        assert kind == "teacher_forcing", f"unknown mask kind {kind!r}"
        half = num_frames * tokens_per_frame
        length, rule = 2 * half, teacher_forcing_rule(half, tokens_per_block)
    key = (ATTENTION_BACKEND, kind, num_frames, tokens_per_frame, frames_per_block, str(device))
    if key not in _block_mask_cache:
        if ATTENTION_BACKEND == "dense":
            _block_mask_cache[key] = dense_mask(rule, length, device)
        else:
            _block_mask_cache[key] = create_block_mask(lambda b, h, q, kv: rule(q, kv), None, None,
                                                       length, length, device=device)
    return _block_mask_cache[key]


# -----------------------------------------------------------------------------
# KV cache
#
# Two layouts share one class. The default (absolute) layout is the one Stage 3 and fixed-length sampling use:
# slot = absolute frame, keys stored RoPE-rotated, at most rope_max_positions frames. The rolling layout
# (sink_frames given) serves rollouts of any length with a bounded cache, as LongLive and Self-Forcing's
# rolling cache do: the first `sink_frames` frames stay forever (the attention sink), after them a window of
# the most recent frames; when a new block does not fit, the oldest non-sink frames are evicted and the
# window shifts left.
#
# RoPE positions in the rolling layout. Self-Forcing and LongLive rotate each key once, at its absolute frame
# index, and keep it rotated while it rolls through the cache; the query of frame f is rotated at f. Since
# RoPE only sees differences, window keys keep their true distance to the query, but the sink's distance
# grows without bound (frame 10,000 sees the sink 10,000 frames away) and the absolute index runs off the
# 1,024-entry RoPE table of Wan. That works for LongLive because it fine-tunes on long streaming rollouts with
# this layout; our students only ever saw clips of the trained length (12 toy frames, 21 Wan latent frames),
# so distances beyond it are out of distribution. We therefore index positions by *slot*: keys are stored
# unrotated and rotated on read at their slot index, and the query at its own slots — sink at 0..s-1, window
# at s.., the current block last. Window frames keep their true distances to the query (the window is
# contiguous); the sink sits directly before the window, and no distance ever exceeds the cache size. With a
# cache no longer than the trained clip, every attention step looks like one inside a trained-length clip,
# and until the first eviction slot = absolute frame, so the rolling layout reproduces the absolute one.


class KVCache:
    """Keys/values of every layer for up to `max_frames` frames, preallocated.

    Absolute layout (sink_frames=None). Slots are indexed by absolute frame: frame f owns token slots
    [f·S, (f+1)·S). A forward on the block starting at frame f writes its keys (already RoPE-rotated) into its
    own slots and attends to slots [0, (f+K)·S). Running the same block again (the next denoising step, then
    the clean context pass at t=0) overwrites the same slots, so after the context pass the cache holds exactly
    the context later frames must see. `filled_frames` (a Python int, no device sync) is one past the last
    frame ever written.

    Rolling layout (sink_frames=s, s < max_frames). `slot_frames` lists the absolute frame held by every used
    slot: the first s frames ever written, then the most recent ones. A block at a new frame (start_frame >=
    filled_frames; gaps are allowed, a re-cache replays only the visible frames) evicts the oldest non-sink
    frames if it does not fit; the last block may be rewritten in place. Keys are stored unrotated and the
    model rotates them at their slot index (see the note above). Memory and per-frame cost are flat in the
    frame index. Inference only: grad-enabled calls are refused.

    Only no-grad calls write. A grad-enabled call (the exit step of a Stage-3 self-rollout) concatenates its
    own keys/values, with gradient, to the cached prefix and leaves the buffers untouched; the no-grad context
    pass that follows writes the block. So the cache only ever changes outside autograd, and the recomputation
    of an activation-checkpointed block during backward reads exactly what its forward read, whatever order
    autograd runs the blocks in (the official code relies on reverse order here; docs/official_code.md).
    The text keys/values of cross-attention are computed once per cache and reused in no-grad calls.
    """

    def __init__(self, cfg, batch_size, max_frames, tokens_per_frame, device=None, dtype=torch.float32,
                 sink_frames=None):
        self.batch_size, self.max_frames, self.tokens_per_frame = batch_size, max_frames, tokens_per_frame
        assert max_frames <= cfg.rope_max_positions, \
            f"a cache of {max_frames} frames exceeds the RoPE range of {cfg.rope_max_positions} frames"
        self.rolling = sink_frames is not None
        if self.rolling:
            assert 0 <= sink_frames and sink_frames + cfg.frames_per_block <= max_frames, \
                f"a rolling cache of {max_frames} frames cannot keep {sink_frames} sink frames plus one " \
                f"{cfg.frames_per_block}-frame block; use fewer sink frames or a larger window"
        self.sink_frames = sink_frames
        shape = (cfg.num_layers, batch_size, max_frames * tokens_per_frame, cfg.num_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [layers, B, max_frames·S, N, d]
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.context_kv = [None] * cfg.num_layers  # per layer (k, v) of the text, [B, Lt, N, d] each
        self.text_buffers = [None] * cfg.num_layers  # where they live: kept across prompts (fixed addresses)
        self.context = None  # the context tensor the cross-attention cache belongs to
        self.filled_frames = 0
        self.slot_frames = []  # rolling layout: absolute frame held by each used slot, in slot order
        self.key_rope = None  # rolling layout: (cos, sin) [visible tokens, d/2] of the current call, set by the model
        self.camera_dims = 0  # PRoPE channels of the keys/values written so far (one cache never mixes the two)

    def reset(self):
        """Forget everything (new video). Buffers are kept; filled_frames and the text K/V are cleared."""
        self.filled_frames = 0
        self.slot_frames = []
        self.camera_dims = 0
        self.forget_text()

    def forget_text(self):
        """Drop the cached text keys/values, so the next call computes them from its (new) context."""
        self.context_kv = [None] * len(self.context_kv)
        self.context = None

    def store_text(self, layer, k, v):
        """Keep a layer's text keys/values [B, Lt, N, d] for the no-grad calls that follow. They are copied into
        the buffers of the previous prompt when the shapes match, so the text K/V keep their memory addresses
        for the whole rollout (a captured CUDA graph reads them there)."""
        buffers = self.text_buffers[layer]
        if buffers is None or buffers[0].shape != k.shape or buffers[0].dtype != k.dtype:
            buffers = self.text_buffers[layer] = (k.clone(), v.clone())
        else:
            buffers[0].copy_(k)
            buffers[1].copy_(v)
        self.context_kv[layer] = buffers
        return buffers

    def text_ready(self):
        """True when every layer holds its text keys/values (the forward then skips the text embedding)."""
        return all(kv is not None for kv in self.context_kv)

    def check_block(self, start_frame, num_frames, batch_size):
        assert batch_size == self.batch_size, f"cache batch {self.batch_size} != input batch {batch_size}"
        assert 0 <= start_frame <= self.filled_frames, \
            f"block at frame {start_frame} would leave a gap: the cache holds frames 0..{self.filled_frames - 1}"
        assert start_frame + num_frames <= self.max_frames, \
            f"frames {start_frame}..{start_frame + num_frames - 1} exceed the cache size of {self.max_frames} frames"

    def place(self, start_frame, num_frames, batch_size):
        """Where the block at absolute `start_frame` goes -> its first slot, which is also the RoPE frame
        position of its queries. The absolute layout returns start_frame; the rolling layout evicts the oldest
        non-sink frames of every layer when a new block does not fit."""
        if not self.rolling:
            self.check_block(start_frame, num_frames, batch_size)
            return start_frame
        assert batch_size == self.batch_size, f"cache batch {self.batch_size} != input batch {batch_size}"
        assert not torch.is_grad_enabled(), "the rolling KV cache is for inference; call it under torch.no_grad()"
        new_frames = list(range(start_frame, start_frame + num_frames))
        if start_frame < self.filled_frames:  # rewriting the newest block (next denoising step, context pass)
            assert self.slot_frames[-num_frames:] == new_frames, \
                f"a rolling cache can only rewrite its newest block {self.slot_frames[-num_frames:]} or append " \
                f"at frame >= {self.filled_frames}; got frames {new_frames}"
            return len(self.slot_frames) - num_frames
        used = len(self.slot_frames)
        evict = max(0, used + num_frames - self.max_frames)
        if evict:
            S, s = self.tokens_per_frame, self.sink_frames
            keep = slice((s + evict) * S, used * S)  # the window frames that stay, moved left over the evicted
            self.k[:, :, s * S:(used - evict) * S] = self.k[:, :, keep].clone()
            self.v[:, :, s * S:(used - evict) * S] = self.v[:, :, keep].clone()
            self.slot_frames = self.slot_frames[:s] + self.slot_frames[s + evict:]
        self.slot_frames += new_frames
        return len(self.slot_frames) - num_frames

    def update(self, layer, k, v, slot):
        """Write this block's k/v [B, n, N, d] at its slots (no-grad calls only); return the visible k/v
        [B, (slot+n/S)·S, N, d]."""
        begin = slot * self.tokens_per_frame
        end = begin + k.shape[1]
        if torch.is_grad_enabled():  # read-only: own keys with gradient after a copy of the cached prefix
            k_all = torch.cat([self.k[layer, :, :begin].to(k.dtype), k], dim=1)
            v_all = torch.cat([self.v[layer, :, :begin].to(v.dtype), v], dim=1)
            return k_all, v_all
        self.k[layer, :, begin:end] = k
        self.v[layer, :, begin:end] = v
        return self.k[layer, :, :end].to(k.dtype), self.v[layer, :, :end].to(v.dtype)

    def nbytes(self):
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def __repr__(self):
        layout = f", sink={self.sink_frames}, slots={self.slot_frames}" if self.rolling else ""
        return (f"KVCache(layers={self.k.shape[0]}, batch={self.batch_size}, frames={self.filled_frames}/"
                f"{self.max_frames}, tokens_per_frame={self.tokens_per_frame}, dtype={self.k.dtype}{layout})")


# -----------------------------------------------------------------------------
# attention layers
#
# Each layer's maths is split at its two attention calls. The pieces between them (projections, norms, RoPE,
# modulation, residual adds) depend only on the block's own tokens, so their shapes never change during a
# rollout and the fast path compiles them (fast_path()); the attention calls read a cache whose length grows.


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)  # over all heads, before the split

    def project(self, x, rope_cos, rope_sin, camera=None, rotate_keys=True):
        """x [B, L, D] -> q, k, v [B, L, N, d]: RMS-normed q and k, RoPE on q (and on k unless a rolling cache
        rotates keys on read), PRoPE's camera transform on q, k, v when camera = (P, P⁻¹, channels) is given."""
        B, L, D = x.shape
        N = self.num_heads
        q = self.norm_q(self.q(x)).view(B, L, N, D // N)  # [B, L, N, d]
        k = self.norm_k(self.k(x)).view(B, L, N, D // N)
        v = self.v(x).view(B, L, N, D // N)
        q = apply_rope(q, rope_cos, rope_sin)
        if rotate_keys:
            k = apply_rope(k, rope_cos, rope_sin)
        if camera is not None:  # RoPE leaves these channels alone (angle 0), so the order does not matter
            projection, inverse, channels = camera
            q = apply_camera(q, projection.transpose(-1, -2), channels)
            k = apply_camera(k, inverse, channels)
            v = apply_camera(v, inverse, channels)
        return q, k, v

    def attend(self, q, k, v, mask=None, cache=None, layer=0, slot=0):
        """Attention of this block's queries over its own keys, or over the cache it writes them into.
        q, k, v [B, L, N, d] (k rotated unless the cache is rolling) -> [B, L, N, d]."""
        if cache is not None:
            k, v = cache.update(layer, k, v, slot)  # [B, L_visible, N, d]
            if cache.rolling:  # keys stored unrotated, rotated at their slot on read
                k = apply_rope(k, *cache.key_rope)
        return attention(q, k, v, mask)

    def output(self, attended, camera=None):
        """[B, L, N, d] -> [B, L, D]: PRoPE's output transform Pᵢ·o when cameras are given, then the o projection."""
        B, L, N, d = attended.shape
        if camera is not None:
            attended = apply_camera(attended, camera[0], camera[2])
        return self.o(attended.reshape(B, L, N * d))


class CrossAttention(nn.Module):
    """Text cross-attention: no RoPE and no mask — Wan attends all text_len rows, zero pads included."""

    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def query(self, x):
        B, L, D = x.shape
        return self.norm_q(self.q(x)).view(B, L, self.num_heads, D // self.num_heads)  # [B, L, N, d]

    def text_keys_values(self, text, cache=None, layer=0):
        """text [B, Lt, D] (the embedded context) -> k, v [B, Lt, N, d]. A cache computes them once per prompt
        (no-grad calls); with gradient enabled they are recomputed so the text path receives gradient."""
        if cache is not None and not torch.is_grad_enabled() and cache.context_kv[layer] is not None:
            return cache.context_kv[layer]
        B, Lt, D = text.shape
        N = self.num_heads
        k = self.norm_k(self.k(text)).view(B, Lt, N, D // N)  # [B, Lt, N, d]
        v = self.v(text).view(B, Lt, N, D // N)
        if cache is not None and not torch.is_grad_enabled():
            k, v = cache.store_text(layer, k, v)
        return k, v


# -----------------------------------------------------------------------------
# transformer block and head


class WanBlock(nn.Module):
    """x ← x + g₁·SelfAttn(LN₁(x)(1+s₁)+b₁); x ← x + CrossAttn(LN₃(x), text); x ← x + g₂·FFN(LN₂(x)(1+s₂)+b₂).
    Shift/scale/gate come per frame from `modulation + e0[frame]`. Modulation and the gated residual adds
    run in fp32, as in the original; the residual stream x is fp32.
    forward() runs three token-local pieces around the two attention calls; with fast_path() on, no-grad calls
    run the compiled versions of the same three methods."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.dim
        self.norm1 = LayerNorm(D, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(D, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(D, eps=cfg.eps, elementwise_affine=True)  # cross_attn_norm=True in Wan2.1
        self.cross_attn = CrossAttention(D, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm(D, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(D, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, D))
        self.modulation = nn.Parameter(torch.randn(1, 6, D) / D ** 0.5)
        self.compiled = False  # set by fast_path(): no-grad calls run the compiled pieces

    def forward(self, x, e0, text, rope_cos, rope_sin, mask=None, cache=None, layer=0, slot=0, camera=None):
        run = _COMPILED_PIECES if (self.compiled and not torch.is_grad_enabled()) else _EAGER_PIECES
        rolling = cache is not None and cache.rolling
        q, k, v = run["self_attention_inputs"](self, x, e0, rope_cos, rope_sin, camera, not rolling)
        attended = self.self_attn.attend(q, k, v, mask, cache, layer, slot)  # [B, L, N, d]
        x, q_text = run["cross_attention_inputs"](self, x, e0, attended, camera)
        k_text, v_text = self.cross_attn.text_keys_values(text, cache, layer)
        return run["feed_forward"](self, x, e0, attention(q_text, k_text, v_text))

    # ---- the three token-local pieces (static shapes within a rollout) ----

    def modulation_of(self, e0, index):
        """Row `index` of modulation + e0: [B, F, 6, D] -> [B, F, 1, D] fp32 (0-2: shift, scale, gate of
        self-attention; 3-5: of the FFN)."""
        return (self.modulation.float()[:, None] + e0)[:, :, index].unsqueeze(2)

    def modulated(self, norm, x, e0, index):
        """norm(x)·(1 + scale) + shift with (shift, scale) = modulation rows index, index+1; fp32 [B, L, D]."""
        B, L, D = x.shape
        num_frames = e0.shape[1]  # frames in this sequence (2F under teacher forcing)
        h = norm(x).float().view(B, num_frames, L // num_frames, D)  # [B, F, S, D]
        h = h * (1 + self.modulation_of(e0, index + 1)) + self.modulation_of(e0, index)
        return h.view(B, L, D)

    def gated(self, x, y, e0, index):
        """x + gate·y with gate = modulation row `index`, in fp32. x [B, L, D] fp32, y [B, L, D]."""
        B, L, D = x.shape
        num_frames = e0.shape[1]
        return x + (y.float().view(B, num_frames, L // num_frames, D) * self.modulation_of(e0, index)).view(B, L, D)

    def self_attention_inputs(self, x, e0, rope_cos, rope_sin, camera, rotate_keys):
        dtype = self.self_attn.q.weight.dtype  # compute dtype of the linear layers
        h = self.modulated(self.norm1, x, e0, 0).to(dtype)
        return self.self_attn.project(h, rope_cos, rope_sin, camera, rotate_keys)  # q, k, v [B, L, N, d]

    def cross_attention_inputs(self, x, e0, attended, camera):
        x = self.gated(x, self.self_attn.output(attended, camera), e0, 2)
        return x, self.cross_attn.query(self.norm3(x).to(self.cross_attn.q.weight.dtype))

    def feed_forward(self, x, e0, attended_text):
        B, L, N, d = attended_text.shape
        x = x + self.cross_attn.o(attended_text.reshape(B, L, N * d)).float()
        y = self.ffn(self.modulated(self.norm2, x, e0, 3).to(self.ffn[0].weight.dtype))
        return self.gated(x, y, e0, 5)


_PIECES = ("self_attention_inputs", "cross_attention_inputs", "feed_forward")
_EAGER_PIECES = {name: getattr(WanBlock, name) for name in _PIECES}
_COMPILED_PIECES = {}  # filled by fast_path(); one compiled function per piece, shared by every layer


class Head(nn.Module):
    """LN(x)·(1+scale)+shift with (shift, scale) = head.modulation + e (the time embedding itself, not e0),
    then a Linear to the patch's channels. Runs in fp32 like the original."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e):
        B, L, D = x.shape
        num_frames = e.shape[1]
        mod = self.modulation.float()[:, None] + e[:, :, None, :]  # [B, F, 2, D]
        shift, scale = (m.unsqueeze(2) for m in mod.unbind(2))  # [B, F, 1, D]
        h = self.norm(x).float().view(B, num_frames, L // num_frames, D) * (1 + scale) + shift  # [B, F, S, D]
        return self.head(h.view(B, L, D).to(self.head.weight.dtype)).float()  # [B, L, C·ph·pw]


# -----------------------------------------------------------------------------
# the model


class CausalWanModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.gradient_checkpointing = False  # recompute each block in backward (activation checkpointing)
        self.init_weights()

    def init_weights(self):
        """Wan's init: Xavier-uniform linears with zero bias, N(0, 0.02) text/time MLPs, zero output head
        (so a fresh model predicts v = 0), modulation ~ randn/√D (set in the constructors)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for module in seq:
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def tokens_per_frame(self, height, width):
        _, ph, pw = self.cfg.patch_size
        return (height // ph) * (width // pw)

    # ---- patchify / embeddings ----

    def patchify(self, x):
        """[B, F, C, H, W] -> tokens [B, F·h·w, D] (frame-major, then row, then column)."""
        x = x.permute(0, 2, 1, 3, 4).to(self.patch_embedding.weight.dtype)  # [B, C, F, H, W]
        return self.patch_embedding(x).flatten(2).transpose(1, 2)  # [B, D, F, h, w] -> [B, F·h·w, D]

    def unpatchify(self, tokens, num_frames, height, width):
        """[B, F·h·w, ph·pw·C] -> [B, F, C, H, W]; a token's channels are ordered (ph, pw, C), as in Wan."""
        _, ph, pw = self.cfg.patch_size
        return rearrange(tokens, "b (f h w) (ph pw c) -> b f c (h ph) (w pw)", f=num_frames, h=height // ph,
                         w=width // pw, ph=ph, pw=pw)

    def time_embeddings(self, t):
        """t [B, F] -> e [B, F, D] (for the head) and e0 [B, F, 6, D] (for the blocks), both fp32."""
        B, num_frames = t.shape
        sinusoid = sinusoidal_embedding(t.reshape(-1), self.cfg.freq_dim)  # [B·F, freq_dim]
        e = self.time_embedding(sinusoid.to(self.time_embedding[0].weight.dtype)).float()  # [B·F, D]
        e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float()  # [B·F, 6D]
        return e.view(B, num_frames, -1), e0.view(B, num_frames, 6, -1)  # [B, F, D], [B, F, 6, D]

    # ---- forward ----

    def forward(self, x, t, context, *, causal=None, cache=None, start_frame=0, clean_x=None, clean_t=None,
                cameras=None):
        """Predict the flow velocity v ≈ ε − x0 for noisy latents.

        x        [B, F, C, H, W] noisy latents (a single block of K frames when `cache` is given)
        t        [B, F] per-frame timesteps in [0, 1000] (float32; [B] is broadcast over frames)
        context  [B, text_len, text_dim] text embeddings, zero-padded after each prompt
        causal   None → cfg.causal; False = bidirectional, True = block-causal with cfg.frames_per_block
        cache    KVCache → cached inference of the block at `start_frame` (writes its K/V into the cache)
        clean_x  [B, F, C, H, W] clean context → teacher forcing; clean_t [B, F] its timesteps (default 0;
                 noise the clean frames yourself if you pass a context-noise t)
        cameras  None, or (world_to_camera [B, F, 4, 4], intrinsics [B, F, 3, 3]) of x's frames (the block's
                 frames when cached; clean frame j shares camera j under teacher forcing): PRoPE on the
                 cfg.camera_dims channels. None runs exactly the model without cameras.
        returns  v [B, F, out_dim, H, W] float32
        """
        cfg = self.cfg
        B, num_frames, C, H, W = x.shape
        _, ph, pw = cfg.patch_size
        K = cfg.frames_per_block
        assert C == cfg.in_dim, f"latents have {C} channels, the model expects {cfg.in_dim}"
        assert H % ph == 0 and W % pw == 0, f"latent size {H}x{W} must be divisible by the patch {ph}x{pw}"
        assert context.shape == (B, cfg.text_len, cfg.text_dim), \
            f"context must be [B={B}, {cfg.text_len}, {cfg.text_dim}] (zero-padded), got {tuple(context.shape)}"
        if t.ndim == 1:
            t = t[:, None].expand(B, num_frames)
        assert t.shape == (B, num_frames), f"t must be [B, F] = [{B}, {num_frames}], got {tuple(t.shape)}"
        causal = cfg.causal if causal is None else causal
        S = self.tokens_per_frame(H, W)

        # which of the four attention modes
        if cache is not None:
            assert clean_x is None, "cached inference and teacher forcing are exclusive"
            assert num_frames == K and start_frame % K == 0, \
                f"cached calls run one block of {K} frame(s) at a block boundary; got {num_frames} at {start_frame}"
            assert cache.context is None or cache.context is context, \
                "this KVCache holds another context's text keys/values; call cache.reset() (new video) or " \
                "cache.forget_text() (new prompt mid-rollout)"
            mode = "cached"
        elif clean_x is not None:
            assert clean_x.shape == x.shape, f"clean_x {tuple(clean_x.shape)} must match x {tuple(x.shape)}"
            assert causal, "teacher forcing is a causal mode; do not pass causal=False with clean_x"
            mode = "teacher_forcing"
        else:
            assert start_frame == 0, "start_frame is only meaningful with a cache"
            mode = "block_causal" if causal else "bidirectional"
        if mode in ("block_causal", "teacher_forcing"):
            assert num_frames % K == 0, f"{num_frames} frames are not a whole number of {K}-frame blocks"

        # embeddings
        tokens = self.patchify(x).float()  # [B, F·S, D], residual stream in fp32
        e, e0 = self.time_embeddings(t)  # [B, F, D], [B, F, 6, D]
        camera, camera_dims = None, 0
        if cameras is not None:
            assert cfg.camera_dims > 0, "this model has no camera channels (camera_dims = 0); pass cameras=None " \
                                        "or build it with camera_dims > 0"
            world_to_camera, intrinsics = cameras
            assert world_to_camera.shape[:2] == (B, num_frames), \
                f"cameras must cover the {num_frames} frames of x: world_to_camera is {tuple(world_to_camera.shape)}"
            projection, inverse = camera_projections(world_to_camera.to(x.device), intrinsics.to(x.device))
            if mode == "teacher_forcing":  # [clean ‖ noisy] frames: clean frame j has camera j
                projection, inverse = torch.cat([projection, projection], 1), torch.cat([inverse, inverse], 1)
            camera_dims = cfg.camera_dims
            camera = (projection, inverse, camera_channels(cfg.head_dim, camera_dims))
        position = start_frame  # RoPE frame position of the first frame (= its cache slot when cached)
        if mode == "cached":
            assert cache.filled_frames == 0 or cache.camera_dims == camera_dims, \
                "this KVCache was filled " + ("with" if cache.camera_dims else "without") + " cameras; pass " \
                "cameras on every call of one video or on none (cache.reset() starts a new video)"
            cache.camera_dims = camera_dims
            position = cache.place(start_frame, num_frames, B)
        h, w = H // ph, W // pw
        assert position + num_frames <= cfg.rope_max_positions and max(h, w) <= cfg.rope_max_positions, \
            f"frames {position}..{position + num_frames - 1} or the {h}x{w} grid exceed the RoPE range " \
            f"0..{cfg.rope_max_positions - 1}"
        rope_cos, rope_sin = rope_rows(cfg.head_dim, position, num_frames, h, w, cfg.rope_max_positions, x.device,
                                       camera_dims, cfg.rope_theta)  # [F·S, d/2] each: frames position..+F-1
        if mode == "cached" and cache.rolling:  # every visible key at its slot; the queries are the last slots
            cache.key_rope = rope_table(cfg.head_dim, position + num_frames, h, w, cfg.rope_max_positions,
                                        x.device, camera_dims, cfg.rope_theta)
        if mode == "teacher_forcing":
            # [clean ‖ noisy]; clean frame j and noisy frame j share RoPE position j (as the official code does)
            clean_t = torch.zeros_like(t) if clean_t is None else clean_t
            assert clean_t.shape == t.shape, f"clean_t must be [B, F], got {tuple(clean_t.shape)}"
            tokens = torch.cat([self.patchify(clean_x).float(), tokens], dim=1)  # [B, 2F·S, D]
            _, e0_clean = self.time_embeddings(clean_t)
            e0 = torch.cat([e0_clean, e0], dim=1)  # [B, 2F, 6, D]
            rope_cos, rope_sin = torch.cat([rope_cos, rope_cos], dim=0), torch.cat([rope_sin, rope_sin], dim=0)
        mask = None
        if mode in ("block_causal", "teacher_forcing"):
            mask = attention_mask(mode, num_frames, S, K, x.device)
        text = None  # a cache that already holds the text keys/values (no-grad calls) needs no text embedding
        if not (mode == "cached" and not torch.is_grad_enabled() and cache.text_ready()):
            text = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))  # [B, Lt, D]

        # transformer and head: replayed from a CUDA graph when the fast path captured this call (fast_path())
        args = (tokens, e0, e, text, rope_cos, rope_sin, mask, cache, position, camera)
        graphs = getattr(self, "cuda_graphs", None)
        if graphs is not None and mode == "cached" and text is None and camera is None:
            key = graph_key(args, cache) + (self.patch_embedding.weight.data_ptr(), self.head.head.weight.data_ptr())
            out = graphs.run(self._transformer, args, key)
        else:
            out = self._transformer(*args)
        if mode == "cached" and not torch.is_grad_enabled():  # grad-enabled calls leave the cache unchanged
            cache.filled_frames = max(cache.filled_frames, start_frame + num_frames)
            cache.context = context
        return self.unpatchify(out, num_frames, H, W)  # [B, F, C_out, H, W]

    def _transformer(self, tokens, e0, e, text, rope_cos, rope_sin, mask, cache, position, camera):
        """The blocks and the head: tokens [B, L, D] fp32 -> [B, L, C·ph·pw] fp32. Tensors in, tensors out (the
        cache is written in place), so a CUDA graph can capture a cached call of it."""
        for layer, block in enumerate(self.blocks):
            args = (tokens, e0, text, rope_cos, rope_sin, mask, cache, layer, position, camera)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # with a cache this is safe: grad-enabled calls never write it (KVCache docstring)
                tokens = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                tokens = block(*args)
        # the head runs on the frames of e: all of them, or the noisy half [B, F·S, D] under teacher forcing
        tokens = tokens[:, tokens.shape[1] - e.shape[1] * (tokens.shape[1] // e0.shape[1]):]
        return self.head(tokens, e)


# -----------------------------------------------------------------------------
# the fast path: the same forward, compiled and (on CUDA) captured as CUDA graphs
#
# A rollout calls the model hundreds of times on one block of tokens; at batch 1 an eager call spends more time
# on per-op overhead than on arithmetic (docs/performance.md). The fast path changes how the forward runs, not
# what it computes:
#   - the three token-local pieces of every block (WanBlock) are compiled with torch.compile: the norms,
#     modulation, RoPE and the casts around the bf16 matmuls fuse into a few kernels (Wan's fp32 residual stream
#     and modulation are kept). One compilation serves every layer. No-grad calls only; training stays eager;
#   - on CUDA, each cached no-grad call is captured once as a CUDA graph (per cache slot, shapes and the
#     addresses of the buffers it reads) and replayed from then on: one launch instead of thousands. The first
#     call of a prompt (it computes the text keys/values) and calls with cameras run without a graph.
# On every path the RoPE tables (rope_table) and the text keys/values (KVCache.store_text) are computed once per
# rollout. The eager forward is the reference; tests/test_fast_path.py holds the fast path to it.


def compiler_available():
    """torch.compile on the CPU needs a C++ compiler (Inductor writes C++); on CUDA it needs Triton."""
    import shutil
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


def fast_path(model, compile=None, cuda_graphs=None):
    """Select how no-grad calls of `model` run — the one place that decides. Defaults: compile when this machine
    can (compiler_available(); on CUDA always), CUDA graphs on CUDA. Call it after the model has its final
    device and dtype. fast_path(model, compile=False, cuda_graphs=False) restores the eager forward.
    Returns a one-line description for logs."""
    device = next(model.parameters()).device
    compile = (device.type == "cuda" or compiler_available()) if compile is None else compile
    cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
    assert not cuda_graphs or device.type == "cuda", "CUDA graphs need the model on a CUDA device"
    if compile and not _COMPILED_PIECES:
        # every model width, dtype, block size, camera/no camera and cache layout is its own compiled variant of a
        # piece; a process that runs several models (the tests, bench.py) needs more than dynamo's default of 8
        import torch._dynamo
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for name, fn in _EAGER_PIECES.items():
            _COMPILED_PIECES[name] = torch.compile(fn, fullgraph=True)
    for block in model.blocks:
        block.compiled = bool(compile)
    if cuda_graphs and getattr(model, "graph_store", None) is None:
        model.graph_store = CudaGraphs()  # kept when the fast path is switched off and on again (bench.py A/B)
    model.cuda_graphs = model.graph_store if cuda_graphs else None
    return describe_fast_path(model)


def describe_fast_path(model):
    compiled = all(block.compiled for block in model.blocks)
    graphs = getattr(model, "cuda_graphs", None) is not None
    if not compiled and not graphs:
        return "eager forward" + ("" if compiler_available() else " (no C++ compiler for torch.compile: install g++)")
    return "fast path: " + " + ".join(p for p, on in (("compiled blocks", compiled), ("CUDA graphs", graphs)) if on)


def graph_key(args, cache):
    """What a captured cached call depends on besides its copied inputs (tokens, e0, e): its shapes and slot,
    and the addresses of everything it reads or writes in place — weights, cache buffers, RoPE tables, text K/V.
    Equal keys mean the graph reads and writes exactly the memory this call would."""
    tokens, e0, e, text, rope_cos, rope_sin, mask, _, position, camera = args
    assert text is None and mask is None and camera is None, "only cached calls with cached text are captured"
    tensors = [rope_cos, rope_sin, cache.k, cache.v]
    if cache.rolling:
        tensors += list(cache.key_rope)
    for kv in cache.context_kv:
        tensors += list(kv)
    return (position, cache.rolling, tuple(tokens.shape), tuple(e0.shape), tokens.dtype,
            tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in tensors))


class CudaGraphs:
    """CUDA graphs of the model's cached calls (fast_path()). run(fn, args, key): the first call with a key runs
    fn eagerly (that result is returned, and it warms up the kernels), then captures fn into a graph that reads
    copies of args[:3]; later calls copy args[:3] in and replay. Graphs share one memory pool: their outputs are
    cloned at once, so no graph's output outlives the next replay. At most `max_graphs` are kept (oldest first
    out)."""

    def __init__(self, max_graphs=512):
        from collections import OrderedDict
        self.graphs, self.max_graphs, self.pool = OrderedDict(), max_graphs, None
        self.captures = self.replays = self.failures = 0
        self.uncapturable = set()

    def run(self, fn, args, key):
        entry = self.graphs.get(key)
        if entry is not None:
            graph, static_inputs, static_out = entry
            self.graphs.move_to_end(key)
            for static, value in zip(static_inputs, args[:3]):
                static.copy_(value)
            graph.replay()
            self.replays += 1
            return static_out.clone()
        if key in self.uncapturable:
            return fn(*args)
        out = fn(*args)
        static_inputs = tuple(torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device).copy_(a)
                              for a in args[:3])
        # warm up the exact call to be captured on a side stream (compilation, autotuning, library handles happen
        # here, not during capture); it writes the same keys/values into the same slots as the call above
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*static_inputs, *args[3:])
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = fn(*static_inputs, *args[3:])
        except RuntimeError as err:  # said once per shape and counted (bench.py prints the count), not hidden
            self.uncapturable.add(key)
            self.failures += 1
            print(f"CUDA graphs: a cached call at slot {key[0]} could not be captured and runs without a graph "
                  f"({type(err).__name__}: {str(err).splitlines()[0][:160]})")
            return out
        self.graphs[key] = (graph, static_inputs, static_out)
        self.captures += 1
        if len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return out


# -----------------------------------------------------------------------------
# flow matching: x_t = (1-σ)·x0 + σ·ε with σ = t/1000 exactly; the network predicts v = ε - x0


def sigma_of(t, like):
    """σ = t/1000 in fp32, shaped to broadcast against latents `like` [B, F, C, H, W]. t: float, [B] or [B, F]."""
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    assert t.dtype == torch.float32, f"timesteps must be float32, got {t.dtype}"
    if t.ndim == 1:
        t = t[:, None]  # [B, 1]
    return (t / 1000.0).reshape(*t.shape, *([1] * (like.ndim - t.ndim)))  # [B, F, 1, 1, 1]


def add_noise(x0, noise, t):
    """x_t = (1 − σ)·x0 + σ·ε."""
    sigma = sigma_of(t, x0)
    return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)


def x0_from_v(x_t, v, t):
    """x0 = x_t − σ·v (paper eq. 4 with the velocity parameterisation)."""
    return (x_t.float() - sigma_of(t, x_t) * v.float()).to(x_t.dtype)


def v_from_x0(x_t, x0, t):
    """v = (x_t − x0)/σ; undefined at σ = 0."""
    sigma = sigma_of(t, x_t)
    assert bool((sigma > 0).all()), "v_from_x0 needs t > 0"
    return ((x_t.float() - x0.float()) / sigma).to(x_t.dtype)


def guided(cond, uncond, scale):
    """Classifier-free guidance u + w·(c − u), the one form used everywhere (the official real score's
    c + 3·(c − u) is w = 4)."""
    return uncond + scale * (cond - uncond)


def shift_sigma(sigma, shift=5.0):
    """Timestep shift: σ' = sσ / (1 + (s−1)σ). Wan-1.3B uses s = 5."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def warp_timesteps(nominal, shift=5.0):
    """Nominal few-step lists in 0..1000 units → shifted timesteps: [1000, 750, 500, 250] → [1000, 937.5,
    833.33, 625]; [1000, 500] → [1000, 833.33] (the paper's t = 1, 0.8333)."""
    return [1000.0 * shift_sigma(n / 1000.0, shift) for n in nominal]


def timestep_grid(num_steps, shift=5.0):
    """The N-point training/sampling grid without 0: u = 1, 1−1/N, …, 1/N, shifted; t = 1000·σ (float32).
    N = 48, s = 5 is the causal-CD grid: 1000, 995.76, …, 937.5 (k=12), …, 96.15 (k=47)."""
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return (1000.0 * shift_sigma(u, shift)).float()


# -----------------------------------------------------------------------------
# rollout: the frame-stepping primitive (one block per step), and generate() on top of it


class Rollout:
    """A frame-wise / chunk-wise autoregressive rollout that advances one block (K = cfg.frames_per_block
    frames) per `step()`. generate() loops over it for a fixed-length video; a live stream (serve.py) calls
    step() forever with a rolling cache and may change the conditioning between any two steps.

    model, context [B, text_len, text_dim]; latent_shape (C, H, W) of one frame.
    steps / first_block_steps / sampler / uncond_context / guidance_scale / context_t: as in generate().
    window       None: absolute cache of `max_frames` frames (positions = absolute frames, at most the RoPE
                 range). An int: a rolling cache of `window` frames — `sink_frames` kept from the start (default
                 one block) plus the most recent ones — so the rollout can run forever at flat cost (KVCache).
    cache        continue an existing KVCache instead (generation starts at cache.filled_frames).
    Per step: len(steps) (len(first_block_steps) for frame 0) denoising calls + 1 context pass.
    Cameras (a PRoPE model, cfg.camera_dims > 0): step() takes the block's cameras, the action of an
    action-conditioned world model; the block's context pass writes its keys/values under the same cameras.

    Prompt switching (set_context): the next step uses the new text. mode="cross_attn" only swaps the
    text keys/values of cross-attention; the self-attention cache still holds frames written under the old
    prompt, so the scene changes gradually. mode="recache" also rewrites the visible frames' keys/values under
    the new prompt by replaying their context passes (LongLive's KV re-cache), at the cost of one context pass
    per visible frame, once. The sink is re-cached too (LongLive can keep the sink's old keys instead); layer-0
    keys/values come before cross-attention and do not change.
    """

    def __init__(self, model, context, latent_shape, *, steps, first_block_steps=None, sampler="renoise",
                 uncond_context=None, guidance_scale=1.0, context_t=0.0, generator=None, window=None,
                 sink_frames=None, max_frames=None, cache=None):
        cfg = model.cfg
        self.model, self.K = model, cfg.frames_per_block
        assert sampler in ("renoise", "euler"), f"unknown sampler {sampler!r}; use 'renoise' or 'euler'"
        for name, step_list in (("steps", steps), ("first_block_steps", first_block_steps)):
            if step_list is not None:
                assert len(step_list) > 0 and all(0 < s <= 1000 for s in step_list) and \
                    all(a > b for a, b in zip(step_list, step_list[1:])), \
                    f"{name} must be non-empty, strictly descending and within (0, 1000], got {list(step_list)}"
        self.steps, self.first_block_steps, self.sampler = list(steps), first_block_steps, sampler
        self.guidance_scale, self.context_t, self.generator = guidance_scale, context_t, generator
        self.use_cfg = guidance_scale != 1.0
        self.batch_size = context.shape[0]
        self.latent_shape = tuple(latent_shape)
        C, H, W = self.latent_shape
        assert C == cfg.in_dim, f"latent_shape {self.latent_shape} has {C} channels, the model expects {cfg.in_dim}"
        self.set_context(context, uncond_context, mode=None)
        param = next(model.parameters())
        if cache is None:
            S = model.tokens_per_frame(H, W)
            if window is not None:
                cache = KVCache(cfg, self.run_batch, window, S, param.device, param.dtype,
                                sink_frames=self.K if sink_frames is None else sink_frames)
            else:
                assert max_frames is not None, "Rollout needs window (rolling cache), max_frames or cache"
                cache = KVCache(cfg, self.run_batch, max_frames, S, param.device, param.dtype)
        assert cache.batch_size == self.run_batch, f"cache batch {cache.batch_size} != rollout batch {self.run_batch}"
        self.cache = cache
        self.frame = cache.filled_frames  # absolute index of the next frame to generate
        self.visible = {}  # absolute frame -> clean latents [B, 1, C, H, W] written into the cache (for re-cache)
        self.visible_cameras = {}  # absolute frame -> its cameras (world_to_camera [B, 1, 4, 4], intrinsics [B, 1, 3, 3])

    @property
    def run_batch(self):
        return 2 * self.batch_size if self.use_cfg else self.batch_size

    @torch.no_grad()
    def set_context(self, context, uncond_context=None, mode="cross_attn"):
        """New text conditioning from the next step on (see the class docstring for the two modes)."""
        assert context.shape[0] == self.batch_size and context.ndim == 3, \
            f"context must be [B={self.batch_size}, text_len, text_dim], got {tuple(context.shape)}"
        assert not self.use_cfg or uncond_context is not None, "guidance_scale != 1 needs uncond_context"
        assert mode in (None, "cross_attn", "recache"), f"unknown prompt-switch mode {mode!r}; use 'cross_attn' or 'recache'"
        self.context = context
        self.run_context = torch.cat([context, uncond_context]) if self.use_cfg else context  # [2B, Lt, E] under CFG
        if mode is None:
            return
        self.cache.forget_text()
        if mode == "recache":
            saved, saved_cameras = dict(self.visible), dict(self.visible_cameras)  # the replay prunes them
            frames = sorted(saved)
            assert self.cache.rolling or frames == list(range(len(frames))), "re-cache needs every frame since 0"
            self.cache.reset()
            for f0 in range(0, len(frames), self.K):  # replay in slot order; rolling positions come out the same
                block = frames[f0:f0 + self.K]
                cameras = None
                if saved_cameras:
                    cameras = tuple(torch.cat([saved_cameras[f][i] for f in block], dim=1) for i in range(2))
                self._context_pass(torch.cat([saved[f] for f in block], dim=1), block[0], cameras)

    def _velocity(self, x, t_value, start, cameras=None):
        x_in = torch.cat([x, x]) if self.use_cfg else x
        t = torch.full((self.run_batch, x.shape[1]), float(t_value), device=x.device)
        if self.use_cfg:  # the unconditional half sees the same cameras
            cameras = cameras_twice(cameras)
        v = self.model(x_in, t, self.run_context, cache=self.cache, start_frame=start, cameras=cameras)
        if self.use_cfg:
            v = guided(*v.chunk(2), self.guidance_scale)
        return v

    def _context_pass(self, x0, start, cameras=None):
        """Write the clean block x0 [B, K, C, H, W] at absolute frame `start` into the cache."""
        x_ctx = x0
        if self.context_t > 0:
            fresh = torch.randn(x0.shape, generator=self.generator, device=x0.device, dtype=x0.dtype)
            x_ctx = add_noise(x0, fresh, self.context_t)
        self._velocity(x_ctx, self.context_t, start, cameras)  # output unused: this call only writes the block's K/V
        for i in range(x0.shape[1]):
            self.visible[start + i] = x0[:, i:i + 1]
            if cameras is not None:
                self.visible_cameras[start + i] = cameras_for_frames(cameras, i, 1)
        if self.cache.rolling:
            kept = set(self.cache.slot_frames)
            self.visible = {f: x for f, x in self.visible.items() if f in kept}
            self.visible_cameras = {f: c for f, c in self.visible_cameras.items() if f in kept}

    @torch.no_grad()
    def write_context(self, x0, cameras=None):
        """Append clean frames x0 [B, n·K, C, H, W] (and their cameras) to the cache without generating them
        (I2V prefix)."""
        assert x0.shape[1] % self.K == 0, f"{x0.shape[1]} frames are not a whole number of {self.K}-frame blocks"
        for p in range(0, x0.shape[1], self.K):
            self._context_pass(x0[:, p:p + self.K], self.frame, cameras_for_frames(cameras, p, self.K))
            self.frame += self.K

    @torch.no_grad()
    def step(self, noise, context_frames=None, cameras=None):
        """Generate the next block from noise [B, K, C, H, W] -> x0 [B, K, C, H, W]. context_frames: write these
        frames into the cache instead of the generated ones (ground-truth conditioning). cameras: the block's
        (world_to_camera [B, K, 4, 4], intrinsics [B, K, 3, 3]) for a PRoPE model."""
        assert noise.shape == (self.batch_size, self.K, *self.latent_shape), \
            f"noise must be [{self.batch_size}, {self.K}, {', '.join(map(str, self.latent_shape))}], got {tuple(noise.shape)}"
        start = self.frame
        step_list = self.first_block_steps if (start == 0 and self.first_block_steps is not None) else self.steps
        dtype, x = noise.dtype, noise
        for i, t_value in enumerate(step_list):
            v = self._velocity(x, t_value, start, cameras)
            t_next = step_list[i + 1] if i + 1 < len(step_list) else 0.0
            if self.sampler == "euler":
                x = (x.float() + (t_next - t_value) / 1000.0 * v.float()).to(dtype)
                x0 = x
            else:
                x0 = x0_from_v(x, v, t_value)
                if i + 1 < len(step_list):  # re-noise with fresh noise to the next level
                    fresh = torch.randn(x0.shape, generator=self.generator, device=x0.device, dtype=dtype)
                    x = add_noise(x0, fresh, t_next)
        self._context_pass(context_frames if context_frames is not None else x0, start, cameras)
        self.frame += self.K
        return x0

    def close(self):
        """Free the cache buffers now (a closed stream must not hold them until garbage collection)."""
        self.cache = None
        self.visible, self.visible_cameras = {}, {}


@torch.no_grad()
def generate(model, noise, context, *, steps, first_block_steps=None, sampler="renoise", uncond_context=None,
             guidance_scale=1.0, context_t=0.0, prefix=None, teacher_context=None, generator=None, cache=None,
             window=None, sink_frames=None, before_block=None, on_block=None, cameras=None):
    """Roll out a video block by block (K = cfg.frames_per_block frames each) with the KV cache.

    noise        [B, F, C, H, W] initial noise of the frames to generate
    context      [B, text_len, text_dim]; uncond_context + guidance_scale w give CFG u + w·(c − u), batched
    steps        timesteps of every block, descending, already warped (e.g. warp_timesteps([1000, 500]))
    first_block_steps  the first generated block's own list (ASD: 4 steps for frame 0 of 1/2-step models);
                 ignored when a prefix is given — that first frame is not generated from nothing
    sampler      "renoise": few-step consistency sampler — predict x0, re-noise it with fresh noise to the next
                 t (the distilled students); "euler": deterministic Euler on the flow ODE, the last step to σ=0
                 (multi-step AR-diffusion teachers)
    context_t    timestep of the context pass that writes each finished block into the cache (0 = clean; > 0
                 adds fresh noise at that level first: the official "context noise")
    prefix       [B, P, C, H, W] clean latents written into the cache before generation (I2V: the image frame)
    teacher_context [B, F, C, H, W] if given, the context pass writes these frames instead of the generated
                 ones (generation conditioned on a ground-truth prefix, as the causal-ODE teacher does)
    cache        a KVCache to continue (generation starts at cache.filled_frames); default: a new one
    window, sink_frames  a rolling cache of `window` frames instead (Rollout): F may exceed the RoPE range
    before_block callback(rollout, start_frame) before each block: change the conditioning from this block on
                 (e.g. rollout.set_context for a prompt switch)
    on_block     callback(block_index, start_frame, x0_block) after each block, for streaming
    cameras      (world_to_camera [B, P+F, 4, 4], intrinsics [B, P+F, 3, 3]) of the prefix frames then the
                 generated ones, for a PRoPE model (the action of the world model, §3.3)
    Calls per block: len(steps) (or len(first_block_steps)) + 1 context pass. Returns [B, F, C, H, W].
    """
    K = model.cfg.frames_per_block
    B, num_frames, C, H, W = noise.shape
    assert num_frames % K == 0, f"{num_frames} frames are not a whole number of {K}-frame blocks"
    prefix_frames = 0 if prefix is None else prefix.shape[1]
    assert prefix_frames % K == 0, f"prefix of {prefix_frames} frames is not a whole number of {K}-frame blocks"
    if teacher_context is not None:
        assert teacher_context.shape == noise.shape, "teacher_context must have the shape of noise"
    rollout = Rollout(model, context, (C, H, W), steps=steps, first_block_steps=first_block_steps, sampler=sampler,
                      uncond_context=uncond_context, guidance_scale=guidance_scale, context_t=context_t,
                      generator=generator, window=window, sink_frames=sink_frames,
                      max_frames=prefix_frames + num_frames, cache=cache)
    if cameras is not None:
        assert cameras[0].shape[:2] == (B, prefix_frames + num_frames), \
            f"cameras must cover the {prefix_frames} prefix and {num_frames} generated frames, got " \
            f"{tuple(cameras[0].shape)}"
    if prefix is not None:  # clean prefix (I2V) into the cache
        rollout.write_context(prefix.to(noise.dtype), cameras_for_frames(cameras, 0, prefix_frames))
    outputs = []
    for block, f0 in enumerate(range(0, num_frames, K)):
        start = rollout.frame
        if before_block is not None:
            before_block(rollout, start)
        x0 = rollout.step(noise[:, f0:f0 + K],
                          context_frames=teacher_context[:, f0:f0 + K] if teacher_context is not None else None,
                          cameras=cameras_for_frames(cameras, prefix_frames + f0, K))
        outputs.append(x0)
        if on_block is not None:
            on_block(block, start, x0)
    return torch.cat(outputs, dim=1)  # [B, F, C, H, W]


@torch.no_grad()
def generate_bidirectional(model, noise, context, *, steps, uncond_context=None, guidance_scale=1.0, cameras=None):
    """Sample a whole clip at once with a bidirectional model: Euler on the flow ODE over `steps` (descending
    timesteps, the last step goes to σ = 0), CFG u + w·(c − u). noise [B, F, C, H, W] -> x0 [B, F, C, H, W].
    cameras: (world_to_camera [B, F, 4, 4], intrinsics [B, F, 3, 3]) for a PRoPE model."""
    use_cfg = guidance_scale != 1.0
    assert not use_cfg or uncond_context is not None, "guidance_scale != 1 needs uncond_context"
    B, num_frames = noise.shape[:2]
    both_cameras = cameras_twice(cameras)
    x = noise
    for i, t_value in enumerate(steps):
        t = torch.full((2 * B if use_cfg else B, num_frames), float(t_value), device=noise.device)
        if use_cfg:
            v = guided(*model(torch.cat([x, x]), t, torch.cat([context, uncond_context]), causal=False,
                              cameras=both_cameras).chunk(2), guidance_scale)
        else:
            v = model(x, t, context, causal=False, cameras=cameras)
        t_next = steps[i + 1] if i + 1 < len(steps) else 0.0
        x = (x.float() + (t_next - t_value) / 1000.0 * v.float()).to(noise.dtype)
    return x


# -----------------------------------------------------------------------------
# strict weight loading: original Wan, diffusers, official Causal-Forcing / Self-Forcing .pt, ours


class WeightLoadError(RuntimeError):
    """A checkpoint that does not fit the model. The message is one line naming the format and the keys."""


# original Wan name -> diffusers name (docs/wan_formats.md); a bijection on the full key set
_TOP_LEVEL_TO_DIFFUSERS = {
    "patch_embedding": "patch_embedding",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "head.modulation": "scale_shift_table",
    "head.head": "proj_out",
}
_BLOCK_TO_DIFFUSERS = {
    "modulation": "scale_shift_table",
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",  # the affine cross-attention norm is norm3 in Wan and norm2 in diffusers
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}


def _rename(key, table):
    for old, new in table.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return None


def _convert_key(key, top_table, block_table):
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        renamed = _rename(rest, block_table)
        return key if renamed is None else f"blocks.{index}.{renamed}"
    renamed = _rename(key, top_table)
    return key if renamed is None else renamed  # unknown keys pass through and fail the strict check


def wan_to_diffusers_key(key):
    return _convert_key(key, _TOP_LEVEL_TO_DIFFUSERS, _BLOCK_TO_DIFFUSERS)


def diffusers_to_wan_key(key):
    return _convert_key(key, {v: k for k, v in _TOP_LEVEL_TO_DIFFUSERS.items()},
                        {v: k for k, v in _BLOCK_TO_DIFFUSERS.items()})


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def strip_wrapper_prefixes(key):
    """'model._fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.ffn.0.weight' -> 'blocks.0.ffn.0.weight'."""
    for prefix in _WRAPPER_PREFIXES:
        key = key.replace(prefix, "")
    while key.startswith("model."):
        key = key[len("model."):]
    return key


def _read_safetensors(paths):
    from safetensors.torch import load_file
    state = {}
    for path in paths:
        try:
            state.update(load_file(path, device="cpu"))
        except Exception as err:  # safetensors raises its own error type for truncated or corrupt files
            raise WeightLoadError(f"{path}: cannot be read as safetensors ({str(err).splitlines()[0][:200]}); the "
                                  f"file is truncated or corrupt — copy or export it again") from None
    return state


def _read_safetensors_folder(folder, stem="diffusion_pytorch_model"):
    """Single file or a sharded index.json -> (state dict, sharded?) or (None, False) if neither exists."""
    single, index = os.path.join(folder, f"{stem}.safetensors"), os.path.join(folder, f"{stem}.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise WeightLoadError(f"{index}: shard files missing: {missing[:3]}")
        return _read_safetensors([os.path.join(folder, s) for s in shards]), True
    if os.path.isfile(single):
        return _read_safetensors([single]), False
    return None, False


def _looks_like_diffusers(keys):
    return any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in keys)


def read_checkpoint(path, use_ema=False):
    """Read any supported checkpoint into a state dict with Wan key names -> (state_dict, format name)."""
    if not os.path.exists(path):
        raise WeightLoadError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model.safetensors")):  # ours (common.py checkpoint directory)
            name = "ema.safetensors" if use_ema else "model.safetensors"
            if not os.path.isfile(os.path.join(path, name)):
                raise WeightLoadError(f"ours: {path} has no {name} (it holds no EMA weights; drop --use_ema)")
            return _read_safetensors([os.path.join(path, name)]), "ours"
        if os.path.isdir(os.path.join(path, "transformer")):  # a diffusers pipeline folder
            path = os.path.join(path, "transformer")
        config = {}
        if os.path.isfile(os.path.join(path, "config.json")):
            with open(os.path.join(path, "config.json")) as f:
                config = json.load(f)
        state, sharded = _read_safetensors_folder(path)
        if state is None:
            raise WeightLoadError(f"{path}: no diffusion_pytorch_model.safetensors(.index.json), model.safetensors "
                                  f"or transformer/ folder; pass a Wan, diffusers or our checkpoint folder")
        if config.get("_class_name") == "WanTransformer3DModel" or _looks_like_diffusers(state):
            return {diffusers_to_wan_key(k): v for k, v in state.items()}, "diffusers"
        return state, "wan-sharded" if sharded else "wan"
    if path.endswith(".safetensors"):
        state = _read_safetensors([path])
        if _looks_like_diffusers(state):
            state = {diffusers_to_wan_key(k): v for k, v in state.items()}
        return {strip_wrapper_prefixes(k): v for k, v in state.items()}, "safetensors"
    if path.endswith((".pt", ".pth", ".bin")):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated file, or a pickle that is not plain tensors
            raise WeightLoadError(f"{path}: cannot be read as a weights-only torch file "
                                  f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
        if not isinstance(obj, dict):
            raise WeightLoadError(f"{path}: expected a dict, found {type(obj).__name__}")
        wrappers = [k for k in ("generator", "generator_ema", "model") if k in obj and isinstance(obj[k], dict)]
        if wrappers:  # official Causal-Forcing / Self-Forcing file
            if use_ema:
                if "generator_ema" not in obj:
                    raise WeightLoadError(f"official-pt: {path} has no 'generator_ema' (keys {sorted(obj)}); "
                                          f"drop --use_ema")
                inner = obj["generator_ema"]
            elif "generator" in obj or "model" in obj:
                inner = obj["generator"] if "generator" in obj else obj["model"]
            else:
                raise WeightLoadError(f"official-pt: {path} holds only 'generator_ema' (EMA weights); "
                                      f"pass --use_ema to load them")
            return {strip_wrapper_prefixes(k): v for k, v in inner.items()}, "official-pt"
        return {strip_wrapper_prefixes(k): v for k, v in obj.items()}, "pt-state-dict"
    raise WeightLoadError(f"{path}: unknown checkpoint type; expected a folder, .safetensors, .pt or .pth")


def check_state_dict(model, state, fmt):
    """Missing keys, unexpected keys and shape mismatches -> one WeightLoadError line; nothing is loaded."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)):
        if items:
            problems.append(f"{len(items)} {label} (first: {', '.join(items[:3])})")
    if problems:
        raise WeightLoadError(f"{fmt} checkpoint does not fit the model: " + "; ".join(problems)
                              + " — is it the right preset/format?")


def load_weights(model, path, use_ema=False):
    """Load a checkpoint strictly into `model` (any format read_checkpoint knows). Returns the format name.
    On any mismatch raises WeightLoadError and leaves the model untouched."""
    state, fmt = read_checkpoint(path, use_ema)
    check_state_dict(model, state, fmt)
    model.load_state_dict(state, strict=True)
    return fmt


def config_from_checkpoint(path):
    """The WanConfig stored beside a checkpoint (Wan, diffusers or ours), or None (official .pt has none)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(os.path.join(folder, "transformer")):
        folder = os.path.join(folder, "transformer")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path) as f:
        c = json.load(f)
    if "model_config" in c:  # ours
        return WanConfig.from_dict(c["model_config"])
    if c.get("_class_name") == "WanTransformer3DModel":
        return WanConfig(in_dim=c["in_channels"], out_dim=c["out_channels"],
                         dim=c["num_attention_heads"] * c["attention_head_dim"], ffn_dim=c["ffn_dim"],
                         freq_dim=c.get("freq_dim", 256), text_dim=c.get("text_dim", 4096),
                         num_heads=c["num_attention_heads"], num_layers=c["num_layers"],
                         patch_size=tuple(c.get("patch_size", (1, 2, 2))), eps=c.get("eps", 1e-6))
    if "dim" in c and "num_heads" in c:  # original Wan config.json (text_dim/patch_size absent → defaults)
        return WanConfig(in_dim=c.get("in_dim", 16), out_dim=c.get("out_dim", 16), dim=c["dim"],
                         ffn_dim=c["ffn_dim"], freq_dim=c.get("freq_dim", 256), text_dim=c.get("text_dim", 4096),
                         text_len=c.get("text_len", 512), num_heads=c["num_heads"], num_layers=c["num_layers"],
                         patch_size=tuple(c.get("patch_size", (1, 2, 2))), eps=c.get("eps", 1e-6))
    return None


# -----------------------------------------------------------------------------
# smoke run: `python model.py` (random toy weights: cache == block-causal, one generate() call)

if __name__ == "__main__":
    import time

    torch.manual_seed(0)
    cfg = WanConfig.from_preset("toy")
    model = CausalWanModel(cfg).eval()
    nn.init.normal_(model.head.head.weight, std=0.02)  # a fresh head predicts 0; make the smoke run non-trivial
    print(f"toy preset: {model.num_params():,} parameters, {cfg}")
    B, num_frames = 1, 12
    context = torch.randn(B, cfg.text_len, cfg.text_dim)
    noise = torch.randn(B, num_frames, cfg.in_dim, 16, 16)
    with torch.no_grad():
        t = torch.full((B, num_frames), 500.0)
        full = model(noise, t, context, causal=True)
        cache = KVCache(cfg, B, num_frames, model.tokens_per_frame(16, 16))
        blocks = [model(noise[:, f:f + 1], t[:, f:f + 1], context, cache=cache, start_frame=f) for f in range(num_frames)]
        err = (torch.cat(blocks, 1) - full).abs().max().item()
    print(f"block-causal forward vs cached frame-by-frame rollout: max abs diff {err:.2e}")
    start = time.time()
    video = generate(model, noise, context, steps=warp_timesteps([1000, 500]),
                     first_block_steps=warp_timesteps([1000, 750, 500, 250]), generator=torch.Generator().manual_seed(0))
    print(f"generate(): {num_frames} frames, 2 steps (+4 for frame 0) in {time.time() - start:.2f}s -> "
          f"latents {tuple(video.shape)}, mean {video.mean():.3f}, std {video.std():.3f}")
