"""Parity and weight-loading tests for model.py (CausalWanModel + load_weights).

Everything is tiny, fp32 and CPU-only; no network, no files outside the repo.
The reference implementation is diffusers' WanTransformer3DModel.
The Wan <-> diffusers key table below is written out independently of model.py
(docs/wan_formats.md) so that model.py's own mapping is checked, not reused.

Run `pytest -s tests/test_model_loading.py` to see the measured parity errors.
"""

import dataclasses
import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from model import (
    CausalWanModel,
    WanConfig,
    WeightLoadError,
    diffusers_to_wan_key,
    load_weights,
    wan_to_diffusers_key,
)

import diffusers  # the independent reference; a hard requirement, never skipped
from diffusers import WanTransformer3DModel

torch.set_num_threads(min(2, torch.get_num_threads()))

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

TEXT_DIM, TEXT_LEN, FFN_DIM, FREQ_DIM, LAYERS, CH = 32, 24, 128, 256, 2, 16
B, F, H, W = 2, 3, 6, 10  # 3 x 5 tokens per frame (non-square)
TEXT_LENS = (7, 12)
T_PER_SAMPLE = (999.0, 437.5)
# ours vs diffusers (other kernels, attention via SDPA), a causal prefix vs the whole clip, and t [B] vs t [B, F]
# reorder fp32 sums of <= 256 terms: <= 256·u ≈ 1.5e-5 of their magnitude each, and ~10 such sums in sequence
# through 2 blocks stay below ~1e-4 relative on any CPU. A wrong key map, RoPE split or mask is O(1e-2) or more.
PARITY_RTOL = 1e-4

# (num_heads, head_dim). RoPE real-dim split d-4(d//6), 2(d//6), 2(d//6):
#   32 -> 12/10/10 (uneven), 20 -> 8/6/6 (uneven, odd pair counts 4/3/3, 3 heads)
HEAD_CONFIGS = [(2, 32), (3, 20)]


def tiny_cfg(num_heads=2, head_dim=32, layers=LAYERS):
    return WanConfig(in_dim=CH, out_dim=CH, dim=num_heads * head_dim, ffn_dim=FFN_DIM, freq_dim=FREQ_DIM,
                     text_dim=TEXT_DIM, text_len=TEXT_LEN, num_heads=num_heads, num_layers=layers)


def wan_config_json(cfg):
    """config.json as shipped with the original Wan checkpoints."""
    return {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v",
            "dim": cfg.dim, "eps": 1e-06, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim,
            "in_dim": cfg.in_dim, "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
            "out_dim": cfg.out_dim, "text_len": cfg.text_len}


def build_random_diffusers(num_heads=2, head_dim=32, seed=0, layers=LAYERS):
    """Tiny WanTransformer3DModel with *every* parameter randomised (proj_out is zero-init and
    the norms are ones by default, which would hide bugs)."""
    torch.manual_seed(seed)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=num_heads, attention_head_dim=head_dim,
                              in_channels=CH, out_channels=CH, text_dim=TEXT_DIM, freq_dim=FREQ_DIM,
                              ffn_dim=FFN_DIM, num_layers=layers, cross_attn_norm=True,
                              qk_norm="rms_norm_across_heads", eps=1e-6)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if re.search(r"(norm_q|norm_k|norm2)\.weight$", name):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("scale_shift_table"):
                p.copy_(0.3 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:  # weights: keep activations O(1)
                p.copy_(noise / (p[0].numel() ** 0.5))
    return m.eval()


def make_inputs(seed=123):
    """Ours: x [B,F,C,H,W], t [B], context [B,TEXT_LEN,TEXT_DIM] zero padded beyond TEXT_LENS."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, F, CH, H, W, generator=g)
    t = torch.tensor(T_PER_SAMPLE, dtype=torch.float32)
    ctx = torch.zeros(B, TEXT_LEN, TEXT_DIM)
    for i, n in enumerate(TEXT_LENS):
        ctx[i, :n] = torch.randn(n, TEXT_DIM, generator=g)
    return x, t, ctx


def per_frame_t():
    return torch.tensor([[999.0, 937.5, 625.0], [437.5, 833.33, 0.0]], dtype=torch.float32)


@torch.no_grad()
def run_ours(model, x, t, ctx, causal=False):
    out = model(x, t, ctx, causal=causal)
    assert out.shape == (x.shape[0], x.shape[1], CH, x.shape[3], x.shape[4])
    assert out.dtype == torch.float32
    return out


@torch.no_grad()
def run_diffusers(dm, x, t, ctx):
    """x in OUR layout [B,F,C,H,W]; t [B] or per-frame [B,F] (expanded to per-token). Returns [B,F,C,H,W]."""
    nf = x.shape[1]
    if t.ndim == 2:
        tokens_per_frame = (x.shape[3] // 2) * (x.shape[4] // 2)
        t = t.repeat_interleave(tokens_per_frame, dim=1)  # frame-major token order
    out = dm(x.permute(0, 2, 1, 3, 4), t, ctx, return_dict=True).sample
    assert out.shape == (x.shape[0], CH, nf, x.shape[3], x.shape[4])
    return out.permute(0, 2, 1, 3, 4)


def rel_err(out, ref):
    abs_err = (out - ref).abs().max().item()
    return abs_err, abs_err / ref.abs().max().item()


# Independent per-key table, original Wan -> diffusers.
_TOP = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "head.head": "proj_out",
    "patch_embedding": "patch_embedding",
}
_BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}


def ref_wan_to_diffusers(key):
    if key == "head.modulation":
        return "scale_shift_table"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m:
        i, rest = m.groups()
        if rest == "modulation":
            return f"blocks.{i}.scale_shift_table"
        mod, param = rest.rsplit(".", 1)
        return f"blocks.{i}.{_BLOCK[mod]}.{param}"
    mod, param = key.rsplit(".", 1)
    return f"{_TOP[mod]}.{param}"


def to_wan_state_dict(diffusers_sd):
    inv = {}
    back = {v: k for k, v in _TOP.items()}
    back_block = {v: k for k, v in _BLOCK.items()}
    for k, v in diffusers_sd.items():
        if k == "scale_shift_table":
            wk = "head.modulation"
        elif (m := re.fullmatch(r"blocks\.(\d+)\.(.+)", k)):
            i, rest = m.groups()
            if rest == "scale_shift_table":
                wk = f"blocks.{i}.modulation"
            else:
                mod, param = rest.rsplit(".", 1)
                wk = f"blocks.{i}.{back_block[mod]}.{param}"
        else:
            mod, param = k.rsplit(".", 1)
            wk = f"{back[mod]}.{param}"
        assert ref_wan_to_diffusers(wk) == k
        inv[wk] = v.detach().clone().contiguous()
    return inv


def write_sharded(sd, folder, n_shards, stem="diffusion_pytorch_model"):
    """Standard HF sharded layout: <stem>-0000k-of-0000n.safetensors + <stem>.safetensors.index.json."""
    os.makedirs(folder, exist_ok=True)
    keys = sorted(sd)
    weight_map, total = {}, 0
    for s in range(n_shards):
        fname = f"{stem}-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[s::n_shards]}
        save_file(part, os.path.join(folder, fname))
        for k, v in part.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    with open(os.path.join(folder, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def write_wan_folder(sd, folder, cfg):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(wan_config_json(cfg), f)
    save_file(dict(sd), os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    return str(folder)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, ref_sd):
    sd = model.state_dict()
    assert set(sd) == set(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(sd[k], v), f"tensor {k} differs"


# --------------------------------------------------------------------------------------------
# fixtures: one random diffusers model per head config, saved once per module
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=HEAD_CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}")
def ref(request, tmp_path_factory):
    heads, hd = request.param
    dm = build_random_diffusers(heads, hd, seed=heads * 100 + hd)
    root = tmp_path_factory.mktemp(f"diffusers_{heads}x{hd}")
    pipe = root / "pipe"
    dm.save_pretrained(pipe / "transformer", safe_serialization=True)
    with open(pipe / "model_index.json", "w") as f:
        json.dump({"_class_name": "WanPipeline", "_diffusers_version": diffusers.__version__,
                   "transformer": ["diffusers", "WanTransformer3DModel"]}, f)
    wan_sd = to_wan_state_dict(dm.state_dict())
    return {"dm": dm, "cfg": tiny_cfg(heads, hd), "pipe": pipe, "wan_sd": wan_sd, "name": f"{heads}x{hd}"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Only the 2x32 model: reference Wan-key state dict, a loaded model and its outputs."""
    dm = build_random_diffusers(2, 32, seed=7)
    cfg = tiny_cfg(2, 32)
    wan_sd = to_wan_state_dict(dm.state_dict())
    model = CausalWanModel(cfg).eval()
    model.load_state_dict(wan_sd, strict=True)  # plain torch: our parameter names are the Wan names
    x, t, ctx = make_inputs()
    return {"cfg": cfg, "wan_sd": wan_sd, "inputs": (x, t, ctx), "out": run_ours(model, x, t, ctx)}


def fresh(cfg, seed=999):
    torch.manual_seed(seed)
    return CausalWanModel(cfg).eval()


# --------------------------------------------------------------------------------------------
# 1. parity with diffusers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["pipeline", "transformer_dir"])
def test_diffusers_parity(ref, layout):
    path = ref["pipe"] if layout == "pipeline" else ref["pipe"] / "transformer"
    model = fresh(ref["cfg"])
    fmt = load_weights(model, str(path))
    assert fmt == "diffusers"
    assert_state_equal(model, ref["wan_sd"])
    x, t, ctx = make_inputs()
    out = run_ours(model, x, t, ctx)
    want = run_diffusers(ref["dm"], x, t, ctx)
    abs_err, rel = rel_err(out, want)
    print(f"\n[parity {ref['name']} {layout}] t[B]: max abs {abs_err:.3e}, rel {rel:.3e} "
          f"(ref max {want.abs().max().item():.3f})")
    assert rel <= PARITY_RTOL
    # sanity: the reference output is not degenerate and depends on t and on the padded text length
    assert want.abs().max() > 0.1
    assert not torch.allclose(want[0], run_diffusers(ref["dm"], x[:1], t[1:], ctx[:1])[0], rtol=0, atol=1e-3)


def test_diffusers_parity_per_frame_t(ref):
    """Per-frame timesteps [B,F], bidirectional: diffusers accepts per-token timesteps [B, L]."""
    model = fresh(ref["cfg"])
    load_weights(model, str(ref["pipe"]))
    x, _, ctx = make_inputs()
    tf = per_frame_t()
    out = run_ours(model, x, tf, ctx, causal=False)
    want = run_diffusers(ref["dm"], x, tf, ctx)
    abs_err, rel = rel_err(out, want)
    print(f"\n[parity {ref['name']}] t[B,F]: max abs {abs_err:.3e}, rel {rel:.3e}")
    assert rel <= PARITY_RTOL
    # t [B] must equal t [B,F] with the same value repeated
    x, t, ctx = make_inputs()
    same_t = run_ours(model, x, t, ctx)
    torch.testing.assert_close(same_t, run_ours(model, x, t[:, None].expand(B, F), ctx), rtol=0,
                               atol=PARITY_RTOL * same_t.abs().max().item())


def test_causal_one_layer_matches_diffusers_on_prefixes(tmp_path):
    """Frame-wise causal (frames_per_block=1), ONE layer: output frame f == bidirectional diffusers on frames
    0..f, frame f (with >1 layer this only holds for f=0, since earlier frames' hidden states differ)."""
    dm = build_random_diffusers(2, 32, seed=11, layers=1)
    dm.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    model = fresh(tiny_cfg(2, 32, layers=1))
    assert load_weights(model, str(tmp_path / "transformer")) == "diffusers"
    x, _, ctx = make_inputs()
    tf = per_frame_t()
    out = run_ours(model, x, tf, ctx, causal=True)
    errs = []
    for f in range(F):
        want = run_diffusers(dm, x[:, : f + 1], tf[:, : f + 1], ctx)[:, f]
        errs.append(rel_err(out[:, f], want))
    print("\n[causal 1-layer] per-frame (max abs, rel): " + ", ".join(f"({a:.2e}, {r:.2e})" for a, r in errs))
    assert max(r for _, r in errs) <= PARITY_RTOL
    # and the mask really is active: bidirectional frame 0 differs from causal frame 0
    assert not torch.allclose(run_ours(model, x, tf, ctx, causal=False)[:, 0], out[:, 0], rtol=0, atol=1e-3)


def test_causal_prefix_consistency(ref):
    """Multi-layer causal: outputs for frames 0..f depend only on frames 0..f (and their timesteps)."""
    model = fresh(ref["cfg"])
    load_weights(model, str(ref["pipe"]))
    x, _, ctx = make_inputs()
    tf = per_frame_t()
    out = run_ours(model, x, tf, ctx, causal=True)
    # frame 0 alone == diffusers on the 1-frame clip
    abs0, rel0 = rel_err(out[:, 0], run_diffusers(ref["dm"], x[:, :1], tf[:, :1], ctx)[:, 0])
    print(f"\n[causal {ref['name']}] frame 0 vs diffusers 1-frame: max abs {abs0:.3e}, rel {rel0:.3e}")
    assert rel0 <= PARITY_RTOL
    for f in range(1, F):
        pre = run_ours(model, x[:, :f], tf[:, :f], ctx, causal=True)
        torch.testing.assert_close(out[:, :f], pre, rtol=0, atol=PARITY_RTOL * out.abs().max().item())
    x2, tf2 = x.clone(), tf.clone()
    x2[:, -1] = torch.randn_like(x2[:, -1])
    tf2[:, -1] = 111.0
    out2 = run_ours(model, x2, tf2, ctx, causal=True)
    torch.testing.assert_close(out2[:, :-1], out[:, :-1], rtol=0, atol=PARITY_RTOL * out.abs().max().item())
    assert (out2[:, -1] - out[:, -1]).abs().max() > 1e-2


def test_diffusers_sharded(ref, tmp_path):
    dst = tmp_path / "transformer"
    ref["dm"].save_pretrained(dst, safe_serialization=True, max_shard_size="40KB")
    assert (dst / "diffusion_pytorch_model.safetensors.index.json").exists()
    model = fresh(ref["cfg"])
    assert load_weights(model, str(dst)) == "diffusers"
    assert_state_equal(model, ref["wan_sd"])


def test_diffusers_names_with_unknown_key_rejected(ref, tmp_path):
    """Diffusers folder where one tensor has a name outside the Wan -> diffusers key table -> error naming both sides."""
    dsd = {k: v.detach().clone().contiguous() for k, v in ref["dm"].state_dict().items()}
    dsd["blocks.1.attn2.to_out.weight"] = dsd.pop("blocks.1.attn2.to_out.0.weight")
    dst = tmp_path / "transformer"
    dst.mkdir()
    save_file(dsd, str(dst / "diffusion_pytorch_model.safetensors"))
    with open(ref["pipe"] / "transformer" / "config.json") as f:
        (dst / "config.json").write_text(f.read())
    model = fresh(ref["cfg"])
    before = snapshot(model)
    with pytest.raises(WeightLoadError) as ei:
        load_weights(model, str(dst))
    msg = str(ei.value)
    assert "blocks.1.attn2.to_out.weight" in msg and "blocks.1.cross_attn.o.weight" in msg, msg
    assert "\n" not in msg.strip()
    assert_state_equal(model, before)


def test_foreign_key_names_rejected(base, tmp_path):
    sd = {k.replace("blocks.", "layers."): v for k, v in base["wan_sd"].items()}
    p = tmp_path / "foreign.safetensors"
    save_file(sd, str(p))
    with pytest.raises(WeightLoadError) as ei:
        load_weights(fresh(base["cfg"]), str(p))
    msg = str(ei.value)
    assert "layers.0." in msg and "blocks.0." in msg, msg  # names an unexpected and a missing key


def test_diffusers_named_bare_safetensors(base, tmp_path):
    """model.py auto-detects diffusers names in a bare .safetensors and converts them (design choice)."""
    p = tmp_path / "diffusers_names.safetensors"
    save_file({ref_wan_to_diffusers(k): v for k, v in base["wan_sd"].items()}, str(p))
    model = fresh(base["cfg"])
    assert load_weights(model, str(p)) == "safetensors"
    assert torch.equal(run_ours(model, *base["inputs"]), base["out"])


# --------------------------------------------------------------------------------------------
# 2. original Wan format round trip (single file and sharded), bare safetensors
# --------------------------------------------------------------------------------------------

def test_wan_single_file(base, tmp_path):
    path = write_wan_folder(base["wan_sd"], tmp_path / "wan", base["cfg"])
    model = fresh(base["cfg"])
    assert load_weights(model, path) == "wan"
    assert_state_equal(model, base["wan_sd"])
    assert torch.equal(run_ours(model, *base["inputs"]), base["out"])


@pytest.mark.parametrize("n_shards", [2, 3])
def test_wan_sharded(base, tmp_path, n_shards):
    folder = tmp_path / "wan_sharded"
    write_sharded(base["wan_sd"], folder, n_shards)
    with open(folder / "config.json", "w") as f:
        json.dump(wan_config_json(base["cfg"]), f)
    model = fresh(base["cfg"])
    assert load_weights(model, str(folder)) == "wan-sharded"
    assert_state_equal(model, base["wan_sd"])
    assert torch.equal(run_ours(model, *base["inputs"]), base["out"])


def test_wan_sharded_missing_key_in_index(base, tmp_path):
    folder = tmp_path / "wan_sharded"
    sd = dict(base["wan_sd"])
    del sd["blocks.1.ffn.2.bias"]
    write_sharded(sd, folder, 2)
    with open(folder / "config.json", "w") as f:
        json.dump(wan_config_json(base["cfg"]), f)
    with pytest.raises(WeightLoadError, match=re.escape("blocks.1.ffn.2.bias")):
        load_weights(fresh(base["cfg"]), str(folder))


def test_bare_safetensors(base, tmp_path):
    p = tmp_path / "weights.safetensors"
    save_file(base["wan_sd"], str(p))
    model = fresh(base["cfg"])
    assert load_weights(model, str(p)) == "safetensors"
    assert torch.equal(run_ours(model, *base["inputs"]), base["out"])


def test_state_dict_keys_are_wan_names(base):
    model = fresh(base["cfg"])
    assert set(model.state_dict()) == set(base["wan_sd"])
    assert len(base["wan_sd"]) == 15 + 27 * LAYERS  # 825 = 15 + 27*30 for the 1.3B


# --------------------------------------------------------------------------------------------
# 3. errors: missing / unexpected / wrong shape -> one-line WeightLoadError naming the key
# --------------------------------------------------------------------------------------------

MISSING, EXTRA, SHAPED = "blocks.1.cross_attn.norm_k.weight", "blocks.0.self_attn.extra_proj.weight", "blocks.0.ffn.0.weight"


def corrupt(sd, kind):
    sd = dict(sd)
    if kind == "missing":
        del sd[MISSING]
        return sd, MISSING, "missing"
    if kind == "unexpected":
        sd[EXTRA] = torch.zeros(3, 3)
        return sd, EXTRA, "unexpected"
    sd[SHAPED] = torch.zeros(sd[SHAPED].shape[0] + 1, sd[SHAPED].shape[1])
    return sd, SHAPED, "shape"


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_load_errors(base, tmp_path, kind):
    sd, key, word = corrupt(base["wan_sd"], kind)
    path = write_wan_folder(sd, tmp_path / "wan", base["cfg"])
    with pytest.raises(WeightLoadError) as ei:
        load_weights(fresh(base["cfg"]), path)
    msg = str(ei.value)
    assert isinstance(ei.value, RuntimeError)
    assert "\n" not in msg.strip(), f"message must be one line: {msg!r}"
    assert key in msg, msg
    assert word in msg.lower(), msg


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_failed_load_leaves_model_unchanged(base, tmp_path, kind):
    sd, _, _ = corrupt(base["wan_sd"], kind)
    # perturb the valid tensors so a partial load would be visible
    sd = {k: (v + 1.0 if k in base["wan_sd"] and v.shape == base["wan_sd"][k].shape else v) for k, v in sd.items()}
    path = write_wan_folder(sd, tmp_path / "wan", base["cfg"])
    model = fresh(base["cfg"])
    before = snapshot(model)
    with pytest.raises(WeightLoadError):
        load_weights(model, path)
    assert_state_equal(model, before)


def test_truncated_safetensors_is_one_clear_line(base, tmp_path):
    path = write_wan_folder(base["wan_sd"], tmp_path / "wan", base["cfg"])
    weights = next(p for p in os.listdir(path) if p.endswith(".safetensors"))
    data = open(os.path.join(path, weights), "rb").read()
    open(os.path.join(path, weights), "wb").write(data[: len(data) // 2])
    model = fresh(base["cfg"])
    before = snapshot(model)
    with pytest.raises(WeightLoadError, match="truncated or corrupt") as ei:
        load_weights(model, path)
    assert "\n" not in str(ei.value)
    assert_state_equal(model, before)


def test_missing_path_raises(base, tmp_path):
    with pytest.raises((WeightLoadError, FileNotFoundError)):
        load_weights(fresh(base["cfg"]), str(tmp_path / "does_not_exist"))


# --------------------------------------------------------------------------------------------
# 4. official Causal-Forcing / Self-Forcing .pt
# --------------------------------------------------------------------------------------------

def wrapped_key(k):
    """FSDP + activation-checkpoint + torch.compile style prefixes, mixed across keys."""
    if k.startswith("blocks."):
        i, rest = k.split(".", 2)[1:]
        return f"model._fsdp_wrapped_module.blocks.{i}._fsdp_wrapped_module._checkpoint_wrapped_module.{rest}"
    if k.startswith("head."):
        return "model._orig_mod." + k
    return "model._fsdp_wrapped_module." + k


def test_official_pt_ema_only(base, tmp_path):
    p = tmp_path / "causal_forcing.pt"
    torch.save({"generator_ema": {"model._fsdp_wrapped_module." + k: v for k, v in base["wan_sd"].items()}}, p)
    model = fresh(base["cfg"])
    assert load_weights(model, str(p), use_ema=True) == "official-pt"
    assert torch.equal(run_ours(model, *base["inputs"]), base["out"])

    model2 = fresh(base["cfg"])
    before = snapshot(model2)
    with pytest.raises(WeightLoadError) as ei:
        load_weights(model2, str(p), use_ema=False)
    assert "use_ema" in str(ei.value)
    assert "\n" not in str(ei.value).strip()
    assert_state_equal(model2, before)


def test_official_pt_generator(base, tmp_path):
    p = tmp_path / "gen.pt"
    torch.save({"generator": {"model." + k: v for k, v in base["wan_sd"].items()}}, p)
    model = fresh(base["cfg"])
    assert load_weights(model, str(p), use_ema=False) == "official-pt"
    assert torch.equal(run_ours(model, *base["inputs"]), base["out"])


def test_official_pt_model_key_and_mixed_prefixes(base, tmp_path):
    p = tmp_path / "model.pt"
    torch.save({"model": {wrapped_key(k): v for k, v in base["wan_sd"].items()}}, p)
    model = fresh(base["cfg"])
    assert load_weights(model, str(p)) == "official-pt"
    assert_state_equal(model, base["wan_sd"])


def test_official_pt_selects_ema_vs_generator(base, tmp_path):
    other = {k: v * 0.5 for k, v in base["wan_sd"].items()}
    p = tmp_path / "both.pt"
    torch.save({"generator": {wrapped_key(k): v for k, v in other.items()},
                "generator_ema": {wrapped_key(k): v for k, v in base["wan_sd"].items()}}, p)
    m_ema, m_gen = fresh(base["cfg"]), fresh(base["cfg"])
    load_weights(m_ema, str(p), use_ema=True)
    load_weights(m_gen, str(p), use_ema=False)
    assert_state_equal(m_ema, base["wan_sd"])
    assert_state_equal(m_gen, other)


def test_official_pt_bad_key_raises(base, tmp_path):
    sd = {"model." + k: v for k, v in base["wan_sd"].items() if k != MISSING}
    p = tmp_path / "bad.pt"
    torch.save({"generator": sd}, p)
    with pytest.raises(WeightLoadError, match=re.escape(MISSING)):
        load_weights(fresh(base["cfg"]), str(p))


_PICKLE_PAYLOAD_RAN = []


def _payload():
    _PICKLE_PAYLOAD_RAN.append(1)
    return {}


class _Evil:
    def __reduce__(self):
        return (_payload, ())


def test_official_pt_uses_weights_only(base, tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"generator": {"model." + k: v for k, v in base["wan_sd"].items()}, "extra": _Evil()}, p)
    with pytest.raises(Exception):
        load_weights(fresh(base["cfg"]), str(p))
    assert not _PICKLE_PAYLOAD_RAN, "arbitrary pickle code ran: torch.load must use weights_only=True"


# --------------------------------------------------------------------------------------------
# "ours": model.safetensors (+ ema.safetensors) + config.json
# --------------------------------------------------------------------------------------------

def test_ours_format(base, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    other = {k: v * 0.5 for k, v in base["wan_sd"].items()}
    save_file(other, str(d / "model.safetensors"))
    save_file(base["wan_sd"], str(d / "ema.safetensors"))
    cfg = base["cfg"]
    with open(d / "config.json", "w") as f:
        json.dump({"model_config": dataclasses.asdict(cfg)}, f)
    m_ema, m_raw = fresh(cfg), fresh(cfg)
    assert load_weights(m_ema, str(d), use_ema=True) == "ours"
    assert load_weights(m_raw, str(d), use_ema=False) == "ours"
    assert_state_equal(m_ema, base["wan_sd"])
    assert_state_equal(m_raw, other)


# --------------------------------------------------------------------------------------------
# 5. key map bijection and real-size param counts (meta device, no allocation)
# --------------------------------------------------------------------------------------------

def test_key_map_examples():
    assert diffusers_to_wan_key("blocks.0.attn1.to_q.weight") == "blocks.0.self_attn.q.weight"
    assert wan_to_diffusers_key("head.modulation") == "scale_shift_table"
    assert wan_to_diffusers_key("blocks.3.modulation") == "blocks.3.scale_shift_table"
    assert wan_to_diffusers_key("blocks.3.norm3.bias") == "blocks.3.norm2.bias"
    assert diffusers_to_wan_key("blocks.3.norm2.weight") == "blocks.3.norm3.weight"
    assert wan_to_diffusers_key("blocks.12.ffn.0.weight") == "blocks.12.ffn.net.0.proj.weight"
    assert wan_to_diffusers_key("blocks.12.self_attn.o.bias") == "blocks.12.attn1.to_out.0.bias"
    assert diffusers_to_wan_key("condition_embedder.time_proj.weight") == "time_projection.1.weight"


def _diffusers_meta(heads, ffn, layers):
    with torch.device("meta"):
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128,
                                     in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=ffn,
                                     num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                     eps=1e-6, added_kv_proj_dim=None, image_dim=None, rope_max_seq_len=1024)


@pytest.mark.parametrize("preset,n_keys,n_params,dheads,dffn,dlayers", [
    ("wan2.1-t2v-1.3b", 825, 1_418_996_800, 12, 8960, 30),
    ("wan2.1-t2v-14b", 1095, 14_288_491_584, 40, 13824, 40),
])
def test_real_size_keys_and_params(preset, n_keys, n_params, dheads, dffn, dlayers):
    with torch.device("meta"):
        model = CausalWanModel(WanConfig.from_preset(preset))
    sd = model.state_dict()
    assert len(sd) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert sum(v.numel() for v in sd.values()) == n_params

    to_d = {k: wan_to_diffusers_key(k) for k in sd}
    assert len(set(to_d.values())) == n_keys  # injective
    for k, dk in to_d.items():
        assert dk == ref_wan_to_diffusers(k), k  # matches the independent table
        assert diffusers_to_wan_key(dk) == k  # round trip is the identity

    dsd = _diffusers_meta(dheads, dffn, dlayers).state_dict()
    assert set(dsd) == set(to_d.values())
    for k, dk in to_d.items():
        assert tuple(sd[k].shape) == tuple(dsd[dk].shape), k


def test_preset_overrides():
    cfg = WanConfig.from_preset("wan2.1-t2v-1.3b", num_layers=2)
    assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers, cfg.text_len, cfg.text_dim) == (1536, 8960, 12, 2, 512, 4096)
    WanConfig.from_preset("toy")
