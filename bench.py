"""
Performance measurements. Numbers are printed as a table and written as JSON; nothing here is asserted.

  python bench.py stage2 --teacher runs/toy/tf --data_dir data/toy      # Stage-2 cost: causal CD vs causal ODE
  python bench.py sampler                                               # rollouts vs FLOP floor, KV cache
  python bench.py stage3-memory --config configs/dmd_small.yaml        # Stage-3 memory estimate per GPU
  python bench.py stream --frames 1200                                  # live stream: latency vs frame index, RSS
  python bench.py page                                                  # frames/s as the browser page sees it
  python bench.py page --ckpt checkpoints/toy/camera_dmd_2step --hold_key ArrowRight --threads 1   # world model, panning
  python bench.py stream --ckpt checkpoints/toy/camera_dmd_2step --pan 2 0       # ... in process, and the cameras' cost
  python bench.py prompt-switch                                         # cross-attention switch vs KV re-cache

stage2 — the paper's efficiency claim (§3.2, Fig. 3(b): ~11,600 vs ~2,900 GPU hours, 1,900 GiB vs 0) on
the same teacher and data. It times the pieces each method needs and combines them for a run that trains
S samples on D clips:
  causal CD   S × (one CD iteration per sample: 2 teacher forwards + student forward/backward + EMA forward)
  causal ODE  D × (48-step CFG trajectory: 96 teacher forwards, stored in fp16) + S × (one regression sample)
The paper trains 5K steps × batch 64 on 80K clips, S/D = 4; the table reports that ratio and the one measured.
"""

import argparse
import json
import os
import tempfile
import time

import torch

import common
import model as M
import sample
import stage2_causal_cd as S2  # the CD and ODE losses being costed


def bench_stage2(args):
    import encoders
    torch.manual_seed(0)
    teacher, model_cfg, _, _ = common.load_model(args.teacher, use_ema=args.teacher_use_ema, causal=True, what="teacher")
    teacher.eval().requires_grad_(False)
    student, _, _, _ = common.load_model(args.teacher, use_ema=args.teacher_use_ema, causal=True, what="student")
    ema = common.make_ema(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    text = encoders.load_text_encoder(args.text_encoder)
    data = common.LatentShards(args.data_dir)
    B = args.batch_size
    x_gt = torch.stack([data.get(i)[0] for i in range(B)])  # [B, F, C, H, W]
    context = text.encode([data.prompts[i] for i in range(B)])
    uncond = text.encode([text.negative_prompt]).expand_as(context)
    grid = M.timestep_grid(48, 5.0)
    g = torch.Generator().manual_seed(0)

    def timed(fn, repeats):
        fn()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    def cd_iteration():
        t, t_next = S2.sample_cd_interval(g, grid, x_gt.shape[1], model_cfg.frames_per_block)
        t, t_next = t.expand(B, -1).contiguous(), t_next.expand(B, -1).contiguous()
        loss, _ = S2.cd_loss(student, ema, teacher, x_gt, torch.randn(x_gt.shape, generator=g), t, t_next, context,
                             uncond, 3.0, torch.ones(B))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        common.ema_update(ema, student, 0.99)

    stored_t = torch.tensor(M.warp_timesteps([1000, 750, 500, 250]))
    keep = [int((grid - t).abs().argmin()) for t in stored_t]
    trajectory = {}

    def ode_trajectory():
        trajectory["states"] = S2.teacher_ode_trajectory(teacher, torch.randn(x_gt.shape, generator=g), x_gt, context,
                                                         uncond, 6.0, grid, keep)

    def ode_iteration():
        index = torch.randint(0, 4, (B,), generator=g)
        loss, _ = S2.ode_regression_loss(student, trajectory["states"], stored_t, index, x_gt, context)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    cd_seconds = timed(cd_iteration, args.repeats) / B
    trajectory_seconds = timed(ode_trajectory, 1) / B
    ode_seconds = timed(ode_iteration, args.repeats) / B
    with tempfile.TemporaryDirectory() as tmp:  # what the ODE data costs on disk, in the shard format
        states = trajectory["states"].half()
        common.write_shard(tmp, 0, {"states": states, "latents": x_gt.half()}, dict(prompts=[""] * B, skipped=[]))
        bytes_per_clip = os.path.getsize(os.path.join(tmp, "shard_00000.safetensors")) / B

    rows = []
    for label, samples_per_clip in (("paper ratio S/D = 4", 4.0), (f"toy config S/D = {args.samples_per_clip:g}",
                                                                   args.samples_per_clip)):
        cd_total = samples_per_clip * cd_seconds
        ode_total = trajectory_seconds + samples_per_clip * ode_seconds
        rows.append(dict(setting=label, cd_seconds_per_clip=cd_total, ode_seconds_per_clip=ode_total,
                         ode_over_cd=ode_total / cd_total))
    result = dict(
        preset=f"dim {model_cfg.dim}, {model_cfg.num_layers} layers", latent_shape=list(x_gt.shape[1:]), batch=B,
        cd=dict(teacher_forwards_per_sample=2, seconds_per_sample=cd_seconds, bytes_stored_per_clip=0),
        ode=dict(teacher_forwards_per_clip=2 * 48, trajectory_seconds_per_clip=trajectory_seconds,
                 regression_seconds_per_sample=ode_seconds, bytes_stored_per_clip=bytes_per_clip),
        totals=rows)
    print(f"\nStage-2 cost on {args.data_dir} (teacher {args.teacher}, {result['preset']}, latents "
          f"{tuple(x_gt.shape[1:])}, batch {B}, {torch.get_num_threads()} threads)")
    print(f"{'':32s}{'causal CD':>14s}{'causal ODE':>14s}")
    print(f"{'teacher forwards':32s}{'2 / sample':>14s}{'96 / clip':>14s}")
    print(f"{'trajectory s / clip':32s}{'-':>14s}{trajectory_seconds:>14.3f}")
    print(f"{'training s / sample':32s}{cd_seconds:>14.3f}{ode_seconds:>14.3f}")
    print(f"{'bytes stored / clip':32s}{0:>14d}{bytes_per_clip:>14,.0f}")
    for row in rows:
        print(f"{'total s / clip, ' + row['setting']:32s}{row['cd_seconds_per_clip']:>14.3f}"
              f"{row['ode_seconds_per_clip']:>14.3f}   ODE/CD = {row['ode_over_cd']:.2f}x")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


# -----------------------------------------------------------------------------
# sampler: frame-wise / chunk-wise rollouts against the FLOP floor, and the KV cache against recomputation

SAMPLER_PRESETS = {  # (model preset, overrides, latent frames, latent h, w, video frames per latent frame after the first)
    "toy": ("toy", dict(), 12, 16, 16, 1),
    # a larger model that keeps 2 CPU cores busy with real GEMMs: 256 tokens per frame, 21 frames like Wan
    "small": ("toy", dict(dim=384, ffn_dim=1536, num_heads=6, num_layers=6), 21, 32, 32, 1),
    # Wan2.1-T2V-1.3B at 480x832: 21 latent frames of 60x104 (1,560 tokens) = 81 video frames (random weights)
    "wan2.1-t2v-1.3b": ("wan2.1-t2v-1.3b", dict(), 21, 60, 104, 4),
}
SAMPLERS = (("frame-wise 1-step", 1, [1000]), ("frame-wise 2-step", 1, [1000, 500]),
            ("frame-wise 4-step", 1, [1000, 750, 500, 250]), ("chunk-wise 4-step", 3, [1000, 750, 500, 250]))


def call_flops(cfg, new_tokens, visible_tokens, text_tokens, text_kv=False):
    """FLOPs (2 per multiply-add) of one DiT forward on `new_tokens` query tokens that attend to
    `visible_tokens` keys: per layer q/k/v/o projections, self-attention, cross-attention q/o and attention over
    the text (its k/v projections only when not cached), the FFN; plus patch embedding and head."""
    D, n, m, Lt = cfg.dim, new_tokens, visible_tokens, text_tokens
    per_layer = 4 * n * D * D + 2 * n * m * D + 2 * n * D * D + 2 * n * Lt * D + 2 * n * D * cfg.ffn_dim
    if text_kv:
        per_layer += 2 * Lt * D * D
    patch = cfg.in_dim * 4
    return 2 * (cfg.num_layers * per_layer + n * patch * D + n * D * cfg.out_dim * 4)


def gemm_rate(dim, ffn, tokens, dtype=torch.float32, repeats=20, trials=5, device="cpu"):
    """Peak FLOP/s of this machine on the model's dominant GEMM ([tokens, dim] x [dim, ffn]): the best of
    `trials` timings, at the rollout's own token count and at 4,096 tokens (CUDA: 16,384), whichever is faster.
    A single timing at the small frame-wise shape is noisy and low, which put rollouts above 100% of their
    'floor'."""
    best = 0.0
    for n in (tokens, 16384 if device == "cuda" else 4096):
        a = torch.randn(n, dim, dtype=dtype, device=device)
        b = torch.randn(dim, ffn, dtype=dtype, device=device)
        for _ in range(3):
            a @ b
        for _ in range(trials):
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            sync(device)
            best = max(best, 2 * n * dim * ffn * repeats / (time.perf_counter() - start))
    return best


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def sampler_model(preset_name, K, device, layers=None):
    """Random weights of a SAMPLER_PRESETS entry, frames_per_block K, in the dtype sample.py samples it in. The
    weights are drawn on the device itself (a 1.3B model initialised on the CPU takes tens of seconds)."""
    base, overrides, _, _, _, _ = SAMPLER_PRESETS[preset_name]
    overrides = {**overrides, **({"num_layers": layers} if layers else {})}
    torch.manual_seed(0)
    cfg = M.WanConfig.from_preset(base, frames_per_block=K, causal=True, **overrides)
    with torch.device(device):
        model = M.CausalWanModel(cfg)
        torch.nn.init.normal_(model.head.head.weight, std=0.02)  # a fresh head predicts 0; make the latents move
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return model.to(dtype=dtype).eval()


def time_rollout(model, how, noise, context, S, video_per_latent):
    """One timed rollout -> dict(seconds, first_frame_s, calls, flops). Synchronises after every block, as a
    stream that shows each frame must."""
    cfg, device = model.cfg, noise.device
    calls, flops, first = [0], [0.0], [None]

    def count(module, inputs, kwargs, output):
        n = inputs[0].shape[1] * S
        calls[0] += 1
        flops[0] += call_flops(cfg, n, kwargs.get("start_frame", 0) * S + n, cfg.text_len)

    hook = model.register_forward_hook(count, with_kwargs=True)
    sync(device)
    start = time.perf_counter()

    def on_block(block, start_frame, x0):
        sync(device)
        if first[0] is None:
            first[0] = time.perf_counter() - start

    latents = sample.sample_latents(model, how, noise, context, on_block=on_block,
                                    generator=torch.Generator(device).manual_seed(0))
    seconds = time.perf_counter() - start
    hook.remove()
    return dict(seconds=seconds, first_frame_s=first[0], calls=calls[0], flops=flops[0], latents=latents)


SAMPLER_HEADER = (f"{'preset':17s}{'sampler':20s}{'path':7s}{'video fr':>9s}{'first ms':>10s}{'frames/s':>10s}"
                  f"{'calls':>7s}{'TFLOP':>9s}{'GEMM TF/s':>11s}{'% floor':>9s}{'1st roll s':>11s}")


def sampler_row_line(r):
    return (f"{r['preset']:17s}{r['sampler']:20s}{r['path']:7s}{r['video_frames']:>9d}{r['first_frame_ms']:>10.1f}"
            f"{r['video_frames_per_second']:>10.1f}{r['model_calls']:>7d}{r['gflops'] / 1e3:>9.3f}"
            f"{r['gemm_tflops_per_s']:>11.2f}{100 * r['floor_fraction']:>8.1f}%{r['first_rollout_s']:>11.2f}")


def bench_sampler(args):
    """Rollouts of every sampler on each preset, the eager forward and the fast path (model.fast_path) timed
    alternately, best of --repeats each; the fast path's first rollout (compilation, graph capture) apart. Each
    row is printed and written to --json as soon as it is measured, so a run stopped early keeps what it did."""
    rows = []
    device = args.device
    print(f"Sampler ({device}, {torch.get_num_threads()} threads, batch 1, model calls include the context passes; "
          f"best of {args.repeats}, paths timed alternately)\n{SAMPLER_HEADER}", flush=True)
    for preset_name in args.presets:
        _, _, num_frames, h, w, video_per_latent = SAMPLER_PRESETS[preset_name]
        video_frames = 1 + video_per_latent * (num_frames - 1)
        model = sampler_model(preset_name, 1, device, args.layers)
        cfg = model.cfg
        S = model.tokens_per_frame(h, w)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(1, num_frames, cfg.in_dim, h, w, generator=g).to(device)
        context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(device)
        dtype = next(model.parameters()).dtype
        for label, K, step_list in SAMPLERS:
            if args.samplers and label not in args.samplers:
                continue
            cfg.frames_per_block = K  # the same weights, rolled out K frames per block
            how = sample.Sampling("few_step", steps=tuple(step_list),
                                  first_block_steps=tuple(sample.FIRST_BLOCK_STEPS) if K == 1 else None)
            rate = gemm_rate(cfg.dim, cfg.ffn_dim, K * S, dtype=dtype, device=device)
            paths = {"eager": dict(compile=False, cuda_graphs=False), "fast": {}}
            timings, fast_description, warm_up = {p: [] for p in args.paths}, None, {}
            for path in args.paths:  # warm-up: allocator and kernels; for the fast path compilation and capture
                description = M.fast_path(model, **paths[path])
                fast_description = description if path == "fast" else fast_description
                start = time.perf_counter()
                time_rollout(model, how, noise, context, S, video_per_latent)
                warm_up[path] = time.perf_counter() - start
                print(f"  ({label}, {path}: first rollout {warm_up[path]:.1f} s)", flush=True)
            for _ in range(args.repeats):
                for path in args.paths:
                    M.fast_path(model, **paths[path])
                    timings[path].append(time_rollout(model, how, noise, context, S, video_per_latent))
            graphs = getattr(model, "graph_store", None)
            difference = None  # the fast path's rollout against the eager one (same noise, same generator)
            if "eager" in timings and "fast" in timings:
                a, b = timings["fast"][-1]["latents"].float(), timings["eager"][-1]["latents"].float()
                difference = ((a - b).abs().max() / b.abs().max()).item()
            for path in args.paths:
                best = min(timings[path], key=lambda r: r["seconds"])
                rows.append(dict(preset=preset_name, sampler=label, path=path, device=device, dtype=str(dtype),
                                 latent_frames=num_frames, video_frames=video_frames, tokens_per_frame=S,
                                 first_frame_ms=1000 * best["first_frame_s"],
                                 video_frames_per_second=video_frames / best["seconds"],
                                 model_calls=best["calls"], gflops=best["flops"] / 1e9,
                                 gemm_tflops_per_s=rate / 1e12, floor_fraction=best["flops"] / rate / best["seconds"],
                                 first_rollout_s=warm_up[path], repeats=args.repeats,
                                 how=fast_description if path == "fast" else "eager forward",
                                 fast_vs_eager_rel_err=difference,
                                 graphs_captured=graphs.captures if graphs and path == "fast" else None,
                                 graph_replays=graphs.replays if graphs and path == "fast" else None,
                                 graph_failures=graphs.failures if graphs and path == "fast" else None))
                print(sampler_row_line(rows[-1]), flush=True)
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        if args.kv_compare and device == "cpu":
            rows.append(kv_cache_vs_recompute(preset_name))

    print(f"\nSampler ({device}, {torch.get_num_threads()} threads, batch 1, best of {args.repeats})\n{SAMPLER_HEADER}")
    for r in rows:
        if "speedup" not in r:
            print(sampler_row_line(r))
    for preset_name in args.presets:
        by = {(r["sampler"], r.get("path")): r for r in rows if r["preset"] == preset_name}
        for path in args.paths:
            fps = {k: by[(f"frame-wise {k}-step", path)]["video_frames_per_second"] for k in (1, 2, 4)
                   if (f"frame-wise {k}-step", path) in by}
            if 1 in fps and 2 in fps and 4 in fps:
                print(f"{preset_name} {path}: 1-step/2-step {fps[1] / fps[2]:.2f}x, 2-step/4-step {fps[2] / fps[4]:.2f}x")
        if "eager" in args.paths and "fast" in args.paths:
            for label, _, _ in SAMPLERS:
                if (label, "fast") in by:
                    e, f = by[(label, "eager")], by[(label, "fast")]
                    graphs = f"; {f['graphs_captured']} graphs captured, {f['graph_replays']} replays, " \
                             f"{f['graph_failures']} calls not capturable" \
                        if f["graphs_captured"] is not None else ""
                    print(f"{preset_name} {label}: fast / eager {f['video_frames_per_second'] / e['video_frames_per_second']:.2f}x "
                          f"({f['how']}); rollouts differ by {f['fast_vs_eager_rel_err']:.2e} (max abs / max){graphs}")
        kv = by.get(("KV cache vs recompute (4-step)", None))
        if kv:
            print(f"{preset_name}: KV cache {kv['speedup']:.1f}x faster than recomputing the prefix at {kv['frames']} "
                  f"frames ({kv['cached_seconds']:.2f} s vs {kv['recompute_seconds']:.2f} s)")
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"wrote {args.json}")


def kv_cache_vs_recompute(preset_name):
    """The KV cache against recomputing the whole prefix for every new frame (frame-wise 4-step, eager)."""
    _, _, num_frames, h, w, _ = SAMPLER_PRESETS[preset_name]
    model = sampler_model(preset_name, 1, "cpu")
    cfg = model.cfg
    noise = torch.randn(1, num_frames, cfg.in_dim, h, w)
    context = torch.randn(1, cfg.text_len, cfg.text_dim)
    how = sample.Sampling("few_step", steps=tuple(sample.FEW_STEP_LISTS[4]), first_block_steps=None)
    steps = M.warp_timesteps(how.steps)
    start = time.perf_counter()
    sample.sample_latents(model, how, noise, context, generator=torch.Generator().manual_seed(0))
    cached = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        done = noise[:, :0]
        for f in range(num_frames):  # no cache: every step re-runs the block-causal forward over all frames
            x = noise[:, f:f + 1]
            for i, t_value in enumerate(steps):
                clip = torch.cat([done, x], dim=1)
                t = torch.full((1, f + 1), float(t_value))
                t[:, :f] = 0.0
                v = model(clip, t, context, causal=True)[:, -1:]
                x0 = M.x0_from_v(x, v, t_value)
                x = M.add_noise(x0, torch.randn_like(x0), steps[i + 1]) if i + 1 < len(steps) else x0
            done = torch.cat([done, x], dim=1)
    recompute = time.perf_counter() - start
    return dict(preset=preset_name, sampler="KV cache vs recompute (4-step)", frames=num_frames,
                cached_seconds=cached, recompute_seconds=recompute, speedup=recompute / cached)


# -----------------------------------------------------------------------------
# stage3-memory: an analytic estimate of Stage-3 memory per GPU (not a measurement)


def stage3_memory(cfg, world_size):
    """Bytes per rank for a Stage-3 config, split into what FSDP2 shards (and CPU offload moves to host RAM)
    and what stays on the GPU. Counts (fp32 master weights, bf16 compute, activation checkpointing):
      generator   weights 4P + grads 4P + AdamW 8P          critic (fake score)  the same, 16P
      EMA         4P                                        real score           4P (frozen, fp32 storage)
      KV cache    layers · 2 · B·F·S · dim · 2 (bf16)
      generator graph  (exit steps of all blocks, kept to backward) layers · B·F·S · dim · 4 (fp32 layer inputs)
      critic graph     the same for its forward over the whole clip
      one layer live   B·F·S · (12·dim + 2·ffn) · 2 for the critic / CFG real score (2B)
      gathered blocks  2 unsharded bf16 blocks of the largest model (FSDP2 prefetch)
    S = tokens per latent frame = (h/2)(w/2). Attention is assumed memory-efficient (flash / SDPA, no L×L)."""
    with torch.device("meta"):
        models = {}
        for role, path in (("generator", cfg.generator), ("real", cfg.real_score), ("fake", cfg.fake_score)):
            model_cfg = None
            if os.path.exists(path):
                model_cfg = M.config_from_checkpoint(common.resolve_checkpoint(path) if os.path.isdir(path) else path)
            if model_cfg is None:  # not downloaded here: infer the preset from the name
                model_cfg = M.WanConfig.from_preset("wan2.1-t2v-14b" if "14B" in path else "wan2.1-t2v-1.3b")
            models[role] = (M.CausalWanModel(model_cfg).num_params(), model_cfg)
    P_gen, gen_cfg = models["generator"]
    P_real, real_cfg = models["real"]
    P_fake, fake_cfg = models["fake"]
    B, F_, S = cfg.batch_size, cfg.num_frames, (cfg.latent_height // 2) * (cfg.latent_width // 2)
    tokens = B * F_ * S
    sharded = {"generator weights+grads+AdamW": 16 * P_gen, "EMA generator": 4 * P_gen,
               "critic weights+grads+AdamW": 16 * P_fake, "real score weights": 4 * P_real}
    sharded = {k: v / world_size for k, v in sharded.items()}
    largest = max(models.values(), key=lambda m: m[0])
    block_params = largest[0] / largest[1].num_layers
    layer_live = lambda c, n: n * (12 * c.dim + 2 * c.ffn_dim) * 2  # noqa: E731
    resident = {
        "KV cache (bf16)": gen_cfg.num_layers * 2 * tokens * gen_cfg.dim * 2,
        "generator graph (checkpointed)": gen_cfg.num_layers * tokens * gen_cfg.dim * 4,
        "critic graph (checkpointed)": fake_cfg.num_layers * tokens * fake_cfg.dim * 4,
        "one live layer (real score, CFG)": layer_live(real_cfg, 2 * tokens),
        "gathered bf16 blocks (x2)": 2 * block_params * 2,
    }
    if not cfg.activation_checkpointing:  # every layer's activations stay alive instead of its input
        resident["generator graph (checkpointed)"] = gen_cfg.num_layers * layer_live(gen_cfg, tokens)
        resident["critic graph (checkpointed)"] = fake_cfg.num_layers * layer_live(fake_cfg, tokens)
    # the generator graph and the critic graph are never alive together: take the larger
    peak = (resident["KV cache (bf16)"] + resident["gathered bf16 blocks (x2)"] + resident["one live layer (real score, CFG)"]
            + max(resident["generator graph (checkpointed)"], resident["critic graph (checkpointed)"]))
    gpu = peak + (0 if cfg.cpu_offload else sum(sharded.values()))
    host = sum(sharded.values()) if cfg.cpu_offload else 0
    return dict(params=dict(generator=P_gen, real=P_real, fake=P_fake), sharded=sharded, resident=resident,
                gpu_bytes=gpu, host_bytes=host, world_size=world_size, tokens=tokens)


def bench_stage3_memory(args):
    import stage3_asym_dmd as S3
    cfg = common.load_config(S3.Config, ["--config", args.config])
    est = stage3_memory(cfg, args.world_size)
    GiB = 2 ** 30
    print(f"\nStage-3 memory estimate for {args.config} on {args.world_size} GPU(s) (analytic, not measured): "
          f"generator {est['params']['generator'] / 1e9:.2f}B, real {est['params']['real'] / 1e9:.2f}B, "
          f"fake {est['params']['fake'] / 1e9:.2f}B parameters; {est['tokens']:,} tokens per rollout")
    where = "host RAM (CPU offload)" if cfg.cpu_offload else "GPU"
    for name, value in est["sharded"].items():
        print(f"  {name:40s}{value / GiB:8.1f} GiB  sharded, {where}")
    for name, value in est["resident"].items():
        print(f"  {name:40s}{value / GiB:8.1f} GiB  GPU")
    print(f"  {'peak GPU per rank':40s}{est['gpu_bytes'] / GiB:8.1f} GiB")
    if cfg.cpu_offload:
        print(f"  {'host RAM per rank':40s}{est['host_bytes'] / GiB:8.1f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(est, f, indent=2)


# -----------------------------------------------------------------------------
# stream / page / prompt-switch: the live stream of serve.py (rolling cache, endless rollouts)


def _engine(args, **overrides):
    import serve
    cfg = serve.ServeConfig(ckpt=args.ckpt, **overrides)
    return serve.Engine(cfg)


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def bench_stream(args):
    """Per-frame latency against the frame index (flat with the rolling cache) and RSS over a long stream,
    in process: Stream.step() = noise + denoising steps + context pass + decode of one frame."""
    if args.preset:
        return bench_stream_preset(args)
    import serve
    engine = _engine(args, use_ema=args.use_ema)
    controls = None
    if args.pan:
        if not engine.camera:
            raise SystemExit(f"bench.py stream: error: --pan needs a camera-conditioned checkpoint; {args.ckpt} takes no cameras")
        controls = {"pan": list(args.pan)}
    context = engine.encode(args.prompt)  # every stream below runs the same prompt
    stream = engine.new_stream(context, seed=0)
    latencies, cpu, rss = [], [], {}
    checkpoints = sorted({10, 100, 1000, args.frames // 2, args.frames})
    start = time.perf_counter()
    for f in range(1, args.frames + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        stream.step(controls)
        latencies.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if f in checkpoints:
            rss[f] = serve.rss_bytes()
    total = time.perf_counter() - start
    first_ms = 1000 * latencies[0]

    # A/B against load from other processes: a stream at frame 20 and one at frame 1000, stepped alternately,
    # so both see the same machine; their median latencies differ only by what the frame index costs
    early, late = engine.new_stream(context, 1), engine.new_stream(context, 2)
    for _ in range(19):
        early.step(controls)
    for _ in range(999):
        late.step(controls)
    paired = {"20": [], "1000": []}
    for _ in range(args.paired):
        for name, s_ in (("20", early), ("1000", late)):
            t0 = time.perf_counter()
            s_.step(controls)
            paired[name].append(time.perf_counter() - t0)

    def around(f, half=args.half_window):  # median over frames f-half..f+half (index 1 = first frame)
        return 1000 * _median(latencies[max(1, f - half) - 1:f + half])

    marks = [f for f in (20, 100, 500, 1000, 2000, 5000, 10000) if f + args.half_window <= args.frames]
    def around_cpu(f, half=args.half_window):
        return 1000 * _median(cpu[max(1, f - half) - 1:f + half])

    result = dict(ckpt=args.ckpt, pan=args.pan, frames=args.frames, threads=torch.get_num_threads(), first_frame_ms=first_ms,
                  median_ms={f: around(f) for f in marks}, median_cpu_ms={f: around_cpu(f) for f in marks},
                  paired_median_ms={k: 1000 * _median(v) for k, v in paired.items()},
                  frames_per_second=args.frames / total, rss_mib={f: v / 2 ** 20 for f, v in rss.items()},
                  model=engine.describe())
    print(f"\nstream: {engine.describe()}, {torch.get_num_threads()} threads")
    print(f"first frame (4-step ASD + context pass + decode): {first_ms:.1f} ms; mean {result['frames_per_second']:.1f} "
          f"frames/s over {args.frames} frames")
    print("median per-frame latency (ms) around frame: " + ", ".join(f"{f}: {v:.2f}" for f, v in result["median_ms"].items()))
    print("median CPU time per frame (ms, all threads) around frame: "
          + ", ".join(f"{f}: {v:.2f}" for f, v in result["median_cpu_ms"].items()))
    if 20 in result["median_ms"] and 1000 in result["median_ms"]:
        result["latency_1000_over_20"] = result["median_ms"][1000] / result["median_ms"][20]
        result["cpu_1000_over_20"] = result["median_cpu_ms"][1000] / result["median_cpu_ms"][20]
        print(f"frame 1000 / frame 20: wall {result['latency_1000_over_20']:.3f}, CPU {result['cpu_1000_over_20']:.3f} "
              f"(target within 10%; wall time also carries the load of other processes)")
    p20, p1000 = result["paired_median_ms"]["20"], result["paired_median_ms"]["1000"]
    result["paired_1000_over_20"] = p1000 / p20
    print(f"paired (two streams stepped alternately, {args.paired} steps each): frame 20 {p20:.2f} ms, frame 1000 "
          f"{p1000:.2f} ms, ratio {p1000 / p20:.3f}")
    if args.pan:  # the world model's own cost: the same model and frame index, with and without cameras (A/B)
        with_cameras, without = engine.new_stream(context, 3), engine.new_stream(context, 4)
        without.camera = False
        times = {"with cameras": [], "without cameras": []}
        for f in range(20 + args.paired):
            for name, s_ in (("with cameras", with_cameras), ("without cameras", without)):
                t0 = time.perf_counter()
                s_.step(controls)
                if f >= 20:
                    times[name].append(time.perf_counter() - t0)
        result["camera_ab_median_ms"] = {k: 1000 * _median(v) for k, v in times.items()}
        a, b = result["camera_ab_median_ms"]["with cameras"], result["camera_ab_median_ms"]["without cameras"]
        print(f"cameras' cost (same model, frames 20-{19 + args.paired}, stepped alternately): {a:.2f} ms with, "
              f"{b:.2f} ms without, +{a - b:.2f} ms per frame")
    print("RSS (MiB) after frame: " + ", ".join(f"{f}: {v:.1f}" for f, v in result["rss_mib"].items()))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


def bench_stream_preset(args):
    """bench.py stream --preset NAME: the same measurement at a preset's shape with random weights and no codec
    (Wan2.1-1.3B on a GPU): a rolling cache of the trained length (21 latent frames, 1 sink frame), 2 steps per
    frame (4 for frame 0), a prompt switch (KV re-cache) at --switch_at; per-frame latency at frame 20 vs 1,000.
    The eager forward is timed over the first --eager_frames frames only."""
    device = args.device
    _, _, num_frames, h, w, video_per_latent = SAMPLER_PRESETS[args.preset]
    model = sampler_model(args.preset, 1, device, args.layers)
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(device) for _ in range(2)]
    steps = M.warp_timesteps(sample.FEW_STEP_LISTS[2])
    first = M.warp_timesteps(sample.FIRST_BLOCK_STEPS)
    result = dict(preset=args.preset, device=device, frames=args.frames, window=num_frames, sink_frames=1)

    def stream(frames, switch_at=None):
        rollout = M.Rollout(model, contexts[0], (cfg.in_dim, h, w), steps=steps, first_block_steps=first,
                            generator=torch.Generator(device).manual_seed(0), window=num_frames, sink_frames=1)
        noise_g = torch.Generator(device).manual_seed(1)
        latencies = []
        for f in range(frames):
            if f == switch_at:
                rollout.set_context(contexts[1], mode="recache")  # timed with the frame after it
            sync(device)
            start = time.perf_counter()
            rollout.step(torch.randn(1, 1, cfg.in_dim, h, w, generator=noise_g, device=device))
            sync(device)
            latencies.append(time.perf_counter() - start)
            if (f + 1) % 250 == 0:
                print(f"  (frame {f + 1}: {1000 * latencies[-1]:.1f} ms)", flush=True)
        return latencies

    for path in args.paths:
        M.fast_path(model, **({"compile": False, "cuda_graphs": False} if path == "eager" else {}))
        frames = args.frames if path == "fast" else min(args.frames, args.eager_frames)
        start = time.perf_counter()
        stream(min(frames, 3 * num_frames))  # warm-up: compilation and capture of every slot
        warm_up = time.perf_counter() - start
        switch_at = args.switch_at if args.switch_at < frames else None
        latencies = stream(frames, switch_at)
        marks = [f for f in (1, 20, 100, 500, 1000, 2000) if f + args.half_window <= frames or f == 1]

        def around(f):  # median ms over frames f-half..f+half (index 1 = the first frame)
            return 1000 * _median(latencies[max(1, f - args.half_window) - 1:f + args.half_window])
        row = dict(median_ms={f: around(f) for f in marks}, first_frame_ms=1000 * latencies[0], warm_up_s=warm_up,
                   video_frames_per_second=video_per_latent / _median(latencies[1:]), how=M.describe_fast_path(model))
        if switch_at is not None:
            row["switch_frame_ms"] = 1000 * latencies[switch_at]
        if 20 in row["median_ms"] and 1000 in row["median_ms"]:
            row["latency_1000_over_20"] = row["median_ms"][1000] / row["median_ms"][20]
        result[path] = row
        print(f"\nstream {args.preset} ({device}, {row['how']}): first frame {row['first_frame_ms']:.1f} ms; "
              f"{row['video_frames_per_second']:.1f} video frames/s at the median frame; warm-up {warm_up:.1f} s")
        print("  median per-frame latency (ms) around frame: " + ", ".join(f"{f}: {v:.2f}" for f, v in row["median_ms"].items()))
        if "latency_1000_over_20" in row:
            print(f"  frame 1000 / frame 20: {row['latency_1000_over_20']:.3f} (goal within 10%)")
        if "switch_frame_ms" in row:
            print(f"  prompt switch (KV re-cache of {num_frames} frames) at frame {switch_at}: {row['switch_frame_ms']:.1f} ms")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


def start_server(extra_args, threads):
    """serve.py on a free loopback port in a child process -> (process, url)."""
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py"),
                             "--port", "0", *extra_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    for line in proc.stdout:
        if line.startswith("open http://"):
            return proc, line.split()[1]
    raise RuntimeError(f"serve.py did not start: {proc.stderr.read()[-2000:]}")


def page_run(args):
    """One server start, one page, one Start: the page's own numbers (serve.py in a child process)."""
    from playwright.sync_api import sync_playwright
    proc, url = start_server(["--ckpt", args.ckpt] + (["--use_ema", "true"] if args.use_ema else [])
                             + (["--fast_path", "false"] if args.eager else []), args.threads)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.browser, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(url)
                page.wait_for_function("window.demo && window.demo.state === 'ready'", timeout=600_000)
                page.fill("#prompt", args.prompt)
                page.click("#start")
                if args.hold_key:  # world-model mode: the camera pans the whole time
                    page.wait_for_function("window.demo.frames >= 1", timeout=600_000)
                    page.locator("body").click(position=dict(x=5, y=5))  # focus leaves the prompt box
                    page.keyboard.down(args.hold_key)
                page.wait_for_function(f"window.demo.frames >= {args.frames}", timeout=600_000)
                page.click("#pause")  # no frame follows "paused": the numbers below are of one finished stream
                page.wait_for_function("window.demo.state === 'paused'", timeout=600_000)
                stats = page.evaluate("({fps: demo.fps, frames: demo.frames, firstFrameMs: demo.firstFrameMs, "
                                      "lastIndex: demo.lastIndex, arrivals: demo.arrivals})")
            finally:
                browser.close()
    finally:
        proc.send_signal(__import__("signal").SIGINT)
        proc.wait(timeout=30)
    arrivals = stats.pop("arrivals")
    return dict(stats, median_interval_ms=_median([b - a for a, b in zip(arrivals, arrivals[1:])]))


def bench_page(args):
    """End-to-end frames/s and first-frame latency as the page measures them, in headless Chromium; --repeats
    starts the server and the page afresh each time and prints the spread."""
    if args.frames < 2:
        raise SystemExit(f"bench.py page: error: --frames must be at least 2 (frame intervals), got {args.frames}")
    if args.repeats < 1:
        raise SystemExit(f"bench.py page: error: --repeats must be at least 1, got {args.repeats}")
    if not os.path.isfile(args.browser):
        raise SystemExit(f"bench.py page: error: no browser at --browser {args.browser}; apt-get install chromium "
                         f"(make browser) or pass the path of a Chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise SystemExit("bench.py page: error: playwright is not installed (pip install -r requirements.txt)") from None
    runs = []
    for k in range(args.repeats):
        run = page_run(args)
        runs.append(run)
        print(f"page run {k + 1}/{args.repeats} ({args.threads} server threads): {run['frames']} frames, "
              f"{run['fps']:.1f} frames/s over the last 60 frames (page's own counter), first frame "
              f"{run['firstFrameMs']:.0f} ms after Start, median frame interval {run['median_interval_ms']:.1f} ms",
              flush=True)
    first, fps = sorted(r["firstFrameMs"] for r in runs), sorted(r["fps"] for r in runs)
    result = dict(runs=runs, server_threads=args.threads, ckpt=args.ckpt, hold_key=args.hold_key,
                  first_frame_ms=dict(min=first[0], median=_median(first), max=first[-1]),
                  fps=dict(min=fps[0], median=_median(fps), max=fps[-1]))
    if args.repeats > 1:
        print(f"\npage, {args.repeats} runs: frames/s {fps[0]:.1f} / {_median(fps):.1f} / {fps[-1]:.1f} (min / "
              f"median / max); first frame {first[0]:.0f} / {_median(first):.0f} / {first[-1]:.0f} ms; "
              f"{sum(f <= 100 for f in first)} of {len(first)} first frames within 100 ms")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


SWITCH_PAIRS = (("a red circle bounces slowly", "a green square stays still"),
                ("a blue triangle stays still", "a yellow circle bounces slowly"),
                ("a magenta square bounces slowly", "a cyan triangle stays still"),
                ("a white circle stays still", "a red square bounces slowly"))


def bench_prompt_switch(args):
    """Both prompt-switch modes on the toy: roll `--before` frames under prompt A, switch to B, roll `--after`.
    frames until B's colour shows: first k such that ToyBench's colour metric is 1 on frames [k, k+3) after the
    switch (B's colour blob in three consecutive frames); colour(B) / colour(A) over the first 12 frames after the
    switch, with ToyBench's shape and direction ("motion") of B there; scene jump: mean |pixel change| across the
    switch divided by the median change between consecutive frames before it (1 = an ordinary frame step)."""
    import toyworld
    engine = _engine(args)
    rows = []
    for mode in ("cross_attn", "recache"):
        per = []
        for a, b in SWITCH_PAIRS:
            for seed in range(args.seeds):
                stream = engine.new_stream(engine.encode(a), seed)
                frames = []
                for f in range(args.before + args.after):
                    if f == args.before:
                        stream.set_prompt(engine.encode(b), mode)
                    frames.append(torch.from_numpy(stream.step()[1]))
                video = torch.cat(frames).permute(0, 3, 1, 2).float() / 127.5 - 1  # [T, 3, H, W]
                after = video[args.before:]
                until = next((k for k in range(len(after) - 2)
                              if toyworld.score_video(after[k:k + 3], b)["colour"] == 1.0), None)
                steps = (video[1:args.before] - video[:args.before - 1]).abs().mean((1, 2, 3))
                jump = (video[args.before] - video[args.before - 1]).abs().mean() / steps.median().clamp(min=1e-6)
                new = toyworld.score_video(after[:12], b)
                per.append(dict(until=until, colour_new=new["colour"], shape_new=new["shape"],
                                direction_new=new["direction"], colour_old=toyworld.score_video(after[:12], a)["colour"],
                                jump=jump.item()))
                stream.close()
        shown = [p["until"] for p in per if p["until"] is not None]
        rows.append(dict(mode=mode, runs=len(per), shown=len(shown),
                         mean_frames_until=sum(shown) / max(1, len(shown)), max_frames_until=max(shown, default=None),
                         colour_new=sum(p["colour_new"] for p in per) / len(per),
                         shape_new=sum(p["shape_new"] for p in per) / len(per),
                         direction_new=sum(p["direction_new"] for p in per) / len(per),
                         colour_old=sum(p["colour_old"] for p in per) / len(per),
                         scene_jump=sum(p["jump"] for p in per) / len(per)))
    print(f"\nprompt switch after {args.before} frames ({engine.describe()}; {len(SWITCH_PAIRS)} prompt pairs x "
          f"{args.seeds} seeds)")
    print(f"{'mode':12s}{'shown':>8s}{'frames until':>14s}{'max':>6s}{'colour new':>12s}{'shape new':>11s}"
          f"{'motion new':>12s}{'colour old':>12s}{'jump':>8s}")
    for r in rows:
        print(f"{r['mode']:12s}{r['shown']:>4d}/{r['runs']:<3d}{r['mean_frames_until']:>14.2f}"
              f"{str(r['max_frames_until']):>6s}{r['colour_new']:>12.2f}{r['shape_new']:>11.2f}{r['direction_new']:>12.2f}"
              f"{r['colour_old']:>12.2f}{r['scene_jump']:>8.2f}")
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stage2", help="causal CD vs causal ODE cost on the same teacher and data")
    p.add_argument("--teacher", default="runs/toy/tf")
    p.add_argument("--teacher_use_ema", action="store_true")
    p.add_argument("--data_dir", default="data/toy")
    p.add_argument("--text_encoder", default="toy")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples_per_clip", type=float, default=100 * 4 / 16,
                   help="S/D of the run to cost (default: configs/toy/ode.yaml, 100 steps x 4 on 16 clips)")
    p.add_argument("--json", default="bench_stage2.json")
    p = sub.add_parser("sampler", help="rollout speed vs the FLOP floor, eager vs fast path; KV cache vs recomputation")
    p.add_argument("--presets", "--preset", nargs="+", default=["toy", "small"], choices=list(SAMPLER_PRESETS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--paths", nargs="+", default=["eager", "fast"], choices=["eager", "fast"],
                   help="the forward paths to time (alternately, best of --repeats)")
    p.add_argument("--samplers", nargs="+", choices=[label for label, _, _ in SAMPLERS],
                   help="only these samplers (default all four)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, help="override the preset's depth (a quick check at Wan width)")
    p.add_argument("--kv_compare", action="store_true", help="also time the KV cache against recomputation (CPU)")
    p.add_argument("--json", default="bench_sampler.json")
    p = sub.add_parser("stage3-memory", help="analytic memory estimate of a Stage-3 config")
    p.add_argument("--config", default="configs/dmd_small.yaml")
    p.add_argument("--world_size", type=int, default=1)
    p.add_argument("--json", default=None)
    p = sub.add_parser("stream", help="live stream: per-frame latency vs frame index, RSS over a long rollout")
    p.add_argument("--ckpt", default="checkpoints/toy/dmd_2step")
    p.add_argument("--prompt", default="a red circle bounces slowly")
    p.add_argument("--frames", type=int, default=1200)
    p.add_argument("--half_window", type=int, default=10, help="median over frame f +- this many frames")
    p.add_argument("--paired", type=int, default=60, help="alternating steps of the frame-20 / frame-1000 streams")
    p.add_argument("--use_ema", action="store_true", help="the EMA weights of a training checkpoint")
    p.add_argument("--pan", type=int, nargs=2, metavar=("DX", "DY"),
                   help="world-model mode: the camera pans this many px per frame the whole time")
    p.add_argument("--preset", choices=list(SAMPLER_PRESETS),
                   help="random weights at this preset's shape, no codec (e.g. wan2.1-t2v-1.3b --device cuda)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="with --preset")
    p.add_argument("--paths", nargs="+", default=["eager", "fast"], choices=["eager", "fast"], help="with --preset")
    p.add_argument("--eager_frames", type=int, default=60, help="with --preset: frames of the eager stream")
    p.add_argument("--switch_at", type=int, default=500, help="with --preset: the frame of the prompt switch")
    p.add_argument("--layers", type=int, help="with --preset: override its depth")
    p.add_argument("--json", default="bench_stream.json")
    p = sub.add_parser("page", help="live stream: frames/s and first-frame latency measured by the page (Chromium)")
    p.add_argument("--ckpt", default="checkpoints/toy/dmd_2step")
    p.add_argument("--prompt", default="a red circle bounces slowly")
    p.add_argument("--frames", type=int, default=600)
    p.add_argument("--use_ema", action="store_true", help="serve the EMA weights of a training checkpoint")
    p.add_argument("--hold_key", help="world-model mode: hold this key (e.g. ArrowRight) while measuring")
    p.add_argument("--eager", action="store_true", help="serve with the eager forward (serve.py --fast_path false)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the server")
    p.add_argument("--repeats", type=int, default=1, help="fresh server + page runs; prints min/median/max")
    p.add_argument("--browser", default="/usr/bin/chromium")
    p.add_argument("--json", default="bench_page.json")
    p = sub.add_parser("prompt-switch", help="live stream: cross-attention switch vs KV re-cache on the toy")
    p.add_argument("--ckpt", default="checkpoints/toy/dmd_2step")
    p.add_argument("--before", type=int, default=24)
    p.add_argument("--after", type=int, default=24)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--json", default="bench_prompt_switch.json")
    args = parser.parse_args()
    {"stage2": bench_stage2, "sampler": bench_sampler, "stage3-memory": bench_stage3_memory, "stream": bench_stream,
     "page": bench_page, "prompt-switch": bench_prompt_switch}[args.command](args)
