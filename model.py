"""Decoder LLMs (Qwen2 / Qwen2.5 / Llama), the audio-language model (LALM), generation and weight I/O.

LALM families (config model_type): qwen2_audio (Qwen2-Audio), qwen2_5_omni (the Qwen2.5-Omni thinker, audio
and text only; loads the released full-model layout or the thinker-only one), audioflamingo3 (Audio Flamingo
3, long audio as 30 s windows) and whisper_lalm (ours: any Whisper encoder + any Qwen2/Llama).

Data flow: input_ids (B, T) -> embed_tokens, audio rows from audio_encoder scattered into the placeholder
slots -> decoder layers (RMSNorm, RoPE, GQA attention, SwiGLU) -> final norm -> logits (B, T, V).
Our tiny default's config adds one key the released architectures lack, audio_time_embedding: each audio
row also gets the embeddings of the time tokens that name its time (LALM.audio_time_rows).

Every module keeps the released HF `config.json` content as `module.config`; architecture dimensions are
read from it, never guessed. Released safetensors checkpoints load through one literal key table per family
(built on the meta device, one tensor at a time) and save back in the released layout so transformers and
other tools can load them.
"""
import json
import math
import os
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from audio_encoder import (SECONDS_PER_AUDIO_TOKEN, LinearProjector, MLPProjector, OmniAudioEncoder, StackProjector,
                           WhisperEncoder, encoder_config)


# ---------------------------------------------------------------------------
# Config: HF-style dicts, v4 (rope_theta / rope_scaling) and v5 (rope_parameters) json.
def rope_parameters(config: dict) -> dict:
    """{"rope_type", "rope_theta", ...} from either config version."""
    if "rope_parameters" in config and config["rope_parameters"]:
        rope = dict(config["rope_parameters"])
    else:
        rope = dict(config.get("rope_scaling") or {})
        rope["rope_theta"] = config.get("rope_theta", 10000.0)
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if rope["rope_type"] not in ("default", "llama3"):
        raise ValueError(f"rope_type {rope['rope_type']!r} is not implemented (only 'default' and 'llama3')")
    return rope


# transformers' defaults for fields a released config.json may omit (Qwen2-Audio's text_config lists only a few).
DECODER_DEFAULTS = {
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, rms_norm_eps=1e-6, tie_word_embeddings=False),
}


def decoder_config(config: dict) -> dict:
    """Decoder hyper-parameters of a qwen2 / llama config, with transformers' defaults for absent fields."""
    family = config.get("model_type", "qwen2")
    if family not in DECODER_DEFAULTS:
        raise ValueError(f"decoder model_type {family!r} not supported ({', '.join(DECODER_DEFAULTS)})")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} not supported (only 'silu')")
    c = {**DECODER_DEFAULTS[family], **{k: v for k, v in config.items() if v is not None}}
    heads, llama = c["num_attention_heads"], family == "llama"
    return dict(
        vocab=c["vocab_size"], dim=c["hidden_size"], ffn=c["intermediate_size"], layers=c["num_hidden_layers"],
        heads=heads, kv_heads=c["num_key_value_heads"] or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads, eps=c["rms_norm_eps"],
        tie=c["tie_word_embeddings"], qkv_bias=not llama or c.get("attention_bias", False),  # Qwen2: always
        o_bias=llama and c.get("attention_bias", False), mlp_bias=llama and c.get("mlp_bias", False),
        rope=rope_parameters(config))


def rope_inv_freq(rope: dict, head_dim: int, device=None) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies; llama3 rescales the long wavelengths (cos/sin stay unscaled)."""
    inv = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if rope["rope_type"] == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        orig = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > orig / low, inv / factor, inv)
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < orig / high) & ~(wavelen > orig / low)
        inv = torch.where(medium, smoothed, inv_l)
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


# ---------------------------------------------------------------------------
# Decoder modules.
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 and cast back BEFORE the weight, as the released models were trained
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c["heads"], c["kv_heads"], c["head_dim"]
        self.q_proj = nn.Linear(c["dim"], self.heads * self.head_dim, bias=c["qkv_bias"])
        self.k_proj = nn.Linear(c["dim"], self.kv_heads * self.head_dim, bias=c["qkv_bias"])
        self.v_proj = nn.Linear(c["dim"], self.kv_heads * self.head_dim, bias=c["qkv_bias"])
        self.o_proj = nn.Linear(self.heads * self.head_dim, c["dim"], bias=c["o_bias"])

    def forward(self, x, cos, sin, mask, cache=None, start=0, output_attentions=False, prefix=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)       # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)    # (B, H_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:                       # static cache: write this chunk, attend over all slots
            k_cache, v_cache = cache
            if torch.is_tensor(start):              # a slot index held on the device (CUDA-graph decoding, T = 1)
                assert prefix is not None, "a tensor start (all slots attended, unwritten ones masked) needs prefix"
                k_cache.index_copy_(2, start, k.to(k_cache.dtype))
                v_cache.index_copy_(2, start, v.to(v_cache.dtype))
            else:
                k_cache[:, :, start:start + T] = k
                v_cache[:, :, start:start + T] = v
            k, v = k_cache, v_cache
        if prefix is not None:                      # grouped decoding
            if torch.is_tensor(start):              # fixed shapes: every slot, the unwritten ones masked
                own_valid = torch.arange(k.shape[2], device=k.device) <= start
            else:                                   # slots [0, start + T) are written
                k, v, own_valid = k[:, :, :start + T], v[:, :, :start + T], None
            o = shared_prefix_attention(q, *prefix, k, v, own_valid)
            return self.o_proj(o.reshape(B, T, -1)), None
        probs, r = None, self.heads // self.kv_heads
        if r > 1 and (cache is None or output_attentions):
            # GQA: kv head j serves query heads j*r..j*r+r-1. Expanded explicitly when training so SDPA can use
            # its memory-efficient masked kernel; decoding keeps enable_gqa (no per-step copy of the cache).
            k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        if output_attentions:                       # explicit path, only for attention analysis
            scores = (q @ k.transpose(-1, -2)).float() * self.head_dim ** -0.5
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(-1)              # (B, H, T, T)
            o = probs.to(q.dtype) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=k.shape[1] != q.shape[1])
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), probs


def shared_prefix_attention(q, prefix_k, prefix_v, prefix_valid, k, v, own_valid=None) -> torch.Tensor:
    """One decoding step of G rows per prompt that share the prompt's keys (Hydragen / cascade attention).

    The prompt's keys and values are stored and read once per prompt instead of once per row, and one softmax
    runs over [prompt keys, the row's own keys]. With audio prompts (hundreds of tokens) and G = 8 the prompt
    is most of a step's key/value traffic and of the cache's memory.
    q (B*G, H, 1, hd); prefix_k/v (B, H_kv, T, hd), prefix_valid (B, T) or None (no left pads); k/v
    (B*G, H_kv, S, hd): the rows' own keys, all valid, or those where own_valid (S,) is true -> (B*G, 1, H*hd).
    GQA: query head j*r + i uses kv head j, so the G rows' r query heads of kv head j are stacked as the rows
    of one matmul with the prompt.
    """
    BG, H, _, hd = q.shape
    B, Hkv, T, _ = prefix_k.shape
    G, r = BG // B, H // Hkv
    q_prompt = q.view(B, G, Hkv, r, hd).transpose(1, 2).reshape(B, Hkv, G * r, hd)     # rows g*r + i
    s_prompt = q_prompt @ prefix_k.transpose(-1, -2)                                    # (B, Hkv, G*r, T)
    if prefix_valid is not None:                                                        # left pads
        s_prompt = s_prompt.masked_fill(~prefix_valid[:, None, None, :], float("-inf"))
    s_own = q.view(BG, Hkv, r, hd) @ k.transpose(-1, -2)                                # (B*G, Hkv, r, S)
    if own_valid is not None:                                                           # unwritten slots
        s_own = s_own.masked_fill(~own_valid, float("-inf"))
    s_prompt = s_prompt.view(B, Hkv, G, r, T).transpose(1, 2).reshape(BG, Hkv, r, T)
    p = (torch.cat([s_prompt, s_own], -1).float() * hd ** -0.5).softmax(-1).to(v.dtype)  # (B*G, Hkv, r, T+S)
    p_prompt = p[..., :T].reshape(B, G, Hkv, r, T).transpose(1, 2).reshape(B, Hkv, G * r, T)
    o = (p_prompt @ prefix_v).view(B, Hkv, G, r, hd).transpose(1, 2).reshape(BG, Hkv, r, hd)
    o = o + p[..., T:] @ v                                                              # (B*G, Hkv, r, hd)
    return o.reshape(BG, 1, H * hd)


class MLP(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.gate_proj = nn.Linear(c["dim"], c["ffn"], bias=c["mlp_bias"])
        self.up_proj = nn.Linear(c["dim"], c["ffn"], bias=c["mlp_bias"])
        self.down_proj = nn.Linear(c["ffn"], c["dim"], bias=c["mlp_bias"])

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.input_layernorm = RMSNorm(c["dim"], c["eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["dim"], c["eps"])
        self.mlp = MLP(c)

    def forward(self, h, cos, sin, mask, cache=None, start=0, output_attentions=False, prefix=None):
        a, probs = self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, start, output_attentions, prefix)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), probs


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """generate-style positions: cumsum(mask) - 1, left pads clamped to 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_mask(key_valid: torch.Tensor, T: int) -> torch.Tensor:
    """(B, 1, T, T) bool: causal AND valid key. A query always sees itself so pad rows stay finite (a fully
    masked row would give NaN, and 0 * NaN in the next layer poisons valid rows too)."""
    i = torch.arange(T, device=key_valid.device)
    causal = i[None, :] <= i[:, None]                                  # (T, T)
    return ((causal[None] & key_valid[:, None, :].bool()) | (i[None, :] == i[:, None])[None])[:, None]


class CausalLM(nn.Module):
    """Qwen2 / Qwen2.5 / Llama decoder with an lm_head (tied to embed_tokens or separate)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        c = self.c = decoder_config(config)
        self.embed_tokens = nn.Embedding(c["vocab"], c["dim"])
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c["layers"]))
        self.norm = RMSNorm(c["dim"], c["eps"])
        self.lm_head = None if c["tie"] else nn.Linear(c["dim"], c["vocab"], bias=False)
        self._inv_freq = {}                         # per device; a plain attribute so .to(bf16) never rounds it
        self.gradient_checkpointing = False         # recompute each layer in backward (big models, long audio)

    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def embed_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T) -> (B, T, D). With a tied lm_head the lookup's gradient is taken sparse:
        autograd adds it into the lm_head's dense gradient of the same weight before it reaches .grad, so
        .grad is dense and the same, but no zero-filled (vocab, dim) buffer is built and added (Qwen2.5-0.5B:
        two 545 MB passes, ~15 % of a CPU forward+backward of 256 tokens)."""
        return F.embedding(input_ids, self.embed_tokens.weight, sparse=self.lm_head is None)

    def rope(self, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T), or (3, B, T) temporal/height/width ids for M-RoPE (Qwen2.5-Omni's
        mrope_section: frequency slot block i takes row i % 3; three equal rows are exactly 1-D RoPE)."""
        dev = position_ids.device
        if dev not in self._inv_freq:
            self._inv_freq[dev] = rope_inv_freq(self.c["rope"], self.c["head_dim"], dev)
        freqs = position_ids[..., None].float() * self._inv_freq[dev]   # (B, T, hd/2) or (3, B, T, hd/2)
        if position_ids.dim() == 3:
            section = self.c["rope"].get("mrope_section")
            if section is None or position_ids.shape[0] != 3:
                raise ValueError(f"position_ids of shape {tuple(position_ids.shape)} need (3, B, T) and a config "
                                 f"with rope mrope_section (Qwen2.5-Omni); pass (B, T) positions otherwise")
            freqs = torch.cat([f[i % 3] for i, f in enumerate(freqs.split(section, dim=-1))], dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                # (B, 1, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def new_cache(self, batch: int, length: int, dtype=None, device=None) -> list:
        """Preallocated static KV cache: one (k, v) pair of (B, kv_heads, length, head_dim) per layer."""
        w = self.embed_tokens.weight
        shape = (batch, self.c["kv_heads"], length, self.c["head_dim"])
        return [(torch.zeros(shape, dtype=dtype or w.dtype, device=device or w.device),
                 torch.zeros(shape, dtype=dtype or w.dtype, device=device or w.device)) for _ in self.layers]

    def decode(self, h, position_ids, mask, cache=None, start=0, output_attentions=False, prefix=None):
        """Embeddings (B, T, D) -> final-normed hidden (B, T, D) [, list of (B, H, T, S) attention probs].

        prefix: per layer (k, v, valid) of a prompt cache shared by groups of rows (see generate)."""
        cos, sin = self.rope(position_ids, h.dtype)
        attentions = []
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and cache is None and torch.is_grad_enabled():
                h, probs = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h, probs = layer(h, cos, sin, mask, None if cache is None else cache[i], start, output_attentions,
                                 None if prefix is None else prefix[i])
            attentions.append(probs)
        return self.norm(h), attentions

    def embed(self, input_ids, **audio):
        if any(v is not None for v in audio.values()):
            raise ValueError("CausalLM takes no audio inputs: load a LALM checkpoint to use audio")
        return self.embed_ids(input_ids)

    def forward(self, input_ids, attention_mask=None, position_ids=None, return_hidden=False,
                output_attentions=False, inputs_embeds=None):
        """attention_mask: (B, T) 1 = valid token (causal attention over valid keys), or a (B, 1, T, T) bool mask
        (True = query row may attend to key column) used as is, e.g. for packed sequences (data.collate_packed);
        a 4-D mask needs explicit position_ids."""
        h = self.embed_ids(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = h.shape[:2]
        if attention_mask is not None and attention_mask.dim() == 4:
            if position_ids is None or attention_mask.shape != (B, 1, T, T) or attention_mask.dtype != torch.bool:
                raise ValueError(f"a 4-D attention_mask must be a bool (B, 1, T, T) = {(B, 1, T, T)} mask with "
                                 f"position_ids; got {tuple(attention_mask.shape)} {attention_mask.dtype}, "
                                 f"position_ids {'given' if position_ids is not None else 'None'}")
            mask = attention_mask
        else:
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask) if attention_mask is not None \
                    else torch.arange(T, device=h.device).expand(B, T)
            # No attention_mask: plain causal attention (SDPA's is_causal, flash-capable). Right-padded training
            # batches may omit the mask too: pads sit after every valid token, so causality already hides them.
            mask = None
            if attention_mask is not None or output_attentions:
                key_valid = torch.ones(B, T, dtype=torch.bool, device=h.device) if attention_mask is None \
                    else attention_mask.bool()
                mask = causal_mask(key_valid, T)
        h, attentions = self.decode(h, position_ids, mask, output_attentions=output_attentions)
        out = h if return_hidden else h @ self.lm_head_weight().T        # (B, T, V)
        return (out, attentions) if output_attentions else out


# ---------------------------------------------------------------------------
# The audio-language model: encoder -> adapter -> rows scattered into the placeholders -> decoder.
# Which audio tower and adapter each family uses: (tower from audio_config, projector from (d_enc, d, config)).
# Qwen2-Audio and AF3 avg-pool before the encoder's layer_norm; Qwen2.5-Omni's tower projects by itself.
AUDIO_ADAPTERS = {
    "qwen2_audio": (lambda a: WhisperEncoder(a, pool_stride=2), lambda d_enc, d, cfg: LinearProjector(d_enc, d)),
    "audioflamingo3": (lambda a: WhisperEncoder(a, pool_stride=2),
                       lambda d_enc, d, cfg: MLPProjector(d_enc, d, cfg.get("projector_bias", True))),
    "qwen2_5_omni": (OmniAudioEncoder, lambda d_enc, d, cfg: nn.Identity()),
    "whisper_lalm": (lambda a: WhisperEncoder(a, pool_stride=1),
                     lambda d_enc, d, cfg: StackProjector(d_enc, d, cfg["adapter"]["stack"],
                                                          cfg["adapter"].get("hidden_size"))),
}
# transformers' defaults of a family's text_config where they differ from Qwen2's (released configs may omit them)
TEXT_DEFAULTS = {
    "qwen2_5_omni": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6),
}
DEFAULT_AUDIO_TOKEN = {"audioflamingo3": 151669}        # <sound>; the Qwen families use <|AUDIO|> 151646


def released_config(config: dict) -> dict:
    """A config in its released form: Qwen2.5-Omni's thinker-only config (model_type qwen2_5_omni_thinker, as
    Qwen2_5OmniThinkerForConditionalGeneration.save_pretrained writes it) is wrapped into the full-model
    config (model_type qwen2_5_omni, thinker_config); every other config is returned as is."""
    if config.get("model_type") != "qwen2_5_omni_thinker":
        return config
    thinker = {k: v for k, v in config.items() if k != "architectures"}
    return {"model_type": "qwen2_5_omni", "architectures": ["Qwen2_5OmniForConditionalGeneration"],
            "thinker_config": thinker, "enable_audio_output": False}


class LALM(nn.Module):
    """audio_tower -> multi_modal_projector -> rows scattered over the audio placeholders of input_ids ->
    language_model (CausalLM). The family (config model_type) picks tower, pooling and projector.

    Qwen2.5-Omni (thinker, audio + text): the config is the full-model one (thinker_config inside); with audio
    and text only, its multimodal RoPE ids are cumsum(attention_mask) - 1 in all three rows (transformers'
    get_rope_index without image/video grids), i.e. plain 1-D RoPE, so it runs the same decoder code. Image
    and video inputs are refused with an error.
    """

    def __init__(self, config: dict):
        super().__init__()
        config = released_config(config)
        self.config = config
        family = config["model_type"]
        if family not in AUDIO_ADAPTERS:
            raise ValueError(f"LALM model_type {family!r} not supported ({', '.join(AUDIO_ADAPTERS)})")
        make_tower, make_projector = AUDIO_ADAPTERS[family]
        cfg = config.get("thinker_config", config)      # Omni nests the audio+text model in thinker_config
        text = {**TEXT_DEFAULTS.get(family, {}), **cfg["text_config"]}
        if text.get("model_type") in (None, "qwen2_5_omni_text"):
            text["model_type"] = "qwen2"                # Omni's text model is Qwen2 layers (+ M-RoPE ids)
        if family in ("qwen2_audio", "audioflamingo3"):  # transformers never ties these heads
            text["tie_word_embeddings"] = False
        elif family == "qwen2_5_omni":                  # the thinker's flag decides, not text_config's
            text["tie_word_embeddings"] = cfg.get("tie_word_embeddings", False)
        if cfg.get("projector_hidden_act", "gelu") != "gelu":
            raise ValueError(f"projector_hidden_act {cfg['projector_hidden_act']!r} not supported (only 'gelu')")
        self.audio_tower = make_tower(cfg["audio_config"])
        d = decoder_config(text)["dim"]
        d_enc = self.audio_tower.proj.out_features if family == "qwen2_5_omni" \
            else encoder_config(cfg["audio_config"])["d_model"]
        if family == "qwen2_5_omni" and d_enc != d:
            raise ValueError(f"audio_config output_dim {d_enc} must equal text hidden_size {d} (no projector)")
        self.multi_modal_projector = make_projector(d_enc, d, cfg)
        self.language_model = CausalLM(text)
        default = DEFAULT_AUDIO_TOKEN.get(family, 151646)
        self.audio_token_id = cfg.get("audio_token_id", cfg.get("audio_token_index", default))
        # image / video placeholders of the Omni thinker: inputs holding them are refused (audio + text only)
        self.vision_token_ids = [cfg.get("image_token_id", cfg.get("image_token_index", 151655)),
                                 cfg.get("video_token_id", cfg.get("video_token_index", 151656))] \
            if family == "qwen2_5_omni" else []
        self.time_embedding = cfg.get("audio_time_embedding")    # our tiny default only (see audio_time_rows)
        if self.time_embedding is not None:
            missing = {"first_token_id", "num_tokens", "seconds_per_token", "scale"} - set(self.time_embedding)
            if missing:
                raise ValueError(f"config audio_time_embedding lacks {sorted(missing)}")
            digits = self.time_embedding.get("digit_token_ids")
            if digits is not None and (len(digits) != 10 or self.time_embedding["seconds_per_token"] != 0.1):
                raise ValueError("config audio_time_embedding digit_token_ids must be the 10 tokens '0' .. '9', "
                                 "naming hundredths after time tokens of 0.1 s (seconds_per_token 0.1)")

    def lm_head_weight(self) -> torch.Tensor:
        return self.language_model.lm_head_weight()

    def num_audio_tokens(self, n_frames: torch.Tensor) -> torch.Tensor:
        """Placeholder count per clip for its number of valid mel frames."""
        n = self.audio_tower.output_lengths(torch.as_tensor(n_frames))
        proj = self.multi_modal_projector
        return proj.output_lengths(n) if hasattr(proj, "output_lengths") else n

    def encode_audio(self, input_features, feature_attention_mask=None) -> torch.Tensor:
        """(N, n_mels, F) features -> (N_tokens_total, D) rows, clip after clip (placeholder order)."""
        if feature_attention_mask is None:
            feature_attention_mask = torch.ones(input_features.shape[0], input_features.shape[-1],
                                                dtype=torch.long, device=input_features.device)
        h = self.multi_modal_projector(self.audio_tower(input_features, feature_attention_mask))  # (N, A, D)
        n_tokens = self.num_audio_tokens(feature_attention_mask.sum(-1))
        keep = torch.arange(h.shape[1], device=h.device)[None, :] < n_tokens[:, None]              # (N, A)
        return h[keep]

    def repeat_audio_embeds(self, audio_embeds, input_ids, num_samples: int) -> torch.Tensor:
        """Rows of encode_audio for B prompts -> rows for their B*G prompt-major copies (b*G + g), so a
        group of G completions reuses one encoding."""
        per_prompt = (input_ids == self.audio_token_id).sum(-1).tolist()                 # (B,) host list
        return torch.cat([a.repeat(num_samples, 1) for a in audio_embeds.split(per_prompt)])

    def embed(self, input_ids, input_features=None, feature_attention_mask=None, audio_embeds=None):
        if self.vision_token_ids and bool(torch.isin(input_ids, torch.tensor(self.vision_token_ids,
                                                                             device=input_ids.device)).any()):
            raise ValueError(f"input_ids hold image/video placeholder tokens {self.vision_token_ids}: images and "
                             f"video are not supported by this implementation (audio and text only)")
        h = self.language_model.embed_ids(input_ids)                                     # (B, T, D)
        if audio_embeds is None and input_features is not None:
            audio_embeds = self.encode_audio(input_features, feature_attention_mask)
        slots = input_ids == self.audio_token_id                                         # (B, T)
        n_slots = int(slots.sum())
        n_rows = 0 if audio_embeds is None else audio_embeds.shape[0]
        if n_slots != n_rows:
            raise ValueError(f"input_ids hold {n_slots} audio placeholders (id {self.audio_token_id}) but the "
                             f"audio gives {n_rows} rows: expand each placeholder to num_audio_tokens copies")
        if n_rows:
            audio = audio_embeds.to(h.dtype)
            if self.time_embedding is not None:
                audio = audio + self.audio_time_rows(slots).to(h.dtype)
            h = h.masked_scatter(slots[..., None], audio)
        return h

    def audio_time_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """(N_audio, D), placeholder order: for each audio placeholder, scale x the input embeddings of the time
        tokens naming when its audio token starts. Config audio_time_embedding {first_token_id, num_tokens,
        seconds_per_token, scale, digit_token_ids (optional)}: time tokens first_token_id + i name i x
        seconds_per_token (the tiny default's "0.0" .. "29.9" pieces, tokenizer.TIME_PIECES); digit_token_ids,
        the tokens "0" .. "9", add the hundredths digit. Audio token k of a run of placeholders (one clip) covers
        [k, k + 1) x 0.04 s and is named by its start 0.04 k the way an answer writes that time: k = 14 gets
        "0.5" + "6" (0.56 s), k = 0, 1, 2 get "0.0" + "0", "4", "8". Without digit_token_ids (the configs of
        sessions 10-11) it gets the piece of its centre alone: "0.0" for k = 0, 1, "0.1" for k = 2 .. 4, ...
        So the decoder can read the time of an audio token it attends to from the token itself (with RoPE the
        values carry no position), which the tiny default needs to write timestamps (train_sta.py). Not part of
        the released architectures (transformers' Qwen2-Audio ignores this config key); absent from their
        configs, so released checkpoints are unaffected."""
        c = self.time_embedding
        count = slots.long().cumsum(-1)                                                  # (B, T)
        before_run = torch.where(slots, 0, count).cummax(-1).values                    # count at the run's start
        k = (count - before_run - 1)[slots]                                            # index within the run
        embed = self.language_model.embed_ids
        if c.get("digit_token_ids") is None:
            # a config without digits (sessions 10-11): the piece of the token's centre (k + 0.5) x 0.04 s;
            # + 1e-6: a centre exactly on a piece boundary (0.30 s) belongs to the later piece despite rounding
            piece = ((k + 0.5) * (SECONDS_PER_AUDIO_TOKEN / c["seconds_per_token"]) + 1e-6).long()
            return embed(c["first_token_id"] + piece.clamp(max=c["num_tokens"] - 1)) * c["scale"]
        hundredths = k * round(SECONDS_PER_AUDIO_TOKEN * 100)                          # 4 k, exact
        rows = embed(c["first_token_id"] + (hundredths // 10).clamp(max=c["num_tokens"] - 1))
        rows = rows + embed(torch.tensor(c["digit_token_ids"], device=k.device)[hundredths % 10])
        return rows * c["scale"]

    def forward(self, input_ids, attention_mask=None, position_ids=None, input_features=None,
                feature_attention_mask=None, audio_embeds=None, return_hidden=False, output_attentions=False,
                input_features_mask=None, **unsupported):
        """input_features_mask: AF3's processor name for feature_attention_mask. Anything else a processor may
        return (pixel_values, image_grid_thw, ...) is refused: these models take audio and text only here."""
        if unsupported:
            raise ValueError(f"unsupported inputs {sorted(unsupported)}: this LALM takes input_ids, attention_mask, "
                             f"position_ids and audio (input_features + feature_attention_mask) only; images and "
                             f"video are not supported")
        if input_features_mask is not None:
            if feature_attention_mask is not None:
                raise ValueError("pass feature_attention_mask or input_features_mask (AF3's name), not both")
            feature_attention_mask = input_features_mask
        h = self.embed(input_ids, input_features, feature_attention_mask, audio_embeds)
        return self.language_model(input_ids, attention_mask, position_ids, return_hidden, output_attentions,
                                   inputs_embeds=h)


def decoder_of(model: nn.Module) -> CausalLM:
    return model.language_model if isinstance(model, LALM) else model


# ---------------------------------------------------------------------------
# Generation: static KV cache, prefix sharing, batched sampling without per-token host syncs.
def sample(logits: torch.Tensor, temperature=1.0, top_p=1.0, top_k=0, generator=None) -> torch.Tensor:
    """(N, V) logits -> (N,) token ids. temperature 0 is greedy.

    Draws by inverse transform: one uniform per row, located in the row's cumulative probabilities
    (searchsorted), so no multinomial host sync and one random number per row instead of one per vocabulary
    entry; the same generator state gives the same draw for the same probabilities. A token of probability 0
    is never drawn (the uniform is kept strictly below the row's total).
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p                 # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    cdf = probs.cumsum(-1)                                                              # (N, V)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)                           # first cdf > u


def decode_step(lm, tok, pos, start, cache, prefix):
    """One grouped decoding step, the body of the static decoders below: token ids (B*G,) at positions pos
    (B*G, 1), their keys written to slot `start` of the rows' own cache -> logits (B*G, V). An int `start`
    attends to the written slots [0, start]; a (1,) tensor to every slot, the unwritten ones masked, so that the
    shapes stay fixed (Attention with a tensor start)."""
    h, _ = lm.decode(lm.embed_ids(tok[:, None]), pos, None, cache, start, prefix=prefix)
    return h[:, 0] @ lm.lm_head_weight().T


def cuda_graph_step(lm, cache, prefix, next_pos):
    """decode_step captured once as a CUDA graph and replayed.

    Eager decoding launches ~60 kernels per layer per step, one by one from Python: a 7B model spends most of
    each step launching them rather than reading its weights. Replaying them as one graph needs fixed shapes
    and addresses: the token, its position and its cache slot live in static tensors written before each
    replay. Returns run(tok (B*G,), pos (B*G, 1), t) -> logits (B*G, V), a buffer the next replay
    overwrites. Call it inside the caller's autocast/no_grad context: the warm-up run caches autocast's weight
    casts outside the graph. Each generate call captures anew (torch.cuda.graph synchronizes and empties the
    allocator's cache first): a few milliseconds, counted in the rollout times of BENCHMARKS.md.
    """
    tok = torch.zeros(next_pos.shape[0], dtype=torch.long, device=next_pos.device)          # (B*G,)
    pos, slot = next_pos.clone(), torch.zeros(1, dtype=torch.long, device=next_pos.device)
    with torch.cuda.device(next_pos.device):    # the model's GPU, whichever is current
        side = torch.cuda.Stream()              # warm-up (cuBLAS workspaces, autocast casts) off the graph
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            decode_step(lm, tok, pos, slot, cache, prefix)  # writes slot 0, which step 0 overwrites first
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):      # its default stream lives on the first GPU that captured
            logits = decode_step(lm, tok, pos, slot, cache, prefix)

    def run(new_tok, new_pos, t):
        tok.copy_(new_tok)
        pos.copy_(new_pos)
        slot.fill_(t)
        graph.replay()
        return logits
    return run


_compiled_decode_step = None                     # torch.compile(decode_step), built on first use


def compiled_step(lm, cache, prefix):
    """decode_step through torch.compile (inductor), for decoding on the CPU.

    A tiny model's eager step is ~275 small kernels and module calls, and on a CPU each costs microseconds of
    dispatch. Inductor fuses the elementwise work (RMSNorm, RoPE, masking, softmax) into a few C++ loops around
    the matmuls. The slot index stays a Python int, so each step reads only the written slots. Dynamo compiles
    one graph for slot 0 and one for the others (~20-40 s on 2 cores; needs a C++ compiler), and again when
    something it specialised on changes: a size it has seen only one value of (it then makes that size
    symbolic; symbolic from the start, dynamic=True, the step is ~15 % slower), one prompt vs several, prompts
    with vs without left pads, autocast on vs off, another model config. Past dynamo's recompile limit (8
    graphs) the process warns once and decodes eagerly from then on. Weights are graph inputs: optimizer
    updates need no recompile. Returns run(tok (B*G,), pos (B*G, 1), t) -> logits (B*G, V).
    """
    global _compiled_decode_step
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(decode_step, fullgraph=True)

    def run(tok, pos, t):
        global _compiled_decode_step
        try:
            return _compiled_decode_step(lm, tok, pos, t, cache, prefix)
        except torch._dynamo.exc.FailOnRecompileLimitHit:          # raised before the step runs: nothing written
            warnings.warn("generate(compile=True): torch.compile's recompile limit reached; decoding eagerly in "
                          "this process from now on")
            _compiled_decode_step = decode_step
            return decode_step(lm, tok, pos, t, cache, prefix)
    return run


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, input_features=None, feature_attention_mask=None, *,
             max_new_tokens=128, num_samples=1, temperature=1.0, top_p=1.0, top_k=0, eos_token_id=None,
             pad_token_id=0, generator=None, audio_embeds=None, check_every=8, cuda_graph=True, compile=False):
    """LEFT-padded prompts (B, T) -> (tokens (B*G, N), lengths (B*G,) incl. EOS, finished (B*G,) bool).

    Rows are prompt-major (b*G + g). Audio is encoded and the prompt prefilled once per prompt; the prompt's
    KV cache stays one copy per prompt, read by its G rows (shared_prefix_attention). Finished rows keep
    running (padded) so no step needs a host sync; all-finished is checked every `check_every` steps.
    eos_token_id: an id or a list (None: never stops).
    audio_embeds (from model.encode_audio for these B prompts) may replace input_features.
    cuda_graph: on a GPU, replay each decoding step as a CUDA graph (cuda_graph_step).
    compile: on the CPU, run each decoding step through torch.compile (compiled_step).
    Neither under FSDP2 (its per-block hooks cannot be captured in a graph, and compiling them is untested):
    there decoding stays eager.
    """
    lm = decoder_of(model)
    B, T = input_ids.shape
    G, N, dev = num_samples, max_new_tokens, input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    key_valid = attention_mask.bool()
    audio = {} if isinstance(model, CausalLM) else dict(input_features=input_features,
                                                         feature_attention_mask=feature_attention_mask,
                                                         audio_embeds=audio_embeds)
    h = model.embed(input_ids, **audio)                                                   # (B, T, D)
    pos = positions_from_mask(key_valid)
    valid = None if bool(key_valid.all()) else key_valid           # no left pads: nothing to mask
    # under autocast keys and values come out of the projections in its dtype: keep the cache in it too
    cache_dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
    prompt_cache = lm.new_cache(B, T, dtype=cache_dtype)
    # prefill; without left pads plain causal attention (SDPA's is_causal: flash-capable, skips masked blocks)
    h, _ = lm.decode(h, pos, None if valid is None else causal_mask(key_valid, T), prompt_cache, 0)
    logits = (h[:, -1] @ lm.lm_head_weight().T).repeat_interleave(G, 0)                    # (B*G, V)

    prefix = [(k, v, valid) for k, v in prompt_cache]              # the prompt's keys: one copy per prompt
    cache = lm.new_cache(B * G, N, dtype=cache_dtype)               # each row's own keys
    next_pos = pos[:, -1:].repeat_interleave(G, 0) + 1                                       # (B*G, 1)
    eos = torch.as_tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long, device=dev).reshape(-1)
    tokens = torch.full((B * G, N), pad_token_id, dtype=torch.long, device=dev)
    finished = torch.zeros(B * G, dtype=torch.bool, device=dev)
    # Omni's image/video placeholders are never sampled: forward refuses them, so a completion holding one
    # could not be scored (completion_logprobs) later
    banned = torch.as_tensor(getattr(model, "vision_token_ids", []), dtype=torch.long, device=dev)
    step = lambda tok, pos, t: decode_step(lm, tok, pos, t, cache, prefix)               # noqa: E731 (eager)
    use_graph, use_compile = cuda_graph and dev.type == "cuda", compile and dev.type == "cpu"
    if (use_graph or use_compile) and N > 1 \
            and not any(hasattr(m, "set_reshard_after_forward") for m in lm.modules()):      # FSDP2 blocks: eager
        step = cuda_graph_step(lm, cache, prefix, next_pos) if use_graph else compiled_step(lm, cache, prefix)
    for t in range(N):
        if len(banned):
            logits = logits.index_fill(-1, banned, float("-inf"))
        tok = sample(logits, temperature, top_p, top_k, generator)
        tok = torch.where(finished, pad_token_id, tok)
        tokens[:, t] = tok
        finished |= torch.isin(tok, eos)
        if t == N - 1 or ((t + 1) % check_every == 0 and bool(finished.all())):
            break
        logits = step(tok, next_pos, t)
        next_pos = next_pos + 1
    is_eos = torch.isin(tokens, eos)
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full_like(finished, N, dtype=torch.long))
    lengths = torch.where(is_eos.any(-1), first + 1, first)
    return tokens, lengths, finished


# ---------------------------------------------------------------------------
# Per-token log-probs without materialising a (B, T, V) log-softmax.
def _chunk_logprobs(h, w, targets, temperature):
    logits = (h @ w.T).float() / temperature                                            # (n, V)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def token_logprobs(hidden, lm_head_weight, targets, temperature=1.0, chunk_size=1024) -> torch.Tensor:
    """hidden (N, C, D), targets (N, C) -> (N, C) fp32 log p(target) under logits / temperature.

    The N*C tokens are processed chunk_size at a time (peak memory chunk_size x V fp32 logits); with grad
    enabled each chunk is recomputed in backward, so only one chunk of logits is ever alive.
    """
    h, tgt = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    out = [h.new_zeros(0, dtype=torch.float32)]                  # keeps torch.cat valid for zero tokens
    for s in range(0, h.shape[0], chunk_size):
        args = (h[s:s + chunk_size], lm_head_weight, tgt[s:s + chunk_size], temperature)
        if torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad):
            out.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(*args))
    return torch.cat(out).reshape(targets.shape)


def completion_logprobs(model, input_ids, attention_mask=None, completion_mask=None, *, input_features=None,
                        feature_attention_mask=None, audio_embeds=None, temperature=1.0, chunk_size=1024):
    """(B, T) fp32: entry t = log p(input_ids[t] | input_ids[:t]); entry 0, and every entry outside
    completion_mask when given, is 0. Only the completion tokens go through the lm_head (prompts with
    hundreds of audio tokens would otherwise dominate the cost)."""
    audio = {} if isinstance(model, CausalLM) else dict(input_features=input_features,
                                                         feature_attention_mask=feature_attention_mask,
                                                         audio_embeds=audio_embeds)
    hidden = model(input_ids, attention_mask, return_hidden=True, **audio)[:, :-1]           # (B, T-1, D)
    targets = input_ids[:, 1:]
    if completion_mask is None:
        lp = token_logprobs(hidden, model.lm_head_weight(), targets, temperature, chunk_size)
    else:
        sel = completion_mask[:, 1:].bool()                                                   # (B, T-1)
        picked = token_logprobs(hidden[sel], model.lm_head_weight(), targets[sel], temperature, chunk_size)
        lp = torch.zeros(sel.shape, dtype=picked.dtype, device=picked.device).masked_scatter(sel, picked)
    return F.pad(lp, (1, 0))                                                                 # (B, T)


# ---------------------------------------------------------------------------
# Weight I/O. Literal tables: released file key -> our parameter name ({} = layer index, None = dropped on
# purpose). Optional entries (biases a config turns off, lm_head when tied) are simply absent from the model.
DECODER_KEYS = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.self_attn.q_proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.self_attn.q_proj.bias",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.self_attn.k_proj.weight",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.self_attn.k_proj.bias",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.self_attn.v_proj.weight",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.self_attn.v_proj.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.self_attn.o_proj.weight",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.self_attn.o_proj.bias",             # llama attention_bias
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.gate_proj.bias": "layers.{}.mlp.gate_proj.bias",                   # llama mlp_bias
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.up_proj.bias": "layers.{}.mlp.up_proj.bias",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
    "model.layers.{}.mlp.down_proj.bias": "layers.{}.mlp.down_proj.bias",
    "model.layers.{}.input_layernorm.weight": "layers.{}.input_layernorm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attention_layernorm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}

ENCODER_KEYS = {   # Whisper-style audio tower, relative to its prefix
    "conv1.weight": "conv1.weight",
    "conv1.bias": "conv1.bias",
    "conv2.weight": "conv2.weight",
    "conv2.bias": "conv2.bias",
    "embed_positions.weight": "embed_positions.weight",
    "layers.{}.self_attn.q_proj.weight": "layers.{}.self_attn.q_proj.weight",
    "layers.{}.self_attn.q_proj.bias": "layers.{}.self_attn.q_proj.bias",
    "layers.{}.self_attn.k_proj.weight": "layers.{}.self_attn.k_proj.weight",
    "layers.{}.self_attn.v_proj.weight": "layers.{}.self_attn.v_proj.weight",
    "layers.{}.self_attn.v_proj.bias": "layers.{}.self_attn.v_proj.bias",
    "layers.{}.self_attn.out_proj.weight": "layers.{}.self_attn.out_proj.weight",
    "layers.{}.self_attn.out_proj.bias": "layers.{}.self_attn.out_proj.bias",
    "layers.{}.self_attn_layer_norm.weight": "layers.{}.self_attn_layer_norm.weight",
    "layers.{}.self_attn_layer_norm.bias": "layers.{}.self_attn_layer_norm.bias",
    "layers.{}.fc1.weight": "layers.{}.fc1.weight",
    "layers.{}.fc1.bias": "layers.{}.fc1.bias",
    "layers.{}.fc2.weight": "layers.{}.fc2.weight",
    "layers.{}.fc2.bias": "layers.{}.fc2.bias",
    "layers.{}.final_layer_norm.weight": "layers.{}.final_layer_norm.weight",
    "layers.{}.final_layer_norm.bias": "layers.{}.final_layer_norm.bias",
    "layer_norm.weight": "layer_norm.weight",
    "layer_norm.bias": "layer_norm.bias",
}

OMNI_ENCODER_KEYS = {   # Qwen2.5-Omni audio tower, relative to its prefix: no stored positions, ln_post + proj
    "conv1.weight": "conv1.weight",
    "conv1.bias": "conv1.bias",
    "conv2.weight": "conv2.weight",
    "conv2.bias": "conv2.bias",
    "audio_bos_eos_token.weight": "audio_bos_eos_token.weight",
    "positional_embedding.positional_embedding": None,     # the sinusoids, if a converter stored them
    "positional_embedding": None,
    **{k: v for k, v in ENCODER_KEYS.items() if k.startswith("layers.")},
    "ln_post.weight": "ln_post.weight",
    "ln_post.bias": "ln_post.bias",
    "proj.weight": "proj.weight",
    "proj.bias": "proj.bias",
}

WHISPER_DECODER_KEYS = {   # the text decoder of WhisperForConditionalGeneration: not used, dropped on load
    "model.decoder.embed_tokens.weight": None,
    "model.decoder.embed_positions.weight": None,
    "model.decoder.layers.{}.self_attn.q_proj.weight": None,
    "model.decoder.layers.{}.self_attn.q_proj.bias": None,
    "model.decoder.layers.{}.self_attn.k_proj.weight": None,
    "model.decoder.layers.{}.self_attn.v_proj.weight": None,
    "model.decoder.layers.{}.self_attn.v_proj.bias": None,
    "model.decoder.layers.{}.self_attn.out_proj.weight": None,
    "model.decoder.layers.{}.self_attn.out_proj.bias": None,
    "model.decoder.layers.{}.self_attn_layer_norm.weight": None,
    "model.decoder.layers.{}.self_attn_layer_norm.bias": None,
    "model.decoder.layers.{}.encoder_attn.q_proj.weight": None,
    "model.decoder.layers.{}.encoder_attn.q_proj.bias": None,
    "model.decoder.layers.{}.encoder_attn.k_proj.weight": None,
    "model.decoder.layers.{}.encoder_attn.v_proj.weight": None,
    "model.decoder.layers.{}.encoder_attn.v_proj.bias": None,
    "model.decoder.layers.{}.encoder_attn.out_proj.weight": None,
    "model.decoder.layers.{}.encoder_attn.out_proj.bias": None,
    "model.decoder.layers.{}.encoder_attn_layer_norm.weight": None,
    "model.decoder.layers.{}.encoder_attn_layer_norm.bias": None,
    "model.decoder.layers.{}.fc1.weight": None,
    "model.decoder.layers.{}.fc1.bias": None,
    "model.decoder.layers.{}.fc2.weight": None,
    "model.decoder.layers.{}.fc2.bias": None,
    "model.decoder.layers.{}.final_layer_norm.weight": None,
    "model.decoder.layers.{}.final_layer_norm.bias": None,
    "model.decoder.layer_norm.weight": None,
    "model.decoder.layer_norm.bias": None,
    "proj_out.weight": None,
}


def _prefixed(file_prefix: str, our_prefix: str, table: dict) -> dict:
    return {file_prefix + k: None if v is None else our_prefix + v for k, v in table.items()}


def _lalm_keys(projector: dict) -> dict:
    """Hub layout shared by Qwen2-Audio-style checkpoints: audio_tower.*, multi_modal_projector.*,
    language_model.model.*, language_model.lm_head.weight."""
    return {**_prefixed("audio_tower.", "audio_tower.", ENCODER_KEYS), **projector,
            **_prefixed("language_model.", "language_model.", DECODER_KEYS)}


KEY_TABLES = {
    "qwen2": DECODER_KEYS,
    "llama": DECODER_KEYS,
    "whisper": {**_prefixed("model.encoder.", "", ENCODER_KEYS), **WHISPER_DECODER_KEYS},
    "qwen2_audio": _lalm_keys({
        "multi_modal_projector.linear.weight": "multi_modal_projector.linear.weight",
        "multi_modal_projector.linear.bias": "multi_modal_projector.linear.bias",
    }),
    "whisper_lalm": _lalm_keys({   # ours: any Whisper encoder + any LLM through the stacking adapter
        "multi_modal_projector.linear_1.weight": "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_1.bias": "multi_modal_projector.linear_1.bias",
        "multi_modal_projector.linear_2.weight": "multi_modal_projector.linear_2.weight",
        "multi_modal_projector.linear_2.bias": "multi_modal_projector.linear_2.bias",
    }),
    "audioflamingo3": _lalm_keys({
        "multi_modal_projector.linear_1.weight": "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_1.bias": "multi_modal_projector.linear_1.bias",
        "multi_modal_projector.linear_2.weight": "multi_modal_projector.linear_2.weight",
        "multi_modal_projector.linear_2.bias": "multi_modal_projector.linear_2.bias",
    }),
    # released full-model layout; thinker.visual.*, talker.*, token2wav.* are skipped (DROPPED_PREFIXES)
    "qwen2_5_omni": {**_prefixed("thinker.audio_tower.", "audio_tower.", OMNI_ENCODER_KEYS),
                     **_prefixed("thinker.", "language_model.", DECODER_KEYS)},
}

# Other spellings of the same keys (transformers-5 in-memory names, v5 pre-release duplicates), first match wins.
KEY_VARIANTS = {
    "qwen2_audio": [("model.language_model.model.", "language_model.model."),
                    ("language_model.model.model.", "language_model.model."),
                    ("model.language_model.", "language_model.model."),
                    ("model.audio_tower.", "audio_tower."),
                    ("model.multi_modal_projector.", "multi_modal_projector."),
                    ("lm_head.", "language_model.lm_head.")],
    # the thinker-only layout (Qwen2_5OmniThinkerForConditionalGeneration.save_pretrained) and v5 in-memory names
    "qwen2_5_omni": [("thinker.model.language_model.", "thinker.model."),
                     ("thinker.model.audio_tower.", "thinker.audio_tower."),
                     ("thinker.model.visual.", "thinker.visual."),
                     ("model.language_model.", "thinker.model."),
                     ("model.audio_tower.", "thinker.audio_tower."),
                     ("model.visual.", "thinker.visual."),
                     ("audio_tower.", "thinker.audio_tower."),
                     ("visual.", "thinker.visual."),
                     ("model.", "thinker.model."),
                     ("lm_head.", "thinker.lm_head.")],
}
KEY_VARIANTS["audioflamingo3"] = KEY_VARIANTS["qwen2_audio"]     # same hub layout and v5 renames

# Whole sub-models a family's checkpoint carries but this code does not use: skipped by name, never read.
DROPPED_PREFIXES = {"qwen2_5_omni": ("thinker.visual.", "talker.", "token2wav.")}

MODEL_CLASSES = {"qwen2": CausalLM, "llama": CausalLM, "whisper": WhisperEncoder, "qwen2_audio": LALM,
                 "whisper_lalm": LALM, "audioflamingo3": LALM, "qwen2_5_omni": LALM}
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                 "whisper": "WhisperForConditionalGeneration",
                 "qwen2_audio": "Qwen2AudioForConditionalGeneration", "whisper_lalm": "WhisperLALM",
                 "audioflamingo3": "AudioFlamingo3ForConditionalGeneration",
                 "qwen2_5_omni": "Qwen2_5OmniForConditionalGeneration"}


def _lookup(table: dict, key: str):
    """(found, value) for a concrete key, trying the literal entry then the {} layer-index pattern."""
    if key in table:
        return True, table[key]
    m = re.search(r"\.(\d+)\.", key)
    if m:
        pattern = key[:m.start()] + ".{}." + key[m.end():]
        if pattern in table:
            v = table[pattern]
            return True, None if v is None else v.replace("{}", m.group(1), 1)
    return False, None


def _canonical(family: str, key: str) -> str:
    for old, new in KEY_VARIANTS.get(family, []):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _family(config: dict) -> str:
    family = config.get("model_type")
    if family not in KEY_TABLES:
        raise ValueError(f"model_type {family!r} is not supported; known: {', '.join(KEY_TABLES)}")
    return family


def _checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
    return [single]


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor):
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)


def load_weights(model: nn.Module, path: str, dtype=torch.float32, device="cpu"):
    """Fill a (meta or real) model from the safetensors under `path`, one tensor at a time (converted to
    dtype on the way), so a 7B model never needs two copies in memory. Strict: any unknown, mis-shaped or
    missing key raises an error naming it. Sub-models in DROPPED_PREFIXES are skipped from the header alone.
    Tensors kept in the file's dtype on the CPU stay memory-mapped from the files (safetensors maps them
    copy-on-write): they are read on first use and live in the page cache (Qwen2.5-Omni-7B thinker in bf16:
    peak RSS 15.7 GiB for 15.4 GiB of weights once every page is read)."""
    family = _family(model.config)
    table = KEY_TABLES[family]
    params = dict(model.named_parameters())
    loaded = set()
    for file in _checkpoint_files(path):
        with safe_open(file, framework="pt", device="cpu") as fh:
            for key in fh.keys():
                if _canonical(family, key).startswith(DROPPED_PREFIXES.get(family, ())):
                    continue            # header only: the tensor's bytes are never read
                found, ours = _lookup(table, _canonical(family, key))
                if found and ours is None:
                    continue
                if not found or ours not in params:
                    if found and ours.endswith("lm_head.weight") and decoder_of(model).lm_head is None:
                        continue        # some tied checkpoints also store the head; the embedding wins
                    raise KeyError(f"{file}: unexpected tensor {key!r} for model_type {family!r} "
                                   f"(not in KEY_TABLES[{family!r}] or not used by this config)")
                shape = tuple(fh.get_slice(key).get_shape())
                if shape != tuple(params[ours].shape):
                    raise ValueError(f"{file}: tensor {key!r} has shape {list(shape)}, config.json implies "
                                     f"{list(params[ours].shape)} for {ours!r}")
                _set_param(model, ours, fh.get_tensor(key).to(device=device, dtype=dtype))
                loaded.add(ours)
    missing = [n for n in params if n not in loaded]
    if missing:
        names = [_released_name(family, n) for n in missing[:5]]
        raise KeyError(f"{path}: checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {names}")
    return model


def from_pretrained(path: str, dtype=torch.float32, device="cpu") -> nn.Module:
    """Released HF checkpoint dir -> CausalLM (qwen2, llama) | WhisperEncoder (whisper) | LALM (qwen2_audio,
    audioflamingo3, qwen2_5_omni: the full-model release or a thinker-only save, whisper_lalm)."""
    with open(os.path.join(path, "config.json")) as f:
        config = released_config(json.load(f))
    with torch.device("meta"):
        model = MODEL_CLASSES[_family(config)](config)
    return load_weights(model, path, dtype, device).eval()


# ---------------------------------------------------------------------------
# Saving in the released layout (sharded like save_pretrained when large) + config.json.
def _released_name(family: str, ours: str) -> str:
    reverse = {v: k for k, v in KEY_TABLES[family].items() if v is not None}
    found, name = _lookup(reverse, ours)
    if not found:
        raise KeyError(f"parameter {ours!r} has no released name in KEY_TABLES[{family!r}]")
    return name


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use an int (bytes) or e.g. '5GB', '500MB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def _atomic_save(tensors: dict, file: str):
    save_file(tensors, file + ".tmp", metadata={"format": "pt"})
    os.replace(file + ".tmp", file)


def save_pretrained(module: nn.Module, path: str, max_shard_size="5GB"):
    """Write `module` in its family's released layout (model.safetensors, or shards + index) and config.json."""
    family = _family(module.config)
    os.makedirs(path, exist_ok=True)
    tensors = {_released_name(family, n): p.detach().contiguous() for n, p in module.named_parameters()}
    limit, shards, size = _parse_size(max_shard_size), [{}], 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    if len(shards) == 1:
        _atomic_save(shards[0], os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, os.path.join(path, name))
            weight_map.update({k: name for k in shard})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": weight_map}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    config = dict(module.config)
    config.setdefault("architectures", [ARCHITECTURES[family]])
    config["dtype"] = str(next(module.parameters()).dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    if family == "qwen2_5_omni":        # only the thinker's audio+text weights are written: no talker, no vision
        config["enable_audio_output"] = False
        config["thinker_config"] = {k: v for k, v in config["thinker_config"].items() if k != "torch_dtype"}
        config["thinker_config"]["dtype"] = config["dtype"]
    with open(os.path.join(path, "config.json.tmp"), "w") as f:
        json.dump(config, f, indent=2)
    os.replace(os.path.join(path, "config.json.tmp"), os.path.join(path, "config.json"))


# ---------------------------------------------------------------------------
# Fresh models: the tiny default (random init) and Whisper + LLM composition.
def init_weights(module: nn.Module, std: float = 0.02):
    """Random init in the released models' style: normal(0, std) matrices, zero biases, unit norms,
    sinusoidal encoder positions."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        if isinstance(m, WhisperEncoder):
            n, d = m.embed_positions.weight.shape
            inv = torch.exp(-math.log(10000) / (d // 2 - 1) * torch.arange(d // 2))
            t = torch.arange(n)[:, None] * inv[None, :]
            with torch.no_grad():
                m.embed_positions.weight.copy_(torch.cat([t.sin(), t.cos()], dim=1))
    return module


def build_lalm(config: dict) -> LALM:
    """Fresh random LALM from an HF-style config (e.g. a tiny qwen2_audio config for the default run)."""
    return init_weights(LALM(config))


def compose_lalm(whisper_path: str, llm_path: str, audio_token_id: int, stack: int = 2,
                 adapter_hidden: int | None = None, dtype=torch.float32, device="cpu") -> LALM:
    """A Whisper checkpoint's encoder + a Qwen2/Llama checkpoint, joined by a fresh frame-stacking adapter.

    audio_token_id must be a token of the LLM's vocabulary reserved for the audio placeholder (e.g. an unused
    special token); the result saves and loads as model_type "whisper_lalm". The encoder masks padded frames
    as keys (Whisper itself attends to its 30 s padding): use pad_to_30s=True features to stay closest to
    how Whisper was trained.
    """
    encoder = from_pretrained(whisper_path, dtype, device)
    lm = from_pretrained(llm_path, dtype, device)
    config = {"model_type": "whisper_lalm", "audio_config": encoder.config, "text_config": lm.config,
              "adapter": {"stack": stack, "hidden_size": adapter_hidden}, "audio_token_id": audio_token_id}
    with torch.device("meta"):
        model = LALM(config)
    model.audio_tower, model.language_model = encoder, lm
    model.multi_modal_projector = init_weights(model.multi_modal_projector.to_empty(device=device)).to(dtype)
    return model
