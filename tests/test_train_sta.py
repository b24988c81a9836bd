"""train_sta.py end to end on a tiny synthetic corpus (CPU, fp32): the loss goes down, the checkpoint loads
with model.from_pretrained + tokenizer.load_tokenizer, 2 gloo processes give the losses of 1 process with the
same global batch, a resumed run repeats the uninterrupted one, and a NaN loss stops the run."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import runlib  # noqa: E402
import train_sta  # noqa: E402

# a model small enough that a step takes well under a second on one core
TINY = ["--enc_dim=32", "--enc_layers=1", "--enc_heads=2", "--dec_dim=32", "--dec_layers=1", "--dec_heads=2",
        "--vocab_size=700", "--n_mels=80", "--eval_n=2", "--eval_batch_size=2", "--max_new_tokens=6",
        "--warmup_steps=1", "--lr=3e-3", "--min_lr=3e-4", "--reasoning_frac=0.2", "--seed=7"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import data
    out = str(tmp_path_factory.mktemp("corpus"))
    data.build_synth_corpus(out, seed=0, n=5, workers=1)
    return out


def args(corpus, out_dir, *extra):
    return [f"--data_dir={corpus}", f"--eval_data_dir={corpus}", "--synth_n=0", "--eval_synth_n=0",
            f"--out_dir={out_dir}", *TINY, *extra]


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["step"] for r in rows], [r["loss"] for r in rows], rows


def test_shipped_configs_parse():
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "sta_*.json")))
    assert {os.path.basename(p) for p in paths} >= {"sta_tiny.json", "sta_qwen2_5_omni.json",
                                                    "sta_audioflamingo3.json", "sta_qwen2_audio.json"}
    for path in paths:
        cfg = runlib.parse_config(train_sta.Config, ["--config", path])
        if "tiny" not in path:                                        # the paper's hyperparameters
            assert (cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.dtype) == (2e-5, 8, 4, "bfloat16")
    assert runlib.parse_config(train_sta.Config, ["--config", os.path.join(ROOT, "configs", "sta_tiny.json")]) \
        == train_sta.Config()                                         # the file is the built-in default


def test_tiny_run_learns_and_checkpoint_loads(corpus, tmp_path, capsys):
    import model as model_lib
    import tokenizer as tokenizer_lib
    out = str(tmp_path / "run")
    train_sta.main(args(corpus, out, "--max_steps=14", "--batch_size=4", "--eval_every=100", "--save_every=7"))
    steps, ls, rows = losses(out)
    assert steps == list(range(1, 15))
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3 - 0.3, ls
    assert all(r[f"{kind}_loss"] > 0 for r in rows for kind in ("align", "ground", "digit", "mention"))
    assert "eval_mean_iou" in rows[-1] and 0.0 <= rows[-1]["eval_mean_iou"] <= 1.0
    printed = capsys.readouterr().out
    assert "step 14/14 | loss " in printed and "| lr " in printed and "| grad " in printed and "tok/s" in printed
    latest = os.path.join(out, "ckpt", "latest")
    assert os.path.realpath(latest).endswith("step_000014")
    model = model_lib.from_pretrained(latest)
    tok = tokenizer_lib.load_tokenizer(latest)
    assert model.config["text_config"]["vocab_size"] == tok.vocab_size
    assert model.audio_token_id == tok.token_to_id("<|AUDIO|>")
    ids = tok.encode("starts at 1.55 seconds")                      # time pieces (the tiny default's tokenizer)
    assert tok.token_to_id("1.5") in ids and tok.decode(ids, skip_special_tokens=True) == "starts at 1.55 seconds"
    meta = runlib.load_meta(latest)
    assert meta["step"] == 14 and meta["data_position"] == 14 * 4 and meta["config"]["max_steps"] == 14


def test_each_grounding_loss_runs_alone(corpus, tmp_path):
    """The digit loss needs no time loss (its targets come from the same time pieces); a loss at weight 0 is
    neither computed nor logged."""
    out = str(tmp_path / "digits")
    train_sta.main(args(corpus, out, "--max_steps=2", "--batch_size=2", "--eval_every=100", "--save_every=100",
                        "--align_weight=0", "--ground_weight=0", "--mention_weight=0", "--digit_weight=0.5"))
    rows = losses(out)[2]
    assert all(r["digit_loss"] > 0 and not {"align_loss", "ground_loss", "mention_loss"} & set(r) for r in rows)


def test_resume_repeats_the_uninterrupted_run(corpus, tmp_path):
    common = ["--max_steps=5", "--batch_size=3", "--grad_accum=2", "--save_every=2", "--eval_every=100"]
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train_sta.main(args(corpus, full, *common))
    train_sta.main(args(corpus, split, *common, "--stop_at=2"))      # "interrupted" after the step-2 checkpoint
    assert runlib.latest_checkpoint(os.path.join(split, "ckpt")).endswith("step_000002")
    train_sta.main(args(corpus, split, *common))                      # the same command again resumes
    steps_full, loss_full, rows_full = losses(full)
    steps_split, loss_split, rows_split = losses(split)
    assert steps_full == steps_split == [1, 2, 3, 4, 5]
    assert loss_full == loss_split
    assert [r["grad_norm"] for r in rows_full] == [r["grad_norm"] for r in rows_split]
    # the same out_dir under another recipe is refused before anything loads; run settings may change
    with pytest.raises(ValueError, match=r"other settings[\s\S]*lr: 0.003 -> 0.001[\s\S]*max_steps: 5 -> 8"):
        train_sta.main(args(corpus, split, *common, "--lr=1e-3", "--max_steps=8"))
    train_sta.main(args(corpus, split, *common, "--eval_every=50", "--keep_last=3", "--log_every=2"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(corpus, tmp_path, strategy):
    """Global batch 8: 1 process x 2 micro-steps of 4 vs 2 gloo processes x 1 micro-step of 4 (DDP or FSDP2)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = ["--max_steps=3", "--batch_size=4", "--eval_every=100", "--save_every=3"]
    train_sta.main(args(corpus, one, *common, "--grad_accum=2"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_sta.py"), *args(corpus, two, *common, "--grad_accum=1", f"--strategy={strategy}")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, loss_one, rows_one = losses(one)
    _, loss_two, rows_two = losses(two)
    assert len(loss_two) == 3
    assert loss_two == pytest.approx(loss_one, abs=1e-5)
    assert [r["grad_norm"] for r in rows_two] == pytest.approx([r["grad_norm"] for r in rows_one], abs=1e-5)
    assert len(runlib.load_meta(os.path.join(two, "ckpt", "latest"))["rng"]) == 2


def test_nan_loss_stops_naming_step_and_batch(corpus, tmp_path, monkeypatch):
    out = str(tmp_path / "nan")
    forward = train_sta.SFTLoss.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        calls["n"] += 1
        loss, *rest = forward(self, *a, **k)
        return (loss * float("nan") if calls["n"] == 3 else loss), *rest      # the 3rd micro-batch = step 3

    monkeypatch.setattr(train_sta.SFTLoss, "forward", poisoned)
    with pytest.raises(runlib.NonFiniteError, match=r"non-finite loss \(nan\) at step 3, batch at data position 8"):
        train_sta.main(args(corpus, out, "--max_steps=6", "--batch_size=4", "--save_every=2", "--eval_every=100"))
    latest = runlib.latest_checkpoint(os.path.join(out, "ckpt"))
    assert latest.endswith("step_000002") and runlib.load_meta(latest)["step"] == 2
    assert torch.isfinite(torch.tensor(losses(out)[1])).all()


def test_freeze_and_activation_checkpointing(corpus, tmp_path):
    """Activation checkpointing does not change the numbers; a frozen encoder stays at its initial values."""
    import model as model_lib
    import tokenizer as tokenizer_lib
    common = ["--max_steps=2", "--batch_size=4", "--eval_every=100", "--save_every=2", "--freeze_encoder=true"]
    plain, ckpt = str(tmp_path / "plain"), str(tmp_path / "ac")
    train_sta.main(args(corpus, plain, *common))
    train_sta.main(args(corpus, ckpt, *common, "--activation_checkpointing=true"))
    assert losses(plain)[1] == pytest.approx(losses(ckpt)[1], abs=1e-6)
    cfg = runlib.parse_config(train_sta.Config, args(corpus, plain, *common))
    torch.manual_seed(cfg.seed)                                       # main() builds the model right after seeding
    init = model_lib.build_lalm(train_sta.tiny_config(cfg, tokenizer_lib.load_tokenizer(f"{plain}/tokenizer.model")))
    trained = model_lib.from_pretrained(os.path.join(ckpt, "ckpt", "latest"))
    for (name, p0), p1 in zip(init.audio_tower.named_parameters(), trained.audio_tower.parameters()):
        assert torch.equal(p0, p1), name
    assert not torch.equal(init.multi_modal_projector.linear.weight, trained.multi_modal_projector.linear.weight)


def test_without_timestamps_ablation_mix():
    """The 'reasoning SFT without timestamps' mix: STA pairs gone, no time left in any target, same size."""
    import train_sta
    mix = [{"audio": "a.wav", "question": "What is the timestamp of the following segment? x",
            "answer": "The segment x starts at 1.00 seconds and ends at 2.00 seconds."},
           {"audio": "a.wav", "question": "Which?", "choices": ["x", "y"], "answer": "x",
            "reasoning": 'From 1.20s to 1.85s, the second speaker says "the blue whale". From 1.90s to 2.10s, the '
                         'second speaker says "sings".\nFinal answer: (a) x'},
           {"audio": "a.wav", "question": train_sta.TRANSCRIBE_QUESTION, "answer": "i 0.35 see 0.50 a 0.78"}]
    out = train_sta.without_timestamps(mix)
    assert len(out) == len(mix)
    texts = [e.get("reasoning", e["answer"]) for e in out]
    assert 'The second speaker says "the blue whale". The second speaker says "sings".\nFinal answer: (a) x' in texts
    assert "i see a" in texts
    assert not any(ch.isdigit() for t in texts for ch in t)


@pytest.fixture(scope="module")
def tiny_lalm(corpus, tmp_path_factory):
    import data
    import model as model_lib
    import tokenizer as tokenizer_lib
    examples = train_sta.load_examples(corpus, 0.2, 0.25, seed=0)
    texts = [data.prompt_text(e) + " " + data.target_text(e) for e in examples]
    tok = tokenizer_lib.train_sentencepiece(texts * 3, str(tmp_path_factory.mktemp("tok")), vocab_size=700,
                                            text_pieces=tokenizer_lib.TIME_PIECES)
    cfg = runlib.parse_config(train_sta.Config, TINY)
    torch.manual_seed(0)
    return model_lib.build_lalm(train_sta.tiny_config(cfg, tok)), tok, examples


def test_packed_rows_give_the_loss_and_gradients_of_separate_rows(corpus, tiny_lalm):
    """collate_packed (one row per clip, examples as branches behind one copy of the audio) is an exact
    rewrite of collate_sft: same summed loss, same alignment loss, same grounding losses (times, digits, mentions),
    same gradients (fp32, 1e-5 relative)."""
    import data
    import tokenizer as tokenizer_lib
    model, tok, examples = tiny_lalm
    units = train_sta.training_units(examples, pack=True)
    assert sorted(i for u in units for i in u) == list(range(len(examples)))
    assert all(len({examples[i]["audio"] for i in u}) == 1 for u in units) and max(map(len, units)) > 3
    groups = [[examples[i] for i in u] for u in units[:3]]
    words_of = train_sta.word_times(corpus, tok)
    step = train_sta.SFTLoss(model, {"ground": (-1, 1), "digit": (-1, 0), "mention": (0, 1)})
    time_ids = torch.tensor([tok.token_to_id(p) for p in tokenizer_lib.TIME_PIECES])
    stop = train_sta.stop_words()

    def run(batch, firsts, groups):
        labels = train_sta.align_labels(firsts, batch["input_ids"], model.audio_token_id, words_of)
        skips = data.Skips("ground")
        targets = dict(zip(("ground", "digit"), train_sta.ground_targets(
            groups, batch["input_ids"], batch["loss_mask"], model.audio_token_id, time_ids, 0.12, skips)))
        targets["mention"] = train_sta.mention_targets(groups, batch["input_ids"], model.audio_token_id, words_of,
                                                       tok, stop)
        assert len(skips) == 0 and all(len(v) > 10 for v in targets.values())
        loss, aux = step(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], batch["input_features"],
                         batch["feature_attention_mask"], labels, batch.get("position_ids"), targets)
        grounding = tuple(aux[k].item() for k in ("ground", "digit", "mention"))
        return loss.item(), aux["align"].item(), grounding, tuple(len(v) for v in targets.values())

    packed = data.collate_packed(groups, tok, "qwen2_audio", 80, False)
    flat = [ex for g in groups for ex in g]
    separate = data.collate_sft(flat, tok, "qwen2_audio", 80, False)
    assert packed["input_ids"].shape[0] == 3 and separate["input_ids"].shape[0] == len(flat)
    assert packed["loss_mask"].sum() == separate["loss_mask"].sum()
    assert packed["token_mask"].sum() < 0.7 * separate["attention_mask"].sum()      # the audio once per clip
    loss_p, align_p, ground_p, n_p = run(packed, [g[0] for g in groups], groups)
    loss_s, align_s, ground_s, n_s = run(separate, flat, [[ex] for ex in flat])
    assert loss_p == pytest.approx(loss_s, rel=1e-5)
    assert n_p == n_s and ground_p == pytest.approx(ground_s, rel=1e-5)     # every time, digit and mention,
                                                                            # packed or not
    # alignment: each clip's frames count once packed, once per example in separate rows
    per_clip = [run(data.collate_packed([g], tok, "qwen2_audio", 80, False), [g[0]], [g])[1] for g in groups]
    assert align_p == pytest.approx(sum(per_clip), rel=1e-5)
    assert align_s == pytest.approx(sum(len(g) * a for g, a in zip(groups, per_clip)), rel=1e-5)
    for gp, gs in zip(answer_grads(step, packed), answer_grads(step, separate)):  # fp32 sums in another order
        assert (gp - gs).abs().max() <= 1e-5 * gs.abs().max() + 1e-7


def answer_grads(step, batch):
    step.model.zero_grad()
    loss, *_ = step(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], batch["input_features"],
                      batch["feature_attention_mask"], None, batch.get("position_ids"))
    loss.backward()
    return [p.grad.clone() for p in step.model.parameters()]


def test_align_labels_mark_the_word_under_each_audio_token():
    """Token k covers [0.04 k, 0.04 (k + 1)); its label is the word at its centre, -100 in silence."""
    ex = {"audio": "/x/a.wav"}
    ids = torch.tensor([[1, 5, 5, 5, 5, 5, 5, 5, 5, 2]])                 # 8 audio tokens (id 5) = 0.32 s
    words = {os.path.abspath("/x/a.wav"): [((7, 8), 0.05, 0.13, "xy"), ((9,), 0.14, 0.30, "z")]}   # (ids, s, e, w)
    labels = train_sta.align_labels([ex], ids, 5, words)
    # centres 0.02 0.06 0.10 0.14 0.18 0.22 0.26 0.30
    assert labels.tolist() == [-100, 7, 7, 9, 9, 9, 9, -100]
    assert train_sta.align_labels([{"audio": "/other.wav"}], ids, 5, words).tolist() == [-100] * 8


def test_ground_targets_point_each_time_at_its_audio(tiny_lalm):
    """The position before each time piece (start, end or word onset) should attend to the audio tokens whose
    centres lie in [t, t + 0.12), the piece itself (predicting the digit) to the one token whose centre is the
    first at or after t; a row whose time pieces do not match its answers' times is skipped and counted."""
    import data
    import tokenizer as tokenizer_lib
    model, tok, _ = tiny_lalm
    audio_id = model.audio_token_id
    time_ids = torch.tensor([tok.token_to_id(p) for p in tokenizer_lib.TIME_PIECES])
    sta = {"audio": "a.wav", "question": "q",
           "answer": "The segment x starts at 0.20 seconds and ends at 0.36 seconds."}
    words = {"audio": "a.wav", "question": train_sta.TRANSCRIBE_QUESTION, "answer": "i 0.08 see 0.50"}
    last = {"audio": "a.wav", "question": "q",
            "answer": "The segment y starts at 0.60 seconds and ends at 0.80 seconds."}   # ends the 0.8 s clip
    rows, masks = [], []
    for ex in (sta, words, sta, last):
        answer = tok.encode(ex["answer"])
        rows.append([1] + [audio_id] * 20 + answer)               # audio tokens at positions 1..20 (0.8 s)
        masks.append([False] * 21 + [True] * len(answer))
    rows[2] = rows[2][:-3] + [tok.token_to_id("9.9")] + rows[2][-2:]   # an extra time piece: does not match
    n = max(map(len, rows))
    ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
    mask = torch.tensor([m + [False] * (n - len(m)) for m in masks])
    skips = data.Skips("ground")
    times, digits = train_sta.ground_targets([[sta], [words], [sta], [last]], ids, mask, audio_id, time_ids, 0.12,
                                             skips)
    pieces = [[i for i in range(n) if mask[b, i] and int(ids[b, i]) in time_ids.tolist()] for b in range(4)]
    assert [tok.decode([int(ids[0, i])]) for i in pieces[0]] == ["0.2", "0.3"]
    # centres (k + 0.5) * 0.04 of audio token k (position k + 1): start 0.20 -> k 5..7, end 0.36 -> k 9..11;
    # onsets 0.08 -> k 2..4, 0.50 -> k 12..14
    # the end 0.80 has no audio token from t on: read from the clip's last tokens [0.68, 0.80) -> k 17..19, no digit
    assert times.tolist() == [[0, pieces[0][0] - 1, 6, 9], [0, pieces[0][1] - 1, 10, 13],
                              [1, pieces[1][0] - 1, 3, 6], [1, pieces[1][1] - 1, 13, 16],
                              [3, pieces[3][0] - 1, 16, 19], [3, pieces[3][1] - 1, 18, 21]]
    # digits: 0.20 -> k 5 (starts at 0.20 s), 0.36 -> k 9 (0.36 s), 0.08 -> k 2 (0.08 s), 0.50 -> k 12 (centre
    # 0.50 s, starts at 0.48 s: the time embedding names it "0.4" "8")
    assert digits.tolist() == [[0, pieces[0][0], 6, 7], [0, pieces[0][1], 10, 11],
                               [1, pieces[1][0], 3, 4], [1, pieces[1][1], 13, 14], [3, pieces[3][0], 16, 17]]
    assert skips.counts == {"time pieces != answer times": 1} and skips.total == 4


def test_ground_loss_is_minus_log_attention_mass_on_the_target_audio(corpus, tiny_lalm):
    """SFTLoss's grounding losses (one head's q and k computed again in a hook: times in the last layer, mentions
    in the first of two) equal -log of the mass that the model's explicit attention path (output_attentions)
    puts on each target's keys, summed; and their gradients reach the encoder through the audio tokens."""
    import data
    import model as model_lib
    import tokenizer as tokenizer_lib
    _, tok, examples = tiny_lalm
    torch.manual_seed(1)
    model = model_lib.build_lalm(train_sta.tiny_config(runlib.parse_config(train_sta.Config,
                                                                             [*TINY, "--dec_layers=2"]), tok))
    units = train_sta.training_units(examples, pack=True)
    groups = [[examples[i] for i in u] for u in units[:2]]
    batch = data.collate_packed(groups, tok, "qwen2_audio", 80, False)
    time_ids = torch.tensor([tok.token_to_id(p) for p in tokenizer_lib.TIME_PIECES])
    targets = dict(zip(("ground", "digit"), train_sta.ground_targets(
        groups, batch["input_ids"], batch["loss_mask"], model.audio_token_id, time_ids, 0.12, data.Skips("ground"))))
    targets["mention"] = train_sta.mention_targets(groups, batch["input_ids"], model.audio_token_id,
                                                   train_sta.word_times(corpus, tok), tok, train_sta.stop_words())
    assert all(len(v) > 5 for v in targets.values())
    heads = {"ground": (-1, 1), "digit": (-1, 0), "mention": (0, 1)}
    step = train_sta.SFTLoss(model, heads)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"], batch["input_features"],
              batch["feature_attention_mask"], None, batch["position_ids"])
    for kind in heads:
        model.zero_grad()
        _, aux = step(*inputs, {kind: targets[kind]})
        assert [k for k, v in aux.items() if v.item() != 0] == [kind]
        aux[kind].backward()
        assert model.audio_tower.conv1.weight.grad.abs().sum() > 0
    _, aux = step(*inputs, targets)
    with torch.no_grad():
        _, attentions = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"], input_features=batch["input_features"],
                              feature_attention_mask=batch["feature_attention_mask"], output_attentions=True)
    for kind, (layer, head) in heads.items():
        probs = attentions[layer][:, head]                            # (B, T, T)
        expected = -sum(torch.log(probs[b, q, lo:hi].sum()) for b, q, lo, hi in targets[kind].tolist())
        assert aux[kind].item() == pytest.approx(expected.item(), rel=1e-5)
    # without targets the losses are zero and the hooks do nothing
    assert [x.item() for x in step(*inputs)[1].values()] == [0.0] * 4
    with pytest.raises(ValueError, match="mention layer 2 not in"):
        train_sta.SFTLoss(model, {"mention": (2, 0)})
    with pytest.raises(ValueError, match="digit head 2 not in"):
        train_sta.SFTLoss(model, {"digit": (-1, 2)})
    with pytest.raises(ValueError, match=r"targets for \['digit'\]"):
        train_sta.SFTLoss(model, {"ground": (-1, 0)})(*inputs, {"digit": targets["digit"]})


def test_mention_targets_point_each_mention_at_its_word(tiny_lalm):
    """A word spoken once in the clip, mentioned in the question or the answer, should attend from its last
    token to the audio tokens whose centres lie in its [start, end); a word spoken twice, a stop word ("and",
    also in "seconds and ends at") and a match that goes on into a longer word are not mentions."""
    model, tok, _ = tiny_lalm
    audio_id = model.audio_token_id
    words_of = {os.path.abspath("a.wav"): [(tuple(tok.encode(" " + w)), s, e, w) for w, s, e in
                                           [("gold", 0.1, 0.3), ("cat", 0.3, 0.5), ("and", 0.5, 0.6),
                                            ("dog", 0.6, 0.65), ("dog", 0.65, 0.7), ("red", 0.7, 0.8)]]}
    text = "say gold cat and dog dog reddish? The segment gold cat starts at 0.10 seconds and ends at 0.50 seconds."
    ids = [1] + [audio_id] * 20 + tok.encode(text)                   # audio tokens at positions 1..20 (0.8 s)
    assert tok.encode(" reddish")[:len(tok.encode(" red"))] == tok.encode(" red")   # "red" matches, then goes on

    def ends(w):                                                      # the last token of each mention of w
        seq = tok.encode(" " + w)
        return [i + len(seq) - 1 for i in range(21, len(ids)) if ids[i:i + len(seq)] == seq]
    assert len(ends("gold")) == len(ends("cat")) == len(ends("and")) == 2
    # centres (k + 0.5) * 0.04 of audio token k (position k + 1): gold [0.1, 0.3) -> k 2..6, cat [0.3, 0.5) -> 7..11,
    # and [0.5, 0.6) -> k 12..14
    want = [[0, i, 3, 8] for i in ends("gold")] + [[0, i, 8, 13] for i in ends("cat")]
    got = train_sta.mention_targets([[{"audio": "a.wav"}]], torch.tensor([ids]), audio_id, words_of, tok,
                                    train_sta.stop_words())
    assert got.tolist() == sorted(want)
    no_stop = train_sta.mention_targets([[{"audio": "a.wav"}]], torch.tensor([ids]), audio_id, words_of, tok)
    assert no_stop.tolist() == sorted(want + [[0, i, 13, 16] for i in ends("and")])
    assert train_sta.mention_targets([[{"audio": "other.wav"}]], torch.tensor([ids]), audio_id, words_of,
                                     tok).shape == (0, 4)
    assert {"and", "the", "segment", "seconds", "has"} <= train_sta.stop_words()


def test_audio_time_embedding_adds_each_audio_tokens_start_time(tiny_lalm, tmp_path):
    """model.LALM.audio_time_rows: audio token k of each run of placeholders gets scale x the input embeddings
    of the time piece and the hundredths digit of its start 0.04 k s; text tokens get nothing; the config key
    survives a save/load; a digit list that is not ten tokens is refused."""
    import model as model_lib
    import tokenizer as tokenizer_lib
    model, tok, _ = tiny_lalm
    assert model.time_embedding["scale"] == 10.0                      # the tiny default's
    a = model.audio_token_id
    t = tok.token_to_id("1.5")                                         # any text token
    ids = torch.tensor([[t] + [a] * 9 + [t, t] + [a] * 3])           # two clips: 9 and 3 audio tokens
    audio = torch.randn(12, model.language_model.c["dim"])
    with torch.no_grad():
        got = model.embed(ids, audio_embeds=audio)
        model.time_embedding = None
        plain = model.embed(ids, audio_embeds=audio)
        model.time_embedding = model.config["audio_time_embedding"]
    # starts 0.00, 0.04, 0.08, 0.12, ... s; the second clip starts again at 0
    times = ["0.00", "0.04", "0.08", "0.12", "0.16", "0.20", "0.24", "0.28", "0.32", "0.00", "0.04", "0.08"]
    E = model.language_model.embed_tokens.weight
    added = torch.stack([10.0 * (E[tok.token_to_id(s[:3])] + E[tok.token_to_id(s[3])]) for s in times])
    assert [tok.decode([i]) for i in tok.encode("0.28")] == ["0.2", "8"]         # how an answer writes it
    slots = ids[0] == a
    assert torch.allclose(got[0, slots] - plain[0, slots], added, atol=1e-6)
    assert torch.equal(got[0, ~slots], plain[0, ~slots])
    assert tokenizer_lib.TIME_PIECES[3] == "0.3"
    # a config without digits (sessions 10-11's checkpoints): the piece of each token's centre, as trained
    model.time_embedding = {k: v for k, v in model.config["audio_time_embedding"].items() if k != "digit_token_ids"}
    with torch.no_grad():
        old = model.embed(ids, audio_embeds=audio)
    model.time_embedding = model.config["audio_time_embedding"]
    centres = ["0.0", "0.0", "0.1", "0.1", "0.1", "0.2", "0.2", "0.3", "0.3", "0.0", "0.0", "0.1"]  # 0.02, 0.06 ..
    assert torch.allclose(old[0, slots] - plain[0, slots], torch.stack([10.0 * E[tok.token_to_id(p)] for p in centres]),
                          atol=1e-6)
    model_lib.save_pretrained(model, str(tmp_path / "m"))
    assert model_lib.from_pretrained(str(tmp_path / "m")).time_embedding == model.time_embedding
    config = json.load(open(tmp_path / "m" / "config.json"))
    config["audio_time_embedding"]["digit_token_ids"] = config["audio_time_embedding"]["digit_token_ids"][:9]
    with pytest.raises(ValueError, match="digit_token_ids must be the 10 tokens"):
        model_lib.build_lalm(config)
