"""model.py against transformers (test-only reference) on tiny random checkpoints, plus generation and
log-prob equivalences. fp32, CPU. Every parameter (norms and biases included) is redrawn before saving so a
wrong op or a swapped key cannot hide behind ones/zeros."""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import model as M                                                  # noqa: E402
from parity import assert_keys_map, max_diff, redraw            # noqa: E402
from audio_encoder import features, num_audio_tokens  # noqa: E402

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file               # noqa: E402

TOL = 2e-5


# ---------------------------------------------------------------------------
# Helpers: tiny HF models with every parameter redrawn.
def left_padded(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
        ids[b, :T - n] = 0
    return ids, mask


QWEN2 = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6)
LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, rms_norm_eps=1e-5, tie_word_embeddings=False,
             rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=16))
AUDIO = dict(num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48)
WHISPER = dict(num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48,
               decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=48, vocab_size=64,
               max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=1)
AUDIO_TOKEN = 95


def qwen2_audio_config():
    return transformers.Qwen2AudioConfig(audio_config=AUDIO, text_config=dict(QWEN2, rms_norm_eps=1e-5),
                                         audio_token_index=AUDIO_TOKEN)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny HF checkpoints saved with save_pretrained, and the HF models for reference."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    out = {}
    qwen = redraw(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN2, tie_word_embeddings=True)), 1)
    qwen.eval().save_pretrained(root / "qwen2", max_shard_size="20KB")
    llama = redraw(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)), 2)
    llama.eval().save_pretrained(root / "llama")
    whisper = redraw(transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**WHISPER)), 3)
    whisper.eval().save_pretrained(root / "whisper")
    qa = redraw(transformers.Qwen2AudioForConditionalGeneration(qwen2_audio_config()), 4)
    qa.eval().save_pretrained(root / "qwen2_audio")
    for name, m in dict(qwen2=qwen, llama=llama, whisper=whisper, qwen2_audio=qa).items():
        out[name] = (m, str(root / name))
    out["root"] = root
    return out


def audio_batch():
    """Two clips (1.3 s, 0.7 s) -> 30 s features, and left-padded prompts with expanded placeholders."""
    g = torch.Generator().manual_seed(5)
    clips = [torch.randn(20800, generator=g) * 0.1, torch.randn(11200, generator=g) * 0.1]
    feats, fmask = features(clips, n_mels=128, pad_to_30s=True)
    n_tok = [num_audio_tokens(int(n)) for n in fmask.sum(-1)]
    rows = [[3, 4] + [AUDIO_TOKEN] * n + [5, 6, 7] for n in n_tok]
    T = max(len(r) for r in rows) + 2
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    return ids, mask, feats, fmask


# ---------------------------------------------------------------------------
# Logits parity with transformers.
@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_decoder_parity(ckpts, name):
    hf, path = ckpts[name]
    if name == "qwen2":
        assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))    # sharded
    ours = M.from_pretrained(path)
    assert isinstance(ours, M.CausalLM)
    ids, mask = left_padded(96, [9, 6])
    pos = M.positions_from_mask(mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, mask)                                    # positions default to cumsum(mask) - 1
        ref1 = hf(input_ids=ids[:1]).logits                      # unpadded, default positions
        got1 = ours(ids[:1])                                      # is_causal path (no mask)
        assert max_diff(got1, ours(ids[:1], torch.ones_like(ids[:1]))) < TOL
    d = max(max_diff(ref, got, mask), max_diff(ref1, got1))
    print(f"{name} logits max abs diff {d:.2e}")
    assert d < TOL


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_decoder_gradients_match_transformers(ckpts, name):
    # qwen2 ties the head to the embedding, whose lookup then takes a sparse gradient (CausalLM.embed_ids);
    # llama does not. Either way every .grad must be dense (AdamW refuses sparse ones) and equal transformers'.
    hf, path = ckpts[name]
    ours = M.from_pretrained(path)
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    for model, logits in ((hf, lambda: hf(input_ids=ids).logits), (ours, lambda: ours(ids))):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(logits()[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    hf_grads = dict(hf.named_parameters())
    for key, p in ours.named_parameters():
        ref = hf_grads["model." + key if not key.startswith("lm_head") else key].grad
        assert p.grad is not None and p.grad.layout == torch.strided, key
        assert max_diff(p.grad, ref) < 1e-6, key
    torch.optim.AdamW(ours.parameters(), lr=1e-3).step()                 # dense grads: the step runs
    hf.zero_grad(set_to_none=True)


def test_v4_rope_config(ckpts, tmp_path):
    """A v4-style config.json (top-level rope_theta + rope_scaling) gives the same model."""
    hf, path = ckpts["llama"]
    cfg = json.load(open(os.path.join(path, "config.json")))
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = dict(rope, type=rope.pop("rope_type"))
    os.makedirs(tmp_path / "v4")
    json.dump(cfg, open(tmp_path / "v4" / "config.json", "w"))
    os.symlink(os.path.join(path, "model.safetensors"), tmp_path / "v4" / "model.safetensors")
    ids, _ = left_padded(96, [12])
    with torch.no_grad():
        assert max_diff(M.from_pretrained(str(tmp_path / "v4"))(ids), hf(input_ids=ids).logits) < TOL


def test_config_defaults_follow_transformers():
    """Released configs omit fields (Qwen2-Audio's text_config lists a handful): use transformers' defaults."""
    for family, cls in [("qwen2", transformers.Qwen2Config), ("llama", transformers.LlamaConfig)]:
        c = M.decoder_config({"model_type": family, "vocab_size": 96, "num_attention_heads": 8})
        ref = cls(vocab_size=96, num_attention_heads=8)
        assert (c["dim"], c["ffn"], c["layers"], c["heads"], c["kv_heads"], c["eps"], c["tie"]) == (
            ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers, ref.num_attention_heads,
            ref.num_key_value_heads, ref.rms_norm_eps, ref.tie_word_embeddings)
        assert c["rope"]["rope_theta"] == ref.rope_parameters["rope_theta"]


def test_whisper_encoder_parity(ckpts):
    hf, path = ckpts["whisper"]
    enc = M.from_pretrained(path)
    assert isinstance(enc, M.WhisperEncoder)
    g = torch.Generator().manual_seed(6)
    feats, _ = features([torch.randn(24000, generator=g) * 0.1, torch.randn(7000, generator=g)], n_mels=80)
    with torch.no_grad():
        ref = hf.model.encoder(feats).last_hidden_state
        got = enc(feats)
    d = max_diff(ref, got)
    print(f"whisper encoder max abs diff {d:.2e}")
    assert got.shape == (2, 1500, 32) and d < TOL


def test_qwen2_audio_parity(ckpts):
    hf, path = ckpts["qwen2_audio"]
    ours = M.from_pretrained(path)
    assert isinstance(ours, M.LALM) and ours.audio_token_id == AUDIO_TOKEN
    ids, mask, feats, fmask = audio_batch()
    pos = M.positions_from_mask(mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, input_features=feats,
                 feature_attention_mask=fmask).logits
        got = ours(ids, mask, input_features=feats, feature_attention_mask=fmask)
        emb = ours.encode_audio(feats, fmask)
        got2 = ours(ids, mask, audio_embeds=emb)
    d = max_diff(ref, got, mask)
    print(f"qwen2_audio logits max abs diff {d:.2e}")
    assert d < TOL and torch.equal(got, got2)
    assert emb.shape[0] == (ids == AUDIO_TOKEN).sum()
    with pytest.raises(ValueError, match="placeholders"):
        ours(ids, mask, audio_embeds=emb[1:])


def test_real_size_tables_on_meta():
    """Qwen2-Audio-7B's hub config lists only a few text fields: with transformers' defaults filled in, every
    tensor of the reference model maps through KEY_TABLES to one of ours of the same shape (meta, no memory)."""
    hub = {"model_type": "qwen2_audio", "audio_token_index": 151646,
           "audio_config": {"model_type": "qwen2_audio_encoder", "num_mel_bins": 128},
           "text_config": {"model_type": "qwen2", "intermediate_size": 11008, "vocab_size": 156032,
                           "rms_norm_eps": 1e-5, "max_position_embeddings": 8192}}
    cfg = transformers.Qwen2AudioConfig(audio_config=hub["audio_config"], text_config=hub["text_config"])
    with torch.device("meta"):
        hf = transformers.Qwen2AudioForConditionalGeneration(cfg)
        ours = dict(M.LALM(hub).named_parameters())
    assert_keys_map("qwen2_audio", hf.state_dict(), ours)
    assert ours["language_model.lm_head.weight"].shape == (156032, 4096)


def test_output_attentions(ckpts):
    ours = M.from_pretrained(ckpts["llama"][1])
    ids, mask = left_padded(96, [8, 5])
    with torch.no_grad():
        logits, att = ours(ids, mask, output_attentions=True)
        assert max_diff(logits, ours(ids, mask), mask) < TOL
    assert len(att) == 2 and att[0].shape == (2, 4, 8, 8)
    assert torch.allclose(att[0].sum(-1), torch.ones(2, 4, 8))
    assert att[1][1, :, -1, :3].abs().max() == 0                  # left pads get no attention


# ---------------------------------------------------------------------------
# Weight I/O: round trips, bf16, strict key errors.
@pytest.mark.parametrize("name", ["qwen2", "qwen2_audio"])
def test_save_round_trip(ckpts, tmp_path, name):
    hf, path = ckpts[name]
    ours = M.from_pretrained(path)
    M.save_pretrained(ours, str(tmp_path), max_shard_size="30KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    cls = type(hf)
    back, info = cls.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not any(info.values()), info
    for (k, p), (k2, q) in zip(sorted(hf.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(p, q), k
    again = M.from_pretrained(str(tmp_path))
    for (k, p), (k2, q) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(p, q), k


def test_bf16_checkpoint(ckpts, tmp_path):
    hf, _ = ckpts["llama"]
    hf16 = transformers.LlamaForCausalLM(hf.config)
    hf16.load_state_dict(hf.state_dict())
    hf16.to(torch.bfloat16).save_pretrained(tmp_path)
    ours = M.from_pretrained(str(tmp_path))
    assert ours.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(ours.lm_head.weight, hf.lm_head.weight.to(torch.bfloat16).float())
    ours16 = M.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert ours16.norm.weight.dtype == torch.bfloat16


def _edit_checkpoint(src, dst, edit):
    os.makedirs(dst)
    os.symlink(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
    sd = load_file(os.path.join(src, "model.safetensors"))
    edit(sd)
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


def test_key_errors(ckpts, tmp_path):
    src = ckpts["llama"][1]
    key = "model.layers.1.mlp.up_proj.weight"
    _edit_checkpoint(src, tmp_path / "missing", lambda sd: sd.pop(key))
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        M.from_pretrained(str(tmp_path / "missing"))
    _edit_checkpoint(src, tmp_path / "unknown", lambda sd: sd.update({"model.layers.0.mlp.extra": sd[key].clone()}))
    with pytest.raises(KeyError, match=r"model\.layers\.0\.mlp\.extra"):
        M.from_pretrained(str(tmp_path / "unknown"))
    _edit_checkpoint(src, tmp_path / "shape", lambda sd: sd.update({key: sd[key][:-1]}))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        M.from_pretrained(str(tmp_path / "shape"))


# ---------------------------------------------------------------------------
# Tiny default (short features), composition, generation, log-probs.
TINY = {"model_type": "qwen2_audio", "audio_token_index": AUDIO_TOKEN, "audio_config": AUDIO,
        "text_config": dict(QWEN2, model_type="qwen2", tie_word_embeddings=True)}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return redraw(M.build_lalm(TINY), 7, scale=0.3).eval()


def tiny_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    clips = [torch.randn(8000, generator=g) * 0.1, torch.randn(4000, generator=g) * 0.1]
    feats, fmask = features(clips, n_mels=128, pad_to_30s=False)
    n = [num_audio_tokens(int(x)) for x in fmask.sum(-1)]
    rows = [[3] + [AUDIO_TOKEN] * n[0] + [5, 6], [3, 4, 9] + [AUDIO_TOKEN] * n[1] + [5]]
    T = max(map(len, rows))
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
    return ids, mask, feats, fmask


def test_tiny_default_short_features(tiny, tmp_path):
    ids, mask, feats, fmask = tiny_batch()
    assert feats.shape[-1] == 50 and feats.shape[-1] < 3000
    with torch.no_grad():
        logits = tiny(ids, mask, input_features=feats, feature_attention_mask=fmask)
    assert logits.shape == (2, ids.shape[1], 96) and torch.isfinite(logits).all()
    M.save_pretrained(tiny, str(tmp_path))
    back, info = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(tmp_path),
                                                                                 output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(back.lm_head.weight, tiny.language_model.lm_head.weight)
    again = M.from_pretrained(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(again(ids, mask, input_features=feats, feature_attention_mask=fmask), logits)


def test_compose_lalm(ckpts, tmp_path):
    lalm = M.compose_lalm(ckpts["whisper"][1], ckpts["llama"][1], audio_token_id=AUDIO_TOKEN, stack=4)
    g = torch.Generator().manual_seed(8)
    feats, fmask = features([torch.randn(16000, generator=g) * 0.1], n_mels=80, pad_to_30s=False)
    n = int(lalm.num_audio_tokens(fmask.sum(-1)))
    assert n == 50 // 4
    ids = torch.tensor([[1, 2] + [AUDIO_TOKEN] * n + [3]])
    with torch.no_grad():
        logits = lalm(ids, input_features=feats, feature_attention_mask=fmask)
        M.save_pretrained(lalm, str(tmp_path))
        again = M.from_pretrained(str(tmp_path))
        assert torch.equal(again(ids, input_features=feats, feature_attention_mask=fmask), logits)


def greedy_reference(model, ids, mask, feats, fmask, n):
    """Argmax loop over full forwards (no cache)."""
    emb = model.encode_audio(feats, fmask)
    out = []
    for _ in range(n):
        logits = model(ids, mask, audio_embeds=emb)
        tok = logits[:, -1].argmax(-1)
        out.append(tok)
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


def test_generate_greedy_matches_no_cache(tiny):
    ids, mask, feats, fmask = tiny_batch()
    with torch.no_grad():
        ref = greedy_reference(tiny, ids, mask, feats, fmask, 12)
    tokens, lengths, finished = M.generate(tiny, ids, mask, feats, fmask, max_new_tokens=12, temperature=0,
                                           eos_token_id=None)
    assert torch.equal(tokens, ref) and (lengths == 12).all() and not finished.any()
    eos = int(ref[0, 4])                                         # stop row 0 at its 5th token
    tokens, lengths, finished = M.generate(tiny, ids, mask, feats, fmask, max_new_tokens=12, temperature=0,
                                           eos_token_id=eos, pad_token_id=0)
    first = [int((r == eos).nonzero()[0]) if (r == eos).any() else None for r in ref]
    for b in range(2):
        n = 12 if first[b] is None else first[b] + 1
        assert lengths[b] == n and bool(finished[b]) == (first[b] is not None)
        assert torch.equal(tokens[b, :n], ref[b, :n]) and (tokens[b, n:] == 0).all()


def test_generate_unpadded_prompt_matches_no_cache(tiny):
    """A prompt without left pads is prefilled with SDPA's is_causal (no explicit mask): same tokens as full
    forwards with the (B, T) attention mask."""
    ids, mask, feats, fmask = (x[:1] for x in tiny_batch())
    assert mask.all() and fmask.all()
    with torch.no_grad():
        ref = greedy_reference(tiny, ids, mask, feats, fmask, 12)
    tokens, _, _ = M.generate(tiny, ids, mask, feats, fmask, max_new_tokens=12, temperature=0, eos_token_id=None)
    assert torch.equal(tokens, ref)


def test_decode_step_with_a_slot_tensor_matches_the_sliced_step(tiny):
    """The fixed-shape step a CUDA graph replays (slot index as a tensor: cache written by index_copy_, every
    slot attended, the unwritten ones masked) == the eager step (slots [0, t] sliced), over left-padded
    prompts shared by G rows."""
    ids, mask, feats, fmask = tiny_batch()
    lm, G, N = tiny.language_model, 2, 5
    pos = M.positions_from_mask(mask)
    prompt = lm.new_cache(2, ids.shape[1])
    tok = torch.randint(0, 96, (2 * G, N), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lm.decode(tiny.embed(ids, feats, fmask), pos, M.causal_mask(mask.bool(), ids.shape[1]), prompt, 0)
        prefix = [(k, v, mask.bool()) for k, v in prompt]
        sliced, fixed = lm.new_cache(2 * G, N), lm.new_cache(2 * G, N)
        next_pos = pos[:, -1:].repeat_interleave(G, 0) + 1
        for t in range(N):
            x = lm.embed_ids(tok[:, t:t + 1])
            a, _ = lm.decode(x, next_pos + t, None, sliced, t, prefix=prefix)
            b, _ = lm.decode(x, next_pos + t, None, fixed, torch.tensor([t]), prefix=prefix)
            assert max_diff(a, b) < 1e-6, t
    assert all(torch.equal(p, q) for layer_a, layer_b in zip(sliced, fixed) for p, q in zip(layer_a, layer_b))


def test_compiled_decoding_matches_eager_and_sees_weight_updates(tiny):
    """generate(compile=True) (model.compiled_step: torch.compile'd steps, the slot a symbolic int) samples the
    eager tokens, over left-padded prompts shared by G rows; and after an in-place weight change (what an
    optimizer step does) the compiled steps read the new weights, not constants baked in at compile time."""
    ids, mask, feats, fmask = tiny_batch()
    kw = dict(max_new_tokens=6, num_samples=2, temperature=1.0, eos_token_id=None)

    def eager_and_compiled():
        return [M.generate(tiny, ids, mask, feats, fmask, generator=torch.Generator().manual_seed(3), compile=c,
                           **kw)[0] for c in (False, True)]
    before = eager_and_compiled()
    assert torch.equal(*before)
    w = tiny.language_model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w.mul_(-4)
    try:
        after = eager_and_compiled()
    finally:
        with torch.no_grad():
            w.div_(-4)
    assert torch.equal(*after) and not torch.equal(before[0], after[0])


def test_compiled_decoding_falls_back_to_eager_at_the_recompile_limit(tiny, monkeypatch):
    """Past dynamo's recompile limit (fullgraph=True would raise) generate warns and finishes eagerly, with the
    same tokens."""
    ids, mask, feats, fmask = tiny_batch()
    kw = dict(max_new_tokens=5, num_samples=2, temperature=0, eos_token_id=None)
    eager = M.generate(tiny, ids, mask, feats, fmask, **kw)[0]
    torch._dynamo.reset()
    monkeypatch.setattr(M, "_compiled_decode_step", None)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)      # slot 0 compiles, slot 1 hits it
    try:
        with pytest.warns(UserWarning, match="recompile limit"):
            compiled = M.generate(tiny, ids, mask, feats, fmask, compile=True, **kw)[0]
        assert M._compiled_decode_step is M.decode_step                   # eager for the rest of the process
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, eager)


def test_generate_causal_lm_gqa(ckpts):
    """The static-cache path with 4 query heads per kv head (Llama) against full forwards."""
    lm = M.from_pretrained(ckpts["llama"][1])
    ids, mask = left_padded(96, [7, 4], seed=3)
    ref_ids, ref_mask, ref = ids, mask, []
    with torch.no_grad():
        for _ in range(8):
            tok = lm(ref_ids, ref_mask)[:, -1].argmax(-1)
            ref.append(tok)
            ref_ids, ref_mask = torch.cat([ref_ids, tok[:, None]], 1), F.pad(ref_mask, (0, 1), value=1)
    tokens, lengths, _ = M.generate(lm, ids, mask, max_new_tokens=8, temperature=0)
    assert torch.equal(tokens, torch.stack(ref, 1)) and (lengths == 8).all()


def test_generate_prefix_sharing_matches_repeat(tiny):
    ids, mask, feats, fmask = tiny_batch(1)
    G = 3
    kw = dict(max_new_tokens=10, temperature=1.3, top_p=0.9, top_k=20, eos_token_id=[7, 8])
    shared = M.generate(tiny, ids, mask, feats, fmask, num_samples=G,
                        generator=torch.Generator().manual_seed(11), **kw)
    rep = lambda x: x.repeat_interleave(G, 0)                     # noqa: E731
    repeated = M.generate(tiny, rep(ids), rep(mask), rep(feats), rep(fmask), num_samples=1,
                          generator=torch.Generator().manual_seed(11), **kw)
    for a, b in zip(shared, repeated):
        assert torch.equal(a, b)
    assert shared[0].shape == (2 * G, 10)
    assert len({tuple(r.tolist()) for r in shared[0]}) > 1       # the G samples differ


def test_group_reuses_one_audio_encoding(tiny):
    """GRPO path: encode B prompts once, repeat rows for B*G completions == encoding B*G copies."""
    ids, mask, feats, fmask = tiny_batch(2)
    G = 2
    tokens, _, _ = M.generate(tiny, ids, mask, max_new_tokens=4, num_samples=G, temperature=1.0,
                              audio_embeds=tiny.encode_audio(feats, fmask),
                              generator=torch.Generator().manual_seed(0))
    full = torch.cat([ids.repeat_interleave(G, 0), tokens], 1)
    full_mask = torch.cat([mask.repeat_interleave(G, 0), torch.ones_like(tokens)], 1)
    comp = torch.cat([torch.zeros_like(ids.repeat_interleave(G, 0)), torch.ones_like(tokens)], 1)
    emb = tiny.repeat_audio_embeds(tiny.encode_audio(feats, fmask), ids, G)
    rep = lambda x: x.repeat_interleave(G, 0)                     # noqa: E731
    with torch.no_grad():
        a = M.completion_logprobs(tiny, full, full_mask, comp, audio_embeds=emb)
        b = M.completion_logprobs(tiny, full, full_mask, comp, input_features=rep(feats),
                                  feature_attention_mask=rep(fmask))
    assert max_diff(a, b) < 1e-5 and (a[:, :ids.shape[1]] == 0).all() and (a[:, ids.shape[1]:] < 0).all()


def test_gradient_checkpointing_same_grads(tiny):
    ids, mask, feats, fmask = tiny_batch()
    grads = []
    for ckpt in (False, True):
        tiny.language_model.gradient_checkpointing = ckpt
        tiny.zero_grad()
        M.completion_logprobs(tiny, ids, mask, mask, input_features=feats, feature_attention_mask=fmask).sum() \
            .backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny.parameters()]))
    tiny.language_model.gradient_checkpointing = False
    tiny.zero_grad()
    assert max_diff(grads[0], grads[1]) < 1e-5


def test_sample_top_k_top_p():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(M.sample(logits, top_k=2, generator=g).tolist()) == {2, 3}
    p = logits[0].softmax(-1)                                    # top-p 0.7 keeps {3, 2}: 0.64 < 0.7 <= 0.88
    assert p[3] < 0.7 < p[3] + p[2]
    assert set(M.sample(logits, top_p=0.7, generator=g).tolist()) == {2, 3}
    freq = (M.sample(logits, generator=g) == 3).float().mean()
    assert abs(freq - p[3]) < 0.05


def test_sample_matches_the_distribution_and_skips_impossible_tokens():
    """Inverse-transform sampling: frequencies within 4 standard errors of p over 40k draws; tokens of
    probability 0 (first, middle, last) never drawn, even for uniforms at the edges of [0, 1)."""
    inf = float("-inf")
    logits = torch.tensor([[inf, 0.5, inf, 1.5, -1.0, 0.0, inf]]).repeat(40000, 1)
    p = logits[0].softmax(-1)
    draws = M.sample(logits, generator=torch.Generator().manual_seed(3))
    freq = torch.bincount(draws, minlength=7).double() / len(draws)
    se = (p.double() * (1 - p.double()) / len(draws)).sqrt()
    assert ((freq - p.double()).abs() <= 4 * se + 1e-12).all(), (freq, p)
    assert freq[[0, 2, 6]].sum() == 0
    for edge, token in ((0.0, 1), (1.0 - 2 ** -24, 5)):         # the smallest and largest uniforms
        real_rand = torch.rand
        torch.rand = lambda shape, **k: torch.full(shape, edge)
        try:
            assert M.sample(logits[:2]).tolist() == [token, token]
        finally:
            torch.rand = real_rand


def test_token_logprobs(tiny):
    ids, mask, feats, fmask = tiny_batch()
    w = tiny.lm_head_weight()
    hidden = torch.randn(2, 9, 32, requires_grad=True)
    targets = torch.randint(0, 96, (2, 9))
    ref = torch.log_softmax((hidden @ w.T) / 0.7, -1).gather(-1, targets[..., None])[..., 0]
    got = M.token_logprobs(hidden, w, targets, temperature=0.7, chunk_size=5)
    assert got.dtype == torch.float32 and max_diff(got, ref) < 1e-5
    g1, = torch.autograd.grad(ref.sum(), hidden)
    g2, = torch.autograd.grad(got.sum(), hidden)
    assert max_diff(g1, g2) < 1e-5
    with torch.no_grad():
        lp = M.completion_logprobs(tiny, ids, mask, mask, input_features=feats, feature_attention_mask=fmask)
        logits = tiny(ids, mask, input_features=feats, feature_attention_mask=fmask)
        none = M.completion_logprobs(tiny, ids, mask, torch.zeros_like(mask), input_features=feats,
                                     feature_attention_mask=fmask)
    assert none.shape == ids.shape and (none == 0).all()
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
    assert lp.shape == ids.shape and (lp[:, 0] == 0).all() and max_diff(lp[:, 1:], ref) < 1e-5
