"""eval.py model-based commands end to end on a tiny random LALM: sta / qa / benchmark result files /
attention / tables, resumable item files, and the attention block split (sums to 1, exact block lengths,
phases from the characters a token writes)."""
import json
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)
import data as D  # noqa: E402
import eval as E  # noqa: E402
import model as M  # noqa: E402
import tokenizer as T  # noqa: E402
from reward import compaction_reward  # noqa: E402

FAMILY = "qwen2_audio"
REASONING = 'From 1.31s to 1.71s, the speaker says "small".\nFinal answer: (b) small'


def tiny_checkpoint(path, tok, tok_file, seed):
    """A random tiny qwen2_audio LALM saved like train_sta.py saves one (weights, tokenizer, meta.json)."""
    torch.manual_seed(seed)
    config = {"model_type": "qwen2_audio", "audio_token_index": tok.token_to_id("<|AUDIO|>"),
              "audio_config": dict(num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=4,
                                   encoder_ffn_dim=64, max_source_positions=1500),
              "text_config": dict(model_type="qwen2", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  rms_norm_eps=1e-5, tie_word_embeddings=True)}
    model = M.build_lalm(config)
    with torch.no_grad():          # sharper than the 0.02 init, so attention is far from uniform
        for p in model.language_model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    M.save_pretrained(model, str(path))
    shutil.copy(tok_file, path / "tokenizer.model")
    (path / "meta.json").write_text(json.dumps({"config": {"family": FAMILY, "pad_to_30s": False}, "step": 0}))
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalmodel")
    corpus = root / "synth"
    D.build_synth_corpus(str(corpus), seed=5, n=6, workers=1)
    recs = [json.loads(line) for f in ("sta.jsonl", "qa.jsonl") for line in (corpus / f).read_text().splitlines()]
    texts = [T.build_prompt(FAMILY, D.prompt_text(r), 1) + D.target_text(r) + T.end_of_turn(FAMILY) for r in recs]
    tok = T.train_sentencepiece(texts * 3 + [REASONING], str(root / "tok"), vocab_size=400)
    tok_file = root / "tok" / "tokenizer.model"
    return {"root": root, "sta": str(corpus / "sta.jsonl"), "qa": str(corpus / "qa.jsonl"), "tok": tok,
            "ck1": tiny_checkpoint(root / "ck1", tok, tok_file, 1),
            "ck2": tiny_checkpoint(root / "ck2", tok, tok_file, 2)}


FAST = ["--max-new-tokens", "12", "--batch-size", "3", "--device", "cpu"]


def test_sta_end_to_end(env, tmp_path):
    out = tmp_path / "sta.json"
    E.main(["sta", "--checkpoint", env["ck1"], "--manifest", env["sta"], "--out", str(out), "--limit", "5", *FAST])
    res = json.loads(out.read_text())
    for key in ("n", "mean_iou", "iou_ge_0_5", "iou_ge_0_7", "sed_f1", "parse_fail_rate", "settings", "items", "run"):
        assert key in res, key
    assert res["n"] == 5 and len(res["items"]) == 5
    assert res["settings"]["t_collar"] == 0.2 and res["settings"]["percentage_of_length"] == 0.2
    assert res["run"]["family"] == FAMILY and res["run"]["pad_to_30s"] is False
    item = res["items"][0]
    assert {"prediction", "gt", "pred_span", "iou"} <= set(item) and 0.0 <= item["iou"] <= 1.0
    # the aggregate is the pure metric over the stored predictions
    m = E.sta_metrics([i["prediction"] for i in res["items"]], [i["gt"] for i in res["items"]])
    assert m["mean_iou"] == res["mean_iou"] and m["parse_fail_rate"] == res["parse_fail_rate"]
    lines = (tmp_path / "sta.json.items.jsonl").read_text().splitlines()
    assert "_settings" in json.loads(lines[0]) and len(lines) == 6


def test_qa_end_to_end_and_resume(env, tmp_path, monkeypatch):
    calls = []
    real_generate = M.generate

    def counting_generate(model, input_ids, *a, **k):
        calls.append(input_ids.shape[0])
        return real_generate(model, input_ids, *a, **k)

    monkeypatch.setattr(E.model_lib, "generate", counting_generate)
    out = tmp_path / "qa.json"
    args = ["qa", "--checkpoint", env["ck1"], "--manifest", env["qa"], "--out", str(out), *FAST]
    E.main(args + ["--limit", "2"])
    assert sum(calls) == 2
    items_file = tmp_path / "qa.json.items.jsonl"
    rows = [json.loads(line) for line in items_file.read_text().splitlines()]
    # plant a marker in a finished item: a resumed run must keep it, not recompute it
    rows[1]["prediction"] = "MARKER"
    items_file.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"key": "torn')   # + a torn last line
    calls.clear()
    E.main(args + ["--limit", "4"])
    assert sum(calls) == 2                                  # only the two new items were decoded
    res = json.loads(out.read_text())
    assert res["n"] == 4 and res["items"][0]["prediction"] == "MARKER"
    assert [i["key"] for i in res["items"]] == [json.loads(line)["id"] for line in open(env["qa"])][:4]
    for key in ("accuracy", "mean_r_tg", "regions_explored", "span_iou", "evidence_iou", "consistency",
                "audio_verify", "parsed_rate", "methods"):
        assert key in res, key
    assert res["span_iou_n"] == 4                           # synth records carry transcript segments
    item = res["items"][2]
    assert {"prediction", "choice_index", "correct", "spans", "r_tg", "consistency", "audio_verify"} <= set(item)
    calls.clear()
    E.main(args + ["--limit", "4"])                         # all done: nothing decoded
    assert calls == []
    # another setting is refused with a message, --restart starts over
    with pytest.raises(SystemExit, match="other settings"):
        E.main(["qa", "--checkpoint", env["ck2"], "--manifest", env["qa"], "--out", str(out), *FAST])
    E.main(args + ["--limit", "1", "--restart"])
    assert json.loads(out.read_text())["n"] == 1 and sum(calls) == 1


def test_commands_on_oracle_completions(env, tmp_path, monkeypatch):
    """sta / qa wiring with the decoder replaced by an oracle that writes the reference texts: perfect scores."""
    def oracle(ck, records, max_new_tokens):
        return [{"text": D.target_text(r), "ids": [], "n_tokens": 1, "truncated": False} for r in records]

    monkeypatch.setattr(E, "decode_greedy", oracle)
    E.main(["sta", "--checkpoint", env["ck1"], "--manifest", env["sta"], "--out", str(tmp_path / "s.json"), *FAST])
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["n"] == 24 and res["mean_iou"] == 1.0 and res["sed_f1"] == 1.0 and res["iou_ge_0_7"] == 1.0
    assert res["parse_fail_rate"] == 0.0
    E.main(["qa", "--checkpoint", env["ck1"], "--manifest", env["qa"], "--out", str(tmp_path / "q.json"), *FAST])
    res = json.loads((tmp_path / "q.json").read_text())
    recs = D.load_examples(env["qa"], kind="qa", check_audio=False)
    ks = [len(E.extract_spans(r["reasoning"])) for r in recs]       # the reference cites 1..3 pieces
    assert res["accuracy"] == 100.0 and res["regions_explored"] == pytest.approx(sum(ks) / len(ks))
    assert res["mean_r_tg"] == pytest.approx(sum(compaction_reward(k) for k in ks) / len(ks))
    # a piece of the evidence overlaps the evidence by its own share of it
    pieces = [[(e - s) / (r["evidence"][0][1] - r["evidence"][0][0]) for s, e in E.extract_spans(r["reasoning"])]
              for r in recs]
    assert res["audio_verify"] == 1.0 and res["consistency"] == 1.0
    assert res["evidence_iou"] == pytest.approx(sum(sum(p) / len(p) for p in pieces) / len(pieces), abs=1e-6)
    assert res["audio_verify_n"] == res["consistency_n"] == res["n"] == 6


def test_qa_scores_reference_reasoning(env):
    """The per-item scoring on known completions: the corpus's reference reasoning is right, grounded and
    verified; a wrong span loses span IoU and audio verification."""
    recs = D.load_examples(env["qa"], kind="qa", check_audio=False)
    words = E.load_words_index(env["qa"])
    assert set(words) == {os.path.realpath(r["audio"]) for r in recs}
    for r in recs:
        item = E.qa_item("k", r, {"text": r["reasoning"], "n_tokens": 1, "truncated": False}, words)
        k = len(E.extract_spans(r["reasoning"]))
        assert item["correct"] == 1 and item["r_tg"] == compaction_reward(k) and item["regions_explored"] == k
        assert (item["evidence_iou"] == 1.0) if k == 1 else (0.0 < item["evidence_iou"] < 1.0)
        assert item["consistency"] == 1.0
        assert item["audio_verify"] == 1.0 and item["span_iou"] > 0.0
    r = recs[0]
    s, e = E.extract_spans(r["reasoning"])[0]
    shifted = r["reasoning"].replace(f"From {s:.2f}s to {e:.2f}s", f"From {s + 5:.2f}s to {e + 5:.2f}s")
    bad = E.qa_item("k", r, {"text": shifted, "n_tokens": 1, "truncated": False}, words)
    assert bad["audio_verify"] == 0.0 and bad["evidence_iou"] == 0.0


def test_benchmark_result_files(env, tmp_path):
    recs = D.load_examples(env["qa"], kind="qa", check_audio=False)
    (tmp_path / "test-mini-audios").mkdir()
    mmau = []
    for i, r in enumerate(recs[:2]):
        shutil.copy(r["audio"], tmp_path / "test-mini-audios" / f"{i}.wav")
        mmau.append({"id": f"id{i}", "audio_id": f"./test-mini-audios/{i}.wav", "question": r["question"],
                     "choices": r["choices"], "answer": r["answer"], "dataset": "synthetic", "task": "speech",
                     "split": "test-mini", "category": "Information Extraction", "sub-category": "Counting",
                     "difficulty": "easy"})
    mmau.append(dict(mmau[0], id="sound", task="sound"))                          # not speech: not read
    (tmp_path / "mmau.json").write_text(json.dumps(mmau))
    out = tmp_path / "mmau_result.json"
    E.main(["qa", "--benchmark", "mmau", "--checkpoint", env["ck1"], "--manifest", str(tmp_path / "mmau.json"),
            "--out", str(out), *FAST])
    res = json.loads(out.read_text())
    assert res["n"] == 2 and set(res["breakdown"]) == {"total", "task", "difficulty", "category", "sub-category"}
    official = json.loads((tmp_path / "mmau_result.official.json").read_text())
    assert [o["id"] for o in official] == ["id0", "id1"]
    assert all({"model_prediction", "model_output"} <= set(o) for o in official)
    assert res["official_score"]["total"]["n"] == 2

    task = tmp_path / "Speaker_Number_Verification_voxceleb1"
    task.mkdir()
    shutil.copy(recs[0]["audio"], task / "a.wav")
    meta = [{"path": "a.wav", "question": "How many speakers?", "choice_a": "1", "choice_b": "2", "choice_c": "3",
             "choice_d": "4", "answer_gt": "2", "task_name": "Speaker_Number_Verification",
             "dataset_name": "voxceleb1", "uniq_id": 7},
            {"path": "missing.wav", "question": "How many speakers?", "choice_a": "1", "choice_b": "2",
             "answer_gt": "2", "task_name": "Speaker_Number_Verification", "dataset_name": "voxceleb1", "uniq_id": 8}]
    (tmp_path / "Foundation_meta.json").write_text(json.dumps(meta))
    out = tmp_path / "air.json"
    E.main(["qa", "--benchmark", "airbench", "--checkpoint", env["ck1"], "--manifest",
            str(tmp_path / "Foundation_meta.json"), "--out", str(out), *FAST])
    res = json.loads(out.read_text())
    assert res["n"] == 1 and res["n_audio_errors"] == 1                  # the missing clip is recorded, not fatal
    assert "missing.wav" in res["items"][1]["error"]
    lines = [json.loads(line) for line in (tmp_path / "air.official.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["uniq_id"] == 7 and lines[0]["response"] in ("", "A", "B", "C", "D")
    shutil.copy(recs[1]["audio"], task / "missing.wav")                  # fixed: a re-run retries that item only
    E.main(["qa", "--benchmark", "airbench", "--checkpoint", env["ck1"], "--manifest",
            str(tmp_path / "Foundation_meta.json"), "--out", str(out), *FAST])
    res = json.loads(out.read_text())
    assert res["n"] == 2 and res["n_audio_errors"] == 0
    assert res["official_score"]["fail"] + res["official_score"]["total"]["n"] == 2


# ---------------------------------------------------------------------------------------------
# Attention analysis

def test_prompt_blocks_match_template(env):
    tok = env["tok"]
    audio_id = tok.token_to_id("<|AUDIO|>")
    q = "Which word? (a) x"
    ids = tok.encode(T.build_prompt(FAMILY, q, 7))
    blocks = E.prompt_blocks(ids, tok, audio_id)
    system = tok.encode(f"<|im_start|>system\n{T.DEFAULT_SYSTEM[FAMILY]}<|im_end|>\n")
    assert blocks.count(0) == len(system) and blocks[:len(system)] == [0] * len(system)
    assert blocks.count(1) == 7 and blocks.count(2) == len(ids) - len(system) - 7
    with pytest.raises(ValueError, match="user"):
        E.prompt_blocks(tok.encode("<|im_start|>system\nhi<|im_end|>\n"), tok, audio_id)


def test_token_phases(env):
    tok = env["tok"]
    ids = tok.encode(REASONING)
    phases = E.token_phases(tok, ids, ["fast", "small", "new", "old"])
    pick = lambda name: tok.decode([i for i, p in zip(ids, phases) if name in p])  # noqa: E731
    assert pick("timestamp") == "1.311.71"
    assert pick("answer").strip() == "Final answer: (b) small"
    assert pick("reasoning").strip() == 'From 1.31s to 1.71s, the speaker says "small".'
    assert all("all" in p for p in phases)
    sta = "The segment a small pen starts at 1.24 seconds and ends at 2.25 seconds."
    ids = tok.encode(sta)
    phases = E.token_phases(tok, ids)
    assert not any("answer" in p for p in phases)                           # one line, no option: no answer phase
    assert tok.decode([i for i, p in zip(ids, phases) if "timestamp" in p]) == "1.242.25"


def test_block_attention_sums_to_one(env):
    ck = E.Checkpoint(env["ck1"], device="cpu")
    rec = D.load_examples(env["qa"], kind="qa", check_audio=False)[0]
    ids = env["tok"].encode(rec["reasoning"])
    sums, lengths = E.block_attention(ck, rec, ids)
    L, N = len(ck.model.language_model.layers), len(ids)
    assert sums.shape == (L, N, 4) and lengths.shape == (N, 4)
    torch.testing.assert_close(sums.sum(-1), torch.ones(L, N), atol=1e-5, rtol=0)
    # block lengths: audio = the placeholders of the prompt; generated grows by one per token
    prompt = D.collate_prompts([rec], ck.tok, FAMILY, ck.n_mels, False, {rec["audio"]: ck.load_audio(rec["audio"])})
    assert lengths[0, 1] == int((prompt["input_ids"] == ck.model.audio_token_id).sum())
    assert lengths[:, 3].tolist() == list(range(N)) and sums[:, 0, 3].abs().max() == 0
    # against the model's own attention, read by hand for one layer / token
    full = torch.tensor([prompt["input_ids"][0].tolist() + ids])
    with torch.no_grad():
        _, att = ck.model(full, input_features=prompt["input_features"],
                          feature_attention_mask=prompt["feature_attention_mask"], output_attentions=True)
    P, j = prompt["input_ids"].shape[1], 5
    row = att[1][0, :, P + j - 1].mean(0)
    audio = (full[0] == ck.model.audio_token_id)
    assert abs(float(row[audio].sum()) - float(sums[1, j, 1])) < 1e-5
    assert abs(float(row[P:P + j].sum()) - float(sums[1, j, 3])) < 1e-5


def test_attention_end_to_end(env, tmp_path):
    out = tmp_path / "att"
    E.main(["attention", "--checkpoint", env["ck1"], "--manifest", env["qa"], "--out", str(out), "--limit", "2",
            "--teacher-force", "--device", "cpu"])
    res = json.loads((out / "attention.json").read_text())
    assert res["n_prompts"] == 2 and res["max_sum_error"] < 1e-4
    assert set(res["phases"]) == set(E.PHASES) and set(res["table4_audio_mass"]) == set(E.PHASES)
    for phase in E.PHASES:
        ph = res["phases"][phase]
        total = [sum(ph["sum"][b][l] for b in E.BLOCKS) for l in range(res["layers"])]
        assert all(abs(t - 1) < 1e-4 for t in total)                       # pooled block sums still sum to 1
        assert ph["mean_over_layers"]["sum"]["audio"] == res["table4_audio_mass"][phase]
    n_tokens = {p: v["n_tokens"] for p, v in res["phases"].items()}
    assert n_tokens["all"] == n_tokens["reasoning"] + n_tokens["answer"]
    assert 0 < res["phases"]["timestamp"]["n_tokens"] < res["phases"]["reasoning"]["n_tokens"]
    assert all(os.path.getsize(p) > 1000 for p in res["plots"]) and len(res["plots"]) == 2
    # generated (not teacher-forced) completions run too
    E.main(["attention", "--checkpoint", env["ck1"], "--manifest", env["sta"], "--out", str(tmp_path / "gen"),
            "--limit", "1", *FAST])
    gen = json.loads((tmp_path / "gen" / "attention.json").read_text())
    assert gen["n_prompts"] == 1 and gen["max_sum_error"] < 1e-4


def test_tables_two_checkpoints(env, tmp_path):
    out = tmp_path / "tables"
    E.main(["tables", "--checkpoints", f"base={env['ck1']}", f"other={env['ck2']}", "--sta", env["sta"],
            "--qa", f"synth={env['qa']}", "--out", str(out), "--attention", "--limit", "2", "--attention-limit", "1",
            "--sta-max-new-tokens", "8", "--teacher-force", *FAST])
    md = (out / "tables.md").read_text()
    for title in ("Table 1", "Table 2", "Table 3", "Table 4"):
        assert title in md
    assert md.count("| base |") == 4 and md.count("| other |") == 4
    res = json.loads((out / "tables.json").read_text())
    assert set(res) == {"base", "other"}
    assert res["base"]["sta"]["n"] == 2 and res["other"]["qa"]["synth"]["n"] == 2
    assert "items" not in res["base"]["qa"]["synth"]
    assert (out / "base" / "sta.json").exists() and (out / "other" / "attention" / "attention.json").exists()
    assert (out / "attention_audio_by_layer.png").exists() and (out / "attention_layers_other.png").exists()
    assert (out / "examples.md").read_text().count("**Q**") == 4                  # 2 answers x 2 checkpoints
    with pytest.raises(SystemExit, match="distinct"):
        E.main(["tables", "--checkpoints", env["ck1"], env["ck1"], "--out", str(out)])
