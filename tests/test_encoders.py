"""Real encoders on tiny random weights saved in the *original Wan formats*: the key maps load strictly and
reproduce the library models run directly; the text pipeline pads like Wan; streaming VAE decode is exact."""

import re

import pytest
import torch

import encoders
import toyworld

# Our encoders vs the library models (other kernels), and streaming vs whole-video decoding (other shapes),
# reorder fp32 sums of <= 128 terms: <= 128·u ≈ 8e-6 of their magnitude each, ~10 such sums in sequence, so
# ~1e-4 on outputs of order 1 on any CPU. A wrong key map or cache is O(1e-1).
REORDER_TOL = 1e-4

# ---- tiny umT5 + a local T5-style tokenizer (no download) ----

TINY_T5 = dict(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0)
WORDS = "a red circle moves left quickly blue square stays still & b c".split()


def hf_t5_to_wan(state_dict):
    """Inverse of the Wan -> HF umT5 key map, written independently of encoders.T5_BLOCK_KEYS."""
    out = {}
    for key, value in state_dict.items():
        if key == "encoder.embed_tokens.weight":
            continue   # tied to shared.weight; Wan stores it once
        if key == "shared.weight":
            out["token_embedding.weight"] = value
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        else:
            i, rest = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key).groups()
            rest = (rest.replace("layer.0.layer_norm", "norm1").replace("layer.1.layer_norm", "norm2")
                    .replace("layer.0.SelfAttention.relative_attention_bias", "pos_embedding.embedding")
                    .replace("layer.0.SelfAttention", "attn").replace("layer.1.DenseReluDense.wi_0", "ffn.gate.0")
                    .replace("layer.1.DenseReluDense.wi_1", "ffn.fc1").replace("layer.1.DenseReluDense.wo", "ffn.fc2"))
            out[f"blocks.{i}.{rest}"] = value
    return out


def make_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(0)
    model = UMT5EncoderModel(UMT5Config(**TINY_T5)).eval()
    wan_dir = tmp_path_factory.mktemp("wan")
    torch.save(hf_t5_to_wan(model.state_dict()), wan_dir / encoders.WAN_T5_FILE)
    tokenizer = make_tokenizer(wan_dir / encoders.WAN_TOKENIZER_DIR)
    return model, tokenizer, wan_dir


def test_clean_prompt_like_wan():
    assert encoders.clean_prompt("  a &amp;amp; b \n\t c  ") == "a & b c"


def test_umt5_from_wan_pth_matches_direct(tiny_t5):
    model, tokenizer, wan_dir = tiny_t5
    enc = encoders.UMT5TextEncoder.from_wan_folder(wan_dir, dtype=torch.float32, config=TINY_T5, text_len=12)
    prompts = ["a red circle moves left quickly", " a  blue square\nstays still ", "a &amp;amp; b"]
    e = enc.encode(prompts)
    assert e.shape == (3, 12, 32) and e.dtype == torch.float32 and enc.text_dim == 32
    # the reference: the same weights run directly on Wan's tokens (cleaned, </s>, padded to max_length)
    tokens = tokenizer(["a red circle moves left quickly", "a blue square stays still", "a & b"],
                       padding="max_length", max_length=12, return_tensors="pt")
    lengths = tokens["attention_mask"].sum(1).tolist()
    assert lengths == [7, 6, 4], "words + </s>"
    with torch.no_grad():
        ref = model(**tokens).last_hidden_state
    for b, n in enumerate(lengths):
        torch.testing.assert_close(e[b, :n], ref[b, :n], rtol=REORDER_TOL, atol=REORDER_TOL)
        assert (e[b, n:] == 0).all()
    assert enc.negative_prompt == encoders.WAN_NEGATIVE_PROMPT and enc.negative_prompt.startswith("色调艳丽")
    # truncation keeps the length fixed at text_len
    assert enc.encode([" ".join(["red"] * 30)]).shape == (1, 12, 32)


def test_umt5_from_hf_folder_and_factory(tiny_t5, tmp_path):
    model, tokenizer, wan_dir = tiny_t5
    model.save_pretrained(tmp_path / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    a = encoders.load_text_encoder(str(tmp_path), dtype=torch.float32)          # -Diffusers layout
    b = encoders.UMT5TextEncoder.from_wan_folder(wan_dir, dtype=torch.float32, config=TINY_T5)
    prompts = ["a red circle moves left quickly"]
    assert a.text_len == 512
    torch.testing.assert_close(a.encode(prompts), b.encode(prompts), rtol=REORDER_TOL, atol=REORDER_TOL)
    toy = encoders.load_text_encoder("toy")
    assert isinstance(toy, toyworld.ToyTextEncoder)


def test_umt5_strict_loading_names_file_and_key(tiny_t5, tmp_path):
    model, _, _ = tiny_t5
    sd = hf_t5_to_wan(model.state_dict())
    del sd["blocks.1.ffn.fc2.weight"]
    torch.save(sd, tmp_path / encoders.WAN_T5_FILE)
    with pytest.raises(ValueError, match=r"models_t5_umt5-xxl-enc-bf16\.pth.*encoder\.block\.1\.layer\.1\.DenseReluDense\.wo"):
        encoders.UMT5TextEncoder.from_wan_folder(tmp_path, dtype=torch.float32, config=TINY_T5)
    sd["blocks.1.ffn.fc2.weight"] = torch.zeros(1)
    sd["blocks.0.attn.rel_bias"] = torch.zeros(1)
    torch.save(sd, tmp_path / encoders.WAN_T5_FILE)
    with pytest.raises(ValueError, match="unexpected key 'blocks.0.attn.rel_bias'"):
        encoders.UMT5TextEncoder.from_wan_folder(tmp_path, dtype=torch.float32, config=TINY_T5)


# ---- tiny Wan VAE ----

TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True])


def diffusers_vae_to_wan(state_dict):
    """Inverse of diffusers' convert_wan_vae_to_diffusers (docs/wan_formats.md), written by hand."""
    res = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
           "conv_shortcut": "shortcut"}
    out = {}
    for key, value in state_dict.items():
        k = key
        k = re.sub(r"^quant_conv\.", "conv1.", k)
        k = re.sub(r"^post_quant_conv\.", "conv2.", k)
        k = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", k)
        k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.head.0.", k)
        k = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", k)
        k = re.sub(r"\.mid_block\.attentions\.0\.", ".middle.1.", k)
        k = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".middle.{2 * int(m.group(1))}.", k)
        k = re.sub(r"^encoder\.down_blocks\.", "encoder.downsamples.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.upsamples.{4 * int(m.group(1)) + int(m.group(2))}.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.upsamples.{4 * int(m.group(1)) + 3}.", k)
        k = re.sub(r"(\.\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\.", lambda m: f"{m.group(1)}.{res[m.group(2)]}.", k)
        out[k] = value
    return out


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**TINY_VAE).eval()
    folder = tmp_path_factory.mktemp("vae")
    torch.save(diffusers_vae_to_wan(vae.state_dict()), folder / encoders.WAN_VAE_FILE)
    return vae, folder


def test_inverse_vae_map_gives_wan_key_names():
    from diffusers import AutoencoderKLWan
    with torch.device("meta"):
        keys = diffusers_vae_to_wan(AutoencoderKLWan().state_dict())   # the real Wan2.1 config, no memory
    assert len(keys) == 194, "Wan2.1_VAE.pth has 194 tensors"
    for k in ["conv1.weight", "conv2.bias", "encoder.conv1.weight", "encoder.downsamples.5.time_conv.weight",
              "encoder.downsamples.3.shortcut.weight", "encoder.middle.1.to_qkv.weight", "encoder.head.2.weight",
              "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.7.time_conv.weight",
              "decoder.upsamples.11.resample.1.weight", "decoder.upsamples.14.residual.6.bias", "decoder.head.0.gamma"]:
        assert k in keys, k
    assert list(keys.values())[0].shape == (96, 3, 3, 3, 3) and "encoder.conv1.weight" == list(keys)[0]


def test_wan_vae_from_pth_matches_direct(tiny_vae):
    vae, folder = tiny_vae
    codec = encoders.WanVAE.from_wan_pth(folder / encoders.WAN_VAE_FILE, config=TINY_VAE)
    assert (codec.latent_channels, codec.spatial_factor, codec.temporal_factor) == (16, 8, 4)
    assert codec.frames_to_latent_frames(9) == 3
    video = torch.rand(2, 9, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1   # [B, T, 3, H, W]
    z = codec.encode(video)
    assert z.shape == (2, 3, 16, 4, 4)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        mu = vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mean                       # [B, C, F, h, w]
        ref_z = ((mu - mean) / std).permute(0, 2, 1, 3, 4)
        ref_video = vae.decode(z.permute(0, 2, 1, 3, 4) * std + mean).sample.permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(z, ref_z, rtol=REORDER_TOL, atol=REORDER_TOL)
    out = codec.decode(z)
    assert out.shape == video.shape and out.abs().max() <= 1
    torch.testing.assert_close(out, ref_video, rtol=REORDER_TOL, atol=REORDER_TOL)
    with pytest.raises(AssertionError):
        codec.encode(video[:, :8])   # not 4k+1 frames


def test_wan_vae_streaming_decode_equals_full(tiny_vae):
    vae, folder = tiny_vae
    codec = encoders.WanVAE.from_wan_pth(folder / encoders.WAN_VAE_FILE, config=TINY_VAE)
    z = torch.randn(1, 4, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    full = codec.decode(z)                                                                   # [1, 13, 3, 32, 32]
    decoder = codec.stream_decoder()
    parts = [decoder.decode_next(z[:, i:i + 1]) for i in range(4)]
    assert [p.shape[1] for p in parts] == [1, 4, 4, 4]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=REORDER_TOL)
    decoder = codec.stream_decoder()   # blocks of several latent frames work too (chunk-wise models)
    chunked = torch.cat([decoder.decode_next(z[:, :1]), decoder.decode_next(z[:, 1:4])], 1)
    torch.testing.assert_close(chunked, full, rtol=0, atol=REORDER_TOL)


def test_wan_vae_strict_and_diffusers_folder(tiny_vae, tmp_path):
    vae, folder = tiny_vae
    sd = diffusers_vae_to_wan(vae.state_dict())
    del sd["decoder.upsamples.7.time_conv.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"broken\.pth.*up_blocks\.1\.upsamplers\.0\.time_conv\.weight"):
        encoders.WanVAE.from_wan_pth(tmp_path / "broken.pth", config=TINY_VAE)
    vae.save_pretrained(tmp_path / "vae")
    a = encoders.load_codec(str(tmp_path))   # a -Diffusers folder with vae/
    b = encoders.WanVAE.from_wan_pth(folder / encoders.WAN_VAE_FILE, config=TINY_VAE)
    video = torch.rand(1, 5, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    torch.testing.assert_close(a.encode(video), b.encode(video), rtol=REORDER_TOL, atol=REORDER_TOL)
    assert isinstance(encoders.load_codec("toy"), toyworld.ToyCodec)
