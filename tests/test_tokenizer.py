"""tokenizer.py against independent references: the HF `tokenizers` library (byte-level BPE, split regexes),
the `sentencepiece` library, and the chat-template strings of ARCHITECTURES.md / transformers."""
import json
import os
import random
import re
import sys
import unicodedata

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tokenizer as T  # noqa: E402

import sentencepiece as spm  # noqa: E402

try:
    import tokenizers   # HF tokenizers: test-only reference
except ImportError:
    tokenizers = None
needs_hf = pytest.mark.skipif(tokenizers is None, reason="the HF `tokenizers` package is not installed")

QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# cl100k-style: possessive quantifiers, as in tiktoken-derived tokenizer.json files
POSSESSIVE_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<sound>"]

# Text that exercises every branch of the split regexes: accents (composed and decomposed), CJK, emoji with
# ZWJ and skin tones, digit runs, decimals (timestamps), whitespace runs with newlines/tabs/CR/NBSP/ideographic
# space, contractions in all cases, special tokens inside words, lone punctuation runs.
HARD_TEXTS = [
    "Hello world! The segment starts at 12.34 seconds and ends at 1234567.5 seconds.",
    "café naïve résumé Ångström cafe\u0301 e\u0301te\u0301 ﬁne ſtraße",
    "日本語のテキスト、中文句子。한국어 문장입니다. Ελληνικά русский текст עִבְרִית العربية",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ✨✨ ❤️",
    "  leading and trailing spaces   \n\n\t\tTabs\tand\r\nCRLF\n \n  \u00a0nbsp\u3000ideo",
    "I'm you're he's we've they'll I'd can't DON'T I'M WE'VE It'S 'ſ o'clock '''",
    "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|AUDIO|><|audio_eos|>\nWhat is said?<|im_end|>\n",
    "x<|im_end|>y <|im_start|>  <sound><sound>z<|endoftext|><|im_end",
    "numbers 0 00 000 0000 3.14159 1,000,000 ١٢٣ ²³ ⅷ 12:34:56.789",
    "code: def f(x):\n    return x**2 + 1  # comment\n\t}}}]]]>>> !!! ??? ...",
    "",
    " ",
    "\n",
    "a",
]


def _corpus(n=400, seed=0):
    rng = random.Random(seed)
    words = ("the segment starts at seconds ends speaker says hello world audio question answer timestamp "
             "café über naïve 日本 中文 한국 😀 I'm don't they'll").split()
    lines = []
    for _ in range(n):
        k = rng.randint(3, 14)
        parts = [rng.choice(words) if rng.random() < 0.7 else f"{rng.uniform(0, 300):.2f}" for _ in range(k)]
        sep = rng.choice([" ", " ", " ", "  ", "\n", "\t", ", "])
        lines.append(sep.join(parts) + rng.choice([".", "?", "!", "\n", ""]))
    return lines + HARD_TEXTS


def _train_hf_bpe(path, pattern, normalizer, ignore_merges=False, merges_as_strings=False, vocab_size=700):
    """A tiny Qwen2/Llama-3 style byte-level BPE trained with `tokenizers`, saved as tokenizer.json."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if normalizer:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIALS)
    # a non-special added token (matched after normalization) and an lstrip/rstrip one
    tok.add_tokens([AddedToken("timestamp", normalized=True, special=False),
                    AddedToken("<mask>", lstrip=True, rstrip=True, special=True, normalized=False)])
    tok.save(str(path))
    if merges_as_strings:   # the older "a b" merge format (Qwen2 hub files)
        spec = json.loads(path.read_text(encoding="utf-8"))
        spec["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
        path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return tokenizers.Tokenizer.from_file(str(path))


# ---------------------------------------------------------------------------
# Pre-tokenizer: every assigned code point, in several contexts, against tokenizers' Oniguruma regex

def _code_point_sample():
    """All assigned code points (Python's Unicode 14 tables) at category boundaries, plus a stride inside runs."""
    cps, prev = [], None
    for cp in list(range(0x30000)) + list(range(0xE0000, 0xE0200)):
        cat = unicodedata.category(chr(cp))
        if cat in ("Cn", "Cs"):     # unassigned in 14.0 (newer in tokenizers' tables) / surrogates
            prev = cat
            continue
        if cat != prev or cp % 13 == 0 or cp < 0x3000:
            cps.append(cp)
        prev = cat
    return cps


@needs_hf
@pytest.mark.parametrize("pattern", [QWEN2_PATTERN, LLAMA3_PATTERN, POSSESSIVE_PATTERN],
                         ids=["qwen2", "llama3", "possessive"])
def test_split_regex_matches_tokenizers_on_all_code_points(pattern):
    from tokenizers import Regex, pre_tokenizers
    hf = pre_tokenizers.Split(Regex(pattern), "isolated")
    ours = re.compile(T.translate_regex(pattern))
    cps = _code_point_sample()
    for template in ("a{c}1 {c}{c}\n", " {c}'S{c}\t{c}99{c}'ſ\r\n {c}"):
        text = "".join(template.format(c=chr(c)) for c in cps)
        expected = [p for p, _ in hf.pre_tokenize_str(text)]
        got = T._isolated_split(ours, [text])
        assert got == expected, next((i, got[i - 2:i + 3], expected[i - 2:i + 3])
                                     for i in range(len(got)) if got[i] != expected[i])
    for text in HARD_TEXTS:
        assert T._isolated_split(ours, [text]) == [p for p, _ in hf.pre_tokenize_str(text)]


def test_translate_regex_rejects_unknown_property():
    with pytest.raises(ValueError, match="Foo"):
        T.translate_regex(r"\p{Foo}+")


# ---------------------------------------------------------------------------
# Byte-level BPE: token-for-token parity with tokenizers

@needs_hf
@pytest.mark.parametrize("pattern,nfc,ignore_merges,merges_as_strings", [
    (QWEN2_PATTERN, True, False, True),      # Qwen2: NFC normalizer, "a b" merges
    (LLAMA3_PATTERN, False, True, False),    # Llama-3: no normalizer, ignore_merges, [a, b] merges
], ids=["qwen2", "llama3"])
def test_bpe_matches_tokenizers(tmp_path, pattern, nfc, ignore_merges, merges_as_strings):
    path = tmp_path / "tokenizer.json"
    hf = _train_hf_bpe(path, pattern, nfc, ignore_merges, merges_as_strings)
    ours = T.load_tokenizer(str(tmp_path))
    assert isinstance(ours, T.BPETokenizer)
    if nfc:     # the same Qwen2 tokenizer as a vocab.json + merges.txt + tokenizer_config.json directory
        spec, slow = json.loads(path.read_text(encoding="utf-8")), tmp_path / "slow"
        slow.mkdir()
        (slow / "vocab.json").write_text(json.dumps(spec["model"]["vocab"]), encoding="utf-8")
        (slow / "merges.txt").write_text("#version: 0.2\n" + "".join(
            (m if isinstance(m, str) else " ".join(m)) + "\n" for m in spec["model"]["merges"]), encoding="utf-8")
        (slow / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
            str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in spec["added_tokens"]}}))
        assert all(T.load_tokenizer(str(slow)).encode(t) == ours.encode(t) for t in HARD_TEXTS)
    texts = HARD_TEXTS + _corpus(150, seed=1) + [
        "\n".join(HARD_TEXTS), "the timestamp<mask> x <mask>y", "timestamps timestamp", "a" * 300, "12" * 50]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text
        if "<mask>" not in text:    # the only lossy parts: NFC and mask's stripped spaces
            assert ours.decode(ids) == (unicodedata.normalize("NFC", text) if nfc else text)
    # ids that decode to invalid UTF-8 on their own (a split multi-byte character)
    for text in ("😀", "日本", "é", "𝄞", "\U0010fffd"):
        for i in ours.encode(text):
            assert ours.decode([i]) == hf.decode([i])
    assert ours.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    for s in SPECIALS + ["<mask>"]:
        assert ours.token_to_id(s) == hf.token_to_id(s) and ours.encode(s) == [hf.token_to_id(s)]
    assert ours.token_to_id("definitely not a token") is None
    assert ours.eos_token_id == hf.token_to_id("<|im_end|>")
    assert ours.pad_token_id == hf.token_to_id("<|endoftext|>")
    assert set(ours.special_tokens) == set(SPECIALS + ["<mask>"])


@needs_hf
@pytest.mark.parametrize("ignore_merges", [False, True])
def test_bpe_merge_order_is_rank_then_leftmost(tmp_path, ignore_merges):
    """A hand-made vocab where greedy-by-rank and left-to-right merging disagree, a token reachable only
    through ignore_merges ("xyz"), and overlapping added tokens (longest match wins)."""
    from tokenizers import decoders, models, pre_tokenizers
    b2u = T.bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(b2u.values())}
    merges = [("b", "c"), ("a", "b"), ("a", "a"), ("bc", "d"), ("a", "bcd"), ("aa", "a"), ("x", "y")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["xyz"] = len(vocab)
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<s>", "<s><t>", "<t>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = T.load_tokenizer(str(tmp_path / "tokenizer.json"))
    for text in ("abcd", "aaaa", "aaaaa", "abcabcd", "aabcd aaabcd", "abab bcbc", "Hello there, it's 2024!",
                 "xyz xyzxyz", "<s><t><s> <t><s><s><t>"):
        assert ours.encode(text) == hf.encode(text).ids, text
        assert ours.decode(ours.encode(text)) == text


def test_bpe_errors_name_the_problem(tmp_path):
    spec = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a b"]},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="merge #0"):
        T.load_tokenizer(str(tmp_path / "tokenizer.json"))
    with pytest.raises(FileNotFoundError):
        T.load_tokenizer(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------
# SentencePiece: the tiny default's trainer, parity with the sentencepiece library

def _sp_texts():
    return [t.replace("<|", "< |") for t in _corpus(600, seed=2)]   # no special tokens in training text


def test_train_sentencepiece_and_parity(tmp_path):
    tok = T.train_sentencepiece(_sp_texts(), str(tmp_path), vocab_size=500)
    assert (tmp_path / "tokenizer.model").exists()
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert isinstance(T.load_tokenizer(str(tmp_path)), T.SentencePieceTokenizer)
    # each special token is one user-defined id, in order after unk
    for i, s in enumerate(T.CHAT_SPECIAL_TOKENS, start=1):
        assert tok.token_to_id(s) == i == sp.piece_to_id(s)
        assert tok.encode(s) == [i]
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>")
    assert tok.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.token_to_id("no such piece") is None
    prompt = T.build_prompt("qwen2_audio", "What is the timestamp of the following segment? hello world", 5)
    for text in HARD_TEXTS + _corpus(100, seed=3) + [prompt + "The segment starts at 1.20 seconds.<|im_end|>"]:
        ids = tok.encode(text)
        assert ids == sp.encode(text), text   # sentencepiece matches user-defined symbols itself
        assert tok.decode(ids) == text        # identity normalization, no dummy prefix: lossless
    ids = tok.encode(prompt)
    assert ids.count(tok.token_to_id("<|AUDIO|>")) == 5
    assert tok.decode(ids, skip_special_tokens=True) == prompt.replace("<|AUDIO|>", "").replace(
        "<|im_start|>", "").replace("<|im_end|>", "").replace("<|audio_bos|>", "").replace("<|audio_eos|>", "")
    # digits split: every character of a timestamp is its own token
    pieces = [sp.id_to_piece(i) for i in tok.encode("at 12.34 seconds")]
    assert [p for p in pieces if any(ch.isdigit() for ch in p)] == ["1", "2", "3", "4"]


def test_time_pieces_are_whole_text_pieces(tmp_path):
    """The tiny default's time pieces: "x.y" is one token followed by the hundredths digit, the pieces are text
    (kept by decode(skip_special_tokens=True), not in special_tokens), the chat tokens stay special."""
    tok = T.train_sentencepiece(_sp_texts(), str(tmp_path), vocab_size=800, text_pieces=T.TIME_PIECES)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert set(tok.special_tokens) == {"<unk>", *T.CHAT_SPECIAL_TOKENS}
    first = len(T.CHAT_SPECIAL_TOKENS) + 1
    assert [sp.id_to_piece(first + i) for i in range(len(T.TIME_PIECES))] == list(T.TIME_PIECES)
    cases = {"starts at 1.55 seconds": ["1.5", "5"], "From 0.38s to 12.04s": ["0.3", "8", "12.0", "4"],
             "at 29.99 s": ["29.9", "9"], "30.5 s": ["3", "0.5"], "7 and 3.": ["7", "3"]}
    for text, digits in cases.items():
        ids = tok.encode(text)
        assert ids == sp.encode(text), text
        assert [p for p in map(sp.id_to_piece, ids) if any(ch.isdigit() for ch in p)] == digits, text
        assert tok.decode(ids, skip_special_tokens=True) == text
    answer = "The segment a cat starts at 0.15 seconds and ends at 0.43 seconds.<|im_end|>"
    ids = tok.encode(answer)
    assert ids[-1] == tok.eos_token_id and tok.decode(ids, skip_special_tokens=True) == answer[:-len("<|im_end|>")]


def test_train_sentencepiece_is_deterministic(tmp_path):
    T.train_sentencepiece(_sp_texts(), str(tmp_path / "a.model"), vocab_size=500)
    T.train_sentencepiece(_sp_texts(), str(tmp_path / "b.model"), vocab_size=500)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()


# ---------------------------------------------------------------------------
# Chat templates: the exact strings of ARCHITECTURES.md §4.3, §5.4, §6.3

def test_build_prompt_exact_strings():
    q = "What is said?"
    assert T.build_prompt("qwen2_audio", q, 3) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|AUDIO|><|AUDIO|><|audio_eos|>\nWhat is said?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert T.build_prompt("qwen2_audio", q, [1, 2], system="S") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
        "Audio 2: <|audio_bos|><|AUDIO|><|AUDIO|><|audio_eos|>\nWhat is said?<|im_end|>\n<|im_start|>assistant\n")
    assert T.build_prompt("qwen2_5_omni", q, 2) == (
        "<|im_start|>system\nYou are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
        "perceiving auditory and visual inputs, as well as generating text and speech.<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|AUDIO|><|audio_eos|>What is said?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert T.build_prompt("qwen2_5_omni", q, 1, system="You are a helpful assistant.") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>What is said?<|im_end|>\n<|im_start|>assistant\n")
    assert T.build_prompt("audioflamingo3", "Transcribe the input speech.", [2, 1]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<sound><sound><sound>Transcribe the input speech.<|im_end|>\n<|im_start|>assistant\n")
    assert T.AUDIO_PLACEHOLDER == {"qwen2_audio": "<|AUDIO|>", "qwen2_5_omni": "<|AUDIO|>", "audioflamingo3": "<sound>"}
    for fam in T.FAMILIES:
        assert T.end_of_turn(fam) == "<|im_end|>"
        assert T.build_prompt(fam, q, 4).count(T.AUDIO_PLACEHOLDER[fam]) == 4
    with pytest.raises(ValueError, match="unknown chat family"):
        T.build_prompt("llama", q, 1)
    with pytest.raises(ValueError):
        T.build_prompt("qwen2_audio", q, -1)


def test_qwen2_audio_prompt_matches_transformers_template():
    pytest.importorskip("jinja2")
    try:
        from transformers.models.qwen2_audio.processing_qwen2_audio import Qwen2AudioProcessor
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        pytest.skip("transformers is not installed")
    template = Qwen2AudioProcessor.default_chat_template.fget(None)
    for n_audio, system in ((1, None), (2, "Be brief.")):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": (
            [{"type": "audio", "audio_url": f"a{i}.wav"} for i in range(n_audio)] + [{"type": "text", "text": "Hi?"}])}]
        rendered, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True)
        expected = rendered[0].replace("<|AUDIO|>", "<|AUDIO|>" * 7)
        assert T.build_prompt("qwen2_audio", "Hi?", [7] * n_audio, system=system) == expected
