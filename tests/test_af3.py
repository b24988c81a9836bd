"""Audio Flamingo 3 (model_type "audioflamingo3") against transformers' AudioFlamingo3ForConditionalGeneration and
AudioFlamingo3Processor (test-only references) on a tiny random checkpoint with every parameter redrawn: long
audio as 30 s windows (one input_features row per window), the <sound> placeholder, save/load, generation.
fp32, CPU."""
import functools
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import model as M                                                  # noqa: E402
from parity import assert_keys_map, max_diff, redraw            # noqa: E402
from audio_encoder import N_SAMPLES, num_audio_tokens, split_windows, windowed_features  # noqa: E402

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TOL = 2e-5
VOCAB, SOUND = 128, 120
WORDS = ["<pad>", "<unk>", "what", "is", "said", "?", "the", "speech"]


# ---------------------------------------------------------------------------
# Helpers: tiny AF3, and the released processor around a tiny word-level tokenizer.
def af3_config(**kw):
    return transformers.AudioFlamingo3Config(
        audio_config=dict(model_type="audioflamingo3_encoder", num_mel_bins=128, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=48),
        text_config=dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=48, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                         rms_norm_eps=1e-6),
        audio_token_id=SOUND, **kw)


def processor():
    vocab = {w: i for i, w in enumerate(WORDS)} | {"<sound>": SOUND}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([tokenizers.pre_tokenizers.Split("<sound>", "isolated"),
                                                           tokenizers.pre_tokenizers.WhitespaceSplit()])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                               additional_special_tokens=["<sound>"])
    fe = transformers.WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)
    return transformers.AudioFlamingo3Processor(feature_extractor=fe, tokenizer=tok)


@functools.lru_cache(maxsize=None)
def clips(seconds=(35.0, 0.75), seed=5):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(int(s * 16000), generator=g) * 0.1 for s in seconds)


@functools.lru_cache(maxsize=None)
def processed(seconds=(35.0, 0.75), seed=5):
    """What the released processor gives for `<sound>what is said ?` per clip (left padding)."""
    return processor()(text=["<sound>what is said ?"] * len(seconds),
                       audio=[c.numpy() for c in clips(seconds, seed)])


@pytest.fixture(scope="module")
def af3(tmp_path_factory):
    root = tmp_path_factory.mktemp("af3")
    torch.manual_seed(0)
    hf = redraw(transformers.AudioFlamingo3ForConditionalGeneration(af3_config()), 2).eval()
    hf.save_pretrained(root / "af3", max_shard_size="100KB")
    return hf, str(root / "af3")


# ---------------------------------------------------------------------------
# Windows, placeholders, parity.
def test_windows_match_processor():
    """35 s -> two windows (30 s + 5 s), 0.75 s -> one; features, masks and <sound> counts as the processor."""
    out = processed()
    feats, fmask, counts = windowed_features(clips(), n_mels=128)
    assert counts == [2, 1] and feats.shape == out["input_features"].shape == (3, 128, 3000)
    assert torch.equal(fmask, out["input_features_mask"].long())
    assert max_diff(feats, out["input_features"]) < 1e-4
    per_window = [num_audio_tokens(int(n)) for n in fmask.sum(-1)]
    assert per_window == [750, 125, 19]
    assert (out["input_ids"] == SOUND).sum(-1).tolist() == [750 + 125, 19]
    windows, counts = split_windows([torch.zeros(N_SAMPLES * 25), torch.zeros(N_SAMPLES), torch.zeros(1)])
    assert counts == [20, 1, 1] and len(windows) == 22                 # 10 min cap (12.5 min is cut)


def test_af3_parity(af3):
    hf, path = af3
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))   # sharded
    ours = M.from_pretrained(path)
    assert isinstance(ours, M.LALM) and ours.audio_token_id == SOUND
    out = processed()
    ids, mask, feats, fmask = out["input_ids"], out["attention_mask"], out["input_features"], out[
        "input_features_mask"]
    pos = M.positions_from_mask(mask)                                  # generate-style positions (left padding)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, input_features=feats,
                 input_features_mask=fmask).logits
        got = ours(ids, mask, None, feats, fmask)                      # the core interface, positional
        got_kw = ours(ids, mask, input_features=feats, input_features_mask=fmask)   # processor names
        ref_a = hf.get_audio_features(feats, fmask).pooler_output
        got_a = ours.encode_audio(feats, fmask)
        n = int(mask[1].sum())                                         # row 1 unpadded: default positions
        ref1 = hf(input_ids=ids[1:, -n:], input_features=feats[2:], input_features_mask=fmask[2:]).logits
        got1 = ours(ids[1:, -n:], input_features=feats[2:], feature_attention_mask=fmask[2:])
    da, dl, d1 = max_diff(ref_a, got_a), max_diff(ref, got, mask), max_diff(ref1, got1)
    print(f"af3 audio rows max abs diff {da:.2e}, logits {dl:.2e}, unpadded {d1:.2e}")
    assert got_a.shape == ref_a.shape == (750 + 125 + 19, 48)
    assert max(da, dl, d1) < TOL and torch.equal(got, got_kw)


def test_af3_no_projector_bias(tmp_path):
    hf = redraw(transformers.AudioFlamingo3ForConditionalGeneration(af3_config(projector_bias=False)), 3).eval()
    hf.save_pretrained(tmp_path)
    ours = M.from_pretrained(str(tmp_path))
    assert ours.multi_modal_projector.linear_1.bias is None
    out = processed((2.0,), seed=1)
    with torch.no_grad():
        ref = hf(**out).logits
        got = ours(out["input_ids"], input_features=out["input_features"],
                   feature_attention_mask=out["input_features_mask"])
    assert max_diff(ref, got) < TOL


# ---------------------------------------------------------------------------
# Save / load, generation, log-probs.
def test_af3_save_round_trip(af3, tmp_path):
    hf, path = af3
    ours = M.from_pretrained(path)
    M.save_pretrained(ours, str(tmp_path), max_shard_size="60KB")
    back, info = transformers.AudioFlamingo3ForConditionalGeneration.from_pretrained(str(tmp_path),
                                                                                    output_loading_info=True)
    assert not any(info.values()), info
    for (k, p), (k2, q) in zip(sorted(hf.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(p, q), k
    assert json.load(open(tmp_path / "config.json"))["model_type"] == "audioflamingo3"
    again = M.from_pretrained(str(tmp_path))
    for (k, p), (k2, q) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(p, q), k


def test_af3_generate_matches_transformers_greedy(af3):
    hf, path = af3
    ours = M.from_pretrained(path)
    out = processed()
    ids, mask, feats, fmask = out["input_ids"], out["attention_mask"], out["input_features"], out[
        "input_features_mask"]
    ref = hf.generate(**out, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    tokens, lengths, _ = M.generate(ours, ids, mask, feats, fmask, max_new_tokens=8, temperature=0)
    assert torch.equal(tokens, ref) and (lengths == 8).all()


def test_af3_generate_prefix_sharing_matches_repeat(af3):
    """Prompt 0 owns windows 0-1, prompt 1 window 2: the repeated batch repeats each prompt's windows."""
    ours = M.from_pretrained(af3[1])
    out = processed()
    ids, mask, feats, fmask = out["input_ids"], out["attention_mask"], out["input_features"], out[
        "input_features_mask"]
    G = 3
    kw = dict(max_new_tokens=8, temperature=1.2, top_p=0.95, top_k=50, eos_token_id=[5])
    shared = M.generate(ours, ids, mask, feats, fmask, num_samples=G,
                        generator=torch.Generator().manual_seed(4), **kw)
    windows = torch.tensor([0, 1] * G + [2] * G)
    rep = lambda x: x.repeat_interleave(G, 0)                     # noqa: E731
    repeated = M.generate(ours, rep(ids), rep(mask), feats[windows], fmask[windows],
                          generator=torch.Generator().manual_seed(4), **kw)
    for a, b in zip(shared, repeated):
        assert torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in shared[0]}) > 1
    emb = ours.repeat_audio_embeds(ours.encode_audio(feats, fmask), ids, G)
    with torch.no_grad():
        assert max_diff(emb, ours.encode_audio(feats[windows], fmask[windows])) < 1e-6


def test_af3_logprobs_and_attentions(af3):
    ours = M.from_pretrained(af3[1])
    out = processed((1.5, 0.75), seed=7)
    ids, mask, feats, fmask = out["input_ids"], out["attention_mask"], out["input_features"], out[
        "input_features_mask"]
    with torch.no_grad():
        logits, att = ours(ids, mask, None, feats, fmask, output_attentions=True)
        plain = ours(ids, mask, None, feats, fmask)
        lp = M.completion_logprobs(ours, ids, mask, mask, input_features=feats, feature_attention_mask=fmask)
    B, T = ids.shape
    assert max_diff(logits, plain, mask) < 1e-5 and len(att) == 2 and att[0].shape == (B, 4, T, T)
    ref = torch.log_softmax(plain[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
    assert max_diff(lp[:, 1:], ref) < 1e-5 and (lp[:, 0] == 0).all()


def test_real_size_tables_on_meta():
    """audio-flamingo-3-hf shapes (converter values): every reference tensor maps to one of ours, same shape."""
    text = dict(model_type="qwen2", vocab_size=151672, hidden_size=3584, intermediate_size=18944,
                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=False)
    hub = {"model_type": "audioflamingo3", "audio_token_id": 151669,
           "audio_config": {"model_type": "audioflamingo3_encoder", "hidden_size": 1280, "num_hidden_layers": 32,
                            "num_attention_heads": 20, "intermediate_size": 5120, "num_mel_bins": 128},
           "text_config": text}
    cfg = transformers.AudioFlamingo3Config(audio_config=hub["audio_config"], text_config=text)
    with torch.device("meta"):
        hf = transformers.AudioFlamingo3ForConditionalGeneration(cfg)
        ours = dict(M.LALM(hub).named_parameters())
    assert_keys_map("audioflamingo3", hf.state_dict(), ours)
    assert ours["language_model.lm_head.weight"].shape == (151672, 3584)
