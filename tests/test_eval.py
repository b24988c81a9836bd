"""eval.py: IoU and span IoU by hand, SED-F1 on sed_eval's test vectors, Table 1 aggregation,
the official scorers' matching rules, result writers, consistency, and the `score` CLI end to end."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)
import eval as E  # noqa: E402
import reward as R  # noqa: E402

PAPER_EXAMPLES = os.path.join(ROOT, "..", "shared", "data", "paper_examples", "mmau_testmini_predictions.json")
HAVE_SHARED = os.path.exists(PAPER_EXAMPLES)


# ---------------------------------------------------------------------------------------------
# IoU

def test_temporal_iou_by_hand():
    assert E.temporal_iou((0.0, 2.0), (1.0, 3.0)) == 1.0 / 3.0
    assert E.temporal_iou((0.0, 1.0), (0.0, 1.0)) == 1.0
    assert E.temporal_iou((0.0, 1.0), (2.0, 3.0)) == 0.0
    assert E.temporal_iou((0.0, 1.0), (1.0, 3.0)) == 0.0          # touching
    assert E.temporal_iou((0.0, 4.0), (1.0, 2.0)) == 0.25         # contained
    assert E.temporal_iou((3.0, 1.0), (0.0, 4.0)) == 0.0          # reversed prediction
    assert E.temporal_iou((1.0, 1.0), (0.0, 4.0)) == 0.0          # empty
    assert E.temporal_iou is R.temporal_iou                       # one definition


def test_span_iou_formats_worked_example():
    # FORMATS.md §9 avg_iou check
    text = "From 0.30s to 3.50s a ... from 0.30s to 3.50s b ... from 6.20s to 8.10s c"
    gt = [(0.36, 3.42), (3.5, 4.78), (6.28, 7.71), (7.71, 10.08)]
    v = E.span_iou(R.extract_spans(text), gt)
    assert math.isclose(v, (3.06 / 3.20 + 1.43 / 1.90) / 2, abs_tol=1e-9)
    assert round(v, 4) == 0.8544
    # duplicates in the input list count once; dict segments work; no span -> 0
    assert math.isclose(E.span_iou([(0.3, 3.5), (0.3, 3.5), (6.2, 8.1)], gt), v)
    assert math.isclose(E.span_iou([(0.3, 3.5)], [{"start": 0.36, "end": 3.42, "text": "x"}]), 3.06 / 3.20)
    assert E.span_iou([], gt) == 0.0
    assert E.span_iou([(0.0, 1.0)], []) == 0.0


def test_parse_transcription():
    s = ('"In the rain here, yeah, don\'t know." (0.27-2.95 s), "You seem a little nervous." (3.69-4.61 s), '
         '"Oh, I am." (4.77-5.79 s)')
    segs = E.parse_transcription(s)
    assert [(g["start"], g["end"]) for g in segs] == [(0.27, 2.95), (3.69, 4.61), (4.77, 5.79)]
    assert segs[2]["text"] == "Oh, I am."
    assert E.parse_transcription("") == [] and E.parse_transcription(None) == []


# Two published records copied as fixtures (MMAU test-mini; predictions of the paper's model).
FIXTURES = [
    {"model_prediction": "To determine the best description, let's analyze the audio content and the given "
                         "timestamps:\nFrom 10.74s to 14.74s, the speaker says, \"I'm nervous because ...\"\n"
                         "Final answer: (b) Ridiculous scenario, not actual concern",
     "gt_transcription": "\"In the rain here, yeah, don't know, but they should be any minute.\" (0.27-2.95 s), "
                         "\"You seem a little nervous.\" (3.69-4.61 s), \"Oh, I am.\" (4.77-5.79 s), \"Are you "
                         "nervous because you haven't met Michael's fiancee?\" (6.65-9.41 s), \"No, Rose.\" "
                         "(9.57-10.03 s), \"I'm nervous because if Sonny Bono gets elected mayor of Palm "
                         "Springs,\" (10.73-14.73 s), \"he's going to make all the postmen wear leather bell "
                         "bottoms on a fur vest.\" (15.81-19.25 s)",
     "avg_iou": 0.995},
    {"model_prediction": "To determine the best description, let's analyze the audio content and the given "
                         "timestamps:\n\nFrom 0.00s to 3.96s, the speaker mentions \"the discovery of Pluto "
                         "expanded our understanding of the solar system.\" The discovery of Pluto occurred in "
                         "1930.\n\n(a) one thousand, nine hundred and forty-five\n(b) one thousand, nine hundred "
                         "and thirty\n\nFinal answer: (b) one thousand, nine hundred and thirty",
     "gt_transcription": "\"The discovery of Pluto expanded our understanding of the solar system.\" (0.06-5.08 s)",
     "avg_iou": 0.7677},
]


def _check_avg_iou(records):
    worst = 0.0
    for r in records:
        v = E.span_iou(R.extract_spans(r["model_prediction"]), E.parse_transcription(r["gt_transcription"]))
        worst = max(worst, abs(v - r["avg_iou"]))
        assert round(v, 4) == pytest.approx(r["avg_iou"], abs=1e-9), (v, r["avg_iou"])
    return worst


def test_avg_iou_fixtures():
    assert _check_avg_iou(FIXTURES) < 5e-5


@pytest.mark.skipif(not HAVE_SHARED, reason="needs ../shared/data/paper_examples")
def test_avg_iou_all_66_published():
    with open(PAPER_EXAMPLES) as f:
        records = json.load(f)
    assert len(records) == 66
    for r in records:   # every segment of the transcript parsed
        assert len(E.parse_transcription(r["gt_transcription"])) == r["gt_transcription"].count(" s)")
    assert _check_avg_iou(records) < 5e-5      # stored rounded to 4 decimals


# ---------------------------------------------------------------------------------------------
# SED (sed_eval tests/test_sound_event.py vectors, FORMATS.md §8-§9)

REF = [(0.0, 2.5, "car"), (2.8, 4.5, "car"), (6.0, 10.0, "car")]
EST = [(0.2, 3.5, "car"), (6.0, 8.0, "car")]


def test_sed_event_based_sed_eval_vectors():
    m = E.sed_f1([(REF, EST)], t_collar=0.2, percentage_of_length=0.5)
    assert (m["ntp"], m["nsubs"], m["nfp"], m["nfn"]) == (2, 0, 0, 1)
    assert math.isclose(m["f1"], 0.8) and math.isclose(m["error_rate"], 1 / 3)
    m = E.sed_f1([(REF, EST)])                     # default offset collar: 20 % of the event
    assert (m["ntp"], m["nfp"], m["nfn"]) == (0, 2, 3)
    assert m["f1"] == 0.0 and math.isclose(m["error_rate"], 5 / 3)


def test_sed_matching_details():
    # one-to-one: two estimates near one reference -> 1 TP + 1 FP
    m = E.sed_f1([([(1.0, 2.0)], [(1.0, 2.0), (1.05, 2.05)])])
    assert (m["ntp"], m["nfp"], m["nfn"]) == (1, 1, 0)
    # optimal (not greedy) matching: est0 fits both refs, est1 only ref0
    ref = [(1.0, 2.0), (1.15, 2.15)]
    est = [(1.1, 2.1), (0.9, 1.9)]
    assert E.sed_f1([(ref, est)])["ntp"] == 2
    # labels: right timing, wrong label -> substitution
    m = E.sed_f1([([(1.0, 2.0, "dog")], [(1.0, 2.0, "cat")])])
    assert (m["ntp"], m["nsubs"], m["nfp"], m["nfn"]) == (0, 1, 0, 0) and m["error_rate"] == 1.0
    # onset collar boundary written with 2 decimals is inside; empty system output scores 0
    assert E.sed_f1([([(1.00, 2.00)], [(1.20, 2.20)])])["ntp"] == 1
    assert E.sed_f1([([(1.00, 2.00)], [(1.21, 2.00)])])["ntp"] == 0
    assert E.sed_f1([([(1.0, 2.0)], [])])["f1"] == 0.0
    # long events: offset collar 20 % of the reference length
    assert E.sed_f1([([(0.0, 10.0)], [(0.0, 11.9)])])["ntp"] == 1
    assert E.sed_f1([([(0.0, 10.0)], [(0.0, 12.1)])])["ntp"] == 0
    # counts accumulate over files; sed_eval dict events work
    m = E.sed_f1([([(0, 1)], [(0, 1)]), ([{"onset": 0, "offset": 1, "event_label": "x"}], [])])
    assert (m["ntp"], m["nref"], m["nsys"]) == (1, 2, 1) and math.isclose(m["f1"], 2 / 3)


# ---------------------------------------------------------------------------------------------
# Table 1

def test_parse_sta_answer():
    assert E.parse_sta_answer("The segment morning everyone. starts at 0.78 seconds and ends at 1.98 seconds.") \
        == (0.78, 1.98)
    assert E.parse_sta_answer("I don't know.") is None
    assert E.parse_sta_answer(None) is None


def test_sta_metrics_by_hand():
    preds = ["The segment a starts at 1.00 seconds and ends at 2.00 seconds.",      # IoU 1
             "The segment b starts at 0.50 seconds and ends at 1.50 seconds.",      # IoU 1/3
             "The segment c starts at 2.00 seconds and ends at 3.60 seconds.",      # IoU 0.8/1 ... see below
             "no idea"]                                                             # unparsed -> 0
    refs = [(1.0, 2.0), (1.0, 2.0), (2.0, 3.2), [4.0, 5.0]]
    ious = [1.0, 0.5 / 1.5, 1.2 / 1.6, 0.0]
    m = E.sta_metrics(preds, refs)
    assert m["n"] == 4 and math.isclose(m["mean_iou"], sum(ious) / 4)
    assert m["iou_ge_0.5"] == 0.5 and m["iou_ge_0.7"] == 0.5 and m["parse_fail_rate"] == 0.25
    # events: #1 matches; #2 onset 0.5 s off; #3 offset 0.4 > max(0.2, 0.24) off -> 1 TP of 3 sys, 4 ref
    assert math.isclose(m["sed_f1"], 2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4))
    # already-parsed spans are accepted too
    assert E.sta_metrics([(1.0, 2.0), None], [(1.0, 2.0), (0.0, 1.0)])["mean_iou"] == 0.5


# ---------------------------------------------------------------------------------------------
# Official scorers

def test_string_match_formats_vectors():
    ch = ["Man", "Woman", "Child", "Robot"]
    for pred in ["Man", "(a) Man", "man.", "The answer is Man."]:
        assert E.string_match("Man", pred, ch)
    for pred in ["Man, not a Woman", "A", "", None]:
        assert not E.string_match("Man", pred, ch)
    ch = ["one", "two", "four", "three"]
    assert E.string_match("four", "Final answer: (c) four", ch)
    assert not E.string_match("four", "four speakers, not three", ch)


def _mmau_record(**kw):
    rec = {"id": "00000000-aaaa-bbbb-cccc-000000000001", "question": "How many people take part in the dialogue?",
           "choices": ["one", "two", "three", "four"], "answer": "two", "dataset": "meld", "task": "speech",
           "split": "test-mini", "category": "Reasoning", "sub-category": "Counting", "difficulty": "easy"}
    rec.update(kw)
    return rec


def test_score_mmau():
    pred = "From 0.00s to 2.10s one person speaks; from 2.40s to 4.00s another replies.\nFinal answer: (b) two"
    recs = [E.mmau_result(_mmau_record(), pred),
            _mmau_record(model_output="three", difficulty="hard", category=["Reasoning"]),
            _mmau_record()]                                       # no model_output: skipped
    assert recs[0]["model_output"] == "two" and recs[0]["model_prediction"] == pred
    out = E.score_mmau(recs)
    assert out["total"] == {"acc": 50.0, "correct": 1, "n": 2} and out["skipped"] == 1
    assert out["difficulty"]["easy"]["acc"] == 100.0 and out["difficulty"]["hard"]["acc"] == 0.0
    assert out["category"]["Reasoning"]["n"] == 2                 # list-valued category grouped with str
    assert recs[0]["match"] == 1 and recs[1]["match"] == 0
    # the full reasoning fails string_match (mentions "one"), as FORMATS.md §9 says
    assert E.score_mmau([_mmau_record(model_prediction=pred)], output_key="model_prediction")["total"]["acc"] == 0.0
    # no answer read -> empty model_output -> wrong
    assert E.mmau_result(_mmau_record(), "I cannot tell.")["model_output"] == ""


def test_score_mmar():
    rec = {"id": "abcDEF12345_00-00-05_00-00-20", "question": "Which city is the speaker most likely in?",
           "choices": ["Paris", "Rome"], "answer": "Rome", "modality": "speech", "category": "Semantic Layer",
           "sub-category": "Content Analysis"}
    recs = [E.mmar_result(rec, "The bells of St Peter's from 1.0s to 3.0s.\nFinal answer: (b) Rome"),
            E.mmar_result({**rec, "modality": "mix-sound-speech"}, "\nFinal answer: (a) Paris")]
    assert recs[0]["answer_prediction"] == "Rome" and "thinking_prediction" in recs[0]
    out = E.score_mmar(recs)
    assert out["total"]["acc"] == 50.0
    assert out["modality"]["speech"]["acc"] == 100.0 and out["modality"]["mix-sound-speech"]["acc"] == 0.0


def test_airbench_parse_gotchas():
    # FORMATS.md §3 [verified] behaviour of score_foundation.py
    assert E.airbench_parse("C.") == "C"
    assert E.airbench_parse("Answer: C") == "A"
    assert E.airbench_parse("(B)") == "B"
    assert E.airbench_parse("The answer is B.") == "B"
    assert E.airbench_parse("b") is None
    assert E.airbench_parse("I think it's B") is None
    assert E.airbench_parse("") is None and E.airbench_parse(None) is None and E.airbench_parse("None") is None
    assert E.airbench_parse("\nD\n") == "D"


def test_score_airbench():
    meta = {"path": "spk_count_0001.wav", "question": "How many distinct speakers can be heard?", "choice_a": "1",
            "choice_b": "2", "choice_c": "3", "choice_d": "4", "answer_gt": "3",
            "task_name": "Speaker_Number_Verification", "dataset_name": "voxceleb1", "uniq_id": 42}
    r1 = E.airbench_result(meta, "From 0.5s to 3.0s a man, then a woman, then a child.\nFinal answer: (c) 3")
    assert r1["response"] == "C"
    r2 = E.airbench_result({**meta, "uniq_id": 43}, "\nFinal answer: B")
    r3 = E.airbench_result({**meta, "uniq_id": 44}, "I do not know")
    assert r3["response"] == ""
    two = {k: v for k, v in meta.items() if k not in ("choice_c", "choice_d")}
    r4 = E.airbench_result({**two, "answer_gt": "2", "task_name": "Speaker_Gender_Recognition"}, "(b)")
    out = E.score_airbench([r1, r2, r3, r4])
    assert out["fail"] == 1 and out["total"] == {"acc": 200 / 3, "correct": 2, "n": 3}
    assert out["task"]["Speaker_Number_Verification_voxceleb1"]["acc"] == 50.0
    assert out["task"]["Speaker_Gender_Recognition_voxceleb1"]["acc"] == 100.0


def test_writers_roundtrip(tmp_path):
    recs = [E.mmau_result(_mmau_record(), "x\n(b) two")]
    E.write_mmau(recs, tmp_path / "mmau.json")
    assert json.loads((tmp_path / "mmau.json").read_text()) == recs
    E.write_mmar(recs + recs, tmp_path / "mmar.jsonl")
    E.write_airbench(recs, tmp_path / "air.jsonl")
    assert E.read_records(tmp_path / "mmar.jsonl") == recs + recs
    assert E.read_records(tmp_path / "mmau.json") == recs
    assert len((tmp_path / "air.jsonl").read_text().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Table 3 (no model)

def test_regions_and_consistency():
    ch = ["one", "two", "three", "four"]
    good = "From 0.00s to 2.10s one person speaks; from 2.40s to 4.00s another replies, so two speakers.\n(b) two"
    assert E.regions_explored(good) == 2
    assert E.consistency(good, ch) == 1.0
    # the reasoning concludes another option
    bad = "From 0.00s to 2.10s a person speaks. Therefore the answer is (c) three.\nFinal answer: (b) two"
    assert E.consistency(bad, ch) == 0.0
    # the chosen option is never supported (digits read as number words, timestamps ignored)
    assert E.consistency("From 1.00s to 2.00s I count 4 voices.\n(b) two", ch) == 0.0
    assert E.consistency("From 1.00s to 2.00s I count 2 voices.\n(b) two", ch) == 1.0
    assert E.consistency("From 1.00s to 2.00s I count 14 voices.\n(d) four", ch) == 0.0   # not "fourteen"
    assert E.consistency("The speaker sounds angry.\n(a) anger", ["anger", "joy"]) == 1.0
    # option lists copied into the reasoning neither support nor contradict
    listed = "Options:\n(a) one\n(b) two\n(c) three\nFrom 1.0s to 2.0s nobody answers.\nFinal answer: (b) two"
    assert E.consistency(listed, ch) == 0.0
    assert E.consistency("no answer here", ch) is None


@pytest.mark.skipif(not HAVE_SHARED, reason="needs ../shared/data/paper_examples")
def test_consistency_on_published_predictions():
    with open(PAPER_EXAMPLES) as f:
        records = json.load(f)
    values = [E.consistency(r["model_prediction"], r["choices"]) for r in records]
    assert values.count(None) == 1                      # the one record with no option
    assert 0.75 <= sum(v or 0.0 for v in values) / len(values) <= 0.95   # paper's judge: 0.83


# ---------------------------------------------------------------------------------------------
# CLI

def test_score_cli_end_to_end(tmp_path):
    recs = [_mmau_record(model_prediction="From 0.00s to 2.10s one person speaks; from 2.40s to 4.00s another "
                                          "replies, so two people.\nFinal answer: (b) two",
                         gt_transcription='"Hi." (0.00-2.10 s), "Hello." (2.40-4.20 s)'),
            _mmau_record(model_prediction="Nothing to cite.\nFinal answer: (c) three"),
            _mmau_record(model_prediction="I cannot tell.")]
    src = tmp_path / "preds.json"
    src.write_text(json.dumps(recs))
    out = tmp_path / "scored.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "score", "--predictions", str(src),
                           "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy 33.33% (1/3)" in proc.stdout
    scored = json.loads(out.read_text())
    assert [r["choice_index"] for r in scored] == [1, 2, None]
    assert [r["choice"] for r in scored] == ["two", "three", ""]
    assert [r["correct"] for r in scored] == [1, 0, 0]
    assert [r["regions_explored"] for r in scored] == [2, 0, 0]
    assert scored[0]["spans"] == [[0.0, 2.1], [2.4, 4.0]]
    assert math.isclose(scored[0]["span_iou"], (1.0 + 1.6 / 1.8) / 2)
    assert "span_iou" not in scored[1]
    # a file without model_prediction is refused with a message naming it
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_mmau_record()) + "\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "score", "--predictions", str(bad),
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "model_prediction" in proc.stderr


@pytest.mark.skipif(not HAVE_SHARED, reason="needs ../shared/data/paper_examples")
def test_score_cli_on_published(tmp_path):
    out = tmp_path / "scored.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "score", "--predictions", PAPER_EXAMPLES,
                           "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy 81.82% (54/66)" in proc.stdout
    scored = json.loads(out.read_text())
    assert all(abs(r["span_iou"] - r["avg_iou"]) < 5e-5 for r in scored)
    # MMAU's official bag-of-tokens rule on the authors' model_output is more lenient: two emotion
    # answers whose words are a permutation of the right one's also count.
    with open(PAPER_EXAMPLES) as f:
        assert E.score_mmau(json.load(f))["total"]["correct"] == 56


# ---------------------------------------------------------------------------------------------
# Table 3: audio verification against a known transcript

WORDS = [("the", 0.0, 0.2), ("red", 0.3, 0.6), ("fox", 0.7, 1.0), ("runs", 1.1, 1.5), ("fast", 2.5, 2.9)]


def test_span_mentions_positions():
    text = 'From 0.30s to 1.00s "a". The segment starts at 2.5 seconds and ends at 3 seconds; (0.30-1.00 s).'
    m = R.span_mentions(text)
    assert [s for _, _, s in m] == [(0.3, 1.0), (2.5, 3.0), (0.3, 1.0)]          # repeats kept, unlike extract_spans
    assert text[m[0][0]:m[0][1]] == "From 0.30s to 1.00s"
    assert text[m[2][0]:m[2][1]] == "(0.30-1.00 s)"
    assert [s for _, _, s in m][:2] == R.extract_spans(text)


def test_audio_verify_by_hand():
    # quote = the words inside the span: precision 1, recall 1
    v, d = E.audio_verify('From 0.30s to 1.00s, the speaker says "red fox".\nFinal answer: (a) fox', WORDS)
    assert v == 1.0 and d[0]["claim"] == "red fox" and d[0]["heard"] == "red fox"
    # span [0.3, 1.5] holds red fox runs; claim "red cat": P = 1/2, R = 1/3, F1 = 0.4
    v, d = E.audio_verify('From 0.30s to 1.50s, the speaker says "red cat".\n(a) x', WORDS)
    assert math.isclose(d[0]["precision"], 0.5) and math.isclose(d[0]["recall"], 1 / 3) and math.isclose(v, 0.4)
    # quote before the span on the same line
    assert E.audio_verify('The speaker says "fast" (2.50-2.90 s).\n(a) x', WORDS)[0] == 1.0
    # no quote: the clause's content words {sounds, fast, happy}: P = 1/3, R = 1 -> 0.5
    v, d = E.audio_verify("From 2.50s to 2.90s the speaker sounds fast and happy.\n(a) x", WORDS)
    assert sorted(d[0]["claim"].split()) == ["fast", "happy", "sounds"] and math.isclose(v, 0.5)
    # mean over mentions; a span away from the quoted words scores 0
    v, d = E.audio_verify('From 0.30s to 1.00s "red fox", then from 2.50s to 2.90s "slow".\n(a) x', WORDS)
    assert [x["score"] for x in d] == [1.0, 0.0] and v == 0.5
    # digits read as number words; the final answer line is no claim
    assert E.audio_verify('From 0.0s to 1.0s they say "2".\n(b) two', [("two", 0.1, 0.5)])[0] == 1.0
    assert E.audio_verify('Final answer: from 0.30s to 1.00s "red fox"', WORDS)[0] == 1.0     # one line: kept
    assert E.audio_verify("No span here.\n(a) x", WORDS) == (None, [])
    assert E.audio_verify('From 0.30s to 1.00s "red fox".\n(a) x', None) == (None, [])
    # dict words work the same
    dicts = [{"word": w, "start": s, "end": e} for w, s, e in WORDS]
    assert E.audio_verify('From 0.30s to 1.00s "red fox".\n(a) x', dicts)[0] == 1.0


def test_words_from_segments():
    w = E.words_from_segments([{"text": "ab c", "start": 0.0, "end": 1.0}, {"text": "", "start": 2.0, "end": 3.0}])
    assert [x[0] for x in w] == ["ab", "c"]
    assert math.isclose(w[0][2], 0.6) and math.isclose(w[1][1], 0.6) and math.isclose(w[1][2], 1.0)
