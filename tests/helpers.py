"""Small things several test files need."""
from dataclasses import asdict

import torch

import common
import model as M
import toyworld


def tiny_frame_wise_checkpoint(root, num_frames):
    """A tiny random frame-wise model (1 layer, 32 wide) saved as one of our Stage-3 checkpoints, with the toy
    text encoder and pixel codec: the CLIs run end to end on it in well under a second per video."""
    torch.manual_seed(0)
    cfg = M.WanConfig(in_dim=12, out_dim=12, dim=32, ffn_dim=64, freq_dim=32, text_dim=toyworld.TOY_TEXT_DIM,
                      text_len=toyworld.TOY_TEXT_LEN, num_heads=2, num_layers=1, causal=True)
    model = M.CausalWanModel(cfg)
    with torch.no_grad():  # away from the zero-initialised head, so outputs depend on the inputs
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run_config = dict(text_encoder="toy", codec="toy", num_frames=num_frames)
    return common.save_checkpoint(str(root / "run"), 1, {"model": model.state_dict()}, {"step": 1},
                                  {"model_config": asdict(cfg), "run_config": run_config, "stage": "stage3_dmd"})
