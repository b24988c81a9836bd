"""reward.py: parsers and rewards on hand-written completions, plus the paper's 66 published
predictions when ../shared exists."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import reward as R  # noqa: E402

PAPER_EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "paper_examples",
                              "mmau_testmini_predictions.json")
CHOICES = ["one", "two", "three", "four"]


# ---------------------------------------------------------------------------------------------
# extract_spans

@pytest.mark.parametrize("text, spans", [
    ("From 10.74s to 14.74s, the speaker says hi.", [(10.74, 14.74)]),
    ("From 6.20 seconds to 10.00 seconds, the speaker says", [(6.2, 10.0)]),
    ("from 1 sec to 2 secs", [(1.0, 2.0)]),
    ("The segment hello starts at 0.78 seconds and ends at 1.98 seconds.", [(0.78, 1.98)]),
    ("it starts at 3 and ends at 4", [(3.0, 4.0)]),
    ("the cue (1.5 - 2.5) is loud", [(1.5, 2.5)]),
    ("the cue (1.5s-2.5s) is loud", [(1.5, 2.5)]),
    ("the cue (1.5s\u20132.5s) is loud", [(1.5, 2.5)]),                 # en dash
    ("the cue (1.5, 2.5) is loud", [(1.5, 2.5)]),
    ("heard 3.25 to 4.5 seconds in", [(3.25, 4.5)]),
    ("heard 3.25\u20134.5 seconds in", [(3.25, 4.5)]),
    ("heard 3.25 - 4.5 second in", [(3.25, 4.5)]),
    ("From [0.00s \u2013 4.30s], the speaker", [(0.0, 4.3)]),           # paper demo page style
    ('"Oh, I am." (4.77-5.79 s), "No, Rose." (9.57-10.03 s)', [(4.77, 5.79), (9.57, 10.03)]),
    ("between 2 and 3.5 seconds a door slams", [(2.0, 3.5)]),
    ("From 5.00s to 2.00s it is quiet", [(5.0, 2.0)]),                  # reversed: kept as written
    ("from 0 to 5 seconds", [(0.0, 5.0)]),                              # paper code counts 2
    ("From 0.34s to 3.54s ... again from 0.34s to 3.54s, then from 6.24s to 8.10s.",
     [(0.34, 3.54), (6.24, 8.1)]),                                      # duplicates once, in order
    ("(2.0 - 3.0) then from 0.5s to 1.0s", [(2.0, 3.0), (0.5, 1.0)]),   # order of appearance
])
def test_extract_spans_forms(text, spans):
    assert R.extract_spans(text) == spans


@pytest.mark.parametrize("text", [
    "", None, 42, "The speaker changes from neutral to angry.", "two speakers in 2 turns",
    "the years 1930 to 1945", "from 5 speakers to 6", "version 2-3", "Final answer: (b) two",
])
def test_extract_spans_none(text):
    assert R.extract_spans(text) == []


def test_count_spans_paper_matches_authors():
    # FORMATS.md §0 [verified] edge cases of the authors' TimestampCompactionORM
    assert R.count_spans_paper("from 0 to 5 seconds") == 2
    assert R.count_spans_paper("From [0.00s \u2013 4.30s] the speaker") == 0
    assert R.count_spans_paper("From 1.00s to 2.50s the speaker") == 1
    assert R.count_spans_paper("From 1.00s to 2.50s ... from 1.00s to 2.50s") == 2
    assert R.count_spans_paper("(1.5s-2.5s) and (1, 2) and it starts at 1 s and ends at 2 s") == 3
    assert R.count_spans_paper(None) == 0


# ---------------------------------------------------------------------------------------------
# extract_choice

@pytest.mark.parametrize("text, idx", [
    ("reasoning\nFinal answer: (b) two", 1),
    ("reasoning\nFinal Answer: (B) two", 1),
    ("reasoning\n(c) three", 2),
    ("reasoning\n\n  Final answer: (d)  \n\n", 3),
    ("reasoning\nC. three", 2),
    ("reasoning\nA) one", 0),
    ("reasoning\n(A)", 0),
    ("reasoning\nB", 1),
    ("reasoning\nb.", 1),
    ("reasoning\nThe answer is B.", 1),
    ("reasoning\nAnswer: C", 2),
    ("reasoning\nOption D is correct.", 3),
    ("reasoning\n**Final answer: (b) two**", 1),
    ("reasoning\n<answer>(c)</answer>", 2),
    ("reasoning\nthree", 2),                                # exact option text
    ("reasoning\nFinal answer: Three.", 2),
    ("reasoning\nSo there are three speakers in total.", 2),  # exactly one option's text on the line
    ("(a) is wrong\nFinal answer: (c) three", 2),           # only the last line counts
])
def test_extract_choice_forms(text, idx):
    assert R.extract_choice(text, CHOICES) == idx


@pytest.mark.parametrize("text", [
    "", None, "   \n\n", "reasoning only, no final line with an option?\nI am not sure.",
    "reasoning\nFinal answer: (a) or (b)",                  # two different options: ambiguous
    "reasoning\nIt is either two or three.",                # two option texts on the line
    "reasoning\nA man is speaking to a woman.",             # the article "a" is not option (a)
    "reasoning\nFinal answer: (e) five",                    # a letter naming no choice
    "Final answer: (b) two\n\nThe audio does not provide enough information.",
])
def test_extract_choice_none(text):
    assert R.extract_choice(text, CHOICES) is None


def test_extract_choice_prefers_longer_option_text():
    choices = ["first speaker", "first speaker shows anger", "second speaker"]
    assert R.extract_choice("x\nFinal answer: first speaker shows anger", choices) == 1
    assert R.extract_choice("x\nFinal answer: first speaker", choices) == 0
    # same letter written twice is one answer; more choices than 4 use (e)..(h)
    assert R.extract_choice("x\n(b) ... so (b)", choices) == 1
    assert R.extract_choice("x\n(h) eight", [str(i) for i in range(8)]) == 7
    assert R.extract_choice("x\n(b)", []) == 1          # no choices known: (a)..(d) accepted
    assert R.extract_choice("x\n(b)", None) == 1
    assert R.extract_choice("x\nThere are fifteen.", ["one", "fifteen", "fifteen"]) == 1   # duplicate option


# ---------------------------------------------------------------------------------------------
# rewards

def test_compaction_by_hand():
    # k -> R_tg with k_ref=1, k_max=5, C_max=0.5, C_min=0.1: 0.5 - (k-1)*0.4/4 between
    expected = {0: 0.0, 1: 0.5, 2: 0.4, 3: 0.3, 4: 0.2, 5: 0.1, 6: 0.1}
    for k, v in expected.items():
        assert math.isclose(R.compaction_reward(k), v, abs_tol=1e-12), k
    assert R.compaction_reward(3, k_ref=2, k_max=4, c_max=1.0, c_min=0.0) == 0.5
    assert R.compaction_reward(-1) == 0.0


def test_answer_reward_and_answer_index():
    ex = {"choices": CHOICES, "answer_index": 2}
    assert R.answer_reward("x\nFinal answer: (c) three", ex) == 1.0
    assert R.answer_reward("x\nFinal answer: (b) two", ex) == 0.0
    assert R.answer_reward("no answer", ex) == 0.0
    assert R.answer_index({"choices": CHOICES, "answer": "four"}) == 3
    assert R.answer_index({"choices": CHOICES, "label": "C"}) == 2       # the authors' GRPO rows
    assert R.answer_index({"choices": CHOICES}) is None
    assert R.answer_index(None) is None


def test_total_reward_paper_default():
    # FORMATS.md §9 TGSR GRPO row: "(c) three" right, one span -> R = 1 + 0.5
    ex = {"choices": CHOICES, "answer_index": 2, "duration": 10.0}
    value, comp = R.total_reward("From 1.00s to 2.50s someone counts.\nFinal answer: (c) three", ex)
    assert value == 1.5
    assert comp["answer"] == 1.0 and comp["compaction"] == 0.5 and comp["k"] == 1
    assert comp["choice"] == 2 and comp["parsed"] == 1.0 and comp["n_spans"] == 1
    # three distinct spans, wrong answer
    text = "From 0s to 1s a, from 1 to 2 seconds b, (3.0 - 4.0) c.\nFinal answer: (a) one"
    value, comp = R.total_reward(text, ex)
    assert math.isclose(value, 0.3) and comp["answer"] == 0.0 and comp["k"] == 3


def test_total_reward_paper_count_option():
    ex = {"choices": CHOICES, "answer_index": 0}
    text = "from 0 to 5 seconds\n(a) one"
    assert R.total_reward(text, ex)[1]["k"] == 1
    value, comp = R.total_reward(text, ex, span_count="paper")
    assert comp["k"] == 2 and math.isclose(value, 1.4)


def test_grounding_and_hallucination():
    ex = {"choices": CHOICES, "answer_index": 1, "evidence": [[1.0, 3.0], [6.0, 8.0]], "duration": 9.0}
    text = "From 1.0s to 3.0s x. From 6.0s to 7.0s y. From 8.0s to 12.0s z. From 5s to 4s w.\n(b) two"
    spans = R.extract_spans(text)
    assert spans == [(1.0, 3.0), (6.0, 7.0), (8.0, 12.0), (5.0, 4.0)]
    assert math.isclose(R.grounding_reward(spans, ex["evidence"]), (1.0 + 0.5 + 0.0 + 0.0) / 4)
    assert R.hallucinated_spans(spans, 9.0) == 2          # past the end, reversed
    assert R.hallucinated_spans(spans, 9.0, tolerance=5.0) == 1
    assert R.hallucinated_spans(spans) == 1               # no duration known: only reversed
    value, comp = R.total_reward(text, ex, grounding_weight=1.0, hallucination_weight=1.0)
    assert math.isclose(comp["grounding"], 0.375) and math.isclose(comp["hallucination"], 0.5)
    assert math.isclose(value, 1.0 + 0.2 + 0.375 - 0.5)           # k = 4 -> 0.2
    # off by default: the paper's reward only
    value, comp = R.total_reward(text, ex)
    assert math.isclose(value, 1.2) and comp["grounding"] == 0.0
    assert R.grounding_reward([], ex["evidence"]) == 0.0
    assert R.grounding_reward(spans, None) == 0.0
    assert R.grounding_reward(spans, [["x", 1]]) == 0.0


def test_total_reward_never_raises_on_bad_inputs():
    for completion in [None, "", 3.5, "\n\n", "(z)", "from 1e9 to ... (,)"]:
        for example in [None, {}, {"choices": None}, {"choices": CHOICES, "answer_index": 99},
                        {"choices": CHOICES, "answer_index": True}, {"evidence": "bad", "duration": "x"},
                        {"choices": "abcd", "answer": "b", "evidence": [[1, None], [2]]}, {"choices": 7}]:
            value, comp = R.total_reward(completion, example, grounding_weight=1.0, hallucination_weight=1.0)
            assert isinstance(value, float) and set(comp) >= {"reward", "answer", "compaction"}


def test_options_validated():
    with pytest.raises(TypeError, match="unknown reward option"):
        R.total_reward("x", {}, k_reff=2)
    with pytest.raises(ValueError, match="span_count"):
        R.RewardOptions(span_count="all")
    opts = R.RewardOptions(compaction_weight=0.0)
    value, _ = R.total_reward("From 1s to 2s\n(a) one", {"choices": CHOICES, "answer_index": 0}, opts)
    assert value == 1.0


# ---------------------------------------------------------------------------------------------
# The paper's published predictions (two copied as fixtures, all 66 when ../shared exists)

FIXTURES = [
    {   # MMAU test-mini 0fbc3dde..., mustard: correct, one span
        "choices": ["Expressing excitement for postal changes", "Ridiculous scenario, not actual concern",
                    "Actual fear of leather bell bottoms", "Complimenting Sonny Bono's fashion sense"],
        "answer": "Ridiculous scenario, not actual concern",
        "model_prediction": "To determine the best description, let's analyze the audio content and the given "
                            "timestamps:\nFrom 10.74s to 14.74s, the speaker says, \"I'm nervous because if Sonny "
                            "Bono gets elected mayor of Palm Springs he's gonna make all the postmen wear leather "
                            "bell bottoms and a fur vest.\" This statement is highly unlikely and humorous.\n"
                            "Final answer: (b) Ridiculous scenario, not actual concern",
    },
    {   # a counting item whose last line has no "Final answer:" and a wrong choice
        "choices": ["one", "ten", "fifteen", "fifteen"], "answer": "ten",
        "model_prediction": "To determine the best description, let's analyze the audio content and the given "
                            "timestamps:\nFrom 0.00s to 2.24s, the phrase \"ruin the movie anyway\" contains two "
                            "unstressed phonemes.\nFrom 2.56s to 5.20s, the phrase \"they can they think that that "
                            "improves\" contains three unstressed phonemes.\nFrom 5.52s to 7.00s, the phrase \"it "
                            "fine but the story is so good\" contains three unstressed phonemes.\nAdding these up, "
                            "we have a total of 8 unstressed phonemes.\nTherefore, the best description is:\n(b) ten",
    },
]


def test_published_fixtures():
    idx = [R.extract_choice(f["model_prediction"], f["choices"]) for f in FIXTURES]
    assert idx == [1, 1]
    assert [f["choices"][i] == f["answer"] for f, i in zip(FIXTURES, idx)] == [True, True]
    assert [len(R.extract_spans(f["model_prediction"])) for f in FIXTURES] == [1, 3]
    assert [R.count_spans_paper(f["model_prediction"]) for f in FIXTURES] == [1, 3]


@pytest.mark.skipif(not os.path.exists(PAPER_EXAMPLES), reason="needs ../shared/data/paper_examples")
def test_published_predictions_54_of_66():
    with open(PAPER_EXAMPLES) as f:
        records = json.load(f)
    assert len(records) == 66
    correct = 0
    for r in records:
        i = R.extract_choice(r["model_prediction"], r["choices"])
        correct += i is not None and r["choices"][i] == r["answer"]
        # the chosen text is what the authors stored as model_output (the one "" is no answer)
        assert (r["choices"][i] if i is not None else "").strip() == r["model_output"].strip()
        # on the published outputs our distinct count never exceeds the authors' hit count
        assert len(R.extract_spans(r["model_prediction"])) <= R.count_spans_paper(r["model_prediction"])
    assert correct == 54
