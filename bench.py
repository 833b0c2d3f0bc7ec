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

SAMPLER_PRESETS = {  # (model preset overrides, latent frames, latent h, w)
    "toy": (dict(), 12, 16, 16),
    # a larger model that keeps 2 CPU cores busy with real GEMMs: 256 tokens per frame, 21 frames like Wan
    "small": (dict(dim=384, ffn_dim=1536, num_heads=6, num_layers=6), 21, 32, 32),
}


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


def gemm_rate(dim, ffn, tokens, dtype=torch.float32, repeats=20, trials=5):
    """Peak FLOP/s of this machine on the model's dominant GEMM ([tokens, dim] x [dim, ffn]): the best of
    `trials` timings, at the rollout's own token count and at 4,096 tokens, whichever is faster. A single timing
    at the small frame-wise shape is noisy and low, which put rollouts above 100% of their 'floor'."""
    best = 0.0
    for n in (tokens, 4096):
        a, b = torch.randn(n, dim, dtype=dtype), torch.randn(dim, ffn, dtype=dtype)
        for _ in range(3):
            a @ b
        for _ in range(trials):
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            best = max(best, 2 * n * dim * ffn * repeats / (time.perf_counter() - start))
    return best


def bench_sampler(args):
    rows = []
    for preset_name in args.presets:
        overrides, num_frames, h, w = SAMPLER_PRESETS[preset_name]
        for label, K, step_list in (("frame-wise 1-step", 1, [1000]), ("frame-wise 2-step", 1, [1000, 500]),
                                    ("frame-wise 4-step", 1, [1000, 750, 500, 250]),
                                    ("chunk-wise 4-step", 3, [1000, 750, 500, 250])):
            torch.manual_seed(0)
            cfg = M.WanConfig.from_preset("toy", frames_per_block=K, causal=True, **overrides)
            model = M.CausalWanModel(cfg).eval()
            S = model.tokens_per_frame(h, w)
            noise = torch.randn(1, num_frames, cfg.in_dim, h, w)
            context = torch.randn(1, cfg.text_len, cfg.text_dim)
            how = sample.Sampling("few_step", steps=tuple(step_list),
                                  first_block_steps=tuple(sample.FIRST_BLOCK_STEPS) if K == 1 else None)
            calls, flops, first_block = [0], [0.0], [None]

            def count(module, inputs, kwargs, output):
                x = inputs[0]
                start_frame = kwargs.get("start_frame", 0)
                calls[0] += 1
                n = x.shape[1] * S
                flops[0] += call_flops(cfg, n, start_frame * S + n, cfg.text_len)

            sample.sample_latents(model, how, noise[:, :K], context)  # warm-up (allocator, kernels)
            hook = model.register_forward_hook(count, with_kwargs=True)
            start = time.perf_counter()

            def on_block(block, start_frame, x0):
                if first_block[0] is None:
                    first_block[0] = time.perf_counter() - start

            sample.sample_latents(model, how, noise, context, on_block=on_block, generator=torch.Generator().manual_seed(0))
            seconds = time.perf_counter() - start
            hook.remove()
            rate = gemm_rate(cfg.dim, cfg.ffn_dim, K * S)
            rows.append(dict(preset=preset_name, sampler=label, frames=num_frames, tokens_per_frame=S,
                             first_frame_ms=1000 * first_block[0], frames_per_second=num_frames / seconds,
                             model_calls=calls[0], gflops=flops[0] / 1e9, gemm_gflops_per_s=rate / 1e9,
                             floor_fraction=flops[0] / rate / seconds))
        # the KV cache vs recomputing the whole prefix for every new frame (frame-wise 4-step, same model)
        cfg = M.WanConfig.from_preset("toy", causal=True, **overrides)
        model = M.CausalWanModel(cfg).eval()
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
        rows.append(dict(preset=preset_name, sampler="KV cache vs recompute (4-step)", frames=num_frames,
                         cached_seconds=cached, recompute_seconds=recompute, speedup=recompute / cached))

    print(f"\nSampler ({torch.get_num_threads()} threads, fp32, batch 1, model calls include the context passes)")
    print(f"{'preset':8s}{'sampler':22s}{'frames':>7s}{'first ms':>10s}{'frames/s':>10s}{'calls':>7s}"
          f"{'GFLOP':>9s}{'GEMM GF/s':>11s}{'% floor':>9s}")
    for r in rows:
        if "speedup" in r:
            continue
        print(f"{r['preset']:8s}{r['sampler']:22s}{r['frames']:>7d}{r['first_frame_ms']:>10.1f}"
              f"{r['frames_per_second']:>10.1f}{r['model_calls']:>7d}{r['gflops']:>9.2f}"
              f"{r['gemm_gflops_per_s']:>11.1f}{100 * r['floor_fraction']:>8.0f}%")
    for preset_name in args.presets:
        by = {r["sampler"]: r for r in rows if r["preset"] == preset_name}
        fps = lambda k: by[f"frame-wise {k}-step"]["frames_per_second"]  # noqa: E731
        kv = by["KV cache vs recompute (4-step)"]
        print(f"{preset_name}: throughput 1-step/4-step {fps(1) / fps(4):.2f}x (goal >= 2.4), 2-step/4-step "
              f"{fps(2) / fps(4):.2f}x (goal >= 1.62); KV cache {kv['speedup']:.1f}x faster than recomputing the "
              f"prefix at {kv['frames']} frames ({kv['cached_seconds']:.2f} s vs {kv['recompute_seconds']:.2f} s; goal >= 5x)")
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"wrote {args.json}")


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


def bench_page(args):
    """End-to-end frames/s and first-frame latency as the page measures them, in headless Chromium."""
    if args.frames < 2:
        raise SystemExit(f"bench.py page: error: --frames must be at least 2 (frame intervals), got {args.frames}")
    if not os.path.isfile(args.browser):
        raise SystemExit(f"bench.py page: error: no browser at --browser {args.browser}; apt-get install chromium "
                         f"(make browser) or pass the path of a Chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit("bench.py page: error: playwright is not installed (pip install -r requirements.txt)") from None
    proc, url = start_server(["--ckpt", args.ckpt] + (["--use_ema", "true"] if args.use_ema else []), args.threads)
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
        arrivals = stats.pop("arrivals")
    finally:
        proc.send_signal(__import__("signal").SIGINT)
        proc.wait(timeout=30)
    intervals = [b - a for a, b in zip(arrivals, arrivals[1:])]
    result = dict(stats, median_interval_ms=_median(intervals), server_threads=args.threads, ckpt=args.ckpt,
                  hold_key=args.hold_key)
    print(f"\npage ({args.threads} server threads): {stats['frames']} frames, {stats['fps']:.1f} frames/s over the "
          f"last 60 frames (page's own counter), first frame {stats['firstFrameMs']:.0f} ms after Start, median "
          f"frame interval {result['median_interval_ms']:.1f} ms")
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
    p = sub.add_parser("sampler", help="rollout speed vs the FLOP floor; KV cache vs recomputation")
    p.add_argument("--presets", nargs="+", default=["toy", "small"], choices=list(SAMPLER_PRESETS))
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
    p.add_argument("--json", default="bench_stream.json")
    p = sub.add_parser("page", help="live stream: frames/s and first-frame latency measured by the page (Chromium)")
    p.add_argument("--ckpt", default="checkpoints/toy/dmd_2step")
    p.add_argument("--prompt", default="a red circle bounces slowly")
    p.add_argument("--frames", type=int, default=600)
    p.add_argument("--use_ema", action="store_true", help="serve the EMA weights of a training checkpoint")
    p.add_argument("--hold_key", help="world-model mode: hold this key (e.g. ArrowRight) while measuring")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the server")
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
