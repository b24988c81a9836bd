"""Evaluation: the metrics of the paper's tables, the official benchmark scorers' exact matching
rules and result writers, model-based evaluation of checkpoints, and the attention analysis.

    python eval.py score --predictions preds.json --out scored.json
    python eval.py sta --checkpoint CKPT --manifest sta.jsonl --out sta.json [--limit N --batch-size B]
    python eval.py qa  --checkpoint CKPT --manifest qa.jsonl  --out qa.json
    python eval.py qa  --checkpoint CKPT --benchmark mmau --manifest mmau-test-mini.json [--audio-root DIR]
                       --out mmau.json          # + mmau.official.json (the benchmark's own result file)
    python eval.py attention --checkpoint CKPT --manifest qa.jsonl --out DIR [--limit 16] [--teacher-force]
    python eval.py tables --checkpoints base=CKPT1 sta=CKPT2 --sta sta.jsonl --qa qa.jsonl --out DIR

On a GPU add --device cuda (default when one is present) and --dtype bfloat16 for 7B checkpoints.

Outputs: `sta` / `qa` write OUT (metrics, settings, per-item predictions) and OUT.items.jsonl (the
resumable item file); `qa --benchmark` also the benchmark's result file (OUT stem + .official.json[l]);
`attention` writes DIR/attention.json, attention_layers.png, attention_phases.png; `tables` writes
DIR/<name>/... for each checkpoint, then DIR/tables.md, tables.json, examples.md and the plots.

`score` reads an MMAU-format JSON list (or JSONL) whose records already hold `model_prediction`
(the full reasoning) and adds: choice_index, choice (option text, "" when none), correct, spans,
regions_explored, consistency and, when `gt_transcription` is present, span_iou.

Model-based commands load CKPT with model.from_pretrained + tokenizer.load_tokenizer (the checkpoint
carries its tokenizer). The chat family comes from config.json's model_type (or the run's meta.json,
or --family); 30 s feature padding from meta.json's pad_to_30s (released checkpoints: on). Decoding
is greedy. Every finished item is appended to OUT.items.jsonl as it completes; re-running the same
command continues from it (a file made with another checkpoint/manifest/setting is refused; --restart
starts over). An item whose audio cannot be read is recorded with its error, counted and left out of
the metrics.

Answer and span parsing come from reward.py (one parser for training and evaluation).

Choices made where the paper or the authors' code leave room (FORMATS.md §0, §8, §10):
  * span_iou reproduces the published `avg_iou`: distinct predicted spans, each one's best IoU
    with a ground-truth segment, averaged. Our span parser reads more forms than the authors'
    "from X to Y" regex; on their 66 published predictions the two agree. In `qa` it is taken against
    the record's transcript `segments` (or an MMAU `gt_transcription`); evidence_iou is the same
    against the record's `evidence` spans.
  * SED-F1 is sed_eval's event-based F1 with one-to-one (maximum bipartite) matching, onset collar
    200 ms and offset collar max(200 ms, 20 % of the reference event) (DCASE 2018/19 Task 4; the
    paper does not say; sed_eval's own default is 50 %: both are options). An empty system output
    scores 0, not NaN. Collar comparisons allow 1e-9 s of float slack (sed_eval: none), so 2-dp
    times exactly one collar apart match whatever their binary rounding.
  * Table 1: the first span of an answer is its prediction; an unparsed answer counts as IoU 0 and
    as a missed event (no system event).
  * Consistency (Table 3) is a rule-based stand-in for the paper's Qwen3-32B judge (see
    `consistency`).
  * Audio verification (Table 3) replaces the paper's Whisper similarity by a comparison with the
    known transcript (see `audio_verify`): the words the reasoning quotes for a cited span against
    the transcript words inside that span. Word times come from the record's `words`, the corpus's
    words.jsonl next to the manifest (the synthetic corpus), or transcript segments with their words
    spread evenly over each segment.
  * Benchmarks are prompted in our training format (question + "(a) ..." options, data.format_mcq),
    not each benchmark's own prompt; the option read from the final line is written in the
    benchmark's result format (AIR-Bench: the bare letter).
  * Attention analysis (Table 4, Figs 3-4): see `block_attention` and `token_phases`.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import sys
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as model_lib
import reward
import tokenizer as tokenizer_lib
from reward import extract_choice, extract_spans, temporal_iou

# ---------------------------------------------------------------------------------------------
# Temporal IoU and span IoU

_SEGMENT_RE = re.compile(r'"(.*?)"\s*\(\s*(\d+(?:\.\d+)?)\s*[-\u2013]\s*(\d+(?:\.\d+)?)\s*s\s*\)',
                         re.DOTALL)


def parse_transcription(gt_transcription: str) -> list[dict]:
    """Segments of a published `gt_transcription` string: `"text" (s-e s), "text" (s-e s), ...`
    -> [{"text", "start", "end"}]."""
    return [{"text": m.group(1), "start": float(m.group(2)), "end": float(m.group(3))}
            for m in _SEGMENT_RE.finditer(gt_transcription or "")]


def _interval(seg) -> tuple[float, float]:
    if isinstance(seg, dict):
        return float(seg["start"]), float(seg["end"])
    return float(seg[0]), float(seg[1])


def span_iou(pred_spans, gt_segments) -> float:
    """Mean over distinct predicted spans of each one's best IoU with a ground-truth segment
    (segments as (s, e) pairs or {"start", "end"} dicts); 0.0 when no span or no segment."""
    spans = list(dict.fromkeys(tuple(map(float, s)) for s in pred_spans))
    gts = [_interval(g) for g in gt_segments]
    if not spans or not gts:
        return 0.0
    return sum(max(temporal_iou(s, g) for g in gts) for s in spans) / len(spans)


# ---------------------------------------------------------------------------------------------
# SED metrics (event-based, Mesaros et al. 2016 / sed_eval EventBasedMetrics)

_EPS = 1e-9


def _max_bipartite_match(adj: dict[int, list[int]]) -> dict[int, int]:
    """Maximum matching ref -> est (Kuhn's augmenting paths; events per file are few)."""
    est_to_ref: dict[int, int] = {}

    def augment(r, seen):
        for e in adj.get(r, []):
            if e in seen:
                continue
            seen.add(e)
            if e not in est_to_ref or augment(est_to_ref[e], seen):
                est_to_ref[e] = r
                return True
        return False

    for r in sorted(adj):
        augment(r, set())
    return {r: e for e, r in est_to_ref.items()}


def _event(ev) -> tuple[float, float, str]:
    if isinstance(ev, dict):
        return float(ev["onset"]), float(ev["offset"]), str(ev.get("event_label", ""))
    return float(ev[0]), float(ev[1]), str(ev[2]) if len(ev) > 2 else ""


def sed_event_counts(reference, estimated, t_collar: float = 0.2,
                     percentage_of_length: float = 0.2) -> dict:
    """Event-based counts for ONE file. Events: (onset, offset[, label]) or sed_eval dicts.
    Returns {ntp, nsubs, nfp, nfn, nref, nsys}."""
    ref = [_event(e) for e in reference]
    est = [_event(e) for e in estimated]

    def timing_ok(r, e):
        on_ok = abs(r[0] - e[0]) <= t_collar + _EPS
        off_ok = abs(r[1] - e[1]) <= max(t_collar, percentage_of_length * (r[1] - r[0])) + _EPS
        return on_ok and off_ok

    adj = {i: [j for j, e in enumerate(est) if r[2] == e[2] and timing_ok(r, e)]
           for i, r in enumerate(ref)}
    match = _max_bipartite_match(adj)
    ntp = len(match)
    used_est = set(match.values())
    nsubs = 0
    for i, r in enumerate(ref):                   # sed_eval: greedy substitutions among leftovers
        if i in match:
            continue
        for j, e in enumerate(est):
            if j not in used_est and timing_ok(r, e):
                used_est.add(j)
                nsubs += 1
                break
    return {"ntp": ntp, "nsubs": nsubs, "nfp": len(est) - ntp - nsubs, "nfn": len(ref) - ntp - nsubs,
            "nref": len(ref), "nsys": len(est)}


def sed_f1(files, t_collar: float = 0.2, percentage_of_length: float = 0.2) -> dict:
    """Overall (micro) event-based metrics over files: `files` is a list of (reference, estimated)
    event lists, counts accumulated file by file as sed_eval does. Returns f1, precision, recall,
    error_rate plus the counts. No system event -> precision 0 (DCASE 'zero_score')."""
    tot = defaultdict(int)
    for reference, estimated in files:
        for k, v in sed_event_counts(reference, estimated, t_collar, percentage_of_length).items():
            tot[k] += v
    p = tot["ntp"] / tot["nsys"] if tot["nsys"] else 0.0
    r = tot["ntp"] / tot["nref"] if tot["nref"] else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    er = (tot["nsubs"] + tot["nfn"] + tot["nfp"]) / tot["nref"] if tot["nref"] else 0.0
    return {"f1": f, "precision": p, "recall": r, "error_rate": er, **tot}


# ---------------------------------------------------------------------------------------------
# Table 1: Stage-1 (STA) answers


def parse_sta_answer(text) -> tuple[float, float] | None:
    """The span of a Stage-1 answer ("... starts at X seconds and ends at Y seconds."): the first
    span reward.extract_spans finds, or None."""
    spans = extract_spans(text)
    return spans[0] if spans else None


def sta_metrics(predictions, references, t_collar: float = 0.2,
                percentage_of_length: float = 0.2) -> dict:
    """Table 1 from Stage-1 answers (str, or an already parsed (s, e), or None) and gold (s, e).
    Returns n, mean_iou, iou_ge_0.5, iou_ge_0.7 (fractions), sed_f1, parse_fail_rate."""
    assert len(predictions) == len(references), f"{len(predictions)} predictions vs {len(references)} references"
    ious, files, fails = [], [], 0
    for pred, ref in zip(predictions, references):
        span = parse_sta_answer(pred) if isinstance(pred, str) or pred is None else tuple(pred)
        ref = _interval(ref)
        if span is None:
            fails += 1
        ious.append(temporal_iou(span, ref) if span is not None else 0.0)
        files.append(([(ref[0], ref[1], "segment")], [] if span is None else [(span[0], span[1], "segment")]))
    n = len(ious)
    sed = sed_f1(files, t_collar, percentage_of_length)
    return {"n": n, "mean_iou": sum(ious) / n if n else 0.0,
            "iou_ge_0.5": sum(i >= 0.5 for i in ious) / n if n else 0.0,
            "iou_ge_0.7": sum(i >= 0.7 for i in ious) / n if n else 0.0,
            "sed_f1": sed["f1"], "parse_fail_rate": fails / n if n else 0.0}


# ---------------------------------------------------------------------------------------------
# Official scorers: MMAU and MMAR string_match, AIR-Bench Foundation letter parsing


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"\b\w+\b", text.lower()))


def string_match(answer: str, prediction: str, choices: list[str]) -> bool:
    """MMAU / MMAR evaluation.py: correct iff every answer token is in the prediction and no token
    that only wrong options have is."""
    pred_tokens = _tokens(prediction or "")
    if not pred_tokens:
        return False
    answer_tokens = _tokens(answer)
    incorrect = set()
    for choice in choices:
        choice_tokens = _tokens(choice)
        if choice_tokens != answer_tokens:
            incorrect |= choice_tokens - answer_tokens
    return answer_tokens <= pred_tokens and not (pred_tokens & incorrect)


def _key(value) -> str:
    """Group key; MMAU has 13 `category` values written as a list (["Reasoning"])."""
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return "None" if value is None else str(value)


def _accuracy_table(records, correct, groups) -> dict:
    table = {"total": [0, 0]}
    for group in groups:
        table[group] = defaultdict(lambda: [0, 0])
    for rec, ok in zip(records, correct):
        table["total"][0] += ok
        table["total"][1] += 1
        for group in groups:
            cell = table[group][_key(rec.get(group))]
            cell[0] += ok
            cell[1] += 1

    def acc(c):
        return {"acc": 100.0 * c[0] / c[1] if c[1] else 0.0, "correct": c[0], "n": c[1]}

    out = {"total": acc(table["total"])}
    for group in groups:
        out[group] = {k: acc(v) for k, v in sorted(table[group].items())}
    return out


def score_mmau(records, output_key: str = "model_output") -> dict:
    """MMAU evaluation.py: records without `output_key` are skipped (not in the denominator); sets
    record["match"]. Accuracy (%) in total and by task, difficulty, category, sub-category."""
    kept = [r for r in records if output_key in r]
    correct = []
    for r in kept:
        ok = string_match(r["answer"], r[output_key] or "", r["choices"])
        r["match"] = int(ok)
        correct.append(int(ok))
    out = _accuracy_table(kept, correct, ["task", "difficulty", "category", "sub-category"])
    out["skipped"] = len(records) - len(kept)
    return out


def score_mmar(records, output_key: str = "answer_prediction") -> dict:
    """MMAR code/evaluation.py: the same string_match; by modality, category, sub-category."""
    kept = [r for r in records if output_key in r]
    correct = []
    for r in kept:
        ok = string_match(r["answer"], r[output_key] or "", r["choices"])
        r["match"] = int(ok)
        correct.append(int(ok))
    out = _accuracy_table(kept, correct, ["modality", "category", "sub-category"])
    out["skipped"] = len(records) - len(kept)
    return out


AIRBENCH_LETTERS = "ABCD"


def airbench_parse(response) -> str | None:
    """score_foundation.py: strip, drop newlines; the first character if it is A-D, else the
    second-to-last ("The answer is B."), else a failure (None). "Answer: C" -> "A", "b" -> None."""
    predict = (response or "").strip().replace("\n", "")
    if not predict or predict == "None":
        return None
    if predict[0] in AIRBENCH_LETTERS:
        return predict[0]
    if len(predict) > 1 and predict[-2] in AIRBENCH_LETTERS:
        return predict[-2]
    return None


def airbench_choices(record) -> list[str]:
    return [record[k] for k in ("choice_a", "choice_b", "choice_c", "choice_d") if record.get(k) is not None]


def airbench_gt_letter(record) -> str | None:
    for letter, key in zip(AIRBENCH_LETTERS, ("choice_a", "choice_b", "choice_c", "choice_d")):
        if record.get(key) is not None and record["answer_gt"] == record[key]:
            return letter
    return None


def score_airbench(records) -> dict:
    """AIR-Bench Foundation accuracy per `task_name`_`dataset_name`; unparsed responses are counted
    in `fail` and left out of the denominator, as score_foundation.py does."""
    table, fails = defaultdict(lambda: [0, 0]), 0
    for r in records:
        letter = airbench_parse(r.get("response"))
        if letter is None:
            fails += 1
            continue
        cell = table[f"{r['task_name']}_{r['dataset_name']}"]
        cell[0] += int(letter == airbench_gt_letter(r))
        cell[1] += 1
    tasks = {k: {"acc": 100.0 * c / n, "correct": c, "n": n} for k, (c, n) in sorted(table.items())}
    n_all = sum(v["n"] for v in tasks.values())
    c_all = sum(v["correct"] for v in tasks.values())
    return {"total": {"acc": 100.0 * c_all / n_all if n_all else 0.0, "correct": c_all, "n": n_all},
            "task": tasks, "fail": fails}


# ---------------------------------------------------------------------------------------------
# Result writers (each benchmark's own format)


def chosen_text(completion, choices) -> str:
    idx = extract_choice(completion, choices)
    return choices[idx] if idx is not None else ""


def mmau_result(record: dict, completion: str) -> dict:
    """MMAU record + both keys its scorer has read over time (model_output at HEAD,
    model_prediction in the README / R1-AQA): the reasoning and the chosen option's text."""
    return {**record, "model_prediction": completion, "model_output": chosen_text(completion, record["choices"])}


def mmar_result(record: dict, completion: str) -> dict:
    return {**record, "thinking_prediction": completion,
            "answer_prediction": chosen_text(completion, record["choices"])}


def airbench_result(record: dict, completion: str) -> dict:
    """The Foundation result line: `response` is the bare letter ("" when no option was read)."""
    idx = extract_choice(completion, airbench_choices(record))
    return {**record, "response": AIRBENCH_LETTERS[idx] if idx is not None else "",
            "reasoning": completion}


def write_json(records, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)


def write_jsonl(records, path):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_mmau(records, path):
    """MMAU evaluation.py input: one JSON list."""
    write_json(records, path)


def write_mmar(records, path):
    """MMAR code/evaluation.py accepts .json or .jsonl; we write JSONL like MMAR-meta.jsonl."""
    write_jsonl(records, path)


def write_airbench(records, path):
    """Foundation_result_<model>.jsonl."""
    write_jsonl(records, path)


def read_records(path) -> list[dict]:
    """A JSON list or JSON lines."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Table 3: behaviour metrics that need no model

_STOPWORDS = set("""a an the and or of to in on at for with by from is are was were be been it its
this that these those as not no but so than then there their they them he she his her him i you we
our your my me do does did has have had shows show speaker speakers""".split())


def regions_explored(text) -> int:
    """Number of distinct time spans cited in the reasoning."""
    return len(extract_spans(text))


def _key_words(text: str) -> set[str]:
    words = _tokens(text)
    key = words - _STOPWORDS
    return key or words


_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                 "fifteen sixteen seventeen eighteen nineteen twenty").split()
_NUMBER_ALIASES = {**{str(i): w for i, w in enumerate(_NUMBER_WORDS)}, "once": "one", "twice": "two"}


def _same_word(a: str, b: str) -> bool:
    """Crude stemming so that "angry"/"anger", "sarcastic"/"sarcasm", "joy"/"joyful" meet: a common
    prefix of at least max(3, shorter length - 2) letters. Number words meet only themselves."""
    if a == b:
        return True
    if not (a.isalpha() and b.isalpha()) or a in _NUMBER_WORDS or b in _NUMBER_WORDS:
        return False
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n >= max(3, min(len(a), len(b)) - 2)


def consistency(text, choices, min_key_share: float = 0.5) -> float | None:
    """Rule-based stand-in for the paper's LLM consistency judge: does the reasoning support the
    final answer? None when no option is read from the last line. Otherwise 1.0 iff
      (1) the reasoning (everything before the last line, minus lines that merely list options)
          contains the chosen option's letter "(x)" or at least `min_key_share` of its key words
          (stopwords dropped, words compared by `_same_word`, "14"/"once" read as
          "fourteen"/"one"), and
      (2) no sentence of the reasoning asserts another option: a sentence with a conclusion cue
          ("answer", "correct", "therefore", "corresponds", "best", "so ") that names a different
          option by "(y)" or by its full text, and not the chosen one.
    """
    text = text if isinstance(text, str) else ""
    choices = list(choices or [])
    idx = extract_choice(text, choices)
    if idx is None or idx >= len(choices):
        return None
    letter = f"({'abcdefgh'[idx]})"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    option_line = re.compile(r"^\(?[a-h][.)]\s", re.IGNORECASE)
    body = [ln for ln in lines[:-1] if not option_line.match(ln)]
    reasoning = "\n".join(body).lower()
    key = _key_words(choices[idx])
    no_times = re.sub(r"\d+\.\d+\s*(?:seconds?|secs?|s)?", " ", reasoning)   # "1.56s" is no "1"
    words = {_NUMBER_ALIASES.get(w, w) for w in _tokens(no_times)}
    found = sum(any(_same_word(k, w) for w in words) for k in key)
    supported = letter in reasoning or found >= min_key_share * len(key)

    cue = re.compile(r"\b(answer|correct|therefore|corresponds?|best|thus|hence)\b|\bso\b")
    for sentence in re.split(r"(?<=[.!?])\s+|\n", reasoning):
        if not cue.search(sentence):
            continue
        names_chosen = letter in sentence or _norm_in(choices[idx], sentence)
        for j, other in enumerate(choices):
            if j == idx or _tokens(other) == _tokens(choices[idx]):
                continue
            if (f"({'abcdefgh'[j]})" in sentence or _norm_in(other, sentence)) and not names_chosen:
                return 0.0
    return 1.0 if supported else 0.0


def _words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _norm_in(option: str, sentence: str) -> bool:
    """The option's full text occurs in the sentence as whole words."""
    opt = _words(option)
    return bool(opt) and f" {opt} " in f" {_words(sentence)} "


# ---------------------------------------------------------------------------------------------
# Table 3: audio verification against a known transcript (stand-in for the paper's Whisper similarity)

_QUOTE_RE = re.compile(r'"([^"\n]+)"|\u201c([^\u201d\n]+)\u201d')
_NUM_RE = re.compile(r"\d+(?:\.\d+)?")
_TIME_NUM_RE = re.compile(rf"{_NUM_RE.pattern}(?=\s*(?:seconds?|secs?|s)(?![a-z]))", re.IGNORECASE)


def _norm_words(text: str) -> list[str]:
    return [_NUMBER_ALIASES.get(w, w) for w in re.findall(r"\w+", text.lower())]


def words_from_segments(segments) -> list[tuple[str, float, float]]:
    """Word times for transcripts known only by segments: each segment's words spread evenly over it,
    in proportion to their length in characters."""
    out = []
    for seg in segments or []:
        s, e = _interval(seg)
        ws = str(seg.get("text", "")).split() if isinstance(seg, dict) else []
        total = sum(len(w) + 1 for w in ws)
        t = s
        for w in ws:
            d = (e - s) * (len(w) + 1) / total
            out.append((w, t, t + d))
            t += d
    return out


def _claim_text(text: str, mentions: list, k: int) -> str:
    """What the reasoning says about the k-th cited span: the quotes between this mention and the next
    one; failing that, the quotes on the same line before it (`"..." from X to Y`); failing that, the
    content words (stopwords and numbers dropped) of the text up to the next mention or line end."""
    end = mentions[k + 1][0] if k + 1 < len(mentions) else len(text)
    after = text[mentions[k][1]:end]
    quotes = [a or b for a, b in _QUOTE_RE.findall(after)]
    if not quotes:
        line_start = text.rfind("\n", 0, mentions[k][0]) + 1
        before_start = max(line_start, mentions[k - 1][1] if k else 0)
        quotes = [a or b for a, b in _QUOTE_RE.findall(text[before_start:mentions[k][0]])]
    if quotes:
        return " ".join(quotes)
    clause = after.split("\n", 1)[0]
    return " ".join(w for w in re.findall(r"[^\W\d_]+", clause.lower()) if w not in _STOPWORDS)


def audio_verify(text, words, pad: float = 0.5, min_inside: float = 0.5):
    """Agreement between what the reasoning says about each cited span and the transcript of that span.

    words: the clip's transcript as (word, start, end) (or dicts with those keys). For each span mention
    in the reasoning (the final answer line excluded), its claim (`_claim_text`: the quoted words, else
    the clause's content words) is compared with the transcript words as bags of words (lowercase,
    digits read as number words):
      precision = share of claim words heard in [s - pad, e + pad] (any overlap; the paper's demo crops
                  cited spans with 0.5 s on each side before transcribing),
      recall    = share of the words lying in [s, e] (at least `min_inside` of their duration) that the
                  claim contains,
      score     = their F1 (0 when the claim is empty or the span holds no word).
    Returns (mean score over mentions, per-mention details), or (None, []) when there is no mention or no
    transcript. A model-free stand-in for the paper's Whisper-based similarity: it needs the transcript,
    and it rewards quoting what is said in the cited span, the behaviour the metric is meant to measure.
    """
    text = text if isinstance(text, str) else ""
    ref = [(w["word"], float(w["start"]), float(w["end"])) if isinstance(w, dict) else (w[0], float(w[1]), float(w[2]))
           for w in (words or [])]
    lines = text.rstrip().rsplit("\n", 1)
    body = lines[0] if len(lines) == 2 else text       # the final answer line is not a claim about a span
    mentions = reward.span_mentions(body)
    if not mentions or not ref:
        return None, []
    details = []
    for k, (_, _, (s, e)) in enumerate(mentions):
        claim = Counter(_norm_words(_claim_text(body, mentions, k)))
        heard = Counter(x for w, ws, we in ref if we > s - pad and ws < e + pad for x in _norm_words(w))
        inside = Counter(x for w, ws, we in ref
                         if we > ws and (min(we, e) - max(ws, s)) >= min_inside * (we - ws) for x in _norm_words(w))
        p = sum((claim & heard).values()) / sum(claim.values()) if claim else 0.0
        r = sum((claim & inside).values()) / sum(inside.values()) if inside else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        details.append({"span": [s, e], "claim": " ".join(claim.elements()), "heard": " ".join(inside.elements()),
                        "precision": p, "recall": r, "score": f})
    return sum(d["score"] for d in details) / len(details), details


# ---------------------------------------------------------------------------------------------
# Command: score


def score_record(rec: dict) -> dict:
    """Add choice_index, choice, correct, spans, regions_explored, consistency and (with
    `gt_transcription`) span_iou to one MMAU-format record holding `model_prediction`."""
    text = rec.get("model_prediction") or ""
    choices = rec.get("choices") or []
    idx = extract_choice(text, choices)
    spans = extract_spans(text)
    out = {**rec, "choice_index": idx, "choice": choices[idx] if idx is not None else "",
           "correct": int(idx is not None and choices[idx] == rec.get("answer")),
           "spans": [list(s) for s in spans], "regions_explored": len(spans),
           "consistency": consistency(text, choices)}
    if rec.get("gt_transcription"):
        out["span_iou"] = span_iou(spans, parse_transcription(rec["gt_transcription"]))
    return out


def cmd_score(args):
    records = read_records(args.predictions)
    missing = [i for i, r in enumerate(records) if "model_prediction" not in r]
    if missing:
        sys.exit(f"{args.predictions}: {len(missing)} record(s) lack 'model_prediction' "
                 f"(first at index {missing[0]}); `score` needs the model's full reasoning there")
    scored = [score_record(r) for r in records]
    write_json(scored, args.out)
    n = len(scored)
    acc = 100.0 * sum(r["correct"] for r in scored) / n if n else 0.0
    parsed = sum(r["choice_index"] is not None for r in scored)
    regions = sum(r["regions_explored"] for r in scored) / n if n else 0.0
    cons = [r["consistency"] for r in scored if r["consistency"] is not None]
    print(f"accuracy {acc:.2f}% ({sum(r['correct'] for r in scored)}/{n}) | parsed {parsed}/{n} | "
          f"regions explored {regions:.2f} | consistency {sum(cons) / len(cons) if cons else 0.0:.2f}")
    ious = [r["span_iou"] for r in scored if "span_iou" in r]
    if ious:
        print(f"span IoU {sum(ious) / len(ious):.4f} over {len(ious)} records with gt_transcription")
    official = score_mmau([{**r, "model_output": r["choice"]} for r in scored if "answer" in r])
    print(f"MMAU string_match on the chosen option: {official['total']['acc']:.2f}% "
          f"({official['total']['correct']}/{official['total']['n']})")
    print(f"wrote {args.out}")


# ---------------------------------------------------------------------------------------------
# Model-based evaluation: checkpoints, manifests, greedy decoding, resumable item files

class EvalError(Exception):
    """A user-facing problem (bad checkpoint, conflicting result file, bad argument): the CLI prints it."""


MODEL_TYPE_FAMILY = {"qwen2_audio": "qwen2_audio", "qwen2_5_omni": "qwen2_5_omni",
                     "qwen2_5_omni_thinker": "qwen2_5_omni", "audioflamingo3": "audioflamingo3"}


class Checkpoint:
    """A checkpoint directory; config and meta are read at once, weights and tokenizer on first use
    (a fully finished, resumed run never loads them)."""

    def __init__(self, path: str, device: str | None = None, dtype: str = "float32", family: str | None = None,
                 pad_to_30s: bool | None = None):
        self.path = path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        cfg_file = os.path.join(path, "config.json")
        if not os.path.exists(cfg_file):
            raise EvalError(f"{path}: no config.json (expected a checkpoint directory written by "
                            f"model.save_pretrained or a released Hugging Face checkpoint)")
        with open(cfg_file) as f:
            self.config = json.load(f)
        run = {}
        if os.path.exists(os.path.join(path, "meta.json")):       # our training runs record their settings
            with open(os.path.join(path, "meta.json")) as f:
                run = json.load(f).get("config", {})
        model_type = self.config.get("model_type")
        self.family = family or run.get("family") or MODEL_TYPE_FAMILY.get(model_type)
        if self.family not in tokenizer_lib.FAMILIES:
            raise EvalError(f"{path}: cannot tell the chat family of model_type {model_type!r}; pass --family "
                            f"(one of {', '.join(tokenizer_lib.FAMILIES)})")
        self.pad_to_30s = pad_to_30s if pad_to_30s is not None else bool(run.get("pad_to_30s", True))
        audio_config = self.config.get("thinker_config", self.config).get("audio_config", {})  # Omni nests it
        self.n_mels = model_lib.encoder_config(audio_config)["num_mel_bins"]
        self.audio_cache: dict = {}

    @functools.cached_property
    def model(self):
        return model_lib.from_pretrained(self.path, dtype=self.dtype, device=self.device).eval()

    @functools.cached_property
    def tok(self):
        return tokenizer_lib.load_tokenizer(self.path)

    def settings(self) -> dict:
        return {"checkpoint": os.path.realpath(self.path), "family": self.family, "pad_to_30s": self.pad_to_30s}

    def load_audio(self, path: str):
        """Cached waveform (data.load_audio: mono, 16 kHz)."""
        if path not in self.audio_cache:
            self.audio_cache[path] = data.load_audio(path)
        return self.audio_cache[path]


def load_manifest(path: str, kind: str, benchmark: str | None = None, audio_root: str | None = None,
                  subset: str | None = None, limit: int = 0) -> list[dict]:
    """Records of a STA / QA JSONL (data.load_examples: skipped rows are counted and reported) or of a
    benchmark's own file (data.BENCHMARK_READERS). limit > 0 keeps the first `limit`."""
    if benchmark is None:
        recs = data.load_examples(path, kind=kind, check_audio=False, audio_root=audio_root)
    else:
        skips = data.Skips(benchmark)
        reader = data.BENCHMARK_READERS[benchmark]
        if benchmark == "mmau":
            recs = reader(path, audio_root, task=subset or "speech", skips=skips)
        elif benchmark == "mmar":
            recs = reader(path, audio_root, modality=subset or "speech", skips=skips)
        elif benchmark == "airbench":
            recs = reader(path, audio_root, tasks=subset.split(",") if subset else None, skips=skips)
        else:
            recs = reader(path, audio_root, skips=skips)
        skips.report()
    if kind == "sta":
        bad = [i for i, r in enumerate(recs) if "start" not in r or "end" not in r]
        if bad:
            raise EvalError(f"{path}: {len(bad)} record(s) lack start/end (first: record {bad[0] + 1}); `sta` "
                            f"needs Stage-1 pairs as written by `python data.py synth` / `data.py sta`")
    return recs[:limit] if limit > 0 else recs


def item_key(rec: dict, index: int) -> str:
    """Resume key: the record's id, else its position, audio and question."""
    if rec.get("id") is not None:
        return str(rec["id"])
    return f"{index}|{rec.get('audio')}|{rec.get('question')}"


def load_words_index(manifest: str) -> dict:
    """Word timings by audio path from words.jsonl next to the manifest (what `data.py synth` writes; its
    audio paths resolve against its own folder, as data.read_words_jsonl does)."""
    path = os.path.join(os.path.dirname(os.path.abspath(manifest)), "words.jsonl")
    if not os.path.exists(path):
        return {}
    skips = data.Skips(path)
    index = {os.path.realpath(audio): words for audio, words in data.read_words_jsonl(path, skips)}
    skips.report()
    return index


class ItemFile:
    """OUT.items.jsonl: a header line with the run's settings, then one finished item per line, flushed
    as it completes. Re-opened with the same settings it continues; other settings are refused."""

    def __init__(self, path: str, settings: dict, restart: bool = False):
        self.path, self.done = path, {}
        if restart and os.path.exists(path):
            os.remove(path)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                lines = [ln for ln in f.read().split("\n") if ln.strip()]
            rows = []
            for n, ln in enumerate(lines):
                try:
                    rows.append(json.loads(ln))
                except json.JSONDecodeError:
                    if n != len(lines) - 1:
                        raise EvalError(f"{path}:{n + 1}: not JSON; delete the file or pass --restart")
                    print(f"{path}: dropping a half-written last line (interrupted run)", file=sys.stderr)
            header = rows[0].get("_settings") if rows else None
            if header != settings:
                diff = {k: (header or {}).get(k) for k in settings if (header or {}).get(k) != settings[k]}
                raise EvalError(f"{path} was written with other settings {diff} (now "
                                f"{ {k: settings[k] for k in diff} }); pass --restart or another --out")
            self.done = {r["key"]: r for r in rows[1:]}
            with open(path, "w", encoding="utf-8") as f:       # rewrite without a torn last line
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"_settings": settings}, ensure_ascii=False) + "\n")
        self.file = open(path, "a", encoding="utf-8")

    def add(self, item: dict):
        self.done[item["key"]] = item
        self.file.write(json.dumps(item, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def run_items(records: list, items: ItemFile, compute, batch_size: int, desc: str) -> list[dict]:
    """Compute the records not finished in `items` (absent, or recorded with an audio error: retried) in
    batches of `batch_size` (compute(list of (key, record)) -> list of item dicts), appending each; returns
    all items in record order. A key repeated in the manifest gets "#<position>" appended."""
    keyed, seen = [], set()
    for i, r in enumerate(records):
        k = item_key(r, i)
        keyed.append((f"{k}#{i}" if k in seen else k, r))
        seen.add(k)
    todo = [(k, r) for k, r in keyed if k not in items.done or "error" in items.done[k]]
    if len(todo) < len(keyed):
        print(f"{items.path}: {len(keyed) - len(todo)} of {len(keyed)} items already done, {len(todo)} to go",
              file=sys.stderr)
    bar = tqdm(total=len(todo), desc=desc, disable=None, dynamic_ncols=True)
    try:
        for i in range(0, len(todo), batch_size):
            for item in compute(todo[i:i + batch_size]):
                items.add(item)
            bar.update(len(todo[i:i + batch_size]))
    finally:
        bar.close()
        items.close()
    return [items.done[k] for k, _ in keyed]


def _readable(ck: Checkpoint, batch):
    """Split a batch into readable records and error items (unreadable audio: recorded, not fatal). The
    audio cache then holds this batch's clips only."""
    ck.audio_cache.clear()
    ok, errors = [], []
    for key, rec in batch:
        try:
            ck.load_audio(rec["audio"])
            ok.append((key, rec))
        except data.AudioError as e:
            errors.append({"key": key, "id": rec.get("id"), "audio": rec.get("audio"), "error": str(e)})
    return ok, errors


@torch.no_grad()
def decode_greedy(ck: Checkpoint, records: list, max_new_tokens: int) -> list[dict]:
    """Greedy completions of a batch of records (prompts: data.collate_prompts, as in training) ->
    [{"text", "ids" (completion ids without the end-of-turn token), "n_tokens", "truncated"}]."""
    cache = {r["audio"]: ck.load_audio(r["audio"]) for r in records}
    batch = data.collate_prompts(records, ck.tok, ck.family, ck.n_mels, ck.pad_to_30s, audio_cache=cache)
    batch = {k: v.to(ck.device) for k, v in batch.items() if torch.is_tensor(v)}
    feats = batch.get("input_features")
    tokens, lengths, finished = model_lib.generate(
        ck.model, batch["input_ids"], batch["attention_mask"],
        None if feats is None else feats.to(ck.dtype), batch.get("feature_attention_mask"),
        max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=ck.tok.eos_token_id,
        pad_token_id=ck.tok.pad_token_id)
    out = []
    for row, n, fin in zip(tokens.tolist(), lengths.tolist(), finished.tolist()):
        ids = row[:n - 1] if fin else row[:n]
        out.append({"text": ck.tok.decode(ids, skip_special_tokens=True), "ids": ids, "n_tokens": n,
                    "truncated": not fin})
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def write_summary(summary: dict, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=1)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# Command: sta (Table 1)


def sta_item(key: str, rec: dict, out: dict) -> dict:
    span = parse_sta_answer(out["text"])
    gt = [float(rec["start"]), float(rec["end"])]
    return {"key": key, "id": rec.get("id"), "audio": rec["audio"], "question": rec["question"],
            "phrase": rec.get("phrase"), "gt": gt, "prediction": out["text"],
            "pred_span": list(span) if span else None,
            "iou": temporal_iou(span, gt) if span else 0.0, "n_tokens": out["n_tokens"], "truncated": out["truncated"]}


def summarize_sta(items: list, t_collar: float = 0.2, percentage_of_length: float = 0.2) -> dict:
    ok = [it for it in items if "error" not in it]
    m = sta_metrics([it["pred_span"] for it in ok], [it["gt"] for it in ok], t_collar, percentage_of_length)
    return {"n": m["n"], "mean_iou": m["mean_iou"], "iou_ge_0_5": m["iou_ge_0.5"], "iou_ge_0_7": m["iou_ge_0.7"],
            "sed_f1": m["sed_f1"], "parse_fail_rate": m["parse_fail_rate"],
            "truncated_rate": _mean([float(it["truncated"]) for it in ok]) or 0.0,
            "n_audio_errors": len(items) - len(ok),
            "settings": {"sed": "event-based, one-to-one matching, one 'segment' event per item",
                         "t_collar": t_collar, "percentage_of_length": percentage_of_length,
                         "prediction": "first span of the answer; unparsed = IoU 0 and no system event",
                         "decoding": "greedy"},
            "items": items}


def run_sta(ck: Checkpoint, manifest: str, out: str, limit: int = 0, batch_size: int = 8,
            max_new_tokens: int = 96, restart: bool = False, t_collar: float = 0.2,
            percentage_of_length: float = 0.2, audio_root: str | None = None) -> dict:
    records = load_manifest(manifest, "sta", audio_root=audio_root, limit=limit)
    settings = {"command": "sta", **ck.settings(), "manifest": os.path.realpath(manifest),
                "max_new_tokens": max_new_tokens}

    def compute(batch):
        ok, errors = _readable(ck, batch)
        outs = decode_greedy(ck, [r for _, r in ok], max_new_tokens) if ok else []
        return errors + [sta_item(k, r, o) for (k, r), o in zip(ok, outs)]

    items = run_items(records, ItemFile(out + ".items.jsonl", settings, restart), compute, batch_size, "sta")
    summary = {**summarize_sta(items, t_collar, percentage_of_length), "run": settings}
    write_summary(summary, out)
    print(f"sta {manifest}: n {summary['n']} | mean IoU {summary['mean_iou']:.4f} | SED-F1 {summary['sed_f1']:.4f} | "
          f"IoU>=0.5 {100 * summary['iou_ge_0_5']:.2f}% | IoU>=0.7 {100 * summary['iou_ge_0_7']:.2f}% | "
          f"parse fail {100 * summary['parse_fail_rate']:.2f}% | "
          + (f"unreadable audio {summary['n_audio_errors']} (see items) | " if summary["n_audio_errors"] else "")
          + f"wrote {out}")
    return summary


# ---------------------------------------------------------------------------------------------
# Command: qa (Tables 2 and 3; benchmark result files)

OFFICIAL = {  # benchmark -> (result writer of one record, file writer, file suffix, official scorer)
    "mmau": (mmau_result, write_mmau, ".official.json", score_mmau),
    "mmar": (mmar_result, write_mmar, ".official.jsonl", score_mmar),
    "airbench": (airbench_result, write_airbench, ".official.jsonl", score_airbench),
}
BREAKDOWN = {"mmau": ["task", "difficulty", "category", "sub-category"],
             "mmar": ["modality", "category", "sub-category"],
             "airbench": ["task_name", "dataset_name"], "meld": ["Emotion", "Sentiment"]}


def reference_words(rec: dict, words_index: dict | None = None):
    """The clip's transcript words with times, for audio verification: the record's `words`, the corpus's
    words.jsonl, its `segments`, or a published MMAU `gt_transcription` (segments); None if unknown."""
    if rec.get("words"):
        return rec["words"]
    if words_index and os.path.realpath(rec["audio"]) in words_index:
        return words_index[os.path.realpath(rec["audio"])]
    segments = reference_segments(rec)
    return words_from_segments(segments) if segments else None


def reference_segments(rec: dict):
    if rec.get("segments"):
        return rec["segments"]
    source = rec.get("source") if isinstance(rec.get("source"), dict) else {}
    if source.get("gt_transcription"):
        return parse_transcription(source["gt_transcription"])
    return None


def qa_item(key: str, rec: dict, out: dict, words_index: dict | None = None) -> dict:
    text = out["text"]
    value, comp = reward.total_reward(text, rec)
    idx = extract_choice(text, rec["choices"])
    spans = extract_spans(text)
    item = {"key": key, "id": rec.get("id"), "audio": rec["audio"], "question": rec["question"],
            "choices": rec["choices"], "answer": rec["answer"], "answer_index": reward.answer_index(rec),
            "prediction": text, "choice_index": idx, "correct": int(comp["answer"]), "spans": [list(s) for s in spans],
            "regions_explored": len(spans), "r_tg": comp["compaction"], "reward": value,
            "consistency": consistency(text, rec["choices"]), "n_tokens": out["n_tokens"],
            "truncated": out["truncated"]}
    segments = reference_segments(rec)
    if segments:
        item["span_iou"] = span_iou(spans, segments)
    if rec.get("evidence"):
        item["evidence_iou"] = reward.grounding_reward(spans, rec["evidence"])
    item["audio_verify"], item["audio_verify_spans"] = audio_verify(text, reference_words(rec, words_index))
    if isinstance(rec.get("source"), dict):
        item["source"] = rec["source"]
    return item


AUDIO_VERIFY_METHOD = ("model-free: for each span cited in the reasoning, the words it quotes for that span (else "
                       "the clause's content words) vs the transcript words of the span (bag-of-words F1: precision "
                       "against words heard in [s-0.5, e+0.5], recall against words lying in [s, e]); mean over cited "
                       "spans, items without spans or transcript excluded. Transcript: record words, words.jsonl, or "
                       "segments with evenly spread words")
CONSISTENCY_METHOD = ("rule-based: the reasoning before the final line names the chosen option's letter or at least "
                      "half of its key words, and no concluding sentence names another option (eval.consistency)")


def summarize_qa(items: list, benchmark: str | None = None) -> dict:
    ok = [it for it in items if "error" not in it]
    n = len(ok)

    def mean_of(key):
        vals = [it[key] for it in ok if it.get(key) is not None]
        return (sum(vals) / len(vals) if vals else None), len(vals)

    span, n_span = mean_of("span_iou")
    evid, n_evid = mean_of("evidence_iou")
    verify, n_verify = mean_of("audio_verify")
    cons, n_cons = mean_of("consistency")
    summary = {
        "n": n, "accuracy": 100.0 * sum(it["correct"] for it in ok) / n if n else 0.0,
        "parsed_rate": sum(it["choice_index"] is not None for it in ok) / n if n else 0.0,
        "mean_reward": _mean([it["reward"] for it in ok]), "mean_r_tg": _mean([it["r_tg"] for it in ok]),
        "regions_explored": _mean([it["regions_explored"] for it in ok]),
        "span_iou": span, "span_iou_n": n_span, "evidence_iou": evid, "evidence_iou_n": n_evid,
        "audio_verify": verify, "audio_verify_n": n_verify, "consistency": cons, "consistency_n": n_cons,
        "truncated_rate": _mean([float(it["truncated"]) for it in ok]) or 0.0, "n_audio_errors": len(items) - n,
        "methods": {"accuracy": "option read from the final line (reward.extract_choice) == answer",
                    "r_tg": "reward.compaction_reward over distinct spans (paper: k_ref 1, k_max 5, 0.5..0.1)",
                    "span_iou": "mean over distinct cited spans of the best IoU with a transcript segment "
                                "(the published avg_iou); items with transcript segments",
                    "evidence_iou": "the same against the record's evidence spans",
                    "audio_verify": AUDIO_VERIFY_METHOD, "consistency": CONSISTENCY_METHOD, "decoding": "greedy"},
    }
    if benchmark:
        sources = [it.get("source") or {} for it in ok]
        groups = BREAKDOWN[benchmark]
        summary["breakdown"] = _accuracy_table(sources, [it["correct"] for it in ok], groups)
        if benchmark in OFFICIAL:
            to_record, _, _, scorer = OFFICIAL[benchmark]
            summary["official_score"] = scorer([to_record(s, it["prediction"]) for s, it in zip(sources, ok)])
    summary["items"] = items
    return summary


def run_qa(ck: Checkpoint, manifest: str, out: str, limit: int = 0, batch_size: int = 8, max_new_tokens: int = 256,
           restart: bool = False, benchmark: str | None = None, audio_root: str | None = None,
           subset: str | None = None, official: str | None = None) -> dict:
    records = load_manifest(manifest, "qa", benchmark, audio_root, subset, limit)
    words_index = {} if benchmark else load_words_index(manifest)
    settings = {"command": "qa", **ck.settings(), "manifest": os.path.realpath(manifest), "benchmark": benchmark,
                "subset": subset, "max_new_tokens": max_new_tokens}

    def compute(batch):
        ok, errors = _readable(ck, batch)
        outs = decode_greedy(ck, [r for _, r in ok], max_new_tokens) if ok else []
        return errors + [qa_item(k, r, o, words_index) for (k, r), o in zip(ok, outs)]

    items = run_items(records, ItemFile(out + ".items.jsonl", settings, restart), compute, batch_size,
                      benchmark or "qa")
    summary = {**summarize_qa(items, benchmark), "run": settings}
    if benchmark in OFFICIAL:
        to_record, writer, suffix, _ = OFFICIAL[benchmark]
        path = official or os.path.splitext(out)[0] + suffix
        writer([to_record(it["source"], it["prediction"]) for it in items if "error" not in it], path)
        summary["official_file"] = path
    write_summary(summary, out)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"qa {manifest}: n {summary['n']} | accuracy {summary['accuracy']:.2f}% | R_tg {fmt(summary['mean_r_tg'])} | "
          f"regions {fmt(summary['regions_explored'])} | span IoU {fmt(summary['span_iou'])} | audio verify "
          f"{fmt(summary['audio_verify'])} | consistency {fmt(summary['consistency'])} | "
          + (f"unreadable audio {summary['n_audio_errors']} (see items) | " if summary["n_audio_errors"] else "")
          + f"wrote {out}")
    if "official_score" in summary:
        print(f"{benchmark} official scorer: {summary['official_score']['total']['acc']:.2f}% "
              f"({summary['official_score']['total']['correct']}/{summary['official_score']['total']['n']}) | "
              f"result file {summary['official_file']}")
    return summary


# ---------------------------------------------------------------------------------------------
# Attention analysis (paper Figs 3-4, Table 4)

BLOCKS = ("system", "audio", "question", "generated")
PHASES = ("all", "reasoning", "timestamp", "answer")


def prompt_blocks(ids: list[int], tok, audio_token_id: int) -> list[int]:
    """Block index (into BLOCKS) of every prompt position, found from the token ids: system = from the start
    up to the first user turn's <|im_start|>; audio = the placeholder run; question = the rest of the prompt
    (user turn text, audio bos/eos markers, the assistant header). Generated positions come after."""
    im_start = tok.token_to_id(tokenizer_lib.IM_START)
    user = next((i for i, t in enumerate(ids) if t == im_start and tok.decode(ids[i + 1:i + 8]).startswith("user")),
                None)
    if user is None:
        raise ValueError("prompt has no '<|im_start|>user' turn: cannot split it into blocks")
    return [1 if t == audio_token_id else 0 if i < user else 2 for i, t in enumerate(ids)]


def token_phases(tok, ids: list[int], choices=None) -> list[set]:
    """Phases of each completion token (ids without the end-of-turn token), from the characters it writes:
      answer    - the final non-empty line, when it reads as an answer (an option is read from it, or the
                  completion has several lines); a one-line completion without an option (an STA answer)
                  has no answer phase,
      reasoning - every other token,
      timestamp - (a subset of reasoning or answer) tokens writing a number of a cited time span (any span
                  form reward.py reads) or a number followed by a time unit ("at 5.2s").
    "all" holds every token."""
    text = tok.decode(ids)
    ends = []                                                           # incremental decode: char offsets
    for i in range(len(ids)):                                           # (monotonic even when a byte-level
        ends.append(max(len(tok.decode(ids[:i + 1])), ends[-1] if ends else 0))   # piece splits a character)
    starts = [0] + ends[:-1]
    stripped = text.rstrip()
    line_start = stripped.rfind("\n") + 1
    n_lines = sum(1 for ln in text.splitlines() if ln.strip())
    has_answer = n_lines > 1 or (choices and extract_choice(text, choices) is not None)
    answer_from = line_start + (len(stripped[line_start:]) - len(stripped[line_start:].lstrip())) \
        if has_answer else len(text) + 1
    numbers = [(m.start(), m.end()) for a, b, _ in reward.span_mentions(text) for m in _NUM_RE.finditer(text, a, b)]
    numbers += [(m.start(), m.end()) for m in _TIME_NUM_RE.finditer(text)]
    out = []
    for a, b in zip(starts, ends):
        phases = {"all", "answer" if b > answer_from else "reasoning"}     # writes answer-line characters
        if any(a < ne and b > ns for ns, ne in numbers):
            phases.add("timestamp")
        out.append(phases)
    return out


@torch.no_grad()
def block_attention(ck: Checkpoint, rec: dict, completion_ids: list[int]):
    """Attention of each generated token to each block, per layer.

    One forward of the model with output_attentions=True over prompt + completion (one sequence, no
    padding). Token j of the completion is generated from query position P + j - 1 (P = prompt length),
    so its attention is that row, averaged over heads and summed over each block's key positions (the
    generated block then holds tokens 0..j-1). Returns (sums (L, N, 4) fp32, block lengths (N, 4)
    visible to each token); sums[l, j].sum() == 1 up to rounding."""
    batch = data.collate_prompts([rec], ck.tok, ck.family, ck.n_mels, ck.pad_to_30s,
                                 audio_cache={rec["audio"]: ck.load_audio(rec["audio"])})
    prompt = batch["input_ids"][0].tolist()
    P, N = len(prompt), len(completion_ids)
    blocks = torch.tensor(prompt_blocks(prompt, ck.tok, ck.model.audio_token_id) + [3] * N)
    ids = torch.tensor([prompt + completion_ids], device=ck.device)
    audio = {}
    if batch.get("input_features") is not None:
        audio = dict(input_features=batch["input_features"].to(ck.device, ck.dtype),
                     feature_attention_mask=batch["feature_attention_mask"].to(ck.device))
    _, attentions = ck.model(ids, output_attentions=True, **audio)
    onehot = F.one_hot(blocks, len(BLOCKS)).float().to(ck.device)                      # (T, 4)
    sums = torch.stack([a[0, :, P - 1:P - 1 + N].float().mean(0) @ onehot for a in attentions]).cpu()  # (L, N, 4)
    lengths = torch.zeros(N, len(BLOCKS))
    lengths[:, :3] = torch.bincount(blocks[:P], minlength=4)[:3].float()
    lengths[:, 3] = torch.arange(N).float()
    return sums, lengths


def attention_item(key: str, ck: Checkpoint, rec: dict, completion: dict) -> dict:
    """Per-phase totals over the item's completion tokens (so items pool by summing): `sum` (L x 4) sums of
    block attention, `pt_sum` / `pt_n` sums and counts of per-token means (block sum / visible block length)."""
    ids = completion["ids"]
    item = {"key": key, "id": rec.get("id"), "completion": completion["text"], "n_tokens": len(ids)}
    if not ids:
        return {**item, "phases": {}}
    sums, lengths = block_attention(ck, rec, ids)
    per_token = sums / lengths.clamp(min=1)                                          # (L, N, 4)
    visible = (lengths > 0).float()                                                  # (N, 4)
    phases = token_phases(ck.tok, ids, rec.get("choices"))
    item["block_lengths"] = dict(zip(BLOCKS[:3], lengths[0, :3].int().tolist()))
    item["sum_error"] = float((sums.sum(-1) - 1).abs().max())
    item["phases"] = {}
    for phase in PHASES:
        sel = torch.tensor([phase in p for p in phases])
        if not sel.any():
            continue
        item["phases"][phase] = {
            "n": int(sel.sum()), "sum": sums[:, sel].sum(1).tolist(),
            "pt_sum": (per_token[:, sel] * visible[sel]).sum(1).tolist(), "pt_n": visible[sel].sum(0).tolist()}
    item["audio_mass"] = {ph: sum(row[1] for row in v["sum"]) / len(v["sum"]) / v["n"]
                          for ph, v in item["phases"].items()}
    return item


def summarize_attention(items: list) -> dict:
    """Token-pooled means over all items: per phase, per layer and block, the mean block sum and the mean
    per-token attention; Table 4 = audio block sum averaged over layers."""
    ok = [it for it in items if "error" not in it and it["phases"]]
    per_phase = {}
    for phase in PHASES:
        rows = [it["phases"][phase] for it in ok if phase in it["phases"]]
        if not rows:
            continue
        n = sum(r["n"] for r in rows)
        L = len(rows[0]["sum"])
        tot = [[sum(r["sum"][l][b] for r in rows) for b in range(len(BLOCKS))] for l in range(L)]
        pt = [[sum(r["pt_sum"][l][b] for r in rows) for b in range(len(BLOCKS))] for l in range(L)]
        pt_n = [sum(r["pt_n"][b] for r in rows) for b in range(len(BLOCKS))]
        per_phase[phase] = {
            "n_tokens": n,
            "sum": {blk: [tot[l][b] / n for l in range(L)] for b, blk in enumerate(BLOCKS)},
            "per_token": {blk: [pt[l][b] / pt_n[b] if pt_n[b] else None for l in range(L)]
                          for b, blk in enumerate(BLOCKS)}}
        per_phase[phase]["mean_over_layers"] = {
            "sum": {blk: sum(v) / L for blk, v in per_phase[phase]["sum"].items()},
            "per_token": {blk: (sum(v) / L if None not in v else None)
                          for blk, v in per_phase[phase]["per_token"].items()}}
    table4 = {ph: per_phase[ph]["mean_over_layers"]["sum"]["audio"] for ph in per_phase}
    sink = None
    if "all" in per_phase:
        m = per_phase["all"]["mean_over_layers"]["per_token"]
        sink = m["system"] / m["audio"] if m["system"] is not None and m["audio"] else None
    return {"n_prompts": len(ok), "n_audio_errors": sum("error" in it for it in items),
            "layers": len(next(iter(per_phase.values()))["sum"]["audio"]) if per_phase else 0,
            "blocks": list(BLOCKS), "phases": per_phase, "table4_audio_mass": table4,
            "system_over_audio_per_token": sink,
            "max_sum_error": max((it["sum_error"] for it in ok), default=None),
            "method": {
                "blocks": "system = prompt start up to the first user turn; audio = the placeholder run; "
                          "question = the rest of the prompt (user text, audio markers, assistant header); "
                          "generated = completion tokens before the current one",
                "attention": "row of the query that generates the token (position P+j-1), averaged over heads, "
                             "summed over each block (sum) and divided by the block's visible length (per_token)",
                "phases": "answer = final line when it reads as an answer; reasoning = the other tokens; "
                          "timestamp = tokens writing numbers of cited spans (subset); the end-of-turn token is "
                          "left out",
                "pooling": "means over all tokens of all prompts (token-weighted); table4 = audio block sum "
                           "averaged over layers"},
            "items": items}


def plot_attention(summary: dict, out_dir: str, title: str = "") -> list[str]:
    """Per-layer lines per block (sum and per-token mean, one row per phase; paper Fig 3) and a phase x block
    bar chart of the layer-averaged sums (Fig 4 / Table 4). Returns the PNG paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    phases = [p for p in PHASES if p in summary["phases"]]
    if not phases:
        return []
    paths = []
    fig, axes = plt.subplots(len(phases), 2, figsize=(11, 3.2 * len(phases)), squeeze=False)
    for r, phase in enumerate(phases):
        ph = summary["phases"][phase]
        for c, kind in enumerate(("sum", "per_token")):
            ax = axes[r][c]
            for blk in BLOCKS:
                ys = ph[kind][blk]
                xs = [l for l, y in enumerate(ys) if y is not None]
                ax.plot(xs, [ys[l] for l in xs], marker="o", ms=3, label=blk)
            ax.set_title(f"{phase} tokens (n={ph['n_tokens']}): attention {kind.replace('_', ' ')}")
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if kind == "per_token":
                ax.set_yscale("log")
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "attention_layers.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / len(BLOCKS)
    for c, kind in enumerate(("sum", "per_token")):
        for b, blk in enumerate(BLOCKS):
            vals = [summary["phases"][p]["mean_over_layers"][kind][blk] or 0.0 for p in phases]
            axes[c].bar([i + b * width for i in range(len(phases))], vals, width, label=blk)
        axes[c].set_xticks([i + 0.4 - width / 2 for i in range(len(phases))], phases)
        axes[c].set_title(f"mean over layers: attention {kind.replace('_', ' ')}")
        if kind == "per_token":
            axes[c].set_yscale("log")
        axes[c].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "attention_phases.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def run_attention(ck: Checkpoint, manifest: str, out_dir: str, limit: int = 16, batch_size: int = 8,
                  max_new_tokens: int = 256, restart: bool = False, teacher_force: bool = False,
                  audio_root: str | None = None) -> dict:
    records = load_manifest(manifest, "auto", audio_root=audio_root, limit=limit)
    settings = {"command": "attention", **ck.settings(), "manifest": os.path.realpath(manifest),
                "max_new_tokens": max_new_tokens, "teacher_force": teacher_force}

    def compute(batch):
        ok, errors = _readable(ck, batch)
        if teacher_force:         # the record's reference text instead of the model's own completion
            outs = []
            for _, r in ok:
                ids = ck.tok.encode(data.target_text(r))
                outs.append({"text": ck.tok.decode(ids), "ids": ids})
        else:
            outs = decode_greedy(ck, [r for _, r in ok], max_new_tokens) if ok else []
        return errors + [attention_item(k, ck, r, o) for (k, r), o in zip(ok, outs)]

    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "attention.json")
    items = run_items(records, ItemFile(out + ".items.jsonl", settings, restart), compute, batch_size, "attention")
    summary = {**summarize_attention(items), "run": settings}
    summary["plots"] = plot_attention(summary, out_dir, os.path.basename(os.path.normpath(ck.path)))
    write_summary(summary, out)
    t4 = summary["table4_audio_mass"]
    print(f"attention {manifest}: {summary['n_prompts']} prompts | audio mass " +
          " | ".join(f"{k} {v:.4f}" for k, v in t4.items()) +
          (f" | system/audio per token {summary['system_over_audio_per_token']:.2f}x"
           if summary["system_over_audio_per_token"] else "") + f" | wrote {out}")
    return summary


# ---------------------------------------------------------------------------------------------
# Command: tables (the paper's Tables 1-4 side by side for several checkpoints)


def _named(values: list[str], what: str) -> list[tuple[str, str]]:
    """NAME=PATH arguments (NAME defaults to the file's stem / the directory's name)."""
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            name, path = os.path.splitext(os.path.basename(os.path.normpath(v)))[0], v
        if not re.fullmatch(r"[\w.-]+", name):
            raise EvalError(f"{what} name {name!r} (from {v!r}): use letters, digits, '.', '_' or '-'")
        out.append((name, path))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise EvalError(f"{what} names must be distinct, got {names}: write them as NAME=PATH")
    return out


def _fmt(v, scale=1.0, digits=4):
    return "-" if v is None else f"{v * scale:.{digits}f}"


def markdown_tables(results: dict, qa_names: list[str]) -> str:
    """results: name -> {"sta": summary|None, "qa": {qa_name: summary}, "attention": summary|None}."""
    names = list(results)
    lines = []

    def table(title, header, rows, note=""):
        lines.append(f"### {title}\n")
        if note:
            lines.append(note + "\n")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines.extend("| " + " | ".join(r) + " |" for r in rows)
        lines.append("")

    sta = {n: r["sta"] for n, r in results.items() if r.get("sta")}
    if sta:
        s0 = next(iter(sta.values()))
        table("Table 1: STA quality", ["model", "IoU", "SED-F1", "IoU>=0.7 (%)", "IoU>=0.5 (%)", "parse fail (%)", "n"],
              [[n, _fmt(s["mean_iou"]), _fmt(s["sed_f1"]), _fmt(s["iou_ge_0_7"], 100, 2), _fmt(s["iou_ge_0_5"], 100, 2),
                _fmt(s["parse_fail_rate"], 100, 2), str(s["n"])] for n, s in sta.items()],
              f"Greedy decoding; SED-F1 event-based, onset collar {s0['settings']['t_collar']} s, offset collar "
              f"max({s0['settings']['t_collar']} s, {100 * s0['settings']['percentage_of_length']:.0f}% of the event).")
    if qa_names:
        table("Table 2: accuracy (%)", ["model"] + qa_names,
              [[n] + [_fmt(results[n]["qa"][q]["accuracy"], 1, 2) if q in results[n]["qa"] else "-" for q in qa_names]
               for n in names])
        q = qa_names[0]
        table(f"Table 3: reasoning behaviour on {q}",
              ["model", "regions explored", "span IoU", "audio verify", "consistency", "R_tg", "accuracy (%)"],
              [[n, _fmt(s["regions_explored"], 1, 2), _fmt(s["span_iou"]), _fmt(s["audio_verify"]),
                _fmt(s["consistency"], 1, 3), _fmt(s["mean_r_tg"], 1, 3), _fmt(s["accuracy"], 1, 2)]
               for n in names for s in [results[n]["qa"].get(q)] if s],
              f"Audio verify: {AUDIO_VERIFY_METHOD}. Consistency: {CONSISTENCY_METHOD}.")
    att = {n: r["attention"] for n, r in results.items() if r.get("attention")}
    if att:
        table("Table 4: mean attention mass on audio tokens while generating",
              ["model", "all", "reasoning", "answer", "timestamp", "system/audio per token", "prompts"],
              [[n, *(_fmt(a["table4_audio_mass"].get(p)) for p in ("all", "reasoning", "answer", "timestamp")),
                _fmt(a["system_over_audio_per_token"], 1, 2), str(a["n_prompts"])] for n, a in att.items()],
              "Head-averaged attention of each generated token summed over the audio placeholder positions, "
              "averaged over tokens and layers.")
    return "\n".join(lines)


def examples_markdown(results: dict, qa_name: str, n: int = 3) -> str:
    """The first `n` answers of each checkpoint on one QA set, with what the metrics read from them."""
    lines = []
    for name, r in results.items():
        items = [it for it in r["qa"][qa_name]["items"] if "error" not in it][:n]
        lines.append(f"### {name}\n")
        for it in items:
            options = "; ".join(f"({'abcdefgh'[i]}) {c}" for i, c in enumerate(it["choices"]))
            verify = "-" if it.get("audio_verify") is None else f"{it['audio_verify']:.2f}"
            lines += [f"**Q** {it['question']} {options} - **gold** {it['answer']}", "",
                      "```", it["prediction"].strip() or "(empty)", "```",
                      f"correct {it['correct']} | spans {it['spans']} | evidence IoU "
                      f"{_fmt(it.get('evidence_iou'), 1, 2)} | audio verify {verify}", ""]
    return "\n".join(lines)


def plot_audio_by_layer(results: dict, path: str):
    """Audio-block attention per layer of every checkpoint, all tokens and timestamp tokens (paper Fig 4)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, phase in zip(axes, ("all", "timestamp")):
        for name, r in results.items():
            ph = (r.get("attention") or {}).get("phases", {}).get(phase)
            if ph:
                ax.plot(ph["sum"]["audio"], marker="o", ms=3, label=name)
        ax.set_title(f"attention mass on audio, {phase} tokens")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {phase} tokens", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_tables(args):
    checkpoints = _named(args.checkpoints, "checkpoint")
    qa_sets = _named(args.qa or [], "QA manifest")
    attention_manifest = args.attention or (qa_sets[0][1] if qa_sets else args.sta)
    results = {}
    for name, path in checkpoints:
        ck = _checkpoint(args, path)
        d = os.path.join(args.out, name)
        res = {"checkpoint": path, "sta": None, "qa": {}, "attention": None}
        if args.sta:
            res["sta"] = run_sta(ck, args.sta, os.path.join(d, "sta.json"), args.limit, args.batch_size,
                                 args.sta_max_new_tokens, args.restart, audio_root=args.audio_root)
        for q, manifest in qa_sets:
            res["qa"][q] = run_qa(ck, manifest, os.path.join(d, f"qa_{q}.json"), args.limit, args.batch_size,
                                  args.max_new_tokens, args.restart, audio_root=args.audio_root)
        if attention_manifest and args.attention_limit > 0:
            res["attention"] = run_attention(ck, attention_manifest, os.path.join(d, "attention"), args.attention_limit,
                                             args.batch_size, args.max_new_tokens, args.restart, args.teacher_force,
                                             audio_root=args.audio_root)
        results[name] = res
        del ck
    md = markdown_tables(results, [q for q, _ in qa_sets])
    print("\n" + md)
    with open(os.path.join(args.out, "tables.md"), "w", encoding="utf-8") as f:
        f.write(md)
    compact = {n: {"checkpoint": r["checkpoint"],
                   "sta": {k: v for k, v in r["sta"].items() if k != "items"} if r["sta"] else None,
                   "qa": {q: {k: v for k, v in s.items() if k != "items"} for q, s in r["qa"].items()},
                   "attention": {k: v for k, v in r["attention"].items() if k != "items"} if r["attention"] else None}
               for n, r in results.items()}
    write_summary(compact, os.path.join(args.out, "tables.json"))
    if any(r["attention"] for r in results.values()):
        plot_audio_by_layer(results, os.path.join(args.out, "attention_audio_by_layer.png"))
        for name, r in results.items():          # each checkpoint's figures next to the tables, for reports
            for plot in (r["attention"] or {}).get("plots", []):
                stem, ext = os.path.splitext(os.path.basename(plot))
                shutil.copy(plot, os.path.join(args.out, f"{stem}_{name}{ext}"))
    if qa_sets:
        with open(os.path.join(args.out, "examples.md"), "w", encoding="utf-8") as f:
            f.write(examples_markdown(results, qa_sets[0][0]))
    print(f"wrote {os.path.join(args.out, 'tables.md')} and tables.json (per-run outputs under {args.out}/<name>/)")
    return compact


# ---------------------------------------------------------------------------------------------
# Command line


def _checkpoint(args, path) -> Checkpoint:
    pad = {"auto": None, "true": True, "false": False}[args.pad_to_30s]
    return Checkpoint(path, args.device, args.dtype, args.family, pad)


def cmd_sta(args):
    run_sta(_checkpoint(args, args.checkpoint), args.manifest, args.out, args.limit, args.batch_size,
            args.max_new_tokens or 96, args.restart, args.t_collar, args.percentage_of_length, args.audio_root)


def cmd_qa(args):
    run_qa(_checkpoint(args, args.checkpoint), args.manifest, args.out, args.limit, args.batch_size,
           args.max_new_tokens or 256, args.restart, args.benchmark, args.audio_root, args.subset, args.official)


def cmd_attention(args):
    run_attention(_checkpoint(args, args.checkpoint), args.manifest, args.out, args.limit, args.batch_size,
                  args.max_new_tokens or 256, args.restart, args.teacher_force, args.audio_root)


def main(argv=None):
    parser = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:4]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score an MMAU-format file holding model_prediction")
    p.add_argument("--predictions", required=True, help="JSON list or JSONL of MMAU records")
    p.add_argument("--out", required=True, help="where to write the scored JSON list")
    p.set_defaults(func=cmd_score)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    common.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    common.add_argument("--family", default=None, choices=tokenizer_lib.FAMILIES,
                        help="chat template family (default: from the checkpoint)")
    common.add_argument("--pad-to-30s", default="auto", choices=["auto", "true", "false"],
                        help="pad features to one 30 s window (auto: the run's meta.json, else true)")
    common.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    common.add_argument("--max-new-tokens", type=int, default=0, help="0: 96 for sta, 256 otherwise")
    common.add_argument("--audio-root", default=None,
                        help="base of relative audio paths (default: the manifest's folder)")
    common.add_argument("--restart", action="store_true", help="discard OUT.items.jsonl instead of continuing it")

    p = sub.add_parser("sta", parents=[common], help="Table 1: decode Stage-1 questions, IoU / SED-F1")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--manifest", required=True, help="sta.jsonl (audio, question, answer, start, end)")
    p.add_argument("--out", required=True, help="result JSON (+ OUT.items.jsonl, the resumable item file)")
    p.add_argument("--limit", type=int, default=0, help="first N records only (0: all)")
    p.add_argument("--t-collar", type=float, default=0.2, help="SED onset collar (s)")
    p.add_argument("--percentage-of-length", type=float, default=0.2, help="SED offset collar share (sed_eval: 0.5)")
    p.set_defaults(func=cmd_sta)

    p = sub.add_parser("qa", parents=[common], help="Tables 2-3: answer multiple-choice questions")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--manifest", required=True, help="qa.jsonl, or the benchmark's own file with --benchmark")
    p.add_argument("--out", required=True, help="result JSON (+ OUT.items.jsonl)")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--benchmark", default=None, choices=sorted(BREAKDOWN),
                   help="read the manifest with data.py's reader of this benchmark; write its result file")
    p.add_argument("--subset", default=None, help="MMAU task / MMAR modality (default speech) / AIR-Bench task(s)")
    p.add_argument("--official", default=None, help="official result file (default: OUT stem + .official.json[l])")
    p.set_defaults(func=cmd_qa)

    p = sub.add_parser("attention", parents=[common], help="Figs 3-4 / Table 4: attention per block and layer")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--manifest", required=True, help="qa.jsonl or sta.jsonl")
    p.add_argument("--out", required=True, help="output directory (attention.json, PNG plots)")
    p.add_argument("--limit", type=int, default=16, help="prompts analysed (0: all)")
    p.add_argument("--teacher-force", action="store_true",
                   help="analyse the record's reference text (reasoning / STA answer) instead of generating")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("tables", parents=[common], help="the paper's tables for several checkpoints side by side")
    p.add_argument("--checkpoints", nargs="+", required=True, help="NAME=CKPT ...")
    p.add_argument("--sta", default=None, help="STA manifest for Table 1")
    p.add_argument("--qa", nargs="*", default=None,
                   help="QA manifests [NAME=]PATH: Table 2 columns; Table 3 on the first")
    p.add_argument("--attention", nargs="?", const=None, default=None, metavar="MANIFEST",
                   help="manifest for Table 4 (default, or the bare flag: the first --qa, else --sta)")
    p.add_argument("--attention-limit", type=int, default=16, help="prompts for Table 4 (0: skip the analysis)")
    p.add_argument("--teacher-force", action="store_true", help="attention on reference texts (see `attention`)")
    p.add_argument("--sta-max-new-tokens", type=int, default=96)
    p.add_argument("--limit", type=int, default=0, help="first N records of each manifest (0: all)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_tables)
    args = parser.parse_args(argv)
    if args.command == "tables" and not args.max_new_tokens:
        args.max_new_tokens = 256
    try:
        return args.func(args)
    except EvalError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
