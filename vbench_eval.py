"""
Evaluation. For now the toy suite: ToyBench (toyworld.py) on the held-out prompts, on CPU, for any checkpoint
of this repo — the bidirectional toy base, a Stage-1 AR diffusion model (multi-step with CFG) or a few-step
student of Stage 2/3 (1, 2 or 4 steps, the first frame with 4: the ASD trick).

  python vbench_eval.py --suite toy --ckpt checkpoints/toy/base                      # 40-step CFG sampling
  python vbench_eval.py --suite toy --ckpt runs/toy/tf --use_ema --sample_steps 40   # AR diffusion, frame-wise
  python vbench_eval.py --suite toy --ckpt runs/toy/cd --use_ema --steps 2           # few-step AR student

Held-out prompts are (colour, shape, motion) combinations that never occur in training (toyworld.HELDOUT), so
the semantic score measures composition, not memory. Every prompt is sampled `--samples` times from fixed
seeds; the table is written to stdout and, with --json, to a file.
"""

import argparse
import json
import time

import torch

import common
import model as M


def load_model(path, use_ema):
    path = common.resolve_checkpoint(path)
    cfg = M.config_from_checkpoint(path)
    if cfg is None:
        raise SystemExit(f"{path}: no config.json to rebuild the model from (our checkpoints carry one)")
    model = M.CausalWanModel(cfg)
    M.load_weights(model, path, use_ema=use_ema)
    return model.eval(), path


@torch.no_grad()
def sample_toy(model, prompts, *, seed=0, steps=None, sample_steps=40, guidance_scale=3.0, shift=5.0,
               batch_size=32):
    """Videos [N, T, 3, H, W] for prompts [N] (noise of prompt i from seed + i). steps = a nominal few-step list
    (few-step AR student, first frame 4 steps); otherwise `sample_steps`-step Euler with CFG (bidirectional or
    AR diffusion model, whichever the checkpoint is)."""
    import toyworld
    text, codec = toyworld.ToyTextEncoder(), toyworld.ToyCodec()
    shape = (toyworld.TOY_FRAMES, toyworld.TOY_LATENT_CHANNELS, toyworld.TOY_LATENT_SIZE, toyworld.TOY_LATENT_SIZE)
    videos = []
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + first + i))
                             for i in range(len(batch))])
        context = text.encode(batch)
        uncond = text.encode([text.negative_prompt] * len(batch))
        generator = torch.Generator().manual_seed(seed + first)
        if steps is not None:
            latents = M.generate(model, noise, context, steps=M.warp_timesteps(steps, shift),
                                 first_block_steps=M.warp_timesteps([1000, 750, 500, 250], shift), generator=generator)
        elif model.cfg.causal:
            latents = M.generate(model, noise, context, steps=M.timestep_grid(sample_steps, shift).tolist(),
                                 sampler="euler", uncond_context=uncond, guidance_scale=guidance_scale)
        else:
            latents = M.generate_bidirectional(model, noise, context, steps=M.timestep_grid(sample_steps, shift).tolist(),
                                               uncond_context=uncond, guidance_scale=guidance_scale)
        videos.append(codec.decode(latents))
    return torch.cat(videos)


def toy_suite(args):
    import toyworld
    model, path = load_model(args.ckpt, args.use_ema)
    prompts = [p for p in toyworld.heldout_prompts() for _ in range(args.samples)]
    steps = {1: [1000], 2: [1000, 500], 4: [1000, 750, 500, 250]}[args.steps] if args.steps else None
    if steps is not None and not model.cfg.causal:
        raise SystemExit(f"{path} is a bidirectional model; --steps is for few-step AR students (use --sample_steps)")
    start = time.time()
    videos = sample_toy(model, prompts, seed=args.seed, steps=steps, sample_steps=args.sample_steps,
                        guidance_scale=args.cfg)
    seconds = time.time() - start
    scores = toyworld.score(videos, prompts)
    how = f"{args.steps}-step" if steps else f"{args.sample_steps}-step CFG {args.cfg}"
    name = args.name or f"{path} ({how})"
    toyworld.print_table({name: scores})
    print(f"{len(prompts)} videos ({len(set(prompts))} held-out prompts x {args.samples}) in {seconds:.1f} s")
    if args.png:
        common.save_png_grid(videos[::args.samples][:8], args.png, scale=2)
        print(f"wrote {args.png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": path, "sampling": how, "seconds": seconds,
                       **{k: v for k, v in scores.items() if k != "per_video"}}, f, indent=2)
        print(f"wrote {args.json}")
    return scores


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["toy"], required=True)
    parser.add_argument("--ckpt", required=True, help="checkpoint directory or run directory (its latest)")
    parser.add_argument("--use_ema", action="store_true", help="evaluate the EMA weights of a training checkpoint")
    parser.add_argument("--steps", type=int, choices=[1, 2, 4], help="few-step AR sampling (students)")
    parser.add_argument("--sample_steps", type=int, default=40, help="multi-step Euler sampling with CFG")
    parser.add_argument("--cfg", type=float, default=3.0, help="CFG weight of multi-step sampling")
    parser.add_argument("--samples", type=int, default=4, help="videos per held-out prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None)
    parser.add_argument("--png", default=None, help="write a strip of one video per prompt (first 8)")
    parser.add_argument("--json", default=None)
    toy_suite(parser.parse_args())
