"""audio_encoder.py: log-mel against transformers' WhisperFeatureExtractor (test-only reference), length
arithmetic, encoder masking / short-feature behaviour and the adapters."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import audio_encoder as ae  # noqa: E402

transformers = pytest.importorskip("transformers")

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


def clip(n, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / ae.SAMPLE_RATE
    return (torch.randn(n, generator=g) * scale + 0.3 * torch.sin(2 * torch.pi * 440 * t)).float()


# ---------------------------------------------------------------------------
# Log-mel parity.
@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(n_mels):
    fe = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    worst = 0.0
    for i, n in enumerate([100, 16000, 37123, ae.N_SAMPLES + 20000]):     # tiny, 1 s, odd, > 30 s (cut)
        a = clip(n, seed=i)
        ref = fe(a.numpy(), sampling_rate=ae.SAMPLE_RATE, return_tensors="pt").input_features[0]
        got = ae.log_mel(a, n_mels)
        assert got.shape == (n_mels, ae.N_FRAMES)
        worst = max(worst, (ref - got).abs().max().item())
    clips = [clip(n, seed=10 + n) for n in (3000, 48000, 20000)]
    ref = fe([c.numpy() for c in clips], sampling_rate=ae.SAMPLE_RATE, return_tensors="pt",
             return_attention_mask=True)
    got, mask = ae.features(clips, n_mels)
    assert got.shape == (3, n_mels, ae.N_FRAMES)
    worst = max(worst, (ref.input_features - got).abs().max().item())
    assert torch.equal(mask, ref.attention_mask.long())
    # a padded (B, n) tensor gives the same as the list when every row has the same true length
    same = torch.stack([clip(16000, 1), clip(16000, 2)])
    assert torch.equal(ae.log_mel(same, n_mels), torch.stack([ae.log_mel(c, n_mels) for c in same]))
    print(f"log-mel {n_mels} bins max abs diff {worst:.2e}")
    assert worst < 1e-4


def test_pad_to_longest():
    fe = transformers.WhisperFeatureExtractor(feature_size=128)
    clips = [clip(16000, 3), clip(9000, 4)]
    got, mask = ae.features(clips, 128, pad_to_30s=False)
    assert got.shape == (2, 128, 100) and mask.sum(-1).tolist() == [100, 57]
    ref = fe([c.numpy() for c in clips], sampling_rate=ae.SAMPLE_RATE, padding="longest", return_tensors="pt")
    assert (ref.input_features - got).abs().max() < 1e-4
    assert torch.equal(ae.log_mel(clips, 128, n_samples=None), got)
    odd = [clip(16050, 5), clip(700, 6)]                   # longest is not a whole number of hops
    got, mask = ae.features(odd, 128, pad_to_30s=False)
    assert got.shape[-1] == ae.num_mel_frames(16050) == 101 and mask.sum(-1).tolist() == [101, 5]
    ref = fe([c.numpy() for c in odd], sampling_rate=ae.SAMPLE_RATE, padding="longest", return_tensors="pt")
    assert (ref.input_features[..., :100] - got[..., :100]).abs().max() < 1e-4     # all but the edge frame
    assert ae.log_mel(clip(1234), 80, n_samples=None).shape == (80, 8)


def test_length_arithmetic():
    # examples from ARCHITECTURES.md 1.2
    for n, frames, enc, tok in [(24000, 150, 75, 37), (12320, 77, 39, 19), (16160, 101, 51, 25), (160, 1, 1, 0),
                                (ae.N_SAMPLES, 3000, 1500, 750), (ae.N_SAMPLES * 2, 3000, 1500, 750)]:
        assert ae.num_mel_frames(n) == frames
        assert ae.num_encoder_frames(frames) == enc and ae.num_audio_tokens(frames) == tok
    mask = ae.feature_mask([160, 161, 10**7], 3000)
    assert mask.sum(-1).tolist() == [1, 2, 3000] and mask[1, :2].all() and not mask[1, 2:].any()


# ---------------------------------------------------------------------------
# Encoder and adapters.
ENC = dict(num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48,
           max_source_positions=1500)


def random_encoder(pool):
    torch.manual_seed(0)
    enc = ae.WhisperEncoder(ENC, pool_stride=pool).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return enc


def test_qwen2_audio_encoder_matches_transformers():
    """Pool before the final layer_norm, key-padding mask on short clips (Qwen2AudioEncoder)."""
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder
    enc = random_encoder(pool=2)
    cfg = transformers.Qwen2AudioEncoderConfig(**ENC)
    cfg._attn_implementation = "eager"
    hf = Qwen2AudioEncoder(cfg).eval()
    hf.load_state_dict(enc.state_dict())
    feats, fmask = ae.features([clip(20000, 5), clip(7000, 6)], 80)
    L1 = (fmask.sum(-1) - 1) // 2 + 1
    bias = torch.where(torch.arange(1500)[None, :] < L1[:, None], 0.0, float("-inf"))
    with torch.no_grad():
        ref = hf(feats, attention_mask=bias[:, None, None, :].expand(2, 1, 1500, 1500)).last_hidden_state
        got = enc(feats, fmask)
    n = enc.output_lengths(fmask.sum(-1))
    assert n.tolist() == [ae.num_audio_tokens(int(x)) for x in fmask.sum(-1)]
    d = max((ref[b, :n[b]] - got[b, :n[b]]).abs().max().item() for b in range(2))
    print(f"qwen2-audio encoder max abs diff {d:.2e}")
    assert got.shape == (2, 750, 32) and d < 2e-5


def test_encoder_short_features_equal_30s_features():
    """With the key mask, valid outputs do not depend on how far the features are padded, so the tiny
    default may run on short features (positions sliced) instead of 3000 frames."""
    enc = random_encoder(pool=2)
    feats, fmask = ae.features([clip(9000, 7), clip(4000, 8)], 80)          # 30 s padding
    short = 100                                                              # covers both clips' conv reach
    with torch.no_grad():
        full = enc(feats, fmask)
        part = enc(feats[..., :short], fmask[:, :short])
    n = enc.output_lengths(fmask.sum(-1))
    for b in range(2):
        assert torch.allclose(full[b, :n[b]], part[b, :n[b]], atol=1e-5)
    with pytest.raises(ValueError, match="mel frames"):
        enc(torch.zeros(1, 80, 3002))


def test_adapters():
    h = torch.randn(2, 11, 32)                                                # (N, A_enc, D_enc)
    stack = ae.StackProjector(32, 24, stack=4, hidden_size=40)
    out = stack(h)
    assert out.shape == (2, 2, 24)
    ref = stack.linear_2(torch.nn.functional.gelu(stack.linear_1(h[:, 4:8].reshape(2, 128))))
    assert torch.allclose(out[:, 1], ref, atol=1e-6)
    assert stack.output_lengths(torch.tensor([11, 3])).tolist() == [2, 0]
    assert ae.MLPProjector(32, 24)(h).shape == (2, 11, 24)
    assert ae.LinearProjector(32, 24)(h).shape == (2, 11, 24)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "data")), reason="needs ../shared/data")
def test_log_mel_on_real_audio():
    sf = pytest.importorskip("soundfile")
    wavs = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(SHARED, "data")) for f in fs
            if f.endswith((".wav", ".flac"))]
    if not wavs:
        pytest.skip("no audio files under ../shared/data")
    a, sr = sf.read(sorted(wavs)[0], dtype="float32")
    if sr != ae.SAMPLE_RATE:
        pytest.skip("first bundled clip is not 16 kHz")
    a = a if a.ndim == 1 else a.mean(-1)
    fe = transformers.WhisperFeatureExtractor(feature_size=128)
    ref = fe(a, sampling_rate=sr, return_tensors="pt").input_features[0]
    assert (ref - ae.log_mel(torch.from_numpy(np.ascontiguousarray(a)), 128)).abs().max() < 1e-4
