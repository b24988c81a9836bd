"""Tests for train_grpo.py: the objective against hand-worked numbers, masks, rollouts, and short real runs."""
import math

import pytest
import torch

import train_grpo
from train_grpo import completion_mask, group_advantages, grpo_loss, kl_k3

# ---------------------------------------------------------------------------
# The objective, worked by hand
#
# Two completions of 3 tokens; the second has 2 valid tokens (its 3rd position is padding).
#   ratios rho = exp(logp - old_logp):  row 0: [1.0, 1.5, 0.5]  (A = +1)
#                                       row 1: [1.1, 0.7, pad]  (A = -2)
# eps_low = eps_high = 0.2, so clip(rho) lies in [0.8, 1.2]. Per-token loss -min(rho*A, clip(rho)*A):
#   row 0 (A=+1): -min(1.0, 1.0) = -1.0 ; -min(1.5, 1.2) = -1.2 ; -min(0.5, 0.8) = -0.5     sum -2.7, mean -0.9
#   row 1 (A=-2): -min(-2.2, -2.2) = 2.2 ; -min(-1.4, -1.6) = 1.6                           sum  3.8, mean  1.9
#   "grpo":    mean(-0.9, 1.9)                  = 0.5
#   "token":   (-2.7 + 3.8) / 5 valid tokens    = 0.22
#   "dr_grpo": 1.1 / (2 * 3)  = 0.18333..., with max_len=4: 1.1 / 8 = 0.1375
# Clipping: low-clipped (rho < 0.8 with A < 0): row 1 token 1 -> 1/5; high-clipped (rho > 1.2, A > 0):
# row 0 token 1 -> 1/5. Row 0 token 2 (rho 0.5, A > 0) is NOT clipped: the unclipped term is the min.
# With eps_high = 0.28 only row 0 token 1 changes: -min(1.5, 1.28) = -1.28, so "grpo" = (-2.78/3 + 1.9)/2.

RATIOS = torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 1.0]])
LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]])
OLD = LOGP - RATIOS.log()
ADV = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)


@pytest.mark.parametrize("loss_type,max_len,expected", [
    ("grpo", None, 0.5), ("token", None, 0.22), ("dr_grpo", None, 1.1 / 6), ("dr_grpo", 4, 0.1375)])
def test_grpo_loss_by_hand(loss_type, max_len, expected):
    loss, stats = grpo_loss(LOGP, OLD, None, ADV, MASK, beta=0.04, loss_type=loss_type, max_len=max_len)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["kl"].item() == 0.0          # ref_logp None -> no KL term
    assert stats["clip_low"].item() == pytest.approx(0.2)
    assert stats["clip_high"].item() == pytest.approx(0.2)
    assert stats["clip_frac"].item() == pytest.approx(0.4)
    assert stats["tokens"].item() == 5
    assert stats["ratio_mean"].item() == pytest.approx((1.0 + 1.5 + 0.5 + 1.1 + 0.7) / 5, abs=1e-6)


def test_grpo_loss_asymmetric_clip():
    loss, stats = grpo_loss(LOGP, OLD, None, ADV, MASK, eps_low=0.2, eps_high=0.28, loss_type="grpo")
    assert loss.item() == pytest.approx((-2.78 / 3 + 1.9) / 2, abs=1e-6)
    # lower side: with eps_low = 0.35, rho = 0.7 >= 0.65 is inside the range: -min(-1.4, -1.4) = 1.4
    loss, stats = grpo_loss(LOGP, OLD, None, ADV, MASK, eps_low=0.35, eps_high=0.2, loss_type="token")
    assert loss.item() == pytest.approx((-2.7 + 2.2 + 1.4) / 5, abs=1e-6)
    assert stats["clip_low"].item() == 0.0


def test_grpo_loss_masked_positions_ignored():
    # garbage (inf / nan) at padded positions must not reach the loss or its gradient
    logp = LOGP.clone()
    logp[1, 2] = -math.inf
    old = OLD.clone()
    old[1, 2] = math.nan
    logp.requires_grad_(True)
    loss, _ = grpo_loss(logp, old, None, ADV, MASK, loss_type="token")
    loss.backward()
    assert loss.item() == pytest.approx(0.22, abs=1e-6)
    assert torch.isfinite(logp.grad).all() and logp.grad[1, 2] == 0


def test_grpo_loss_gradient_on_policy():
    # mu = 1: old = logp.detach(), rho = 1 in value, d loss / d logp_t = -A / |o_i| / N ("grpo")
    logp = LOGP.clone().requires_grad_(True)
    loss, stats = grpo_loss(logp, logp.detach(), None, ADV, MASK, loss_type="grpo")
    loss.backward()
    assert loss.item() == pytest.approx(0.5, abs=1e-6)                      # mean over rows of -A: (-1 + 2) / 2
    expected = torch.tensor([[-1 / 3, -1 / 3, -1 / 3], [2 / 2, 2 / 2, 0.0]]) / 2
    torch.testing.assert_close(logp.grad, expected)
    assert stats["clip_frac"].item() == 0.0 and stats["ratio_mean"].item() == 1.0


# k3 = exp(d) - d - 1 with d = ref - logp:  d = 0 -> 0;  d = ln 2 -> 2 - ln 2 - 1 = 0.306853;
# d = -ln 2 -> 0.5 + ln 2 - 1 = 0.193147.  With A = 0, loss = beta * (valid-token mean of k3).
def test_k3_values_and_kl_term():
    logp = torch.zeros(1, 3)
    ref = torch.tensor([[0.0, math.log(2), -math.log(2)]])
    k3 = kl_k3(logp, ref)
    torch.testing.assert_close(k3, torch.tensor([[0.0, 2 - math.log(2) - 1, 0.5 + math.log(2) - 1]]))
    assert (kl_k3(torch.randn(4, 5), torch.randn(4, 5)) >= 0).all()
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = grpo_loss(logp, logp, ref, torch.zeros(1), mask, beta=0.1, loss_type="token")
    mean_k3 = (0.306853 + 0.193147) / 3
    assert loss.item() == pytest.approx(0.1 * mean_k3, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(mean_k3, abs=1e-6)
    loss0, stats0 = grpo_loss(logp, logp, ref, torch.zeros(1), mask, beta=0.0)   # beta = 0 -> no KL at all
    assert loss0.item() == 0.0 and stats0["kl"].item() == 0.0


def test_k3_zero_when_equal_and_clamped():
    x = torch.randn(3, 4)
    assert kl_k3(x, x).abs().max().item() == 0.0
    huge = kl_k3(torch.tensor([[-1000.0]]), torch.tensor([[0.0]]))           # d = 1000 -> clamped to 20
    assert huge.item() == pytest.approx(math.exp(20) - 21, rel=1e-5)
    tiny = kl_k3(torch.tensor([[0.0]]), torch.tensor([[-1000.0]]))           # d = -1000 -> -20
    assert tiny.item() == pytest.approx(math.exp(-20) + 19, rel=1e-6)
    # bf16 inputs are upcast: the result is fp32
    assert kl_k3(x.bfloat16(), x.bfloat16() + 1).dtype == torch.float32


# ---------------------------------------------------------------------------
# Advantages
# Group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / (0.57735 + 1e-4).

def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 1.0, 1.0]])
    adv = group_advantages(r)
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4))
    assert adv[1].abs().max().item() == 0.0                                 # zero-spread group -> zeros
    s2 = math.sqrt(2 / 3)                                                   # [2,0,1,1]: sum sq dev 2, /3
    torch.testing.assert_close(adv[2], torch.tensor([1.0, -1.0, 0.0, 0.0]) / (s2 + 1e-4))
    torch.testing.assert_close(group_advantages(r, scale=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert group_advantages(r, scale=False)[1].abs().max().item() == 0.0


# ---------------------------------------------------------------------------
# Masks: from lengths (EOS included), never from token values

def test_completion_mask_keeps_eos_when_pad_is_eos():
    eos = pad = 2
    tokens = torch.tensor([[5, 7, eos, pad, pad], [5, 6, 7, 8, 9], [eos, pad, pad, pad, pad]])
    lengths = torch.tensor([3, 5, 1])                       # row 1 truncated (no EOS), row 2 EOS only
    mask = completion_mask(lengths, tokens.shape[1])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert not torch.equal(mask, tokens != pad)             # value masking would drop the EOS


# ---------------------------------------------------------------------------
# Rollouts and log-probs on a tiny random LALM over a real (synthetic espeak-ng) corpus

def _run_config(**over):
    cfg = dict(group_size=4, max_new_tokens=10, rollout_prompts=1, lr=1e-3, warmup_steps=0, dump_every=1,
               threads=1, eval_data="", save_every=1)
    cfg.update(over)
    return [f"--{k}={v}" for k, v in cfg.items()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """6 synthetic clips with QA, a SentencePiece tokenizer, and two tiny random LALMs (policy, reference)."""
    import data
    import model as model_lib
    import tokenizer as tokenizer_lib
    import train_sta
    root = tmp_path_factory.mktemp("grpo")
    data.build_synth_corpus(str(root / "synth"), seed=3, n=6, workers=1)
    examples = data.load_examples(str(root / "synth" / "qa.jsonl"), kind="qa")
    texts = [data.prompt_text(e) + "\n" + e["reasoning"] for e in examples]
    # the tiny default's tokenizer holds the time pieces (its audio_time_embedding needs them)
    tok = tokenizer_lib.train_sentencepiece(texts, str(root / "policy"), 700, text_pieces=tokenizer_lib.TIME_PIECES)
    shape = train_sta.Config(n_mels=80, enc_dim=32, enc_layers=1, enc_heads=2, dec_dim=32, dec_layers=2, dec_heads=2)
    for name, seed in (("policy", 0), ("ref", 1)):
        torch.manual_seed(seed)
        model_lib.save_pretrained(model_lib.build_lalm(train_sta.tiny_config(shape, tok)), str(root / name))
    return {"root": root, "examples": examples, "tok": tok, "qa": str(root / "synth" / "qa.jsonl"),
            "policy": str(root / "policy"), "ref": str(root / "ref")}


def _prompts(tiny, n):
    import data
    return data.collate_prompts(tiny["examples"][:n], tiny["tok"], "qwen2_audio", 80, False)


def test_prefix_shared_rollout_equals_unshared(tiny):
    # generate(num_samples=G) encodes + prefills each prompt once and copies its KV cache to G rows; the same
    # seed must give exactly what G separate copies of each prompt give (rows are prompt-major)
    import model as model_lib
    model = model_lib.from_pretrained(tiny["policy"])
    b = _prompts(tiny, 3)
    G, tok = 4, tiny["tok"]
    kw = dict(max_new_tokens=12, temperature=0.8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    shared = model_lib.generate(model, b["input_ids"], b["attention_mask"], b["input_features"],
                                b["feature_attention_mask"], num_samples=G, generator=torch.Generator().manual_seed(7),
                                **kw)
    rep = lambda x: x.repeat_interleave(G, 0)                                           # noqa: E731
    unshared = model_lib.generate(model, rep(b["input_ids"]), rep(b["attention_mask"]), rep(b["input_features"]),
                                  rep(b["feature_attention_mask"]), num_samples=1,
                                  generator=torch.Generator().manual_seed(7), **kw)
    for x, y in zip(shared, unshared):
        assert torch.equal(x, y)
    assert len({tuple(r) for r in shared[0].tolist()}) > 1          # the G samples differ from one another


def test_completion_logprobs_reuse_encoded_audio(tiny):
    # audio encoded once per prompt and its rows repeated for the G completions must give the same per-token
    # log-probs (at temperature T) as a plain forward over [prompt + completion] with the features repeated
    import model as model_lib
    model = model_lib.from_pretrained(tiny["policy"])
    b = _prompts(tiny, 2)
    G, tok, T = 3, tiny["tok"], 0.8
    tokens, lengths, _ = model_lib.generate(model, b["input_ids"], b["attention_mask"], b["input_features"],
                                            b["feature_attention_mask"], max_new_tokens=8, num_samples=G,
                                            temperature=1.0, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    batch = dict(b, tokens=tokens, lengths=lengths)
    rows = list(range(1, 2 * G))                                    # a micro-batch cutting across the two prompts
    audio = model.encode_audio(b["input_features"], b["feature_attention_mask"])
    inputs, cmask = train_grpo.micro_batch(batch, rows, G, model.audio_token_id, encoded=True)
    with torch.no_grad():
        got = train_grpo.CompletionLogprobs(model)(**inputs, temperature=T, audio_embeds=audio)
        # trainable-audio path: the micro-batch's features encoded inside forward
        inputs2, _ = train_grpo.micro_batch(batch, rows, G, model.audio_token_id, encoded=False)
        got2 = train_grpo.CompletionLogprobs(model)(**inputs2, temperature=T)
        p = torch.tensor(rows) // G
        ids = torch.cat([b["input_ids"][p], tokens[rows]], 1)
        mask = torch.cat([b["attention_mask"][p], completion_mask(lengths[rows], tokens.shape[1]).long()], 1)
        logits = model(ids, mask, input_features=b["input_features"][p],
                       feature_attention_mask=b["feature_attention_mask"][p])
        Tp = b["input_ids"].shape[1]
        ref = torch.log_softmax(logits[:, Tp - 1:-1] / T, -1).gather(-1, tokens[rows][..., None])[..., 0]
    C = got.shape[1]
    torch.testing.assert_close(got[cmask], ref[:, :C][cmask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got2[cmask], ref[:, :C][cmask], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------
# Short real runs: end to end, resume, and two gloo processes against one

def _metrics(out_dir):
    import json
    with open(f"{out_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_train_grpo_runs_and_resumes(tiny, tmp_path, monkeypatch):
    # a reward that varies with the completion (a random model never answers right) so advantages are non-zero
    import reward

    def fake_reward(completion, example, **opts):
        value = float(len(completion) % 3) / 2
        return value, {"reward": value, "answer": float(value == 1.0), "compaction": 0.0, "grounding": 0.0,
                       "hallucination": 0.0, "n_spans": 0, "parsed": 1.0}
    monkeypatch.setattr(reward, "total_reward", fake_reward)
    common = _run_config(init_from=tiny["policy"], train_data=tiny["qa"], device_batch_size=4, grad_accum=2,
                         eval_data=tiny["qa"], eval_n=2, beta=0.1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    evals = train_grpo.main(common + [f"--out_dir={straight}", "--num_steps=3"])
    assert set(evals) == {"before", "after"} and evals["after"]["n"] == 2
    train_grpo.main(common + [f"--out_dir={resumed}", "--num_steps=2"])
    train_grpo.main(common + [f"--out_dir={resumed}", "--num_steps=3"])        # picks up ckpt/latest at step 2
    with pytest.raises(ValueError, match=r"beta: 0.1 -> 0.2"):              # another recipe is refused
        train_grpo.main(common + [f"--out_dir={resumed}", "--num_steps=3", "--beta=0.2"])
    a, b = _metrics(straight), _metrics(resumed)
    steps = [r for r in a if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("reward", "reward_std", "kl", "grad_norm", "length_mean", "zero_spread", "truncated", "clip_low",
                "answer_mean", "compaction_mean", "spans", "gen_tok_per_s", "rollout_s", "update_s"):
        assert key in steps[-1]
    assert any(r["grad_norm"] > 0 for r in steps) and any(r["reward_std"] > 0 for r in steps)
    assert steps[0]["kl"] == 0.0                                   # policy == reference before the first update
    last_a = steps[-1]
    last_b = [r for r in b if r.get("step") == 3 and "loss" in r][-1]
    for key in ("loss", "reward", "kl", "grad_norm"):
        assert last_b[key] == pytest.approx(last_a[key], rel=1e-5, abs=1e-7)
    assert (straight / "ckpt" / "latest" / "meta.json").exists()
    assert (straight / "completions.jsonl").exists()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(tiny, tmp_path, strategy):
    # same global batch (2 prompts x G 4): one process with 2 micro-batches vs two processes with 1 each. The
    # reference is a different random model, so the KL term gives a non-zero loss and gradient to compare.
    import os
    import subprocess
    import sys
    common = _run_config(init_from=tiny["policy"], ref_from=tiny["ref"], train_data=tiny["qa"], num_steps=2,
                         device_batch_size=4, dump_every=0)
    train_grpo.main(common + [f"--out_dir={tmp_path / 'one'}", "--grad_accum=2"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", train_grpo.__file__,
           *common, f"--out_dir={tmp_path / 'two'}", "--grad_accum=1", f"--strategy={strategy}"]
    proc = subprocess.run(cmd, env=env, cwd=os.path.dirname(train_grpo.__file__), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a["loss"] != 0
        for key in ("loss", "kl", "grad_norm", "reward", "length_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key


@pytest.mark.parametrize("mode", ["drop", "resample"])
def test_zero_spread_modes(tiny, tmp_path, monkeypatch, mode):
    # half the prompts get a constant reward (zero spread), the others one that varies with the completion
    import reward

    def fake_reward(completion, example, **opts):
        flat = int(example["id"][-1]) % 2 == 0
        value = 0.5 if flat else float(len(completion) % 3) / 2
        return value, {"reward": value, "answer": 0.0, "compaction": 0.0, "grounding": 0.0, "hallucination": 0.0,
                       "n_spans": 0, "parsed": 0.0}
    monkeypatch.setattr(reward, "total_reward", fake_reward)
    train_grpo.main(_run_config(init_from=tiny["policy"], train_data=tiny["qa"], device_batch_size=4, grad_accum=4,
                                num_steps=1, zero_spread=mode, out_dir=tmp_path))
    (rec,) = _metrics(tmp_path)
    assert 0 < rec["zero_spread"] < 1 and rec["grad_norm"] > 0 and math.isfinite(rec["loss"])
