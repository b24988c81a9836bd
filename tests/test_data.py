"""data.py against independent references: hand-written files in the real formats (FORMATS.md §9), scipy's
polyphase resampler, soundfile-written clips in several rates/channels/codecs, the paper's real clips and MMAU
records (when ../shared exists), and the synthetic corpus (determinism, timing sanity, record consistency)."""
import hashlib
import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as D  # noqa: E402
import reward  # noqa: E402
import tokenizer as T  # noqa: E402
from audio_encoder import num_audio_tokens, num_mel_frames  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "paper_examples"


def sine(freq, sr, seconds=1.0, amp=0.5):
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_freq(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


# ---------------------------------------------------------------------------
# Audio loading and resampling

@pytest.mark.parametrize("sr,channels,fmt,subtype", [
    (16000, 1, "WAV", "PCM_16"), (8000, 1, "WAV", "PCM_16"), (22050, 2, "WAV", "FLOAT"),
    (44100, 2, "FLAC", "PCM_16"), (48000, 6, "WAV", "PCM_24"), (24000, 1, "OGG", "VORBIS"),
    (44100, 2, "MP3", "MPEG_LAYER_III")])
def test_load_audio_rates_channels_codecs(tmp_path, sr, channels, fmt, subtype):
    x = sine(440, sr, 1.0)
    # channel c carries the tone scaled by (c+1)/channels: the mono mix has amplitude mean((c+1)/C)
    multi = np.stack([x * (c + 1) / channels for c in range(channels)], axis=1)
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, multi, sr, format=fmt, subtype=subtype)
    y = D.load_audio(path)
    assert y.dtype == torch.float32 and y.dim() == 1
    expected_len = math.ceil(sf.info(path).frames * 16000 / sr)
    assert y.shape[0] == expected_len
    mid = y[2000:-2000].numpy()                       # skip codec delay / edges
    assert abs(peak_freq(mid, 16000) - 440) < 3
    expected_amp = 0.5 * np.mean([(c + 1) / channels for c in range(channels)])
    assert abs(np.sqrt(2) * mid.std() - expected_amp) < 0.05 * expected_amp + (0.02 if fmt in ("OGG", "MP3") else 1e-3)


def test_resample_keeps_sine_and_matches_scipy():
    signal = pytest.importorskip("scipy.signal")
    for orig, freq in [(44100, 1000.0), (48000, 3000.0), (22050, 5000.0), (8000, 1000.0)]:
        x = sine(freq, orig, 1.0, amp=0.8)
        y = D.resample(torch.from_numpy(x), orig, 16000).numpy()
        assert len(y) == math.ceil(len(x) * 16000 / orig)
        mid = y[800:-800]
        assert abs(peak_freq(mid, 16000) - freq) < 2
        assert abs(np.sqrt(2) * mid.std() - 0.8) < 0.008                 # amplitude kept within 1 %
        g = math.gcd(orig, 16000)
        ref = signal.resample_poly(x.astype(np.float64), 16000 // g, orig // g)
        n = min(len(ref), len(y))
        assert np.abs(ref[800:n - 800] - y[800:n - 800]).max() < 0.01


def test_resample_removes_aliases():
    # 12 kHz at 48 kHz lies above the 8 kHz Nyquist of 16 kHz: it must be filtered, not folded to 4 kHz
    y = D.resample(torch.from_numpy(sine(12000, 48000, 1.0, amp=1.0)), 48000, 16000).numpy()
    assert np.sqrt(2) * y[800:-800].std() < 0.01                             # < -40 dB
    k = D.resample(torch.from_numpy(sine(12000, 48000)), 48000, 16000, window="kaiser").numpy()
    assert np.sqrt(2) * k[800:-800].std() < 0.01


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt", "no_frames"])
def test_load_audio_bad_files_name_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.wav"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(b"RIFF\x00\x01\x02\x03garbage" + bytes(range(200)))
    elif kind == "no_frames":
        sf.write(path, np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(D.AudioError, match=str(path)):
        D.load_audio(path)


def test_audio_windows_per_family():
    wav = torch.zeros(35 * 16000)
    with pytest.warns(UserWarning, match=r"5\.00 s\)"):
        w = D.audio_windows(wav, "qwen2_audio", "x.wav")
    assert len(w) == 1 and w[0].shape[0] == 30 * 16000
    w = D.audio_windows(wav, "audioflamingo3")
    assert [x.shape[0] for x in w] == [480000, 80000]
    with pytest.warns(UserWarning, match=r"60\.00 s\)"):
        w = D.audio_windows(torch.zeros(11 * 60 * 16000), "audioflamingo3")
    assert len(w) == 20


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data/paper_examples not present")
def test_real_paper_clips_load():
    manifest = json.loads((SHARED / "cropped_manifest.json").read_text())
    manifest = manifest if isinstance(manifest, list) else list(manifest.values())
    seen = set()
    for wav in sorted(SHARED.glob("*.wav")):
        info = sf.info(wav)
        seen.add((info.samplerate, info.channels))
        y = D.load_audio(wav)
        assert y.dim() == 1 and y.dtype == torch.float32 and torch.isfinite(y).all()
        assert abs(y.shape[0] - info.frames * 16000 / info.samplerate) <= 1
        assert 0.001 < y.abs().max() <= 1.0
    assert len({sr for sr, _ in seen}) >= 3 and len({c for _, c in seen}) >= 2


# ---------------------------------------------------------------------------
# Word-timestamp readers (records from FORMATS.md §9 and the tools' documented layouts)

WHISPER_TS = {"text": " Good morning everyone.", "segments": [{"id": 0, "seek": 0, "start": 0.52, "end": 1.98,
    "text": " Good morning everyone.", "tokens": [50364, 2205, 2446, 1518, 13, 50464], "temperature": 0.0,
    "avg_logprob": -0.21, "compression_ratio": 0.74, "no_speech_prob": 0.02, "confidence": 0.91,
    "words": [{"text": "Good", "start": 0.52, "end": 0.78, "confidence": 0.95},
              {"text": "morning", "start": 0.78, "end": 1.2, "confidence": 0.9},
              {"text": "everyone.", "start": 1.2, "end": 1.98, "confidence": 0.88}]}], "language": "en"}
OPENAI_WHISPER = {"text": " Good morning.", "segments": [{"id": 0, "seek": 0, "start": 0.5, "end": 1.2,
    "text": " Good morning.", "words": [{"word": " Good", "start": 0.5, "end": 0.8, "probability": 0.9},
                                        {"word": " morning.", "start": 0.8, "end": 1.2, "probability": 0.8}]}],
                  "language": "en"}
MFA_JSON = {"start": 0, "end": 2.1, "tiers": {"words": {"type": "interval", "entries": [
    [0.31, 0.62, "good"], [0.62, 1.05, "morning"]]}, "phones": {"type": "interval", "entries": [
        [0.31, 0.4, "G"], [0.4, 0.52, "UH1"], [0.52, 0.62, "D"]]}}}
TEXTGRID_LONG = '''File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0
xmax = 2.1
tiers? <exists>
size = 2
item []:
    item [1]:
        class = "IntervalTier"
        name = "words"
        xmin = 0
        xmax = 2.1
        intervals: size = 4
        intervals [1]:
            xmin = 0
            xmax = 0.31
            text = ""
        intervals [2]:
            xmin = 0.31
            xmax = 0.62
            text = "good"
        intervals [3]:
            xmin = 0.62
            xmax = 1.05
            text = "say ""hi"" 2"
        intervals [4]:
            xmin = 1.05
            xmax = 2.1
            text = ""
    item [2]:
        class = "IntervalTier"
        name = "phones"
        xmin = 0
        xmax = 2.1
        intervals: size = 1
        intervals [1]:
            xmin = 0.31
            xmax = 0.4
            text = "G"
'''
TEXTGRID_SHORT = '''File type = "ooTextFile"
Object class = "TextGrid"

0
2.1
<exists>
1
"IntervalTier"
"spk1 - words"
0
2.1
3
0
0.31
""
0.31
0.62
"good"
0.62
1.05
"morning"
'''
EXPECTED_MFA = [D.Word("good", 0.31, 0.62), D.Word("morning", 0.62, 1.05)]


def test_whisper_readers(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(WHISPER_TS))
    assert D.read_whisper_json(tmp_path / "a.json") == [
        D.Word("Good", 0.52, 0.78), D.Word("morning", 0.78, 1.2), D.Word("everyone.", 1.2, 1.98)]
    (tmp_path / "b.json").write_text(json.dumps(OPENAI_WHISPER))
    assert D.read_whisper_json(tmp_path / "b.json") == [D.Word("Good", 0.5, 0.8), D.Word("morning.", 0.8, 1.2)]
    bad = json.loads(json.dumps(WHISPER_TS))
    bad["segments"][0]["words"][1]["end"] = 0.1                          # end before start
    (tmp_path / "c.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="c.json"):
        D.read_whisper_json(tmp_path / "c.json")


def test_mfa_readers(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(MFA_JSON))
    assert D.read_mfa_json(tmp_path / "a.json") == EXPECTED_MFA
    (tmp_path / "a.csv").write_text("Begin,End,Label,Type,Speaker\n0.31,0.62,good,words,spk1\n"
                                    "0.31,0.4,G,phones,spk1\n0.62,1.05,morning,words,spk1\n")
    assert D.read_mfa_csv(tmp_path / "a.csv") == EXPECTED_MFA
    (tmp_path / "short.TextGrid").write_text(TEXTGRID_SHORT)
    assert D.read_textgrid(tmp_path / "short.TextGrid") == EXPECTED_MFA
    (tmp_path / "long.TextGrid").write_bytes(TEXTGRID_LONG.encode("utf-16"))           # Praat also writes UTF-16
    assert D.read_textgrid(tmp_path / "long.TextGrid") == [D.Word("good", 0.31, 0.62),
                                                           D.Word('say "hi" 2', 0.62, 1.05)]
    (tmp_path / "bad.TextGrid").write_text(TEXTGRID_SHORT[:130])
    with pytest.raises(ValueError, match="bad.TextGrid"):
        D.read_textgrid(tmp_path / "bad.TextGrid")


def test_librispeech_alignment(tmp_path):
    p = tmp_path / "19-198.alignment.txt"
    p.write_text('19-198-0001 ",HELLO,WORLD," "0.300,0.710,1.250,1.40"\n19-198-0002 ",HI," "0.1,0.5,0.6"\n')
    out = D.read_librispeech_alignment(p, keep_silence=True)
    assert out["19-198-0001"] == [D.Word("", 0.0, 0.3), D.Word("HELLO", 0.3, 0.71), D.Word("WORLD", 0.71, 1.25),
                                  D.Word("", 1.25, 1.4)]
    assert D.read_librispeech_alignment(p)["19-198-0002"] == [D.Word("HI", 0.1, 0.5)]
    p.write_text('19-198-0001 ",HELLO," "0.3,0.7"\n')
    with pytest.raises(ValueError, match="alignment.txt:1"):
        D.read_librispeech_alignment(p)


def test_words_jsonl_counts_malformed(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"audio": "a.wav", "words": [{"word": "hi", "start": 0.1, "end": 0.4}]}) + "\n"
                 + "{not json\n" + json.dumps({"audio": "b.wav", "words": [{"word": "x", "start": 1}]}) + "\n"
                 + json.dumps({"audio": "/abs/c.wav", "words": []}) + "\n")
    skips = D.Skips("m")
    out = D.read_words_jsonl(p, skips)
    assert out == [(str(tmp_path / "a.wav"), [D.Word("hi", 0.1, 0.4)]), ("/abs/c.wav", [])]
    assert skips.counts["malformed record"] == 2 and skips.total == 4


# ---------------------------------------------------------------------------
# Stage-1 pairs

def test_sta_pair_exact_strings():
    words = [D.Word("Good", 0.52, 0.78), D.Word("morning", 0.78, 1.2), D.Word("everyone.", 1.2, 1.98)]
    p = D.sta_pair(words, 1, 2, audio="a.wav")
    assert p["question"] == "What is the timestamp of the following segment? morning everyone."
    assert p["answer"] == "The segment morning everyone. starts at 0.78 seconds and ends at 1.98 seconds."
    assert (p["start"], p["end"], p["phrase"], p["audio"]) == (0.78, 1.98, "morning everyone.", "a.wav")
    assert D.sta_pair([D.Word("a", 1.0, 2.5)], 0, 0)["answer"].endswith("starts at 1.00 seconds and ends at 2.50 seconds.")


def test_sample_phrase_options():
    words = [D.Word(w, i * 0.5, i * 0.5 + 0.4) for i, w in enumerate(
        "the cat sat. then a dog ran far away. end".split())]
    for seed in range(200):
        rng = random.Random(seed)
        i, j = D.sample_phrase(words, rng, min_words=2, max_words=3)
        assert 2 <= j - i + 1 <= 3
        assert not any(w.word.endswith(".") for w in words[i:j])            # never crosses a sentence end
    lengths = {j - i + 1 for i, j in (D.sample_phrase(words, random.Random(s), 1, 8, False) for s in range(300))}
    assert max(lengths) > 5                                                 # without boundaries: long phrases
    a = D.sta_pairs(words, 3, random.Random(7))
    assert a == D.sta_pairs(words, 3, random.Random(7)) and len(a) == 3
    rep = [D.Word(w, i, i + 0.5) for i, w in enumerate("a b a b c".split())]
    assert all(p["phrase"] not in ("a", "b", "a b") for p in D.sta_pairs(rep, 5, random.Random(0)))


def test_build_sta_corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "utt1.json").write_text(json.dumps(WHISPER_TS))
    sf.write(src / "utt1.flac", sine(300, 16000, 2.0), 16000)
    (src / "orphan.TextGrid").write_text(TEXTGRID_SHORT)                    # no audio next to it
    (src / "broken.json").write_text("{")
    out = tmp_path / "sta.jsonl"
    skips = D.build_sta_corpus(src, out, per_file=2, seed=0)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["audio"] == str(src / "utt1.flac") for r in rows)
    assert skips.counts == {"audio not found": 1, "unreadable word file": 1}


# ---------------------------------------------------------------------------
# QA schema and benchmark readers

MMAU = {"id": "00000000-aaaa-bbbb-cccc-000000000001",
        "audio_id": "./test-mini-audios/00000000-aaaa-bbbb-cccc-000000000001.wav",
        "question": "How many people take part in the dialogue?", "choices": ["one", "two", "three", "four"],
        "answer": "two", "dataset": "meld", "task": "speech", "split": "test-mini", "category": "Reasoning",
        "sub-category": "Counting", "difficulty": "easy"}
MMAR = {"id": "abcDEF12345_00-00-05_00-00-20", "audio_path": "./audio/abcDEF12345_00-00-05_00-00-20.wav",
        "question": "Which city is the speaker most likely in?", "choices": ["Paris", "Rome"], "answer": "Rome",
        "modality": "speech", "category": "Semantic Layer", "sub-category": "Content Analysis", "language": "en",
        "source": "youtube", "url": "https://www.youtube.com/watch?v=abcDEF12345", "timestamp": "00:00:05,00:00:20"}
AIR = {"path": "spk_count_0001.wav", "question": "How many distinct speakers can be heard?", "choice_a": "1",
       "choice_b": "2", "choice_c": "3", "choice_d": "4", "answer_gt": "3", "task_name": "Speaker_Number_Verification",
       "dataset_name": "voxceleb1", "uniq_id": 42}
AVQA = {"id": 7, "video_name": "xyz_000010", "video_id": 12, "question_text": "What is making the sound in the video?",
        "multi_choice": ["dog", "cat", "car", "bird"], "answer": 0, "question_relation": "View",
        "question_type": "Come From", "dataset_name": "AVQA", "audio_path": "/data/avqa/xyz_10.wav"}
MELD_CSV = ('Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n'
            '1,"Wait, you did what?",Ross,surprise,negative,0,0,2,5,"00:03:10,120","00:03:11,905"\n'
            '2,That\u2019s great news!,Monica,joy,positive,0,1,2,5,"0:03:12,300","0:03:13,950"\n'
            '3,Bad row,Joey,boredom,neutral,0,2,2,5,"0:03:14,000","0:03:15,000"\n')


def test_format_mcq():
    assert D.format_mcq("Q?", ["x", "y", "z", "w"]) == "Q?\n(a) x\n(b) y\n(c) z\n(d) w"


def test_mmau_mmar_airbench_avqa(tmp_path):
    music = dict(MMAU, id="m1", task="music")
    bad = dict(MMAU, id="b1", answer="five")
    (tmp_path / "mmau.json").write_text(json.dumps([MMAU, music, bad]))
    skips = D.Skips("mmau")
    recs = D.read_mmau(tmp_path / "mmau.json", audio_root="/root", skips=skips)
    assert len(recs) == 1 and skips.counts["malformed record"] == 1
    r = recs[0]
    assert (r["answer_index"], r["audio"], r["source"]["sub-category"]) == (1, "/root/test-mini-audios/" + MMAU["id"] + ".wav", "Counting")
    assert set(r) >= {"id", "audio", "question", "choices", "answer", "answer_index", "duration", "source"}

    (tmp_path / "mmar.jsonl").write_text(json.dumps(MMAR) + "\n" + json.dumps(dict(MMAR, modality="music")) + "\n")
    recs = D.read_mmar(tmp_path / "mmar.jsonl")
    assert len(recs) == 1 and recs[0]["answer_index"] == 1 and recs[0]["source"]["url"] == MMAR["url"]
    assert recs[0]["audio"] == str(tmp_path / "audio" / "abcDEF12345_00-00-05_00-00-20.wav")

    (tmp_path / "air.json").write_text(json.dumps([AIR, dict(AIR, choice_c=None, choice_d=None, answer_gt="2",
                                                             uniq_id=43)]))
    recs = D.read_airbench_foundation(tmp_path / "air.json", audio_root="/air")
    assert recs[0]["answer_index"] == 2 and recs[0]["audio"] == "/air/Speaker_Number_Verification_voxceleb1/spk_count_0001.wav"
    assert recs[1]["choices"] == ["1", "2"]

    (tmp_path / "avqa.jsonl").write_text(json.dumps(AVQA) + "\n" + json.dumps(dict(AVQA, answer=9)) + "\n")
    skips = D.Skips("avqa")
    recs = D.read_avqa(tmp_path / "avqa.jsonl", None, skips=skips)
    assert recs[0]["question"] == "What is making the sound in the audio?" and recs[0]["answer"] == "dog"
    assert recs[0]["audio"] == "/data/avqa/xyz_10.wav" and recs[0]["answer_index"] == 0
    assert skips.counts["malformed record"] == 1


def test_meld(tmp_path):
    (tmp_path / "test_sent_emo.csv").write_text(MELD_CSV, encoding="utf-8")
    assert D.parse_meld_time("00:03:10,120") == pytest.approx(190.12)
    assert D.parse_meld_time("0:03:12,300") == pytest.approx(192.3)
    skips = D.Skips("meld")
    recs = D.read_meld(tmp_path / "test_sent_emo.csv", clip_dir="/clips", skips=skips)
    assert skips.counts["malformed record"] == 1 and len(recs) == 2
    a, b = recs
    assert a["audio"] == "/clips/dia0_utt0.wav" and b["audio"] == "/clips/dia0_utt1.wav"
    assert a["answer"] == "surprise" and len(a["choices"]) == 4 and len(set(a["choices"])) == 4
    assert a["source"]["start_seconds"] == pytest.approx(190.12) and b["source"]["Utterance"] == "That\u2019s great news!"
    assert b["duration"] == pytest.approx(1.65)
    assert recs == D.read_meld(tmp_path / "test_sent_emo.csv", clip_dir="/clips")          # deterministic


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data/paper_examples not present")
def test_real_mmau_records():
    skips = D.Skips("paper")
    recs = D.read_mmau(SHARED / "mmau_testmini_predictions.json", skips=skips)
    assert len(recs) == 66 and len(skips) == 0
    assert all(r["choices"][r["answer_index"]] == r["answer"] for r in recs)
    assert all("model_prediction" in r["source"] for r in recs)


# ---------------------------------------------------------------------------
# Synthetic corpus

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    stats = D.build_synth_corpus(str(out), seed=3, n=14, workers=1)
    return out, stats


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name != "stats.json":
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_rare_scene_draws_build():
    """Draws that a 20,000-clip corpus met: a next_word sentence without a unique word before a content word
    (raised IndexError) and a 3-speaker scene whose first two turns were equal (looped forever, redrawing only
    the last turn). Each must now build a scene with distinct turns, within a second."""
    import signal

    def too_slow(*_):
        raise TimeoutError("scene draw did not finish")
    old = signal.signal(signal.SIGALRM, too_slow)
    try:
        for seed, index in ((0, 13069), (1, 3556), (0, 30932), (1, 15885)):
            rng = random.Random(f"tgsr-synth-{seed}-{index}")      # as synth_clip draws its QA type
            qa_type = D.QA_TYPES[index % len(D.QA_TYPES)] if rng.random() < 0.5 else rng.choice(D.QA_TYPES)
            signal.alarm(1)
            turns, make = D._scene(rng, qa_type)
            signal.alarm(0)
            assert qa_type in ("next_word", "speaker") and len({" ".join(t) for t in turns}) == len(turns)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_synth_deterministic(corpus, tmp_path):
    out, stats = corpus
    again = tmp_path / "again"
    D.build_synth_corpus(str(again), seed=3, n=14, workers=2)          # worker count must not matter
    assert _digest(out) == _digest(again)
    other = tmp_path / "other"
    D.build_synth_corpus(str(other), seed=4, n=2, workers=1)
    assert (other / "qa.jsonl").read_text() != "\n".join((out / "qa.jsonl").read_text().splitlines()[:2]) + "\n"
    assert stats["clips"] == 14 and set(stats["qa_types"]) == set(D.QA_TYPES)


def test_synth_word_timings(corpus):
    out, _ = corpus
    for line in (out / "words.jsonl").read_text().splitlines():
        r = json.loads(line)
        audio, sr = sf.read(out / r["audio"], dtype="float32")
        assert sr == 16000 and audio.ndim == 1 and abs(len(audio) / sr - r["duration"]) < 1e-3
        assert 1.0 < r["duration"] < 7.0
        words = [D.Word(**w) for w in r["words"]]
        rms = lambda s, e: float(np.sqrt(np.mean(audio[int(s * sr):max(int(e * sr), int(s * sr) + 1)] ** 2)))
        lead = rms(0, words[0].start - 0.02) if words[0].start > 0.05 else 0.0
        for a, b in zip(words, words[1:]):
            assert a.end <= b.start + 1e-6
        for w in words:
            assert 0 <= w.start < w.end <= r["duration"] and 0.02 <= w.end - w.start < 1.5
            assert rms(w.start, w.end) > 3 * lead + 1e-4                 # speech inside every word
        for seg in r["segments"]:
            assert seg["text"] == " ".join(w.word for w in words if seg["start"] <= w.start < seg["end"] + 1e-6)


def test_synth_records(corpus):
    out, _ = corpus
    words = {json.loads(l)["audio"]: [D.Word(**w) for w in json.loads(l)["words"]]
             for l in (out / "words.jsonl").read_text().splitlines()}
    sta = [json.loads(l) for l in (out / "sta.jsonl").read_text().splitlines()]
    assert len(sta) == 14 * 4
    for p in sta:
        ws = words[p["audio"]]
        phrase = p["phrase"].split()
        i = next(k for k in range(len(ws)) if [w.word for w in ws[k:k + len(phrase)]] == phrase)
        assert p == dict(D.sta_pair(ws, i, i + len(phrase) - 1, p["audio"]), id=p["id"], duration=p["duration"])
    qa = D.load_examples(out / "qa.jsonl")
    assert len(qa) == 14
    for r in qa:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert r["choices"][r["answer_index"]] == r["answer"]
        (s, e), = r["evidence"]
        assert 0 <= s < e <= r["duration"]
        last = r["reasoning"].splitlines()[-1]
        assert last == f"Final answer: {r['answer']}"                 # the option by its text
        assert reward.extract_choice(r["reasoning"], r["choices"]) == r["answer_index"]
        spans = reward.extract_spans(r["reasoning"])           # the evidence, cited in 1..3 pieces in order
        assert 1 <= len(spans) <= 3 and spans[0][0] == s and spans[-1][1] == e, (spans, s, e)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        assert r["reasoning"].startswith(f"From {s:.2f}s to {spans[0][1]:.2f}s, ")
    assert {len(reward.extract_spans(r["reasoning"])) for r in qa} >= {1, 2}


# ---------------------------------------------------------------------------
# Batching

@pytest.fixture(scope="module")
def tiny_tok(corpus, tmp_path_factory):
    out, _ = corpus
    exs = D.load_examples(out / "sta.jsonl") + D.load_examples(out / "qa.jsonl")
    texts = [D.prompt_text(e) + " " + D.target_text(e) for e in exs]
    return T.train_sentencepiece(texts * 3, str(tmp_path_factory.mktemp("tok")), vocab_size=500)


def test_collate_sft_and_prompts(corpus, tiny_tok):
    out, _ = corpus
    exs = D.load_examples(out / "sta.jsonl")[:3] + D.load_examples(out / "qa.jsonl")[:2]
    cache = {}
    b = D.collate_sft(exs, tiny_tok, "qwen2_audio", n_mels=80, pad_to_30s=False, audio_cache=cache)
    assert len(cache) == len({e["audio"] for e in exs})
    B, Tn = b["input_ids"].shape
    assert b["attention_mask"].shape == b["loss_mask"].shape == (B, Tn) and b["loss_mask"].dtype == torch.bool
    audio_id = tiny_tok.token_to_id("<|AUDIO|>")
    for k, ex in enumerate(exs):
        n = int(b["attention_mask"][k].sum())
        assert b["attention_mask"][k, :n].all() and not b["attention_mask"][k, n:].any()        # right padding
        assert (b["input_ids"][k, n:] == tiny_tok.pad_token_id).all()
        target = tiny_tok.decode(b["input_ids"][k][b["loss_mask"][k]].tolist())
        assert target == D.target_text(ex) + "<|im_end|>"
        wav = D.load_audio(ex["audio"])
        valid = int(b["feature_attention_mask"][k].sum())
        assert abs(valid - num_mel_frames(len(wav))) <= 1          # (pad_to_30s=False can drop the last frame)
        assert int((b["input_ids"][k] == audio_id).sum()) == num_audio_tokens(valid)
    assert b["input_features"].shape[:2] == (B, 80)
    p = D.collate_prompts(exs, tiny_tok, "qwen2_audio", n_mels=80, pad_to_30s=True)
    assert p["input_features"].shape == (B, 80, 3000)
    prompt = tiny_tok.encode("<|im_start|>assistant\n")
    for k in range(B):
        assert p["input_ids"][k, -len(prompt):].tolist() == prompt                              # left padding
        n = int(p["attention_mask"][k].sum())
        assert not p["attention_mask"][k, :-n].any()


def test_bucket_sampler_and_shard():
    lengths = [random.Random(i).randint(1, 100) for i in range(103)]
    s = D.BucketBatchSampler(lengths, batch_size=8, seed=1, pool_batches=4)
    flat = [i for b in s for i in b]
    assert sorted(flat) == list(range(103)) and list(s) == list(s)
    s.set_epoch(1)
    assert list(s) != D.BucketBatchSampler(lengths, batch_size=8, seed=1, pool_batches=4).batches()
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in s])
    assert spread < 40                                                     # batches are length-homogeneous
    ranks = [D.BucketBatchSampler(lengths, 8, seed=1, rank=r, world_size=3).batches() for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    got = [i for r in ranks for b in r for i in b]
    assert len(got) == len(set(got))
    assert D.shard(list(range(10)), 1, 3) == [1, 4, 7] and D.shard(list(range(10)), 0, 3) == [0, 3, 6]


def test_load_examples_counts_bad_rows(tmp_path, capsys):
    sf.write(tmp_path / "ok.wav", sine(200, 16000, 0.5), 16000)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "bad.wav").write_bytes(b"not audio at all" * 10)
    good = {"audio": "ok.wav", "question": "q", "answer": "a"}
    lines = [good, dict(good, audio="empty.wav"), dict(good, audio="bad.wav"), dict(good, audio="missing.wav"),
             {"audio": "ok.wav", "question": "q"}, dict(good, choices=["x", "y"], answer="z")]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n{oops\n")
    skips = D.Skips("m")
    out = D.load_examples(tmp_path / "m.jsonl", skips=skips)
    assert [o["audio"] for o in out] == [str(tmp_path / "ok.wav")]
    assert skips.counts == {"bad audio": 3, "malformed record": 3} and skips.total == 7
    assert "skipped 6 of 7 rows" in capsys.readouterr().err
    assert len(D.load_examples(tmp_path / "m.jsonl", check_audio="decode")) == 1


def test_cli_convert_and_sta(tmp_path, capsys):
    (tmp_path / "mmau.json").write_text(json.dumps([MMAU, dict(MMAU, id="m1", task="music")]))
    D.main(["convert", "--format", "mmau", "--src", str(tmp_path / "mmau.json"), "--out", str(tmp_path / "qa.jsonl"),
            "--audio-root", "/mmau"])
    rows = [json.loads(l) for l in (tmp_path / "qa.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["audio"].startswith("/mmau/test-mini-audios/")
    (tmp_path / "w").mkdir()
    sf.write(tmp_path / "w" / "a.wav", sine(300, 16000, 2.0), 16000)
    (tmp_path / "w" / "words.jsonl").write_text(json.dumps({"audio": "a.wav", "words": [
        {"word": w, "start": 0.3 * i, "end": 0.3 * i + 0.25} for i, w in enumerate("one two three four".split())]}))
    D.main(["sta", "--src", str(tmp_path / "w" / "words.jsonl"), "--out", str(tmp_path / "sta.jsonl"),
            "--per-file", "3", "--max-words", "2"])
    rows = [json.loads(l) for l in (tmp_path / "sta.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(1 <= len(r["phrase"].split()) <= 2 for r in rows)
    assert "wrote 3 STA pairs" in capsys.readouterr().out


def test_collate_af3_windows_and_qwen_truncation(tmp_path):
    sf.write(tmp_path / "long.wav", sine(300, 8000, 35.0, amp=0.3), 8000)
    ex = {"audio": str(tmp_path / "long.wav"), "question": "q", "answer": "a"}
    tok = T.train_sentencepiece(["q a what is it"] * 20, str(tmp_path / "tok"), vocab_size=300,
                                special_tokens=T.CHAT_SPECIAL_TOKENS + ("<sound>",))
    b = D.collate_sft([ex], tok, "audioflamingo3", n_mels=80, pad_to_30s=True)
    assert b["input_features"].shape == (2, 80, 3000)                  # two 30 s windows of one clip
    assert b["feature_attention_mask"].sum(1).tolist() == [3000, 500]
    assert int((b["input_ids"] == tok.token_to_id("<sound>")).sum()) == 750 + 125
    with pytest.warns(UserWarning, match="truncated"):
        b = D.collate_prompts([ex], tok, "qwen2_audio", n_mels=80, pad_to_30s=True)
    assert b["input_features"].shape == (1, 80, 3000)
    assert int((b["input_ids"] == tok.token_to_id("<|AUDIO|>")).sum()) == 750
