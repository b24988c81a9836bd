"""Data: audio loading, word-timestamp readers, Stage-1 STA pairs, the multiple-choice QA schema and its
benchmark readers, the synthetic timestamped-speech corpus, and batching for both training stages.

The synthetic corpus is the built-in default's data, sized so that a few-M-parameter model trained from scratch
on CPU can learn it: 1.4-7 s clips (mean 3.6 s) of espeak-ng speech (22 voices, random rate, pitch, pauses and
background noise) over a ~155-word vocabulary in simple sentences, with exact word timings. Each clip gives
STA pairs and one four-option question whose answer needs one span of the audio (qa_type: next_word, count,
speaker, number_between, color_of, word_at_time, where), with its evidence span, the turn segments, and a
reference grounded answer in `reasoning` ('From 1.20s to 1.85s, the speaker says "..."' + 'Final answer: x';
the evidence is cited in 1..3 pieces, see citation_chunks).

Commands (all write JSONL; every skipped input row is counted and reported at the end):
    python data.py synth --out DIR --seed 0 --n 2000 [--workers 2] [--sta-per-clip 4] [--noise-prob 0.3]
        -> DIR/audio/*.wav (16 kHz mono), DIR/sta.jsonl, DIR/qa.jsonl, DIR/words.jsonl
    python data.py sta --src DIR_OR_MANIFEST --out sta.jsonl [--per-file 4] [--min-words 1] [--max-words 8]
        [--seed 0] [--no-sentence-boundaries]
    python data.py convert --format {mmau,mmar,airbench,meld,avqa} --src FILE --out qa.jsonl
        [--audio-root DIR] [--subset speech]

Deviations from the paper / decisions on its open points:
- The paper builds word timestamps with whisper-timestamped on real corpora; the built-in corpus instead
  synthesises speech with espeak-ng, whose WORD events give exact word onsets (ends from the signal energy).
- Stage-1 phrase sampling (length range, sentence boundaries) is not given by the paper: here 1..8 words,
  not crossing a sentence end (a word ending in . ? !), uniform over lengths then positions; a phrase that
  occurs twice in the transcript is rejected (its timestamp would be ambiguous). Synthetic clips: 1..4 words
  and spans of at least 0.15 s.
- The synthetic reference answers name the chosen option by its text ("Final answer: two"), not by its letter
  ("Final answer: (c) two", the paper's format, which the real-data targets keep): writing the letter needs a
  look-up (find the option whose text is the answer, copy the letter in front of it), an induction-style
  circuit that the tiny decoder does not form in a CPU budget. Measured on text alone (no audio): a 3-layer
  192-wide Qwen2 decoder trained on "Which option is gray? (a) red (b) gray ..." -> the letter, batch 32,
  stays at chance: 4 options, loss ln 4 after 6,000 steps (6 layers: 3,000); 2 options, ln 2 after 1,250
  steps (transformers' Qwen2 with the same config: the same; a 2-layer one: after 2,000), while copying the
  question's word ("Final answer:" -> " gray") is learned in 250 steps. With letters, Stage 1's letters were
  at chance (26.5 %) while the text after them was right 33.5 % of the time. reward.extract_choice and the
  official scorers read the option text, so accuracy is measured the same way.
- MELD -> MCQ: the paper's recipe is not public; here "What emotion ...?" with the true emotion and three
  other MELD emotions, drawn deterministically per utterance.
"""
import argparse
import csv
import ctypes
import functools
import json
import math
import multiprocessing
import os
import random
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch

import audio_encoder
from audio_encoder import SAMPLE_RATE, num_audio_tokens
from tokenizer import AUDIO_PLACEHOLDER, build_prompt, end_of_turn

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
LETTERS = "abcdefgh"
WINDOW_SECONDS = audio_encoder.CHUNK_LENGTH          # 30 s, one encoder window
MAX_WINDOWS = {"qwen2_audio": 1, "qwen2_5_omni": 1, "audioflamingo3": 20}  # AF3: 20 x 30 s = 10 min


# ---------------------------------------------------------------------------
# Bookkeeping of skipped inputs: never drop a row silently.

@dataclass
class Skips:
    """Counts skipped rows by reason and keeps the first few messages for the report."""
    name: str = "data"
    counts: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)
    total: int = 0

    def add(self, reason: str, message: str):
        self.counts[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(message)

    def __len__(self):
        return sum(self.counts.values())

    def report(self, file=None):
        file = file or sys.stderr
        if not self.counts:
            return
        parts = ", ".join(f"{k}: {v}" for k, v in self.counts.most_common())
        print(f"[{self.name}] skipped {len(self)} of {self.total} rows ({parts})", file=file)
        for m in self.examples:
            print(f"[{self.name}]   e.g. {m}", file=file)


# ---------------------------------------------------------------------------
# Audio: loading, band-limited resampling, mono mix, per-family windows.

class AudioError(RuntimeError):
    """An audio file could not be read; the message names the file."""


@functools.lru_cache(maxsize=32)
def _sinc_kernel(orig: int, new: int, width: int, rolloff: float, window: str, beta: float):
    """Polyphase windowed-sinc filter bank (new, 1, K) for orig->new (both already divided by their gcd).
    Same construction as torchaudio.functional.resample (sinc_interp_hann / sinc_interp_kaiser)."""
    base = min(orig, new) * rolloff                     # cutoff below the lower Nyquist, in units of the gcd
    pad = math.ceil(width * orig / base)
    idx = torch.arange(-pad, pad + orig, dtype=torch.float64)[None, None] / orig
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx) * base
    t = t.clamp(-width, width)
    if window == "hann":
        win = torch.cos(t * math.pi / width / 2) ** 2
    elif window == "kaiser":
        win = torch.i0(beta * torch.sqrt(1 - (t / width) ** 2)) / torch.i0(torch.tensor(beta, dtype=torch.float64))
    else:
        raise ValueError(f"resample window must be 'hann' or 'kaiser', got {window!r}")
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    return (sinc * win * base / orig).float(), pad


def resample(x: torch.Tensor, orig_sr: int, new_sr: int, lowpass_filter_width: int = 6, rolloff: float = 0.99,
             window: str = "hann", beta: float = 14.769656459379492) -> torch.Tensor:
    """Band-limited resampling of (..., n) float audio: windowed-sinc polyphase filter applied as a strided conv.
    Output length ceil(n * new_sr / orig_sr)."""
    if orig_sr == new_sr:
        return x
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    kernel, pad = _sinc_kernel(orig, new, lowpass_filter_width, rolloff, window, beta)
    shape = x.shape
    x = x.reshape(-1, shape[-1]).float()
    n = x.shape[-1]
    y = torch.nn.functional.conv1d(torch.nn.functional.pad(x, (pad, pad + orig))[:, None], kernel, stride=orig)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)[:, :math.ceil(new * n / orig)]
    return y.reshape(*shape[:-1], y.shape[-1])


def load_audio(path, sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Read wav/flac/ogg/mp3 (anything libsndfile reads), mix to mono, resample to sr -> (n,) float32.
    Raises AudioError naming the file when it is missing, unreadable, corrupt or empty."""
    path = str(path)
    try:
        data, file_sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/OSError/TypeError by cause
        raise AudioError(f"cannot read audio file {path}: {type(e).__name__}: {e}") from e
    if data.shape[0] == 0:
        raise AudioError(f"audio file {path} has no samples")
    if not np.isfinite(data).all():
        raise AudioError(f"audio file {path} contains NaN/inf samples")
    wav = torch.from_numpy(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0])
    return resample(wav, file_sr, sr).contiguous()


def audio_windows(wav: torch.Tensor, family: str, name: str = "") -> list:
    """Split a 16 kHz clip into the family's encoder windows: one window truncated at 30 s for Qwen2-Audio and
    Qwen2.5-Omni, consecutive 30 s windows up to 10 min for Audio Flamingo 3. Warns with what was cut."""
    if family not in MAX_WINDOWS:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(MAX_WINDOWS)}")
    win = WINDOW_SECONDS * SAMPLE_RATE
    limit = MAX_WINDOWS[family] * win
    if wav.shape[-1] > limit:
        cut = wav.shape[-1] - limit
        warnings.warn(f"{name or 'clip'}: {wav.shape[-1] / SAMPLE_RATE:.2f} s is longer than the {limit // SAMPLE_RATE} s "
                      f"that {family} accepts; truncated, {cut} samples ({cut / SAMPLE_RATE:.2f} s) cut")
        wav = wav[..., :limit]
    return [wav[i:i + win] for i in range(0, max(wav.shape[-1], 1), win)]


# ---------------------------------------------------------------------------
# Word-timestamp readers. Every reader returns words as a list of Word(word, start, end) in seconds.

class Word(NamedTuple):
    word: str
    start: float
    end: float


def _words(items, where: str, keep_silence: bool = False) -> list:
    out = []
    for w, s, e in items:
        s, e = float(s), float(e)
        if not (math.isfinite(s) and math.isfinite(e)) or s < 0 or e < s:
            raise ValueError(f"{where}: bad word time {w!r} [{s}, {e}] (need 0 <= start <= end)")
        w = str(w).strip()
        if w or keep_silence:
            out.append(Word(w, s, e))
    return out


def read_whisper_json(path) -> list:
    """whisper-timestamped (`text`/`confidence`) or openai-whisper (`word`/`probability`) transcription JSON."""
    obj = json.loads(Path(path).read_text(encoding="utf-8"))
    raw = [w for seg in obj.get("segments", []) for w in seg.get("words", [])] or obj.get("words", [])
    try:
        return _words([(w["text"] if "text" in w else w["word"], w["start"], w["end"]) for w in raw], str(path))
    except KeyError as e:
        raise ValueError(f"{path}: word entry without key {e} (expected text|word, start, end)") from e


def read_mfa_json(path) -> list:
    """Montreal Forced Aligner JSON: tiers[<name ending in 'words'>].entries = [[begin, end, label], ...]."""
    obj = json.loads(Path(path).read_text(encoding="utf-8"))
    tiers = {k: v for k, v in obj.get("tiers", {}).items() if k.endswith("words")}
    if not tiers:
        raise ValueError(f"{path}: no 'words' tier in {sorted(obj.get('tiers', {}))}")
    items = [(lab, b, e) for t in tiers.values() for b, e, lab in t["entries"]]
    return sorted(_words(items, str(path)), key=lambda w: w.start)


_TG_TOKEN = re.compile(r'"(?:[^"]|"")*"|\[\d*\]|<exists>|<absent>|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?')


def read_textgrid(path, tier: str = "words") -> list:
    """Praat TextGrid (long or short text format, UTF-8 or UTF-16): intervals of the tier(s) named `tier`
    or '<speaker> - words'. Empty intervals (silence) are dropped."""
    raw = Path(path).read_bytes()
    text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8-sig")
    toks = [t for t in _TG_TOKEN.findall(text) if not t.startswith("[")]
    val = lambda t: t[1:-1].replace('""', '"') if t.startswith('"') else t
    try:
        assert val(toks[0]) == "ooTextFile" and val(toks[1]) == "TextGrid", "not an ooTextFile TextGrid"
        i = 4 + (toks[4] in ("<exists>", "<absent>"))
        n_tiers, i = int(toks[i]), i + 1
        items = []
        for _ in range(n_tiers):
            cls, name, n = val(toks[i]), val(toks[i + 1]), int(toks[i + 4])
            i += 5
            width = 3 if cls == "IntervalTier" else 2
            if cls == "IntervalTier" and (name == tier or name.endswith(f" - {tier}")):
                items += [(val(toks[j + 2]), toks[j], toks[j + 1]) for j in range(i, i + 3 * n, 3)]
            i += width * n
    except (AssertionError, IndexError, ValueError) as e:
        raise ValueError(f"{path}: malformed TextGrid ({e})") from e
    if not items:
        raise ValueError(f"{path}: no interval tier named {tier!r}")
    return sorted(_words(items, str(path)), key=lambda w: w.start)


def read_mfa_csv(path) -> list:
    """MFA CSV export, header Begin,End,Label,Type,Speaker; rows of Type 'words' only."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"Begin", "End", "Label"} <= set(rows[0]):
        raise ValueError(f"{path}: expected columns Begin,End,Label,Type,Speaker, found {list(rows[0])}")
    items = [(r["Label"], r["Begin"], r["End"]) for r in rows if r.get("Type", "words") == "words"]
    return sorted(_words(items, str(path)), key=lambda w: w.start)


def read_librispeech_alignment(path, keep_silence: bool = False) -> dict:
    """CorentinJ/librispeech-alignments `<spk>-<chapter>.alignment.txt`: lines `utt ",W1,W2," "t1,t2,..."`
    with END times (start = previous end). Returns {utt_id: words}; empty words (silence) kept on request."""
    out = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            utt, words, ends = line.strip().split(" ")
            words, ends = words.strip('"').split(","), [float(t) for t in ends.strip('"').split(",")]
            assert len(words) == len(ends), f"{len(words)} words vs {len(ends)} times"
        except (ValueError, AssertionError) as e:
            raise ValueError(f"{path}:{n}: malformed alignment line ({e}): {line[:80]!r}") from e
        starts = [0.0] + ends[:-1]
        out[utt] = _words(zip(words, starts, ends), f"{path}:{n}", keep_silence)
    return out


def read_words_jsonl(path, skips: Skips = None) -> list:
    """Plain JSONL lines {audio, words: [{word, start, end}]} -> [(audio_path, words)]; relative audio paths are
    taken relative to the manifest. Malformed lines are skipped and counted in `skips`."""
    skips = skips if skips is not None else Skips(str(path))
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        skips.total += 1
        try:
            r = json.loads(line)
            words = _words([(w["word"], w["start"], w["end"]) for w in r["words"]], f"{path}:{n}")
            out.append((_resolve(r["audio"], Path(path).parent), words))
        except (ValueError, KeyError, TypeError) as e:
            skips.add("malformed record", f"{path}:{n}: {type(e).__name__}: {e}")
    return out


def _resolve(audio, root) -> str:
    p = Path(audio)
    return str(p if p.is_absolute() or root is None else Path(root) / p)


def _sibling_audio(path: Path, stem: str = None):
    for ext in AUDIO_EXTENSIONS:
        p = path.with_name((stem or path.name.split(".")[0]) + ext)
        if p.exists():
            return str(p)
    return None


def read_word_file(path, skips: Skips) -> list:
    """Any supported word-timestamp file -> [(audio_path or None, words)]; audio found next to the file."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".jsonl"):
        return read_words_jsonl(path, skips)
    if name.endswith(".alignment.txt"):
        return [(_sibling_audio(path, utt), w) for utt, w in read_librispeech_alignment(path).items()]
    if name.endswith(".textgrid"):
        return [(_sibling_audio(path), read_textgrid(path))]
    if name.endswith(".csv"):
        return [(_sibling_audio(path), read_mfa_csv(path))]
    if name.endswith(".json"):
        obj = json.loads(path.read_text(encoding="utf-8"))
        reader = read_mfa_json if "tiers" in obj else read_whisper_json
        return [(_sibling_audio(path), reader(path))]
    raise ValueError(f"{path}: unknown word-timestamp format (expected .json, .TextGrid, .csv, .alignment.txt, .jsonl)")


# ---------------------------------------------------------------------------
# Stage 1: supervised timestamp alignment (STA) pairs.

STA_QUESTION = "What is the timestamp of the following segment? {phrase}"
STA_ANSWER = "The segment {phrase} starts at {start:.2f} seconds and ends at {end:.2f} seconds."
REASONING_CITE = 'From {start:.2f}s to {end:.2f}s, {who} "{words}".'     # who: "the speaker says", ...
FINAL_ANSWER = "Final answer: {answer}"


def sta_pair(words: list, i: int, j: int, audio=None) -> dict:
    """The STA pair for the contiguous phrase words[i..j] (inclusive)."""
    phrase = " ".join(w.word for w in words[i:j + 1])
    s, e = round(float(words[i].start), 2), round(float(words[j].end), 2)
    return {"audio": audio, "question": STA_QUESTION.format(phrase=phrase),
            "answer": STA_ANSWER.format(phrase=phrase, start=s, end=e), "start": s, "end": e, "phrase": phrase}


def sample_phrase(words: list, rng: random.Random, min_words: int = 1, max_words: int = 8,
                  sentence_boundaries: bool = True):
    """Pick (i, j) of a contiguous phrase: length uniform in [min_words, max_words] (capped by what fits),
    then a uniform start; with sentence_boundaries the phrase never runs past a word ending in . ? !"""
    if not words:
        raise ValueError("cannot sample a phrase from an empty word list")
    sents, cur = [], []
    for k, w in enumerate(words):
        cur.append(k)
        if sentence_boundaries and w.word.endswith((".", "?", "!")):
            sents.append(cur)
            cur = []
    sents += [cur] if cur else []
    longest = max(len(s) for s in sents)
    n = rng.randint(min(min_words, longest), min(max_words, longest))
    sent = rng.choice([s for s in sents if len(s) >= n])
    i = sent[rng.randint(0, len(sent) - n)]
    return i, i + n - 1


def sta_pairs(words: list, n: int, rng: random.Random, audio=None, unique: bool = True, context=None,
              min_seconds: float = 0.0, **phrase_opts) -> list:
    """n distinct STA pairs from one transcript (fewer if it is too short). With `unique`, a phrase that occurs
    more than once in `context` (default: these words) is rejected, since its timestamp would be ambiguous;
    so is a span shorter than min_seconds."""
    seen, out = set(), []
    text = " " + " ".join(w.word.lower() for w in (context or words)) + " "
    for _ in range(8 * n):
        i, j = sample_phrase(words, rng, **phrase_opts)
        phrase = " " + " ".join(w.word.lower() for w in words[i:j + 1]) + " "
        if (i, j) not in seen and not (unique and text.count(phrase) > 1) and \
                words[j].end - words[i].start >= min_seconds:
            seen.add((i, j))
            out.append(sta_pair(words, i, j, audio))
        if len(out) == n:
            break
    return out


def build_sta_corpus(src, out, per_file: int = 4, seed: int = 0, **phrase_opts) -> Skips:
    """STA JSONL from a directory of word-timestamp files (searched recursively) or one JSONL manifest."""
    src = Path(src)
    files = [src] if src.is_file() else sorted(
        p for p in src.rglob("*") if p.is_file() and (p.name.lower().endswith(
            (".json", ".textgrid", ".csv", ".alignment.txt", ".jsonl"))))
    skips, rng, n_out = Skips("sta"), random.Random(seed), 0
    with open(out, "w", encoding="utf-8") as f:
        for p in files:
            try:
                items = read_word_file(p, skips)
            except (ValueError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
                skips.total += 1
                skips.add("unreadable word file", f"{p}: {e}")
                continue
            if not p.name.endswith(".jsonl"):          # (read_words_jsonl counts its own lines)
                skips.total += len(items)
            for audio, words in items:
                if audio is None or not Path(audio).exists():
                    skips.add("audio not found", f"{p}: no audio file next to it for these words")
                elif not words:
                    skips.add("no words", f"{p}: empty transcript")
                else:
                    duration = round(sf.info(audio).duration, 3)
                    for pair in sta_pairs(words, per_file, rng, audio=audio, **phrase_opts):
                        f.write(json.dumps(dict(pair, duration=duration), ensure_ascii=False) + "\n")
                        n_out += 1
    print(f"wrote {n_out} STA pairs from {len(files)} files to {out}")
    skips.report()
    return skips


# ---------------------------------------------------------------------------
# Multiple-choice QA schema and the benchmark readers.

def format_mcq(question: str, choices: list) -> str:
    """Question followed by one option per line: (a) ..., (b) ..."""
    return question.strip() + "\n" + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))


def qa_record(id, audio, question, choices, answer, source, duration=None, evidence=None, segments=None,
              **extra) -> dict:
    """One QA record in the team schema (SPEC); raises ValueError if the answer is not one of the choices."""
    choices = [str(c) for c in choices]
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"record {id}: need 2..{len(LETTERS)} choices, got {len(choices)}")
    if answer not in choices:
        raise ValueError(f"record {id}: answer {answer!r} is not one of the choices {choices}")
    rec = {"id": str(id), "audio": audio, "question": question, "choices": choices, "answer": answer,
           "answer_index": choices.index(answer), "duration": duration}
    if evidence is not None:
        rec["evidence"] = evidence
    if segments is not None:
        rec["segments"] = segments
    rec.update(extra)
    rec["source"] = source
    return rec


def _read_json_or_jsonl(path):
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith(".jsonl"):
        return [json.loads(l) for l in text.splitlines() if l.strip()]
    return json.loads(text)


def _convert(rows, make, skips: Skips) -> list:
    out = []
    for n, r in enumerate(rows):
        skips.total += 1
        try:
            rec = make(r)
            if rec is not None:
                out.append(rec)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            skips.add("malformed record", f"row {n}: {type(e).__name__}: {e}")
    return out


def read_mmau(path, audio_root=None, task="speech", skips: Skips = None) -> list:
    """MMAU test-mini JSON list; `audio_id` is relative to audio_root (default: the JSON's folder)."""
    skips, root = skips if skips is not None else Skips("mmau"), audio_root or Path(path).parent
    make = lambda r: None if task and r["task"] != task else qa_record(
        r["id"], _resolve(r["audio_id"], root), r["question"], r["choices"], r["answer"], source=r)
    return _convert(_read_json_or_jsonl(path), make, skips)


def read_mmar(path, audio_root=None, modality="speech", skips: Skips = None) -> list:
    """MMAR-meta .json or .jsonl; `audio_path` relative to audio_root (default: the file's folder)."""
    skips, root = skips if skips is not None else Skips("mmar"), audio_root or Path(path).parent
    make = lambda r: None if modality and r["modality"] != modality else qa_record(
        r["id"], _resolve(r["audio_path"], root), r["question"], r["choices"], r["answer"], source=r)
    return _convert(_read_json_or_jsonl(path), make, skips)


def read_airbench_foundation(path, audio_root=None, tasks=None, skips: Skips = None) -> list:
    """AIR-Bench Foundation_meta.json; audio at <root>/<task_name>_<dataset_name>/<path> (.flac for grounding)."""
    skips, root = skips if skips is not None else Skips("airbench"), Path(audio_root or Path(path).parent)

    def make(r):
        if tasks and r["task_name"] not in tasks:
            return None
        choices = [r[k] for k in ("choice_a", "choice_b", "choice_c", "choice_d") if r.get(k) is not None]
        rel = r["path"] if r["task_name"] != "Audio_Grounding" else str(Path(r["path"]).with_suffix(".flac"))
        return qa_record(r["uniq_id"], str(root / f"{r['task_name']}_{r['dataset_name']}" / rel), r["question"],
                         choices, r["answer_gt"], source=r)
    return _convert(_read_json_or_jsonl(path), make, skips)


MELD_EMOTIONS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]


def parse_meld_time(t: str) -> float:
    """MELD episode time 'h:mm:ss,ms' with either hour padding ('00:03:10,120' or '0:03:10,120') -> seconds."""
    m = re.fullmatch(r"\s*(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})\s*", t)
    if not m:
        raise ValueError(f"bad MELD time {t!r} (expected h:mm:ss,ms)")
    h, mi, s, ms = m.groups()
    return int(h) * 3600 + int(mi) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000


def read_meld(csv_path, clip_dir=None, clip_ext="wav", seed=0, skips: Skips = None) -> list:
    """MELD *_sent_emo.csv -> emotion MCQ per utterance on clip dia{D}_utt{U}.<clip_ext> (convert MELD's mp4 to
    wav first; soundfile cannot read mp4). Three distractor emotions drawn deterministically per utterance."""
    skips, root = skips if skips is not None else Skips("meld"), Path(clip_dir or Path(csv_path).parent)
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))

    def make(r):
        d, u, emo = int(r["Dialogue_ID"]), int(r["Utterance_ID"]), r["Emotion"].strip().lower()
        if emo not in MELD_EMOTIONS:
            raise ValueError(f"unknown emotion {emo!r}")
        start, end = parse_meld_time(r["StartTime"]), parse_meld_time(r["EndTime"])
        rng = random.Random(f"{seed}-{d}-{u}")
        choices = rng.sample([e for e in MELD_EMOTIONS if e != emo], 3) + [emo]
        rng.shuffle(choices)
        src = dict(r, start_seconds=start, end_seconds=end)
        return qa_record(f"dia{d}_utt{u}", str(root / f"dia{d}_utt{u}.{clip_ext}"),
                         "What emotion does the speaker express in this utterance?", choices, emo,
                         source=src, duration=round(end - start, 3))
    return _convert(rows, make, skips)


def read_avqa(path, audio_root=None, skips: Skips = None) -> list:
    """R1-AQA AVQA JSONL (`question_text`, `multi_choice`, integer `answer`, `audio_path`; a relative audio_path
    is taken relative to audio_root, default the file's folder)."""
    skips, root = skips if skips is not None else Skips("avqa"), audio_root or Path(path).parent
    make = lambda r: qa_record(r["id"], _resolve(r["audio_path"], root), r["question_text"].replace("video", "audio"),
                               r["multi_choice"], r["multi_choice"][int(r["answer"])], source=r)
    return _convert(_read_json_or_jsonl(path), make, skips)


BENCHMARK_READERS = {"mmau": read_mmau, "mmar": read_mmar, "airbench": read_airbench_foundation,
                     "meld": read_meld, "avqa": read_avqa}


# ---------------------------------------------------------------------------
# espeak-ng through ctypes (the library and voices ship in the espeakng-loader wheel).

class _EspeakEvent(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_ESPEAK_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                    ctypes.POINTER(_EspeakEvent))
_EVENT_WORD, _AUDIO_OUTPUT_SYNCHRONOUS, _SSML, _CHARS_UTF8, _RATE, _PITCH = 1, 2, 0x10, 1, 1, 3


class Espeak:
    """Synchronous espeak-ng: text -> (int16 samples, sample index where each WORD event fires)."""

    def __init__(self):
        import espeakng_loader
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                      espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate}); data path {espeakng_loader.get_data_path()}")
        self._chunks, self._word_samples = [], []
        self._callback = _ESPEAK_CALLBACK(self._on_synth)     # keep a reference: C holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def _on_synth(self, wav, n, events):
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        i = 0
        while events[i].type != 0:                         # list terminated by espeakEVENT_LIST_TERMINATED
            if events[i].type == _EVENT_WORD:
                self._word_samples.append(events[i].sample)
            i += 1
        return 0

    def synth(self, words: list, voice: str, rate: int, pitch: int, breaks_ms: list):
        """Speak words with an SSML break of breaks_ms[k] ms after word k (0 = none)."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        self.lib.espeak_SetParameter(_RATE, rate, 0)
        self.lib.espeak_SetParameter(_PITCH, pitch, 0)
        text = " ".join(w + (f' <break time="{b}ms"/>' if b else "") for w, b in zip(words, breaks_ms)).encode()
        self._chunks, self._word_samples = [], []
        rc = self.lib.espeak_Synth(text, len(text) + 1, 0, 1, 0, _SSML | _CHARS_UTF8, None, None)
        if rc != 0 or len(self._word_samples) != len(words):
            raise RuntimeError(f"espeak-ng failed on {text!r}: rc {rc}, {len(self._word_samples)} word events "
                               f"for {len(words)} words")
        return np.concatenate(self._chunks), list(self._word_samples)

    def seed(self, seed: int):
        """Seed the engine's noise generator (espeak_Initialize seeds it from the clock)."""
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))


@functools.lru_cache(maxsize=1)
def espeak() -> Espeak:
    """One engine per process (the library keeps global state)."""
    return Espeak()


def word_bounds(wav: np.ndarray, onsets: list, sr: int, floor_db: float = -35.0) -> list:
    """Exact onsets from espeak are refined to the first/last 5 ms frame above floor_db (re the loudest frame)
    inside [onset_k, onset_k+1): this trims leading silence and SSML pauses from each word."""
    hop = sr // 200
    n = len(wav) // hop
    rms = np.sqrt((wav[:n * hop].astype(np.float64).reshape(n, hop) ** 2).mean(1) + 1e-12)
    active = rms > rms.max() * 10 ** (floor_db / 20)
    out = []
    for k, s in enumerate(onsets):
        e = onsets[k + 1] if k + 1 < len(onsets) else len(wav)
        f = np.nonzero(active[s // hop:max(e // hop, s // hop + 1)])[0]
        out.append((s, e) if len(f) == 0 else (s // hop * hop + f[0] * hop, min(e, (s // hop + f[-1] + 1) * hop)))
    return out


# ---------------------------------------------------------------------------
# The synthetic timestamped speech corpus: vocabulary, scenes, grounded QA with reference reasoning.

VOCAB = {
    "color": "red blue green yellow black white brown pink orange purple gray gold".split(),
    "animal": ("dog cat bird fish horse cow pig sheep duck goat mouse rabbit frog bear lion tiger wolf fox owl "
               "snake whale monkey zebra camel").split(),
    "number": ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
               "sixteen seventeen eighteen nineteen twenty").split(),
    "object": ("ball book cup chair table box hat shoe car boat train bike key lamp door bed bag clock pen phone "
               "apple bread cake egg kite tree flower house window drum").split(),
    "name": "anna ben clara david emma frank grace henry lucy max nora sam".split(),
    "verb": "runs jumps sleeps eats swims sings walks sits plays hides waits rests dances climbs".split(),
    "place": "park school garden kitchen river beach forest city farm store library lake".split(),
    "day": "monday tuesday wednesday thursday friday saturday sunday".split(),
    "adjective": "big small old new happy sad fast slow tall hot cold quiet".split(),
}
FUNCTION_WORDS = "the a and i see is goes to on has numbers are".split()
CATEGORY = {w: c for c, ws in VOCAB.items() for w in ws}
VOICES = [f"{lang}+{v}" for lang in ("en-us", "en") for v in "m1 m2 m3 m4 m5 m7 f1 f2 f3 f4 f5".split()]
ORDINALS = ["first", "second", "third", "fourth"]
QA_TYPES = ["next_word", "count", "speaker", "number_between", "color_of", "word_at_time", "where"]


def _sentence(rng, kind):
    """One simple sentence as a word list."""
    V = VOCAB
    if kind == "desc":
        return ["the", rng.choice(V["color"]), rng.choice(V["animal"]), rng.choice(V["verb"])]
    if kind == "have":
        return [rng.choice(V["name"]), "has", "a", rng.choice(V["adjective"] + V["color"]), rng.choice(V["object"])]
    if kind == "go":
        return [rng.choice(V["name"]), "goes", "to", "the", rng.choice(V["place"]), "on", rng.choice(V["day"])]
    raise ValueError(kind)


def _scene(rng, qa_type):
    """Turns (word lists, one voice each) and a question builder for one clip of the given QA type.
    Returns (turns, make_qa); make_qa(timed words per turn) -> (question, choices, answer, evidence words,
    who says them, optional explanation); the choices are shuffled later."""
    V = VOCAB
    if qa_type == "speaker":
        n_turns = rng.choice([2, 2, 3])
        turns = [_sentence(rng, "desc" if n_turns == 3 else rng.choice(["desc", "have"])) for _ in range(n_turns)]
        while len({" ".join(t) for t in turns}) < len(turns):          # every turn distinct: redraw a repeat
            turns[next(i for i in range(1, len(turns)) if turns[i] in turns[:i])] = _sentence(rng, "desc")
        k = rng.randrange(len(turns))
        def make(tw):
            ws = tw[k]
            said = " ".join(w.word for w in ws)
            ans = f"the {ORDINALS[k]} speaker"
            return (f'Which speaker says "{said}"?', [f"the {o} speaker" for o in ORDINALS], ans, ws,
                    f"the {ORDINALS[k]} speaker says", "")
        return turns, make
    if qa_type == "count":
        n_items = rng.randint(3, 4)
        n_animals = rng.randint(1, n_items)
        items = rng.sample(V["animal"], n_animals) + rng.sample(V["object"], n_items - n_animals)
        rng.shuffle(items)
        words = ["i", "see"] + [x for it in items[:-1] for x in ("a", it)] + ["and", "a", items[-1]]
        def make(tw):
            ws = tw[0][2:]
            animals = [w.word for w in ws if CATEGORY.get(w.word) == "animal"]
            listed = animals[0] if len(animals) == 1 else ", ".join(animals[:-1]) + " and " + animals[-1]
            ans = ["one", "two", "three", "four"][n_animals - 1]
            return ("How many animals are named?", ["one", "two", "three", "four"], ans, ws, "the speaker says",
                    f"The animals named are {listed}, so the answer is {ans}.")
        return [words], make
    if qa_type == "number_between":
        nums = rng.sample(V["number"], rng.randint(4, 6))
        k = rng.randint(1, len(nums) - 2)
        def make(tw):
            ws = tw[0][2:]
            a, x, b = ws[k - 1], ws[k], ws[k + 1]
            others = [n for n in nums if n != x.word] + rng.sample([n for n in V["number"] if n not in nums], 3)
            return (f'What number is said between "{a.word}" and "{b.word}"?', [x.word] + rng.sample(others, 3),
                    x.word, [a, x, b], "the speaker says", "")
        return [["the", "numbers"] + nums], make
    if qa_type == "color_of":
        colors, animals = rng.sample(V["color"], 2), rng.sample(V["animal"], 2)
        k = rng.randrange(2)
        words = ["the", colors[0], animals[0], rng.choice(V["verb"]), "and", "the", colors[1], animals[1],
                 rng.choice(V["verb"])]
        def make(tw):
            ws = tw[0]
            c, a = ws[1 + 5 * k], ws[2 + 5 * k]
            choices = [c.word, colors[1 - k]] + rng.sample([x for x in V["color"] if x not in colors], 2)
            return f"What color is the {a.word}?", choices, c.word, [c, a], "the speaker says", ""
        return [words], make
    if qa_type == "where":
        people, places = rng.sample(V["name"], 2), rng.sample(V["place"], 2)
        k = rng.randrange(2)
        words = [people[0], "goes", "to", "the", places[0], "and", people[1], "goes", "to", "the", places[1]]
        def make(tw):
            ws = tw[0][6 * k:6 * k + 5]
            choices = [places[k], places[1 - k]] + rng.sample([p for p in V["place"] if p not in places], 2)
            return f"Where does {people[k]} go?", choices, places[k], ws, "the speaker says", ""
        return [words], make
    # next_word and word_at_time: one or two plain sentences, redrawn in the rare draw without a word to ask about
    while True:
        turns = [_sentence(rng, rng.choice(["desc", "have", "go"])) + (
            _sentence(rng, "desc") if rng.random() < 0.3 else [])]
        words = turns[0]
        content = [i for i, w in enumerate(words) if w in CATEGORY and words.count(w) == 1]
        cand = [i for i in range(len(words) - 1) if words.count(words[i]) == 1 and words[i + 1] in CATEGORY]
        if (cand if qa_type == "next_word" else content):        # a word to ask about
            break
    if qa_type == "next_word":
        k = rng.choice(cand)
        def make(tw):
            a, b = tw[0][k], tw[0][k + 1]
            pool = [w for w in VOCAB[CATEGORY[b.word]] if w != b.word]
            return (f'Which word comes right after "{a.word}"?', [b.word] + rng.sample(pool, 3), b.word, [a, b],
                    "the speaker says", "")
        return turns, make
    if qa_type == "word_at_time":
        k = rng.choice(content)
        def make(tw):
            w = tw[0][k]
            pool = [x for x in dict.fromkeys(words) if x != w.word and x in CATEGORY]
            pool += [x for x in VOCAB[CATEGORY[w.word]] if x != w.word and x not in pool]
            return (f"Which word is spoken from {w.start:.2f}s to {w.end:.2f}s?", [w.word] + rng.sample(pool[:8], 3),
                    w.word, [w], "the speaker says", "")
        return turns, make
    raise ValueError(f"unknown QA type {qa_type!r}; expected one of {QA_TYPES}")


def citation_chunks(ws: list, seed: int, index: int) -> list:
    """How finely a reference answer cites its evidence words: 1..3 contiguous pieces (uniform, at most one per
    word), so Stage 1 teaches a spread of span counts for the compaction reward to act on (the paper's models
    cite one to several spans). Its own RNG, so the rest of the clip does not depend on it."""
    rng = random.Random(f"tgsr-cite-{seed}-{index}")
    k = rng.randint(1, min(3, len(ws)))
    bounds = [round(i * len(ws) / k) for i in range(k + 1)]
    return [ws[a:b] for a, b in zip(bounds, bounds[1:])]


def synth_clip(index: int, seed: int, out_dir: str, sta_per_clip: int = 4, noise_prob: float = 0.3,
               qa_types=tuple(QA_TYPES)) -> dict:
    """Synthesise clip `index`, write DIR/audio/<index>.wav and return its STA pairs, QA record and word list.
    Text, voices, pauses and questions depend only on (seed, index); the exact samples also depend on what the
    espeak engine spoke before in this process (see build_synth_corpus)."""
    rng = random.Random(f"tgsr-synth-{seed}-{index}")
    qa_type = qa_types[index % len(qa_types)] if rng.random() < 0.5 else rng.choice(qa_types)
    turns, make_qa = _scene(rng, qa_type)
    eng = espeak()
    voices = rng.sample(VOICES, len(turns))
    pieces, words_t, segments = [np.zeros(int(rng.uniform(0.05, 0.4) * eng.sample_rate), np.float32)], [], []
    offset = len(pieces[0])
    for t, (words, voice) in enumerate(zip(turns, voices)):
        breaks = [rng.choice([0, 0, 0, 80, 150, 250]) for _ in words[:-1]] + [0]
        wav, onsets = eng.synth(words, voice, rate=rng.randint(150, 210), pitch=rng.randint(30, 70),
                                breaks_ms=breaks)
        wav = wav.astype(np.float32) / 32768.0
        bounds = word_bounds(wav, onsets, eng.sample_rate)
        last = bounds[-1][1]
        tw = [Word(w, round(float(offset + s) / eng.sample_rate, 3), round(float(offset + e) / eng.sample_rate, 3))
              for w, (s, e) in zip(words, bounds)]
        words_t.append(tw)
        segments.append({"text": " ".join(words), "start": tw[0].start, "end": tw[-1].end, "speaker": voice})
        gap = np.zeros(int(rng.uniform(0.2, 0.45 if t + 1 < len(turns) else 0.3) * eng.sample_rate), np.float32)
        tail = min(len(wav), last + eng.sample_rate // 50)      # keep 20 ms of decay, faded out
        wav = wav[:tail].copy()
        wav[last:] *= np.linspace(1, 0, tail - last, dtype=np.float32)
        pieces += [wav, gap]
        offset += tail + len(gap)
    clip = np.concatenate(pieces)
    if rng.random() < noise_prob:
        snr_db = rng.uniform(15, 35)
        speech_rms = np.sqrt(np.mean(clip[clip != 0] ** 2))
        noise = np.random.default_rng([seed, index]).standard_normal(len(clip)).astype(np.float32)
        clip = clip + noise * speech_rms * 10 ** (-snr_db / 20)
    audio = resample(torch.from_numpy(clip), eng.sample_rate, SAMPLE_RATE).numpy()
    audio = audio * (rng.uniform(0.3, 0.9) / max(np.abs(audio).max(), 1e-6))
    rel = f"audio/{index:06d}.wav"
    sf.write(os.path.join(out_dir, rel), audio, SAMPLE_RATE, subtype="PCM_16")
    duration = round(len(audio) / SAMPLE_RATE, 3)

    q, choices, ans, ws, who, why = make_qa(words_t)
    s, e = round(ws[0].start, 2), round(ws[-1].end, 2)
    order = list(range(len(choices)))
    rng.shuffle(order)
    choices = [choices[i] for i in order]
    reasoning = " ".join(REASONING_CITE.format(start=round(c[0].start, 2), end=round(c[-1].end, 2), who=who,
                                               words=" ".join(w.word for w in c))
                         for c in citation_chunks(ws, seed, index)) + (f" {why}" if why else "") + \
        "\n" + FINAL_ANSWER.format(answer=ans)
    all_words = [w for tw in words_t for w in tw]
    qa = qa_record(f"synth-{seed}-{index:06d}", rel, q, choices, ans, duration=duration,
                   evidence=[[s, e]], segments=segments, reasoning=reasoning,
                   source={"dataset": "synthetic", "qa_type": qa_type, "seed": seed, "index": index})
    sta = [dict(p, id=f"synth-{seed}-{index:06d}-sta{j}", duration=duration) for j, p in enumerate(
        pair for tw in rng.sample(words_t, len(words_t)) for pair in sta_pairs(
            tw, -(-sta_per_clip // len(words_t)), rng, audio=rel, context=all_words, max_words=4, min_seconds=0.15,
            sentence_boundaries=False))]
    words_rec = {"audio": rel, "duration": duration, "words": [w._asdict() for w in all_words],
                 "segments": segments}
    return {"sta": sta[:sta_per_clip], "qa": qa, "words": words_rec}


SHARD_CLIPS = 64   # clips synthesised in one fresh process; part of what a seed means, do not change


def _synth_shard(args):
    start, stop, seed, out, sta_per_clip, noise_prob = args
    torch.set_num_threads(1)
    espeak().seed(seed * 1_000_003 + start)
    return [synth_clip(i, seed, out, sta_per_clip, noise_prob) for i in range(start, stop)]


def build_synth_corpus(out: str, seed: int = 0, n: int = 1000, workers: int = 2, sta_per_clip: int = 4,
                       noise_prob: float = 0.3) -> dict:
    """Write the synthetic corpus and DIR/stats.json; returns the stats.

    espeak-ng keeps hidden state across calls (voice-source phase, flutter, breath noise), so the same text
    renders slightly differently depending on what was spoken before. For byte-identical output per seed,
    clips are made in fixed shards of SHARD_CLIPS, each in a fresh process with a seeded engine: the result
    does not depend on the worker count, and a corpus of n clips is a prefix of a larger one."""
    os.makedirs(os.path.join(out, "audio"), exist_ok=True)
    t0 = time.time()
    shards = [(a, min(a + SHARD_CLIPS, n), seed, out, sta_per_clip, noise_prob) for a in range(0, n, SHARD_CLIPS)]
    # fork is cheap, but a child must not inherit an engine this process has already used
    ctx = multiprocessing.get_context("spawn" if espeak.cache_info().currsize else "fork")
    with ctx.Pool(max(1, min(workers, len(shards))), maxtasksperchild=1) as pool:
        results = [r for shard in pool.imap(_synth_shard, shards) for r in shard]
    with open(os.path.join(out, "sta.jsonl"), "w") as fs, open(os.path.join(out, "qa.jsonl"), "w") as fq, \
            open(os.path.join(out, "words.jsonl"), "w") as fw:
        for r in results:
            fs.writelines(json.dumps(p) + "\n" for p in r["sta"])
            fq.write(json.dumps(r["qa"]) + "\n")
            fw.write(json.dumps(r["words"]) + "\n")
    durs = np.array([r["qa"]["duration"] for r in results])
    vocab = {w["word"] for r in results for w in r["words"]["words"]}
    stats = {"clips": n, "seconds": round(time.time() - t0, 2), "sta_pairs": sum(len(r["sta"]) for r in results),
             "duration_min": float(durs.min()), "duration_mean": round(float(durs.mean()), 3),
             "duration_max": float(durs.max()), "vocab_used": len(vocab),
             "qa_types": dict(Counter(r["qa"]["source"]["qa_type"] for r in results))}
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    return stats


# ---------------------------------------------------------------------------
# Training examples: JSONL loading with counted skips, prompts and targets.

def load_examples(path, kind: str = "auto", check_audio="header", audio_root=None, skips: Skips = None) -> list:
    """Read an STA or QA JSONL; rows missing required keys, bad QA answers or unreadable audio are skipped,
    counted and reported. check_audio: "header" (fast: the file opens and has samples), "decode" (also reads
    every sample, catching corrupt data behind a valid header) or None. Relative audio paths resolve against
    audio_root (default: the JSONL's folder)."""
    skips = skips if skips is not None else Skips(str(path))
    root = audio_root or Path(path).parent
    out, checked = [], {}                                  # audio path -> None (readable) or the error
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        skips.total += 1
        try:
            r = json.loads(line)
            is_qa = "choices" in r if kind == "auto" else kind == "qa"
            need = ("audio", "question", "choices", "answer") if is_qa else ("audio", "question", "answer")
            missing = [k for k in need if k not in r]
            if missing:
                raise KeyError(f"missing {missing}")
            if is_qa and r["answer"] not in r["choices"]:
                raise ValueError(f"answer {r['answer']!r} not in choices")
        except (ValueError, KeyError, TypeError) as e:
            skips.add("malformed record", f"{path}:{n}: {e}")
            continue
        r["audio"] = _resolve(r["audio"], root)
        if check_audio:
            if r["audio"] not in checked:                  # records of one clip (e.g. 8 STA pairs) share a check
                try:
                    if check_audio == "decode":
                        load_audio(r["audio"])
                    elif sf.info(r["audio"]).frames <= 0:
                        raise AudioError(f"audio file {r['audio']} has no samples")
                    checked[r["audio"]] = None
                except Exception as e:  # any reason soundfile cannot open the file is a counted skip
                    checked[r["audio"]] = e
            if checked[r["audio"]] is not None:
                skips.add("bad audio", f"{path}:{n}: {r['audio']}: {checked[r['audio']]}")
                continue
        out.append(r)
    skips.report()
    return out


def prompt_text(example: dict) -> str:
    """The user question: STA questions as is, QA questions with their (a)..(d) options."""
    return format_mcq(example["question"], example["choices"]) if "choices" in example else example["question"]


def target_text(example: dict) -> str:
    """The SFT target: the STA answer, or for QA the reference reasoning (else just the final-answer line)."""
    if "choices" not in example:
        return example["answer"]
    if example.get("reasoning"):
        return example["reasoning"]
    i = example["choices"].index(example["answer"])
    return f"Final answer: ({LETTERS[i]}) {example['answer']}"


# ---------------------------------------------------------------------------
# Batching: features, token ids with masks, length-bucketed and sharded batch sampling.

def _audio_inputs(examples, family, n_mels, pad_to_30s, audio_cache):
    """Features of every window of every example, and each example's audio-token count. The count comes from
    the feature mask the encoder will see, so placeholders and encoder outputs always agree."""
    windows, owner = [], []
    for b, ex in enumerate(examples):
        path = ex["audio"]
        wav = audio_cache.get(path) if audio_cache is not None else None
        if wav is None:
            wav = load_audio(path)
            if audio_cache is not None:
                audio_cache[path] = wav
        ws = audio_windows(wav, family, name=path)
        windows += ws
        owner += [b] * len(ws)
    feats, feat_mask = audio_encoder.features(windows, n_mels, pad_to_30s=pad_to_30s)   # (N, n_mels, F), (N, F)
    n_tokens = [0] * len(examples)
    for b, valid in zip(owner, feat_mask.sum(1).tolist()):
        n_tokens[b] += num_audio_tokens(int(valid))
    return feats, feat_mask, n_tokens


def _pad(seqs, pad_id, left: bool):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[b, sl] = torch.tensor(s, dtype=torch.long)
        mask[b, sl] = 1
    return ids, mask


def collate_sft(examples, tokenizer, family, n_mels, pad_to_30s, audio_cache=None) -> dict:
    """Right-padded SFT batch. loss_mask[b, t] is True where input_ids[b, t] is a target token (answer and the
    end-of-turn token); the loss predicts token t from position t-1."""
    feats, feat_mask, n_tokens = _audio_inputs(examples, family, n_mels, pad_to_30s, audio_cache)
    seqs, n_prompt = [], []
    for ex, n in zip(examples, n_tokens):
        p = tokenizer.encode(build_prompt(family, prompt_text(ex), n))
        a = tokenizer.encode(target_text(ex) + end_of_turn(family))
        seqs.append(p + a)
        n_prompt.append(len(p))
    input_ids, attention_mask = _pad(seqs, tokenizer.pad_token_id, left=False)       # (B, T)
    pos = torch.arange(input_ids.shape[1])[None]                                      # (1, T)
    loss_mask = (pos >= torch.tensor(n_prompt)[:, None]) & attention_mask.bool()      # (B, T)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "input_features": feats, "feature_attention_mask": feat_mask}


def collate_packed(groups, tokenizer, family, n_mels, pad_to_30s, audio_cache=None) -> dict:
    """SFT batch with one row per clip: each group (examples sharing one audio file) becomes one row holding the
    shared prompt prefix (system turn, audio placeholders, ...) once, then every example's rest of prompt +
    answer as a branch. A branch attends to the prefix and to itself only, at the positions it has alone, so
    the loss is that of the examples in separate rows (tests/test_train_sta.py) at a fraction of the tokens,
    and the audio is encoded once per clip. attention_mask is (B, 1, T, T) bool, with position_ids; token_mask
    (B, T) marks the real tokens."""
    feats, feat_mask, n_tokens = _audio_inputs([g[0] for g in groups], family, n_mels, pad_to_30s, audio_cache)
    rows, positions, branches, targets = [], [], [], []
    for group, n in zip(groups, n_tokens):
        if len({ex["audio"] for ex in group}) != 1:
            raise ValueError(f"collate_packed: a group must share one audio file, got {[ex['audio'] for ex in group]}")
        prompts = [tokenizer.encode(build_prompt(family, prompt_text(ex), n)) for ex in group]
        answers = [tokenizer.encode(target_text(ex) + end_of_turn(family)) for ex in group]
        shared = min(len(p) for p in prompts) - 1        # every branch keeps >= 1 prompt token before its answer
        for p in prompts[1:]:
            shared = next((i for i in range(shared) if p[i] != prompts[0][i]), shared)
        row, pos, branch, target = prompts[0][:shared], list(range(shared)), [0] * shared, [False] * shared
        if row.count(tokenizer.token_to_id(AUDIO_PLACEHOLDER[family])) != n:
            raise ValueError(f"collate_packed: the shared prompt prefix of {group[0]['audio']} does not hold all "
                             f"{n} audio placeholders")
        for j, (p, a) in enumerate(zip(prompts, answers), start=1):
            tail = p[shared:] + a
            row += tail
            pos += range(shared, shared + len(tail))
            branch += [j] * len(tail)
            target += [False] * (len(p) - shared) + [True] * len(a)
        rows.append(row)
        positions.append(pos)
        branches.append(branch)
        targets.append(target)
    input_ids, valid = _pad(rows, tokenizer.pad_token_id, left=False)                   # (B, T)
    T = input_ids.shape[1]
    position_ids, _ = _pad(positions, 0, left=False)
    branch, _ = _pad(branches, -1, left=False)                                           # pads: -1
    loss_mask = _pad([[int(t) for t in ts] for ts in targets], 0, left=False)[0].bool()
    i = torch.arange(T)
    causal = (i[None, :] <= i[:, None])[None]                                            # (1, T, T)
    same = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])        # key in prefix or own branch
    mask = (causal & same & valid.bool()[:, None, :]) | (i[None, :] == i[:, None])[None]  # pads see themselves
    return {"input_ids": input_ids, "attention_mask": mask[:, None], "position_ids": position_ids,
            "loss_mask": loss_mask, "token_mask": valid, "input_features": feats, "feature_attention_mask": feat_mask}


def collate_prompts(examples, tokenizer, family, n_mels, pad_to_30s, audio_cache=None) -> dict:
    """Left-padded generation prompts (no answer) with their audio features."""
    feats, feat_mask, n_tokens = _audio_inputs(examples, family, n_mels, pad_to_30s, audio_cache)
    seqs = [tokenizer.encode(build_prompt(family, prompt_text(ex), n)) for ex, n in zip(examples, n_tokens)]
    input_ids, attention_mask = _pad(seqs, tokenizer.pad_token_id, left=True)        # (B, T)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "input_features": feats, "feature_attention_mask": feat_mask}


def shard(items: list, rank: int, world_size: int) -> list:
    """Deterministic rank shard: items[rank::world_size], truncated so every rank gets the same count."""
    assert 0 <= rank < world_size, f"rank {rank} not in [0, {world_size})"
    n = len(items) // world_size
    return list(items[rank::world_size][:n])


class BucketBatchSampler:
    """Batches of similar length: shuffle, sort inside pools of `pool_batches` batches, shuffle the batches,
    then keep this rank's share. Same (seed, epoch) -> same batches on every rank."""

    def __init__(self, lengths, batch_size: int, shuffle: bool = True, seed: int = 0, pool_batches: int = 50,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        self.lengths, self.batch_size, self.shuffle, self.seed = list(lengths), batch_size, shuffle, seed
        self.pool, self.drop_last, self.rank, self.world_size, self.epoch = pool_batches, drop_last, rank, world_size, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def batches(self) -> list:
        rng = random.Random(f"{self.seed}-{self.epoch}")
        idx = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(idx)
        pool = self.batch_size * self.pool
        idx = [i for p in range(0, len(idx), pool) for i in sorted(idx[p:p + pool], key=lambda i: self.lengths[i])]
        out = [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        if self.shuffle:
            rng.shuffle(out)
        return shard(out, self.rank, self.world_size)

    def __iter__(self):
        return iter(self.batches())

    def __len__(self):
        return len(self.batches())


# ---------------------------------------------------------------------------
# Command line.

def main(argv=None):
    ap = argparse.ArgumentParser(description="Data tools: synthetic corpus, STA pairs, benchmark -> QA JSONL.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="synthetic timestamped speech corpus")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n", type=int, default=1000)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--sta-per-clip", type=int, default=4)
    s.add_argument("--noise-prob", type=float, default=0.3)
    t = sub.add_parser("sta", help="STA pairs from word-timestamp files")
    t.add_argument("--src", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--per-file", type=int, default=4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--min-words", type=int, default=1)
    t.add_argument("--max-words", type=int, default=8)
    t.add_argument("--no-sentence-boundaries", action="store_true")
    c = sub.add_parser("convert", help="benchmark file -> QA JSONL")
    c.add_argument("--format", required=True, choices=sorted(BENCHMARK_READERS))
    c.add_argument("--src", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--audio-root", default=None)
    c.add_argument("--subset", default=None, help="MMAU task / MMAR modality (default speech) / AIR-Bench task")
    a = ap.parse_args(argv)
    if a.cmd == "synth":
        print(json.dumps(build_synth_corpus(a.out, a.seed, a.n, a.workers, a.sta_per_clip, a.noise_prob), indent=1))
    elif a.cmd == "sta":
        build_sta_corpus(a.src, a.out, a.per_file, a.seed, min_words=a.min_words, max_words=a.max_words,
                         sentence_boundaries=not a.no_sentence_boundaries)
    else:
        skips = Skips(a.format)
        if a.format in ("mmau", "mmar"):
            key = "task" if a.format == "mmau" else "modality"
            recs = BENCHMARK_READERS[a.format](a.src, a.audio_root, **{key: a.subset or "speech"}, skips=skips)
        elif a.format == "airbench":
            recs = read_airbench_foundation(a.src, a.audio_root, [a.subset] if a.subset else None, skips=skips)
        elif a.format == "meld":
            recs = read_meld(a.src, a.audio_root, skips=skips)
        else:
            recs = read_avqa(a.src, a.audio_root, skips=skips)
        with open(a.out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        print(f"wrote {len(recs)} QA records to {a.out}")
        skips.report()


if __name__ == "__main__":
    main()
