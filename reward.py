"""Rewards for Stage 2 (GRPO) of timestamp-grounded speech reasoning, and the answer/span parsers
that eval.py reuses so that training and evaluation read completions the same way.

Every public function is total: whatever the completion text or the example holds (None, empty,
missing keys, garbage), it returns a value and never raises. Only a wrong option *name* passed to
`total_reward` raises (a programming error, caught on the first call).

The paper's reward is R = R_answer + R_tg (PAPER.md, FORMATS.md §0):
  R_answer  1.0 if the option read from the completion's last non-empty line is the right one.
  R_tg      compaction score of k, the number of cited time spans: 0 if k = 0, C_max if k <= k_ref,
            C_min if k >= k_max, linear in between (k_ref=1, k_max=5, C_max=0.5, C_min=0.1).

Deviations from the authors' reward code (ijihoon98/Timestamp-Grounded-Speech-Reasoning,
codes/grpo_critic.py), each deliberate:
  * k counts DISTINCT spans. The authors' k is the total number of hits of 5 overlapping regexes, so
    "from 0 to 5 seconds" counts 2 (patterns "from X to Y" and "X to Y seconds" both hit) and a
    span repeated verbatim counts twice. `count_spans_paper` reproduces their count exactly and
    `RewardOptions(span_count="paper")` selects it.
  * More span forms are read: the bracketed "[0.00s - 4.30s]" of the paper's demo page (their code
    counts 0), "(0.27-2.95 s)" of the published transcripts, "between X and Y seconds", em dashes.
  * Options (a)..(h) are accepted, not only (a)..(d), but only letters that name an existing
    choice; "A." / "A)" / "Answer: B" / the exact option text are also read. A last line naming two
    different options ("(a) or (b)") is no answer (their code takes the first one).
  * Beyond the paper, off by default: a grounding reward (mean over cited spans of the best IoU with
    the example's evidence spans) and a penalty for hallucinated spans (start >= end, or ending past
    the audio's duration), the "dense reward" the paper lists as future work.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields

# ---------------------------------------------------------------------------------------------
# Time spans

_NUM = r"(\d+(?:\.\d+)?)"
_UNIT = r"(?:seconds?|secs?|s)(?![a-z])"          # s / sec / secs / second / seconds, not "speaker"
_DASH = r"[-\u2013\u2014]"                         # hyphen, en dash, em dash
_SEP = rf"(?:\s*{_DASH}\s*|\s+to\s+|\s*~\s*)"      # between the two numbers of a span

# Each pattern has exactly two groups: start, end. Order matters only for overlap resolution at the
# same position (the earlier, more specific pattern wins).
_SPAN_PATTERNS = [
    # "starts at 1.2 seconds and ends at 3.4 seconds"
    rf"\bstarts?\s+at\s+{_NUM}\s*(?:{_UNIT})?\s*,?\s+and\s+ends?\s+at\s+{_NUM}(?:\s*{_UNIT})?",
    # "from 1.2s to 3.4s", "from 1.2 - 3.4 seconds"
    rf"\bfrom\s+{_NUM}\s*(?:{_UNIT})?{_SEP}{_NUM}(?:\s*{_UNIT})?",
    # "between 1.2 and 3.4 seconds"
    rf"\bbetween\s+{_NUM}\s*(?:{_UNIT})?\s+and\s+{_NUM}\s*{_UNIT}",
    # "[0.00s - 4.30s]" (paper demo page), "(1.2 - 3.4)", "(1.2s-3.4s)", "(0.27-2.95 s)"
    rf"\[\s*{_NUM}\s*(?:{_UNIT})?{_SEP}{_NUM}\s*(?:{_UNIT})?\s*\]",
    rf"\(\s*{_NUM}\s*(?:{_UNIT})?{_SEP}{_NUM}\s*(?:{_UNIT})?\s*\)",
    # "(1.2, 3.4)"
    rf"\(\s*{_NUM}\s*(?:{_UNIT})?\s*,\s*{_NUM}\s*(?:{_UNIT})?\s*\)",
    # "1.2 to 3.4 seconds", "1.2-3.4s" (a unit after the second number is required here)
    rf"(?<![\d.]){_NUM}\s*(?:{_UNIT})?{_SEP}{_NUM}\s*{_UNIT}",
]
_SPAN_RES = [re.compile(p, re.IGNORECASE) for p in _SPAN_PATTERNS]

# The authors' 5 patterns, verbatim in meaning (codes/grpo_critic.py, TimestampCompactionORM).
_PAPER_SPAN_RES = [re.compile(p, re.IGNORECASE) for p in [
    r"starts?\s+at\s+\d+\.?\d*\s*(?:seconds?|s)?\s+and\s+ends?\s+at\s+\d+\.?\d*\s*(?:seconds?|s)?",
    r"(?:is\s+)?from\s+\d+\.?\d*\s*(?:seconds?|s)?\s*to\s+\d+\.?\d*\s*(?:seconds?|s)?",
    "\\(\\d+\\.?\\d*s?\\s*[-\u2013]\\s*\\d+\\.?\\d*s?\\)",
    r"\(\d+\.?\d*\s*,\s*\d+\.?\d*\)",
    "\\d+\\.?\\d*\\s*(?:to|[-\u2013])\\s*\\d+\\.?\\d*\\s*seconds?",
]]


def _as_text(text) -> str:
    return text if isinstance(text, str) else ("" if text is None else str(text))


def extract_spans(text) -> list[tuple[float, float]]:
    """Distinct cited time spans (start, end) in seconds, in order of first appearance.

    Forms: "from X to Y", "X to Y seconds", "starts at X and ends at Y", "(X - Y)", "(Xs-Ys)",
    "(X, Y)", "[Xs - Ys]", "between X and Y seconds", `"text" (X-Y s)`, with s/sec/second(s),
    decimals, hyphen/en/em dashes. Overlapping matches of different forms are one mention; a span
    is kept as written (a reversed span stays reversed, so the hallucination check can see it).
    Distinct = same (start, end) values; the authors' code would count repeats and overlaps again.
    """
    spans = []
    for _, _, span in span_mentions(text):
        if span not in spans:
            spans.append(span)
    return spans


def span_mentions(text) -> list[tuple[int, int, tuple[float, float]]]:
    """(char_start, char_end, (start, end)) of every span mention in reading order, repeats kept: where
    matches of different forms overlap, the one starting first (then the longest, then the earlier form)
    is the mention and the others inside it are skipped. eval.py uses it to tell which tokens write times."""
    text = _as_text(text)
    hits = []                                     # (char_start, char_end, pattern_rank, span)
    for rank, rx in enumerate(_SPAN_RES):
        for m in rx.finditer(text):
            hits.append((m.start(), m.end(), rank, (float(m.group(1)), float(m.group(2)))))
    hits.sort(key=lambda h: (h[0], -h[1], h[2]))
    out, taken_until = [], -1
    for start, end, _, span in hits:
        if start >= taken_until:                  # not inside a mention already read
            out.append((start, end, span))
            taken_until = end
    return out


def count_spans_paper(text) -> int:
    """k exactly as the authors' TimestampCompactionORM counts it: total hits of their 5 patterns
    (overlaps and repeats included; "from 0 to 5 seconds" -> 2, "[0.00s - 4.30s]" -> 0)."""
    text = _as_text(text)
    return sum(len(rx.findall(text)) for rx in _PAPER_SPAN_RES)


# ---------------------------------------------------------------------------------------------
# Final answer

_LETTERS = "abcdefgh"
# Lead-ins stripped from the last line before reading the option ("Final answer: (b) two").
_LEAD_IN = re.compile(
    r"^(?:(?:so|thus|therefore|hence)\s*,?\s+)?(?:the\s+)?(?:final\s+|correct\s+|best\s+)?"
    r"(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*", re.IGNORECASE)


def _norm(s: str) -> str:
    return " ".join(re.findall(r"\w+", s.lower()))


def last_line(text) -> str:
    """The last non-empty line, stripped (the line the paper's answer reward reads)."""
    lines = [ln.strip() for ln in _as_text(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def extract_choice(text, choices) -> int | None:
    """Index of the option chosen on the completion's last non-empty line, or None.

    Read, in order: "(b)" anywhere on the line (case-insensitive; two different such letters ->
    None); "b)" / "B." / "B:" at the start of the answer (after a lead-in such as "Final answer:");
    a bare letter as the whole answer ("B", "b.", "The answer is B."); else the option's text: the
    answer equals one option's text, or exactly one option's text appears in the line as whole
    words (options contained in a longer matching option are dropped first). A letter that names no
    existing choice is ignored. The article "a" inside a sentence is never read as option (a).
    """
    choices = [_as_text(c) for c in choices] if isinstance(choices, (list, tuple)) else []
    n = min(len(choices), len(_LETTERS)) if choices else 4       # choices unknown: (a)..(d)
    line = re.sub(r"[*_`#>]+|</?answer>", " ", last_line(text)).strip()
    if not line:
        return None
    valid = _LETTERS[:n]

    letters = {m.group(1).lower() for m in re.finditer(r"\(([a-h])\)", line, re.IGNORECASE)}
    letters &= set(valid)
    if len(letters) > 1:
        return None
    if letters:
        return valid.index(letters.pop())

    answer = _LEAD_IN.sub("", line, count=1).strip()
    m = re.match(r"^\(?([a-h])\s*[.):]", answer, re.IGNORECASE)
    if m and m.group(1).lower() in valid:
        return valid.index(m.group(1).lower())
    m = re.fullmatch(r"([a-h])\s*[.!]?", answer, re.IGNORECASE)
    if m and m.group(1).lower() in valid:
        return valid.index(m.group(1).lower())
    m = re.search(r"\b(?i:answer|option|choice)\s+(?i:is\s+)?([A-H])\b", line)
    if m and m.group(1).lower() in valid:
        return valid.index(m.group(1).lower())

    if not choices:
        return None
    norm_answer, norm_line = _norm(answer), f" {_norm(line)} "
    normed = [_norm(c) for c in choices]
    exact = [i for i, c in enumerate(normed) if c and c == norm_answer]
    if len(set(normed[i] for i in exact)) == 1:
        return exact[0]
    inside = [i for i, c in enumerate(normed) if c and f" {c} " in norm_line]
    inside = [i for i in inside
              if not any(j != i and normed[i] != normed[j] and f" {normed[i]} " in f" {normed[j]} "
                         for j in inside)]
    if len({normed[i] for i in inside}) == 1:                   # one text (maybe listed twice)
        return inside[0]
    return None


def answer_index(example) -> int | None:
    """The example's correct option index: `answer_index`, else `answer` text in `choices`, else a
    letter `label` ("c", the authors' GRPO rows). None when the example carries none."""
    example = example if isinstance(example, dict) else {}
    choices = example.get("choices")
    choices = choices if isinstance(choices, (list, tuple)) else []
    idx = example.get("answer_index")
    if isinstance(idx, int) and not isinstance(idx, bool) and 0 <= idx < max(len(choices), 1):
        return idx
    answer = example.get("answer")
    if isinstance(answer, str) and answer in choices:
        return choices.index(answer)
    label = example.get("label")
    if isinstance(label, str) and len(label.strip()) == 1 and label.strip().lower() in _LETTERS:
        return _LETTERS.index(label.strip().lower())
    return None


# ---------------------------------------------------------------------------------------------
# Reward components


def answer_reward(completion, example) -> float:
    """1.0 if the option on the last line is the example's answer, else 0.0."""
    example = example if isinstance(example, dict) else {}
    gold = answer_index(example)
    choice = extract_choice(completion, example.get("choices"))
    return 1.0 if gold is not None and choice == gold else 0.0


def compaction_reward(k: int, k_ref: int = 1, k_max: int = 5, c_max: float = 0.5,
                      c_min: float = 0.1) -> float:
    """R_tg: 0 for k = 0, c_max for k <= k_ref, c_min for k >= k_max, linear in between."""
    if k <= 0:
        return 0.0
    if k <= k_ref:
        return c_max
    if k >= k_max:
        return c_min
    return c_max - (k - k_ref) * (c_max - c_min) / (k_max - k_ref)


def temporal_iou(a, b) -> float:
    """IoU of two time intervals [s, e]; 0.0 when either is empty or reversed (e <= s)."""
    (s1, e1), (s2, e2) = a, b
    if e1 <= s1 or e2 <= s2:
        return 0.0
    inter = min(e1, e2) - max(s1, s2)
    return max(0.0, inter) / (max(e1, e2) - min(s1, s2))


def grounding_reward(spans, evidence) -> float:
    """Mean over cited spans of each span's best IoU with an evidence span; 0.0 without either."""
    evidence = [tuple(map(float, ev[:2])) for ev in (evidence or []) if _is_span(ev)]
    spans = [s for s in (spans or []) if _is_span(s)]
    if not spans or not evidence:
        return 0.0
    return sum(max(temporal_iou(s, ev) for ev in evidence) for s in spans) / len(spans)


def hallucinated_spans(spans, duration=None, tolerance: float = 0.0) -> int:
    """Number of spans that cannot be real: start >= end, or ending past duration + tolerance."""
    bad = 0
    for s, e in spans or []:
        if s >= e or (isinstance(duration, (int, float)) and e > duration + tolerance):
            bad += 1
    return bad


def _is_span(x) -> bool:
    return (isinstance(x, (list, tuple)) and len(x) >= 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x[:2]))


# ---------------------------------------------------------------------------------------------
# Total reward


@dataclass(frozen=True)
class RewardOptions:
    """Weights and shapes of the reward. Defaults are the paper's R = R_answer + R_tg."""
    answer_weight: float = 1.0
    compaction_weight: float = 1.0
    k_ref: int = 1
    k_max: int = 5
    c_max: float = 0.5
    c_min: float = 0.1
    span_count: str = "distinct"          # "distinct" (ours) | "paper" (the authors' regex hit count)
    grounding_weight: float = 0.0         # beyond the paper: + w * mean best IoU with `evidence`
    hallucination_weight: float = 0.0     # beyond the paper: - w * share of impossible spans
    duration_tolerance: float = 0.0       # seconds a span may end past `duration`

    def __post_init__(self):
        if self.span_count not in ("distinct", "paper"):
            raise ValueError(f"span_count must be 'distinct' or 'paper', got {self.span_count!r}")
        if not self.k_max > self.k_ref:
            raise ValueError(f"need k_max > k_ref, got k_ref={self.k_ref} k_max={self.k_max}")


_OPTION_NAMES = {f.name for f in fields(RewardOptions)}


def total_reward(completion, example, options: RewardOptions | None = None,
                 **overrides) -> tuple[float, dict]:
    """(reward, components) for one completion of one QA example (SPEC QA record: `choices`,
    `answer_index` or `answer`, optional `evidence` [[s, e], ...] and `duration`).

    components: reward, answer, compaction, grounding, hallucination (the penalty, >= 0), k (the
    count the compaction used), n_spans (distinct spans), n_hallucinated, choice (index or -1),
    parsed (1.0 if an option was read). All floats except choice/k/n_*, ready for logging.
    """
    unknown = set(overrides) - _OPTION_NAMES
    if unknown:
        raise TypeError(f"unknown reward option(s) {sorted(unknown)}; known: {sorted(_OPTION_NAMES)}")
    opt = options or RewardOptions()
    if overrides:
        opt = RewardOptions(**{**{f: getattr(opt, f) for f in _OPTION_NAMES}, **overrides})
    example = example if isinstance(example, dict) else {}

    choice = extract_choice(completion, example.get("choices"))
    gold = answer_index(example)
    r_answer = 1.0 if gold is not None and choice == gold else 0.0
    spans = extract_spans(completion)
    k = len(spans) if opt.span_count == "distinct" else count_spans_paper(completion)
    r_tg = compaction_reward(k, opt.k_ref, opt.k_max, opt.c_max, opt.c_min)
    r_ground = grounding_reward(spans, example.get("evidence")) if opt.grounding_weight else 0.0
    n_bad = hallucinated_spans(spans, example.get("duration"), opt.duration_tolerance)
    penalty = n_bad / len(spans) if spans else 0.0

    value = (opt.answer_weight * r_answer + opt.compaction_weight * r_tg
             + opt.grounding_weight * r_ground - opt.hallucination_weight * penalty)
    return value, {
        "reward": value, "answer": r_answer, "compaction": r_tg, "grounding": r_ground,
        "hallucination": penalty, "k": k, "n_spans": len(spans), "n_hallucinated": n_bad,
        "choice": -1 if choice is None else choice, "parsed": float(choice is not None),
    }
