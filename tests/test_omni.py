"""Qwen2.5-Omni thinker (model_type "qwen2_5_omni") against transformers' Qwen2_5OmniThinkerForConditionalGeneration
(test-only reference) on a tiny random checkpoint with every parameter redrawn, loaded from both released layouts:
the full-model one (thinker.* keys next to talker.* / token2wav.*, sharded, config.json with thinker_config) and
the thinker-only one the thinker class saves. fp32, CPU."""
import functools
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import model as M                                                  # noqa: E402
from parity import assert_keys_map, max_diff, redraw            # noqa: E402
from audio_encoder import OmniAudioEncoder, feature_mask, features, num_audio_tokens, sinusoids  # noqa: E402

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file               # noqa: E402

TOL = 2e-5
VOCAB, AUDIO, BOS, EOS, IMAGE, VIDEO, VISION_BOS = 128, 120, 118, 119, 121, 122, 117


# ---------------------------------------------------------------------------
# Helpers: a tiny thinker with every parameter redrawn, written in both layouts.
def thinker_config():
    return transformers.Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                          encoder_ffn_dim=48, output_dim=48),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=48,
                           fullatt_block_indexes=[0]),
        text_config=dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 1, 3])),
        audio_token_index=AUDIO, image_token_index=IMAGE, video_token_index=VIDEO, audio_start_token_id=BOS,
        audio_end_token_id=EOS, vision_start_token_id=VISION_BOS)


def write_full_layout(thinker_dir, out_dir):
    """The released full-model layout by hand: thinker.* keys (vision included), dummy talker.* / token2wav.*
    tensors, a full config.json (v4 style: top-level architectures Qwen2_5OmniModel), 3 shards + index."""
    os.makedirs(out_dir)
    sd = {"thinker." + k: v for k, v in load_file(os.path.join(thinker_dir, "model.safetensors")).items()}
    sd.update({"talker.model.layers.0.mlp.up_proj.weight": torch.randn(8, 4),
               "talker.thinker_to_talker_proj.weight": torch.randn(4, 48),
               "token2wav.code2wav_bigvgan_model.conv_pre.weight": torch.randn(3, 2, 7)})
    keys = sorted(sd)
    shards = [keys[:len(keys) // 3], keys[len(keys) // 3:2 * len(keys) // 3], keys[2 * len(keys) // 3:]]
    weight_map = {}
    for i, part in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: sd[k] for k in part}, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.numel() * 4 for t in sd.values())}, "weight_map": weight_map}, f)
    thinker = json.load(open(os.path.join(thinker_dir, "config.json")))
    thinker.pop("architectures")
    full = {"architectures": ["Qwen2_5OmniModel"], "model_type": "qwen2_5_omni", "enable_audio_output": True,
            "thinker_config": thinker, "talker_config": {"model_type": "qwen2_5_omni_talker", "hidden_size": 4},
            "token2wav_config": {"model_type": "qwen2_5_omni_token2wav"}}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(full, f)


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni")
    torch.manual_seed(0)
    hf = redraw(transformers.Qwen2_5OmniThinkerForConditionalGeneration(thinker_config()), 1).eval()
    hf.save_pretrained(root / "thinker")
    write_full_layout(root / "thinker", root / "full")
    return hf, str(root / "thinker"), str(root / "full")


@functools.lru_cache(maxsize=None)
def audio_batch(seconds=(5.08, 0.75), seed=5, prefix=(3, 4)):
    """Clips at 16 kHz -> 30 s features as the Omni processor makes them (padding='max_length') and LEFT-padded
    prompts `<prefix> <|audio_bos|> <|AUDIO|>*n <|audio_eos|> 5 6 7`."""
    g = torch.Generator().manual_seed(seed)
    clips = [torch.randn(int(s * 16000), generator=g) * 0.1 for s in seconds]
    feats, fmask = features(clips, n_mels=128, pad_to_30s=True)
    n_tok = [num_audio_tokens(int(n)) for n in fmask.sum(-1)]
    rows = [list(prefix) + [BOS] + [AUDIO] * n + [EOS, 5, 6, 7] for n in n_tok]
    T = max(len(r) for r in rows) + 1
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
    return ids, mask, feats, fmask


# ---------------------------------------------------------------------------
# Parity.
def test_token_counts_match_processor():
    from transformers.models.qwen2_5_omni import processing_qwen2_5_omni as P
    lengths = feature_mask([81280, 12000, 160, 161, 480000, 700000], 3000).sum(-1)
    enc = OmniAudioEncoder(dict(thinker_config().audio_config.to_dict()))
    assert torch.equal(P._get_feat_extract_output_lengths(lengths), enc.output_lengths(lengths))
    assert [num_audio_tokens(int(n)) for n in lengths] == P._get_feat_extract_output_lengths(lengths).tolist()


def test_sinusoids_match_reference():
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import SinusoidsPositionEmbedding
    assert torch.equal(sinusoids(1500, 32), SinusoidsPositionEmbedding(1500, 32).positional_embedding)


@pytest.mark.parametrize("layout", ["full", "thinker"])
def test_omni_parity(omni, layout):
    hf, thinker_dir, full_dir = omni
    ours = M.from_pretrained(full_dir if layout == "full" else thinker_dir)
    assert isinstance(ours, M.LALM) and ours.audio_token_id == AUDIO
    assert ours.config["model_type"] == "qwen2_5_omni" and "thinker_config" in ours.config
    ids, mask, feats, fmask = audio_batch()
    assert fmask.sum(-1).tolist() == [508, 75]                     # 3 chunks (200, 200, 108) and 1
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, input_features=feats, feature_attention_mask=fmask).logits
        got = ours(ids, mask, input_features=feats, feature_attention_mask=fmask)
        ref_a = hf.get_audio_features(feats, fmask).last_hidden_state
        got_a = ours.encode_audio(feats, fmask)
        ref1 = hf(input_ids=ids[:1], input_features=feats[:1], feature_attention_mask=fmask[:1]).logits
        got1 = ours(ids[:1], input_features=feats[:1], feature_attention_mask=fmask[:1])
        got2 = ours(ids, mask, audio_embeds=got_a)
    da, dl, d1 = max_diff(ref_a, got_a), max_diff(ref, got, mask), max_diff(ref1, got1)
    print(f"omni ({layout} layout) audio tower max abs diff {da:.2e}, logits {dl:.2e}, unpadded {d1:.2e}")
    assert got_a.shape == ref_a.shape == ((ids == AUDIO).sum(), 48)
    assert max(da, dl, d1) < TOL and torch.equal(got, got2)


def test_omni_chunking_matters(omni):
    """The same frames as one long chunk (n_window huge) differ: the test above would catch full attention."""
    hf, thinker_dir, _ = omni
    ours = M.from_pretrained(thinker_dir)
    _, _, feats, fmask = audio_batch()
    with torch.no_grad():
        a = ours.encode_audio(feats, fmask)
        ours.audio_tower.n_window = 1500                              # one chunk of 3000 frames
        b = ours.encode_audio(feats, fmask)
    assert max_diff(a, b) > 1e-2


def test_omni_mrope_position_ids(omni):
    """(3, B, T) temporal/height/width ids with different rows follow mrope_section like the reference."""
    hf, thinker_dir, _ = omni
    ours = M.from_pretrained(thinker_dir)
    ids, mask, feats, fmask = audio_batch()
    pos = M.positions_from_mask(mask)
    pos3 = torch.stack([pos, pos // 2, (pos * 3) % 7])                # (3, B, T)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos3, input_features=feats,
                 feature_attention_mask=fmask).logits
        got = ours(ids, mask, pos3, feats, fmask)
        same = ours(ids, mask, pos[None].expand(3, -1, -1), feats, fmask)   # three equal rows == 1-D RoPE
        plain = ours(ids, mask, pos, feats, fmask)
    assert max_diff(ref, got, mask) < TOL and torch.equal(same, plain)


def test_omni_refuses_images_and_video(omni):
    ours = M.from_pretrained(omni[1])
    ids, mask, feats, fmask = audio_batch()
    for bad in (IMAGE, VIDEO):
        img = ids.clone()                                         # audio_batch is cached: never edit in place
        img[0, -2] = bad
        with pytest.raises(ValueError, match="not supported"):
            ours(img, mask, input_features=feats, feature_attention_mask=fmask)
    with pytest.raises(ValueError, match="pixel_values"):
        ours(ids, mask, input_features=feats, feature_attention_mask=fmask, pixel_values=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="mrope_section|position_ids"):
        M.CausalLM(dict(model_type="qwen2", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=2)).rope(torch.zeros(3, 1, 4, dtype=torch.long), torch.float32)


def test_skipped_submodels_are_never_read(omni, monkeypatch):
    """thinker.visual.*, talker.*, token2wav.* are skipped by name: their bytes are never read."""
    read = []
    real = M.safe_open

    class Recording:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.h = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.h.keys()

        def get_slice(self, key):
            return self.h.get_slice(key)

        def get_tensor(self, key):
            read.append(key)
            return self.h.get_tensor(key)

    monkeypatch.setattr(M, "safe_open", Recording)
    M.from_pretrained(omni[2])
    assert read and all(k.startswith(("thinker.audio_tower.", "thinker.model.", "thinker.lm_head.")) for k in read)
    assert len(read) == len(set(read))


# ---------------------------------------------------------------------------
# Save / load, generation, log-probs, attentions.
def test_omni_save_round_trip(omni, tmp_path):
    hf, _, full_dir = omni
    ours = M.from_pretrained(full_dir)
    M.save_pretrained(ours, str(tmp_path), max_shard_size="40KB")
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert all(k.startswith("thinker.") for k in index["weight_map"])
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["model_type"] == "qwen2_5_omni" and cfg["thinker_config"]["model_type"] == "qwen2_5_omni_thinker"
    assert cfg["enable_audio_output"] is False                       # no talker weights were written
    back, info = transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
        str(tmp_path), output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert info["missing_keys"] and all(".visual." in k for k in info["missing_keys"])
    ref = {k: v for k, v in hf.state_dict().items() if ".visual." not in k}
    got = {k: v for k, v in back.state_dict().items() if ".visual." not in k}
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    again = M.from_pretrained(str(tmp_path))
    for (k, p), (k2, q) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(p, q), k
    assert not again.audio_tower.audio_bos_eos_token.weight.requires_grad   # unused by forward: frozen


def test_omni_generate_matches_transformers_greedy(omni):
    hf, thinker_dir, _ = omni
    ours = M.from_pretrained(thinker_dir)
    ids, mask, feats, fmask = audio_batch(seed=9)
    ref = hf.generate(input_ids=ids, attention_mask=mask, input_features=feats, feature_attention_mask=fmask,
                      max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    tokens, lengths, _ = M.generate(ours, ids, mask, feats, fmask, max_new_tokens=8, temperature=0)
    assert torch.equal(tokens, ref) and (lengths == 8).all()


def test_omni_generate_prefix_sharing_matches_repeat(omni):
    ours = M.from_pretrained(omni[1])
    ids, mask, feats, fmask = audio_batch(seed=11)
    G = 3
    kw = dict(max_new_tokens=8, temperature=1.2, top_p=0.95, top_k=50, eos_token_id=[7])
    shared = M.generate(ours, ids, mask, feats, fmask, num_samples=G,
                        generator=torch.Generator().manual_seed(3), **kw)
    rep = lambda x: x.repeat_interleave(G, 0)                     # noqa: E731
    repeated = M.generate(ours, rep(ids), rep(mask), rep(feats), rep(fmask),
                          generator=torch.Generator().manual_seed(3), **kw)
    for a, b in zip(shared, repeated):
        assert torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in shared[0]}) > 1
    hot = M.generate(ours, ids, mask, feats, fmask, num_samples=8, max_new_tokens=16, temperature=5.0,
                     generator=torch.Generator().manual_seed(0))[0]
    assert not torch.isin(hot, torch.tensor([IMAGE, VIDEO])).any()   # never sampled: forward would refuse them


def test_omni_logprobs_and_attentions(omni):
    ours = M.from_pretrained(omni[1])
    ids, mask, feats, fmask = audio_batch(seconds=(2.5, 1.1))
    with torch.no_grad():
        logits, att = ours(ids, mask, input_features=feats, feature_attention_mask=fmask, output_attentions=True)
        plain = ours(ids, mask, input_features=feats, feature_attention_mask=fmask)
        lp = M.completion_logprobs(ours, ids, mask, mask, input_features=feats, feature_attention_mask=fmask)
    B, T = ids.shape
    assert max_diff(logits, plain, mask) < 1e-5 and len(att) == 2 and att[0].shape == (B, 4, T, T)
    assert torch.allclose(att[1].sum(-1), torch.ones(B, 4, T))
    ref = torch.log_softmax(plain[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
    assert max_diff(lp[:, 1:], ref) < 1e-5 and (lp[:, 0] == 0).all()


def test_real_size_tables_on_meta():
    """Qwen2.5-Omni-7B's hub config (v4 style: rope_theta + rope_scaling with mrope_section): every tensor of the
    reference thinker (transformers-5 in-memory names) maps to one of ours of the same shape, vision excluded."""
    hub = {"model_type": "qwen2_5_omni", "architectures": ["Qwen2_5OmniModel"], "enable_audio_output": True,
           "thinker_config": {"model_type": "qwen2_5_omni_thinker", "audio_token_index": 151646,
                              "audio_config": {"model_type": "qwen2_5_omni_audio_encoder", "n_window": 100,
                                               "output_dim": 3584},
                              "text_config": {"model_type": "qwen2_5_omni_text", "hidden_size": 3584,
                                              "rope_theta": 1000000.0, "tie_word_embeddings": False,
                                              "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default",
                                                               "type": "default"}}}}
    with torch.device("meta"):
        hf = transformers.Qwen2_5OmniThinkerForConditionalGeneration(transformers.Qwen2_5OmniThinkerConfig())
        ours = M.LALM(hub)
    params = dict(ours.named_parameters())
    ref = {k: v for k, v in hf.state_dict().items() if ".visual." not in k}
    assert_keys_map("qwen2_5_omni", ref, params)
    assert params["language_model.lm_head.weight"].shape == (152064, 3584)
    lm = ours.language_model.c
    assert (lm["layers"], lm["heads"], lm["kv_heads"], lm["rope"]["rope_theta"]) == (28, 28, 4, 1e6)
    assert lm["rope"]["mrope_section"] == [16, 24, 24] and not lm["tie"]
