"""Audio front end: Whisper log-mel features, Whisper-style encoders and the adapters that feed an LLM.

Data flow: waveform (16 kHz mono) -> log_mel -> (B, n_mels, frames) -> encoder -> (B, A_enc, D_enc)
-> adapter (pool + projector) -> (B, A, D) rows that model.LALM scatters into the audio placeholders.
Encoders: WhisperEncoder (Whisper; Qwen2-Audio and Audio Flamingo 3 with pool_stride=2) and OmniAudioEncoder
(Qwen2.5-Omni: chunked attention, pool, ln_post and its own projection). Audio Flamingo 3 reads long audio
as consecutive 30 s windows (split_windows / windowed_features).
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# Audio and time constants: defined once, everything else derives from them.
SAMPLE_RATE = 16000                                   # Hz, every model here
N_FFT = 400                                           # samples, 25 ms window
HOP_LENGTH = 160                                      # samples, 10 ms hop
CHUNK_LENGTH = 30                                     # seconds, one Whisper window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE                # 480000 samples in one window
N_FRAMES = N_SAMPLES // HOP_LENGTH                    # 3000 mel frames in one window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH         # 100 mel frames/s (10 ms each)
CONV_STRIDE = 2                                       # Whisper conv2 stride
ENCODER_TOKENS_PER_SECOND = FRAMES_PER_SECOND // CONV_STRIDE  # 50 encoder frames/s (20 ms each)
POOL_STRIDE = 2                                       # Qwen2-Audio / Omni avg-pool after the encoder
AUDIO_TOKENS_PER_SECOND = ENCODER_TOKENS_PER_SECOND // POOL_STRIDE  # 25 LLM audio tokens/s
SECONDS_PER_AUDIO_TOKEN = 1 / AUDIO_TOKENS_PER_SECOND  # 0.04 s of audio per LLM audio token


def num_mel_frames(n_samples: int) -> int:
    """Valid mel frames of a clip of n_samples (capped at one 30 s window), as the processors count them."""
    return min(math.ceil(n_samples / HOP_LENGTH), N_FRAMES)


def num_encoder_frames(n_frames: int) -> int:
    """Frames after conv2 (kernel 3, stride 2, padding 1)."""
    return (n_frames - 1) // CONV_STRIDE + 1


def num_audio_tokens(n_frames: int) -> int:
    """LLM audio tokens after conv2 and the stride-2 avg-pool (Qwen2-Audio, Omni per chunk); 1 frame -> 0."""
    return (num_encoder_frames(n_frames) - 2) // POOL_STRIDE + 1


# ---------------------------------------------------------------------------
# Log-mel features, identical to transformers' WhisperFeatureExtractor (torch path).
def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    log_part = 15.0 + 27.0 * torch.log(f.clamp(min=1e-10) / 1000.0) / math.log(6.4)
    return torch.where(f < 1000.0, 3.0 * f / 200.0, log_part)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return torch.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * torch.exp(math.log(6.4) / 27.0 * (m - 15.0)))


@functools.lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> torch.Tensor:
    """(N_FFT//2+1, n_mels) Slaney-normalised triangular filters, fmin 0, fmax = Nyquist.

    Built in float64 and cast once, as the reference builds it in numpy float64.
    """
    n_freqs = N_FFT // 2 + 1
    fft_freqs = torch.linspace(0, SAMPLE_RATE / 2, n_freqs, dtype=torch.float64)
    mel_max = _hz_to_mel(torch.tensor(SAMPLE_RATE / 2, dtype=torch.float64))
    f_pts = _mel_to_hz(torch.linspace(0.0, float(mel_max), n_mels + 2, dtype=torch.float64))
    f_diff = f_pts[1:] - f_pts[:-1]
    ramps = f_pts[None, :] - fft_freqs[:, None]                       # (n_freqs, n_mels+2)
    down = -ramps[:, :-2] / f_diff[:-1]
    up = ramps[:, 2:] / f_diff[1:]
    fb = torch.clamp(torch.minimum(down, up), min=0.0)
    fb = fb * (2.0 / (f_pts[2:n_mels + 2] - f_pts[:n_mels]))           # slaney area normalisation
    return fb.to(torch.float32)


def _as_batch(audio) -> tuple[list[torch.Tensor], bool]:
    if isinstance(audio, (list, tuple)):
        return [torch.as_tensor(a, dtype=torch.float32).reshape(-1) for a in audio], True
    audio = torch.as_tensor(audio, dtype=torch.float32)
    if audio.dim() == 1:
        return [audio], False
    if audio.dim() != 2:
        raise ValueError(f"log_mel: audio must be (n,) or (B, n), got shape {tuple(audio.shape)}")
    return list(audio), True


def log_mel(audio, n_mels: int = 128, n_samples: int | None = N_SAMPLES) -> torch.Tensor:
    """Whisper log-mel of 16 kHz audio: (n,) -> (n_mels, F); (B, n) or a list of 1-D clips -> (B, n_mels, F).

    Each clip is truncated/zero-padded to n_samples (F = n_samples // HOP_LENGTH; 3000 for 30 s), or, with
    n_samples=None, zero-padded to the longest clip of the batch (rounded up to whole hops, so F =
    num_mel_frames(longest)). The padded waveform is transformed (never the
    log-mel padded afterwards): padded frames carry the value the model saw in training (max - 2).
    """
    clips, batched = _as_batch(audio)
    if n_samples is None:   # round up to whole hops so every clip keeps all num_mel_frames(n) frames
        n_samples = max(-(-max(len(c) for c in clips) // HOP_LENGTH) * HOP_LENGTH, HOP_LENGTH)
    device = clips[0].device
    x = torch.zeros(len(clips), n_samples, device=device)              # (B, n)
    for i, c in enumerate(clips):
        c = c[:n_samples]
        x[i, :len(c)] = c
    window = torch.hann_window(N_FFT, device=device)                  # periodic, as torch.stft expects
    stft = torch.stft(x, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()                  # drop the last frame: F = n // HOP
    mel = mel_filters(n_mels).to(device).T @ power                     # (B, n_mels, F)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)                     # per clip, over the padded window
    log_spec = torch.maximum(log_spec, peak - 8.0)
    feats = (log_spec + 4.0) / 4.0
    return feats if batched else feats[0]


def feature_mask(lengths_in_samples, n_frames: int) -> torch.Tensor:
    """(B, n_frames) LongTensor, 1 on the valid mel frames ceil(n/HOP_LENGTH) of each clip, ones first."""
    lengths = torch.as_tensor(lengths_in_samples, dtype=torch.long).reshape(-1)
    valid = torch.clamp((lengths + HOP_LENGTH - 1) // HOP_LENGTH, max=n_frames)
    return (torch.arange(n_frames)[None, :] < valid[:, None]).long()


def features(audios: list[torch.Tensor], n_mels: int, pad_to_30s: bool = True):
    """Batch of clips -> (input_features (N, n_mels, F), feature_attention_mask (N, F)).

    pad_to_30s=True reproduces the released processors (F = 3000, longer clips cut at 30 s); False pads to the
    longest clip only (still capped at 30 s; F = num_mel_frames(longest)), which the tiny default uses to avoid
    paying for padding.
    """
    clips = [torch.as_tensor(a, dtype=torch.float32).reshape(-1)[:N_SAMPLES] for a in audios]
    feats = log_mel(clips, n_mels=n_mels, n_samples=N_SAMPLES if pad_to_30s else None)
    mask = feature_mask([len(c) for c in clips], feats.shape[-1])
    return feats, mask


def split_windows(audios, max_seconds: int = 600) -> tuple[list[torch.Tensor], list[int]]:
    """Long clips -> consecutive 30 s windows, as Audio Flamingo 3's processor cuts them.

    Returns (windows, windows_per_clip): every clip gives max(1, ceil(n / N_SAMPLES)) windows (the last one
    shorter), at most max_seconds / CHUNK_LENGTH of them (AF3: 600 s -> 20; the rest is dropped). The windows
    of one clip are consecutive, so their audio rows fill that clip's placeholder run in order.
    """
    max_windows = max_seconds // CHUNK_LENGTH
    windows, counts = [], []
    for a in audios:
        a = torch.as_tensor(a, dtype=torch.float32).reshape(-1)
        n = min(max(1, -(-len(a) // N_SAMPLES)), max_windows)
        windows += [a[i * N_SAMPLES:(i + 1) * N_SAMPLES] for i in range(n)]
        counts.append(n)
    return windows, counts


def windowed_features(audios, n_mels: int, max_seconds: int = 600, pad_to_30s: bool = True):
    """AF3 inputs: (input_features (W, n_mels, F), feature_attention_mask (W, F), windows_per_clip list).

    One row per 30 s window (each window padded to 30 s like the released processor's `input_features` and
    `input_features_mask`). A clip's placeholder count is the sum of num_audio_tokens over its windows
    (equal to the processor's count on the summed frames, because full windows give an even 1500 frames).
    """
    windows, counts = split_windows(audios, max_seconds)
    feats, mask = features(windows, n_mels, pad_to_30s)
    return feats, mask, counts


# ---------------------------------------------------------------------------
# Whisper-style encoder (Whisper, Qwen2-Audio, AF3): conv stem, stored positions, pre-LN blocks.
# transformers' defaults for fields a released config.json may omit.
_LARGE_V3 = dict(num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                 encoder_ffn_dim=5120, max_source_positions=1500, activation_function="gelu")
ENCODER_DEFAULTS = {
    "qwen2_audio_encoder": _LARGE_V3,
    "whisper": dict(num_mel_bins=80, d_model=384, encoder_layers=4, encoder_attention_heads=6,
                    encoder_ffn_dim=1536, max_source_positions=1500, activation_function="gelu"),
    "audioflamingo3_encoder": _LARGE_V3,
    # Qwen2.5-Omni: attention in chunks of 2 * n_window mel frames, then its own projection to the LLM width
    "qwen2_5_omni_audio_encoder": dict(_LARGE_V3, n_window=100, output_dim=3584),
}
# Other spellings of the same fields (AF3 writes the transformers-style names; all configs accept both).
ENCODER_ALIASES = {"d_model": "hidden_size", "encoder_layers": "num_hidden_layers",
                   "encoder_attention_heads": "num_attention_heads", "encoder_ffn_dim": "intermediate_size"}


def encoder_config(config: dict) -> dict:
    """The encoder fields of a whisper / qwen2_audio_encoder / audioflamingo3_encoder /
    qwen2_5_omni_audio_encoder config (transformers' defaults where absent; either field spelling)."""
    family = config.get("model_type") or "qwen2_audio_encoder"
    if family not in ENCODER_DEFAULTS:
        raise ValueError(f"audio encoder model_type {family!r} not supported ({', '.join(ENCODER_DEFAULTS)})")
    c = {k: config.get(k, config.get(ENCODER_ALIASES.get(k, k), v)) for k, v in ENCODER_DEFAULTS[family].items()}
    if c["activation_function"] != "gelu":
        raise ValueError(f"encoder activation_function {c['activation_function']!r} not supported (only 'gelu')")
    return c


class EncoderLayer(nn.Module):
    def __init__(self, d: int, n_heads: int, ffn: int):
        super().__init__()
        self.n_heads = n_heads
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(d, d)
        self.self_attn.k_proj = nn.Linear(d, d, bias=False)          # Whisper's k projection has no bias
        self.self_attn.v_proj = nn.Linear(d, d)
        self.self_attn.out_proj = nn.Linear(d, d)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def attend(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Bidirectional self-attention (a method of its own so q, k, v are freed before the 4x-wide MLP)."""
        B, A, D = x.shape
        hd = D // self.n_heads
        a = self.self_attn
        q, k, v = (p(x).view(B, A, self.n_heads, hd).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, H, A, hd)
        return a.out_proj(o.transpose(1, 2).reshape(B, A, D))

    def forward(self, h: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        h = h + self.attend(self.self_attn_layer_norm(h), key_mask)
        h = h + self.fc2(F.gelu(self.fc1(self.final_layer_norm(h))))
        if h.dtype == torch.float16:                                   # as the reference, avoids fp16 overflow
            bound = torch.finfo(torch.float16).max - 1000
            h = h.clamp(-bound, bound)
        return h


class WhisperEncoder(nn.Module):
    """(B, n_mels, F) log-mel -> (B, A, D_enc); F <= 3000 (positions are sliced, so short features work).

    pool_stride=2 gives the Qwen2-Audio / AF3 audio tower: avg-pool THEN the final layer_norm (§4.2);
    pool_stride=1 is plain Whisper (final layer_norm over all frames). With feature_attention_mask, padded
    encoder frames are masked as keys (queries are computed and later discarded), as Qwen2-Audio does.
    """

    def __init__(self, config: dict, pool_stride: int = 1):
        super().__init__()
        self.config = config
        c = encoder_config(config)
        d = c["d_model"]
        self.pool_stride = pool_stride
        self.conv1 = nn.Conv1d(c["num_mel_bins"], d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=CONV_STRIDE, padding=1)
        self.embed_positions = nn.Embedding(c["max_source_positions"], d)
        self.layers = nn.ModuleList(EncoderLayer(d, c["encoder_attention_heads"], c["encoder_ffn_dim"])
                                    for _ in range(c["encoder_layers"]))
        self.layer_norm = nn.LayerNorm(d)

    def output_lengths(self, n_frames: torch.Tensor) -> torch.Tensor:
        """Valid output rows per clip for valid mel frames n_frames (pool of stride 2 == num_audio_tokens)."""
        n_enc = (n_frames - 1) // CONV_STRIDE + 1
        return n_enc if self.pool_stride == 1 else (n_enc - self.pool_stride) // self.pool_stride + 1

    def forward(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None = None):
        n_pos = self.embed_positions.num_embeddings
        if input_features.shape[-1] > CONV_STRIDE * n_pos:
            raise ValueError(f"encoder input has {input_features.shape[-1]} mel frames, at most "
                             f"{CONV_STRIDE * n_pos} (30 s) are supported: cut or window the audio")
        x = input_features.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))                                      # (B, D, A)
        h = x.transpose(1, 2) + self.embed_positions.weight[:x.shape[-1]]  # (B, A, D)
        key_mask = None
        if feature_attention_mask is not None:
            n_enc = (feature_attention_mask.sum(-1) - 1) // CONV_STRIDE + 1
            key_mask = (torch.arange(h.shape[1], device=h.device)[None, :] < n_enc[:, None])[:, None, None, :]
        for layer in self.layers:
            h = layer(h, key_mask)
        if self.pool_stride > 1:
            h = F.avg_pool1d(h.transpose(1, 2), self.pool_stride, self.pool_stride).transpose(1, 2)
        return self.layer_norm(h)


# ---------------------------------------------------------------------------
# Qwen2.5-Omni audio tower: the Whisper-style encoder run chunk by chunk, then pool, ln_post and proj.
def sinusoids(length: int, channels: int) -> torch.Tensor:
    """(length, channels) Whisper sinusoids, computed as transformers does (fp32); Omni never stores them."""
    inv = torch.exp(-math.log(10000) / (channels // 2 - 1) * torch.arange(channels // 2).float())
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1)


class OmniAudioEncoder(nn.Module):
    """Qwen2.5-Omni `audio_tower`: (N, n_mels, F) log-mel -> (N, A, output_dim) rows already in LLM width.

    Each clip's valid frames (feature_attention_mask) are cut into chunks of 2*n_window = 200 mel frames (2 s,
    the last one shorter). Every chunk goes through the conv stem on its own (zero padding at its edges), gets
    sinusoidal positions restarting at 0, and attends only within itself: the chunks are the batch rows of the
    encoder layers, which is the block-diagonal attention of the reference. Then a stride-2 average pool over
    the clip (pairs never straddle chunks: full chunks give an even 100 frames; an odd last frame is dropped),
    ln_post and proj. Row a of the output holds clip a's num_audio_tokens rows first; the rest is filler.
    The clip length is not limited to 30 s (the released processor cuts at 30 s anyway).
    """

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        c = encoder_config({**config, "model_type": config.get("model_type") or "qwen2_5_omni_audio_encoder"})
        d = c["d_model"]
        self.n_window = c["n_window"]
        self.conv1 = nn.Conv1d(c["num_mel_bins"], d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=CONV_STRIDE, padding=1)
        # in the checkpoint but unused by the reference forward (<|audio_bos|>/<|audio_eos|> are text tokens);
        # kept so checkpoints round-trip, frozen so DDP does not wait for its gradient
        self.audio_bos_eos_token = nn.Embedding(2, c["output_dim"]).requires_grad_(False)
        self.layers = nn.ModuleList(EncoderLayer(d, c["encoder_attention_heads"], c["encoder_ffn_dim"])
                                    for _ in range(c["encoder_layers"]))
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, c["output_dim"])

    def output_lengths(self, n_frames: torch.Tensor) -> torch.Tensor:
        """LLM rows per clip for valid mel frames n_frames (the chunking does not change the count)."""
        return (num_encoder_frames(n_frames) - POOL_STRIDE) // POOL_STRIDE + 1

    def forward(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None = None):
        N, _, n_frames = input_features.shape
        width = 2 * self.n_window                                          # mel frames per chunk
        K = -(-n_frames // width)                                          # chunks per row
        lengths = feature_attention_mask.sum(-1) if feature_attention_mask is not None \
            else torch.full((N,), n_frames, device=input_features.device)
        frame = torch.arange(K * width, device=input_features.device)
        x = F.pad(input_features, (0, K * width - n_frames))               # (N, n_mels, K*width)
        x = (x * (frame[None, :] < lengths[:, None])[:, None]).to(self.conv1.weight.dtype)  # padding -> 0
        x = x.unflatten(-1, (K, width)).transpose(1, 2)                     # (N, K, n_mels, width)
        chunk_len = (lengths[:, None] - torch.arange(K, device=x.device)[None] * width).clamp(0, width)  # (N, K)
        present = chunk_len > 0
        x, chunk_len = x[present], chunk_len[present]                      # (C, n_mels, width), (C,)
        inside = torch.arange(width, device=x.device)[None, :] < chunk_len[:, None]
        h = F.gelu(self.conv1(x)) * inside[:, None]                         # zero beyond the chunk, as reference
        h = F.gelu(self.conv2(h)).transpose(1, 2)                           # (C, width/2, D)
        h = h + sinusoids(h.shape[1], h.shape[2]).to(h.device, h.dtype)
        n_enc = num_encoder_frames(chunk_len)
        key_mask = (torch.arange(h.shape[1], device=h.device)[None, :] < n_enc[:, None])[:, None, None, :]
        for layer in self.layers:
            h = layer(h, key_mask)
        h = F.avg_pool1d(h.transpose(1, 2), POOL_STRIDE, POOL_STRIDE).transpose(1, 2)  # (C, width/4, D)
        h = self.proj(self.ln_post(h))                                      # (C, width/4, output_dim)
        out = h.new_zeros(N, K, h.shape[1], h.shape[2])
        out[present] = h
        return out.flatten(1, 2)                                            # (N, K*width/4, output_dim)


# ---------------------------------------------------------------------------
# Adapters: encoder frames (N, A_enc, D_enc) -> LLM rows (N, A, D).
class LinearProjector(nn.Module):
    """Qwen2-Audio `multi_modal_projector`: one linear with bias (the pool lives in the encoder)."""

    def __init__(self, d_enc: int, d_model: int):
        super().__init__()
        self.linear = nn.Linear(d_enc, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h)


class MLPProjector(nn.Module):
    """Audio Flamingo 3 `multi_modal_projector`: linear_1 -> GELU -> linear_2 (biases: config projector_bias)."""

    def __init__(self, d_enc: int, d_model: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(d_enc, d_model, bias=bias)
        self.linear_2 = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(h)))


class StackProjector(nn.Module):
    """Fresh adapter for composing any Whisper encoder with any LLM (SALMONN / LLaMA-Omni style).

    Concatenates `stack` consecutive encoder frames (the remainder is dropped) and maps them with a two-layer
    GELU MLP; stack=2 on Whisper's 50 frames/s gives the same 25 tokens/s as Qwen2-Audio.
    """

    def __init__(self, d_enc: int, d_model: int, stack: int = 2, hidden_size: int | None = None):
        super().__init__()
        self.stack = stack
        self.linear_1 = nn.Linear(stack * d_enc, hidden_size or d_model)
        self.linear_2 = nn.Linear(hidden_size or d_model, d_model)

    def output_lengths(self, n_enc: torch.Tensor) -> torch.Tensor:
        return n_enc // self.stack

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        N, A, D = h.shape
        A = A // self.stack * self.stack
        h = h[:, :A].reshape(N, A // self.stack, self.stack * D)     # (N, A/stack, stack*D_enc)
        return self.linear_2(F.gelu(self.linear_1(h)))
