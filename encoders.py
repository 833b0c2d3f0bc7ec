"""
The real frozen encoders of Wan2.1, borrowed from libraries instead of re-implemented
(docs/wan_formats.md has the formats and numbers this file relies on):
  - umT5-XXL text encoder as `transformers.UMT5EncoderModel`, loaded from Wan's
    `models_t5_umt5-xxl-enc-bf16.pth` through a strict key map, or from an HF folder.
    Wan's text pipeline: clean, tokenize to 512 with </s>, encode, zero the pad rows.
  - Wan2.1 VAE as `diffusers.AutoencoderKLWan`, loaded from `Wan2.1_VAE.pth` (key conversion) or a diffusers
    folder, wrapped so that encode/decode speak the normalised latent space the DiT sees, plus
    a streaming decoder: one latent frame per call with a persistent causal-conv cache (first call -> 1 frame,
    later calls -> 4), bit-identical to decoding the whole clip.

Both wrappers share their interface with the toy versions in toyworld.py; `load_text_encoder` and
`load_codec` pick one from a config string ("toy" or a path). No hub access: local files only.

Shapes: pixel videos [B, T, 3, H, W] in [-1, 1]; latents [B, F, C, h, w] with T = 4(F-1)+1, h = H/8.
"""

import html
import re
from pathlib import Path

import torch

WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = "google/umt5-xxl"
WAN_VAE_FILE = "Wan2.1_VAE.pth"
WAN_TEXT_LEN = 512

# Wan's default negative prompt (shared_config.sample_neg_prompt), the unconditional branch of CFG everywhere
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# google/umt5-xxl encoder, as used by Wan (docs/wan_formats.md)
UMT5_XXL_CONFIG = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                       relative_attention_num_buckets=32, relative_attention_max_distance=128,
                       feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0)


# -----------------------------------------------------------------------------
# ---- strict loading ----

def load_strict(module, state_dict, source, assign=False):
    """load_state_dict(strict=True) with one readable error line naming the file and the first bad keys."""
    expected, given = set(module.state_dict().keys()), set(state_dict.keys())
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: {len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:5]} (loading into {type(module).__name__})")
    module.load_state_dict(state_dict, strict=True, assign=assign)   # also checks shapes


# -----------------------------------------------------------------------------
# ---- umT5 text encoder ----

# per-block Wan key suffix -> HF UMT5EncoderModel suffix (tests/test_encoders.py checks the two encoders agree)
T5_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",  # umT5: one per layer
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",   # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",      # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def wan_t5_to_hf(state_dict, source="state dict"):
    """Wan T5Encoder keys -> HF UMT5EncoderModel keys. Unknown keys are an error."""
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value   # tied to shared in HF
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif m and m.group(2) in T5_BLOCK_KEYS:
            out[f"encoder.block.{m.group(1)}.{T5_BLOCK_KEYS[m.group(2)]}"] = value
        else:
            raise ValueError(f"{source}: unexpected key {key!r} for a Wan umT5 encoder")
    return out


def clean_prompt(text):
    """Wan's HuggingfaceTokenizer(clean='whitespace'), same as diffusers' prompt_clean."""
    import ftfy   # Wan's own dependency; only the real text pipeline needs it
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5TextEncoder:
    """Frozen umT5 encoder + tokenizer: prompts -> [B, text_len, d_model] float32, rows after each prompt's
    real length (its </s> included) exactly zero, which is what Wan feeds its DiT (docs/wan_formats.md)."""

    def __init__(self, model, tokenizer, text_len=WAN_TEXT_LEN, negative_prompt=WAN_NEGATIVE_PROMPT):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.text_dim = model.config.d_model
        self.negative_prompt = negative_prompt
        self.device = next(model.parameters()).device

    @classmethod
    def from_wan_folder(cls, wan_dir, device="cpu", dtype=torch.bfloat16, config=None, **kwargs):
        """Wan2.1 checkpoint folder: `models_t5_umt5-xxl-enc-bf16.pth` + tokenizer in `google/umt5-xxl/`.
        `config` (a UMT5Config kwargs dict) is for tiny test models; real use keeps umT5-XXL."""
        from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel
        wan_dir = Path(wan_dir)
        path = wan_dir / WAN_T5_FILE
        assert path.is_file(), f"no {WAN_T5_FILE} in {wan_dir}"
        state_dict = wan_t5_to_hf(torch.load(path, map_location="cpu", weights_only=True), source=str(path))
        with torch.device("meta"):   # 5.7B params: build without memory, then take the loaded tensors
            model = UMT5EncoderModel(UMT5Config(**(config or UMT5_XXL_CONFIG)))
        load_strict(model, state_dict, str(path), assign=True)
        model.tie_weights()
        model = model.to(device=device, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(wan_dir / WAN_TOKENIZER_DIR, local_files_only=True)
        return cls(model, tokenizer, **kwargs)

    @classmethod
    def from_hf_folder(cls, model_dir, tokenizer_dir=None, device="cpu", dtype=torch.bfloat16, **kwargs):
        """An HF-format encoder folder (e.g. the `text_encoder/` of a -Diffusers repo) + its tokenizer folder."""
        from transformers import AutoTokenizer, UMT5EncoderModel
        model = UMT5EncoderModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir, local_files_only=True)
        return cls(model, tokenizer, **kwargs)

    @torch.no_grad()
    def encode(self, prompts):
        assert isinstance(prompts, (list, tuple)), f"encode wants a list of prompts, got {type(prompts)}"
        tokens = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
                                max_length=self.text_len, add_special_tokens=True, return_tensors="pt")
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)   # [B, L]
        out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()               # [B, L, D]
        return out * mask[:, :, None]   # Wan keeps rows [:len] and zero-pads the rest


# -----------------------------------------------------------------------------
# ---- Wan VAE ----

class WanVAE:
    """diffusers AutoencoderKLWan speaking the normalised latent space: encode z = (mu - mean) / std,
    decode mu = z * std + mean (Wan's 16 per-channel constants). encode takes the posterior mean (deterministic, as Wan does)."""

    def __init__(self, vae):
        cfg = vae.config
        assert cfg.get("patch_size") is None, "Wan2.2-style patchified VAEs are not supported"
        self.vae = vae.eval().requires_grad_(False)
        self.latent_channels = cfg.z_dim
        self.spatial_factor = 2 ** (len(cfg.dim_mult) - 1)
        self.temporal_factor = 2 ** sum(cfg.temperal_downsample)
        param = next(vae.parameters())
        self.mean = torch.tensor(cfg.latents_mean, device=param.device, dtype=torch.float32).view(1, 1, -1, 1, 1)   # [1, 1, C, 1, 1]
        self.std = torch.tensor(cfg.latents_std, device=param.device, dtype=torch.float32).view(1, 1, -1, 1, 1)
        assert self.mean.shape[2] == cfg.z_dim, f"{self.mean.shape[2]} latent means for z_dim {cfg.z_dim}"

    @classmethod
    def from_wan_pth(cls, path, device="cpu", dtype=torch.float32, config=None):
        """`Wan2.1_VAE.pth` (original WanVAE_ keys) -> converted to diffusers keys -> strict load.
        `config` (AutoencoderKLWan kwargs) is for tiny test models; real use keeps the default = Wan2.1 VAE."""
        from diffusers import AutoencoderKLWan
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
        state_dict = convert_wan_vae_to_diffusers(torch.load(path, map_location="cpu", weights_only=True))
        vae = AutoencoderKLWan(**(config or {}))
        load_strict(vae, state_dict, str(path))
        return cls(vae.to(device=device, dtype=dtype))

    @classmethod
    def from_diffusers_folder(cls, path, device="cpu", dtype=torch.float32):
        from diffusers import AutoencoderKLWan
        return cls(AutoencoderKLWan.from_pretrained(path, local_files_only=True, torch_dtype=dtype).to(device))

    def frames_to_latent_frames(self, frames):
        assert (frames - 1) % self.temporal_factor == 0, f"the Wan VAE wants 4k+1 frames, got {frames}"
        return (frames - 1) // self.temporal_factor + 1

    def _dtype(self):
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, video):
        B, T, C, H, W = video.shape
        s = self.spatial_factor
        assert C == 3 and H % s == 0 and W % s == 0, f"encode wants [B, T, 3, H, W] with H, W divisible by {s}, got {tuple(video.shape)}"
        self.frames_to_latent_frames(T)   # asserts T = 4k+1
        x = video.permute(0, 2, 1, 3, 4).to(self._dtype())                 # [B, 3, T, H, W]
        mu = self.vae.encode(x).latent_dist.mean.float()                    # [B, C, F, h, w]
        return (mu.permute(0, 2, 1, 3, 4) - self.mean) / self.std          # [B, F, C, h, w]

    def _unnormalise(self, latents):
        B, F_, C, h, w = latents.shape
        assert C == self.latent_channels, f"decode wants {self.latent_channels} latent channels, got {tuple(latents.shape)}"
        z = latents.float() * self.std + self.mean                          # [B, F, C, h, w]
        return z.permute(0, 2, 1, 3, 4).to(self._dtype())                  # [B, C, F, h, w]

    @torch.no_grad()
    def decode(self, latents):
        out = self.vae.decode(self._unnormalise(latents)).sample           # [B, 3, T, H, W], clamped by diffusers
        return out.float().clamp(-1, 1).permute(0, 2, 1, 3, 4)             # [B, T, 3, H, W]

    def stream_decoder(self):
        return WanStreamDecoder(self)


class WanStreamDecoder:
    """Decode latents as they are generated. Runs diffusers' decoder one latent frame at a time with our own
    persistent causal-conv feature cache (the same loop as AutoencoderKLWan._decode, but the cache outlives
    the call), so the concatenated outputs equal decode() of the whole clip: 1 frame for the first latent
    frame, 4 for every later one."""

    def __init__(self, wrapper):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
        self.wrapper = wrapper
        self.cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in wrapper.vae.decoder.modules())
        self.first = True

    @torch.no_grad()
    def decode_next(self, latents):
        vae = self.wrapper.vae
        x = vae.post_quant_conv(self.wrapper._unnormalise(latents))        # [B, C, f, h, w]; 1x1x1 conv, per frame
        outs = []
        for i in range(x.shape[2]):
            outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=self.cache, feat_idx=[0], first_chunk=self.first))
            self.first = False
        out = torch.cat(outs, 2).float().clamp(-1, 1)                       # [B, 3, t, H, W]
        return out.permute(0, 2, 1, 3, 4)                                   # [B, t, 3, H, W]


# -----------------------------------------------------------------------------
# ---- factories (stage scripts pick by config string) ----

def load_text_encoder(kind_or_path, device="cpu", dtype=torch.bfloat16):
    """"toy" -> toyworld.ToyTextEncoder; a Wan2.1 folder, a -Diffusers folder or an HF encoder folder -> umT5."""
    if kind_or_path == "toy":
        import toyworld
        return toyworld.ToyTextEncoder(device)
    p = Path(kind_or_path)
    if (p / WAN_T5_FILE).is_file():
        return UMT5TextEncoder.from_wan_folder(p, device, dtype)
    if (p / "text_encoder" / "config.json").is_file():
        return UMT5TextEncoder.from_hf_folder(p / "text_encoder", p / "tokenizer", device, dtype)
    if (p / "config.json").is_file():
        return UMT5TextEncoder.from_hf_folder(p, p, device, dtype)
    raise FileNotFoundError(f"{p}: not 'toy', and no {WAN_T5_FILE}, text_encoder/ or config.json found")


def load_codec(kind_or_path, device="cpu", dtype=torch.float32):
    """"toy" -> toyworld.ToyCodec; `Wan2.1_VAE.pth`, a folder holding it, a -Diffusers folder or a diffusers
    VAE folder -> WanVAE."""
    if kind_or_path == "toy":
        import toyworld
        return toyworld.ToyCodec()
    p = Path(kind_or_path)
    if p.is_file() and p.suffix == ".pth":
        return WanVAE.from_wan_pth(p, device, dtype)
    if (p / WAN_VAE_FILE).is_file():
        return WanVAE.from_wan_pth(p / WAN_VAE_FILE, device, dtype)
    if (p / "vae" / "config.json").is_file():
        return WanVAE.from_diffusers_folder(p / "vae", device, dtype)
    if (p / "config.json").is_file():
        return WanVAE.from_diffusers_folder(p, device, dtype)
    raise FileNotFoundError(f"{p}: not 'toy', and no {WAN_VAE_FILE}, vae/ or config.json found")
