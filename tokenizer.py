"""Tokenizers and chat templates: text <-> token ids, and the prompt strings with audio placeholders.

Two tokenizer kinds, one interface (`encode`, `decode`, `token_to_id`, `vocab_size`, `special_tokens`,
`eos_token_id`, `pad_token_id`):
- byte-level BPE read from a Hugging Face `tokenizer.json` (Qwen2 / Qwen2.5 / Llama-3 / GPT-2 style), written
  from scratch: added tokens split out first (longest match), normalizer (NFC...), the file's split regex,
  GPT-2 byte-to-unicode map, BPE merges by rank, byte-level decode. Checked token-for-token against the
  `tokenizers` library in tests/test_tokenizer.py.
- SentencePiece `.model` (Llama-2 style, and the tiny default trained by `train_sentencepiece`) through the
  sentencepiece library, with special tokens split out the same way.
`encode` never adds BOS/EOS; special-token strings in the text become their ids.

Pre-tokenization without the `regex` module: the file's pattern is translated to Python's `re` (3.11 has
possessive quantifiers and atomic groups) by expanding `\\p{..}`, `\\s` and `\\S` into explicit character classes
built from `unicodedata` with Oniguruma's definitions (the engine behind `tokenizers`). `\\s` there is
U+0009-U+000D, U+0085 and Z* (Python's `\\s` also takes U+001C-U+001F, so it cannot be used as is).
Deviation: Python 3.11's Unicode tables are version 14.0; a code point assigned later is classified as
unassigned (not a letter/number).
"""
import functools
import heapq
import io
import json
import os
import re
import unicodedata

import sentencepiece as spm

# ---------------------------------------------------------------------------
# Special tokens and chat templates (ARCHITECTURES.md §4.3, §5.4, §6.3)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
AUDIO_BOS, AUDIO_EOS = "<|audio_bos|>", "<|audio_eos|>"
# The tiny default's SentencePiece model holds these as user-defined symbols (one id each, this order).
CHAT_SPECIAL_TOKENS = ("<|endoftext|>", IM_START, IM_END, "<|AUDIO|>", AUDIO_BOS, AUDIO_EOS)
# Time pieces of the tiny default: "0.0" .. "29.9" (a 30 s Whisper window), one user-defined piece each, so a time
# is 2 tokens ("1.55" -> "1.5" "5") instead of 4 digit tokens. They are text, not special tokens.
TIME_PIECES = tuple(f"{s}.{t}" for s in range(30) for t in range(10))

FAMILIES = ("qwen2_audio", "qwen2_5_omni", "audioflamingo3")
AUDIO_PLACEHOLDER = {"qwen2_audio": "<|AUDIO|>", "qwen2_5_omni": "<|AUDIO|>", "audioflamingo3": "<sound>"}
DEFAULT_SYSTEM = {
    "qwen2_audio": "You are a helpful assistant.",
    # Qwen's recommended Omni system prompt (the hub template alone would insert "You are a helpful assistant.").
    "qwen2_5_omni": "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
                    "perceiving auditory and visual inputs, as well as generating text and speech.",
    "audioflamingo3": "You are a helpful assistant.",
}


def _check_family(family):
    if family not in FAMILIES:
        raise ValueError(f"unknown chat family {family!r}; expected one of {FAMILIES}")


def end_of_turn(family: str) -> str:
    """The token that closes an assistant answer: the target is `answer + end_of_turn(family)`."""
    _check_family(family)
    return IM_END


def build_prompt(family: str, question: str, n_audio_tokens, system: str | None = None) -> str:
    """Prompt text up to and including `<|im_start|>assistant\\n`, each audio placeholder already expanded.

    n_audio_tokens: int for one audio, or a list (one entry per audio item; for AF3 the windows of one audio,
    whose runs are contiguous so the list is equivalent to its sum). system=None uses DEFAULT_SYSTEM[family].
    Audio comes before the question text, as in the released templates.
    """
    _check_family(family)
    counts = [n_audio_tokens] if isinstance(n_audio_tokens, int) else list(n_audio_tokens)
    if any(not isinstance(n, int) or n < 0 for n in counts):
        raise ValueError(f"n_audio_tokens must be non-negative ints, got {n_audio_tokens!r}")
    ph = AUDIO_PLACEHOLDER[family]
    if family == "qwen2_audio":     # one line per audio: "Audio 1: <|audio_bos|><|AUDIO|>..<|audio_eos|>\n"
        audio = "".join(f"Audio {i}: {AUDIO_BOS}{ph * n}{AUDIO_EOS}\n" for i, n in enumerate(counts, 1))
    elif family == "qwen2_5_omni":  # no "Audio N:" prefix and no newline
        audio = "".join(f"{AUDIO_BOS}{ph * n}{AUDIO_EOS}" for n in counts)
    else:                           # audioflamingo3: bare <sound> run, no bos/eos
        audio = ph * sum(counts)
    system = DEFAULT_SYSTEM[family] if system is None else system
    return (f"{IM_START}system\n{system}{IM_END}\n"
            f"{IM_START}user\n{audio}{question}{IM_END}\n"
            f"{IM_START}assistant\n")


# ---------------------------------------------------------------------------
# Unicode classes for the split regex (Oniguruma semantics, as used by `tokenizers`)

@functools.lru_cache(maxsize=None)
def _category_ranges() -> dict:
    """General category -> list of (first, last) code point ranges, over all of Unicode (once per process)."""
    out, cat, start = {}, None, 0
    for cp in range(0x110000):
        c = unicodedata.category(chr(cp))
        if c != cat:
            if cat is not None:
                out.setdefault(cat, []).append((start, cp - 1))
            cat, start = c, cp
    out.setdefault(cat, []).append((start, 0x10FFFF))
    return out


def _ranges_to_class(ranges) -> str:
    """Body of a `re` character class (no brackets) for sorted or unsorted (first, last) ranges."""
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in sorted(ranges))


@functools.lru_cache(maxsize=None)
def _property_class(name: str) -> str:
    """`\\p{name}` -> class body. name: a general category (`Lu`) or its first letter (`L`), or `White_Space`."""
    cats = _category_ranges()
    if name == "White_Space":   # Oniguruma's \s: \t \n \v \f \r, NEL, and Zs/Zl/Zp
        return _ranges_to_class([(0x09, 0x0D), (0x85, 0x85)] + cats["Zs"] + cats["Zl"] + cats["Zp"])
    names = [c for c in cats if c == name or (len(name) == 1 and c[0] == name)]
    if not names:
        raise ValueError(f"unsupported Unicode property \\p{{{name}}} in the tokenizer's split regex")
    return _ranges_to_class([r for c in names for r in cats[c]])


def translate_regex(pattern: str) -> str:
    """Rewrite a `tokenizers` (Oniguruma) split pattern into an equivalent Python `re` pattern.

    `\\p{X}`/`\\P{X}` and `\\s`/`\\S` become explicit classes; everything else (alternation, `(?i:..)`,
    lookahead, possessive quantifiers) means the same in both engines.
    """
    out, i, depth = [], 0, 0    # depth > 0: inside [...]
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if nxt in "pP":
                m = re.match(r"\{\^?(\w+)\}", pattern[i + 2:])
                if not m:
                    raise ValueError(f"cannot parse \\{nxt} at offset {i} of split regex {pattern!r}")
                body = _property_class(m.group(1))
                negated = (nxt == "P") != m.group(0).startswith("{^")
                i += 2 + len(m.group(0))
            elif nxt in "sS":
                body, negated = _property_class("White_Space"), nxt == "S"
                i += 2
            else:
                out.append(pattern[i:i + 2])
                i += 2
                continue
            if depth and negated:
                raise ValueError(f"negated class escape inside [...] is not supported in split regex {pattern!r}")
            out.append(body if depth else f"[{'^' if negated else ''}{body}]")
            continue
        if ch == "[":
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
        out.append(ch)
        i += 1
    return "".join(out)


# GPT-2 ByteLevel pre-tokenizer pattern (used when a tokenizer.json has ByteLevel with use_regex=true).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character map (bytes that are not printable are shifted to 256+)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# ---------------------------------------------------------------------------
# Shared: added/special tokens are split out before anything else

class AddedTokenMatcher:
    """Leftmost-longest matching of added tokens, with the `lstrip`/`rstrip`/`single_word` options of tokenizers."""

    def __init__(self, tokens: list):
        # tokens: dicts with content, id and optional lstrip/rstrip/single_word
        self.by_content = {t["content"]: t for t in tokens}
        alts = sorted(self.by_content, key=len, reverse=True)  # longest first: `re` takes the first alternative
        self.regex = re.compile("|".join(map(re.escape, alts))) if alts else None

    def split(self, text: str) -> list:
        """-> [(piece, id or None)], the pieces concatenated give back `text` minus stripped whitespace."""
        if self.regex is None or not text:
            return [(text, None)] if text else []
        out, pos = [], 0
        for m in self.regex.finditer(text):
            tok, start, stop = self.by_content[m.group(0)], m.start(), m.end()
            if tok.get("single_word") and (
                    (start > 0 and _is_word_char(text[start - 1])) or (stop < len(text) and _is_word_char(text[stop]))):
                continue
            if start < pos:     # the previous token's rstrip already took this text
                continue
            if tok.get("lstrip"):
                while start > pos and text[start - 1].isspace():
                    start -= 1
            if tok.get("rstrip"):
                while stop < len(text) and text[stop].isspace():
                    stop += 1
            if start > pos:
                out.append((text[pos:start], None))
            out.append((text[start:stop], tok["id"]))
            pos = stop
        if pos < len(text):
            out.append((text[pos:], None))
        return out


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


class Tokenizer:
    """Common interface; subclasses implement `_encode_ordinary(text)` and `_decode_ordinary(ids)`."""

    special_tokens: dict   # content -> id of the special tokens (skipped by decode(skip_special_tokens=True))
    vocab_size: int        # max id + 1
    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str) -> list:
        ids = []
        for piece, tid in self.matcher.split(text):
            if tid is None:
                ids.extend(self._encode_ordinary(piece))
            else:
                ids.append(tid)
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        special_ids = set(self.special_tokens.values())
        if skip_special_tokens:
            ids = [i for i in ids if i not in special_ids]
        return self._decode_ordinary(ids)

    def _pick_ids(self, config: dict, sp_eos=None, sp_pad=None):
        """eos: chat end <|im_end|> when present; pad: <|endoftext|> when present (Qwen); else the files' own."""
        def named(key):
            v = config.get(key)
            return self.token_to_id(v["content"] if isinstance(v, dict) else v) if v else None

        def first(*xs):
            return next((x for x in xs if x is not None), None)
        self.eos_token_id = first(self.token_to_id(IM_END), named("eos_token"), sp_eos,
                                  *(self.token_to_id(t) for t in ("<|eot_id|>", "<|endoftext|>", "</s>")))
        self.pad_token_id = first(self.token_to_id("<|endoftext|>"), named("pad_token"), sp_pad,
                                  self.token_to_id("<pad>"), self.eos_token_id)

    def __repr__(self):
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos={self.eos_token_id}, pad={self.pad_token_id})"


# ---------------------------------------------------------------------------
# Byte-level BPE from tokenizer.json

_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD"}


def _parse_normalizer(spec):
    """tokenizer.json normalizer -> function str -> str (None when there is none)."""
    if spec is None:
        return None
    kind = spec["type"]
    if kind in _NORMALIZERS:
        return lambda s: unicodedata.normalize(kind, s)
    if kind == "Lowercase":
        return str.lower
    if kind == "Sequence":
        fns = [f for f in map(_parse_normalizer, spec["normalizers"]) if f is not None]
        return lambda s: functools.reduce(lambda acc, f: f(acc), fns, s)
    raise ValueError(f"unsupported normalizer type {kind!r} in tokenizer.json (supported: NFC/NFD/NFKC/NFKD, "
                     "Lowercase, Sequence)")


def _parse_pre_tokenizer(spec):
    """tokenizer.json pre_tokenizer -> (list of compiled split regexes applied in turn, add_prefix_space)."""
    if spec is None:
        raise ValueError("tokenizer.json has no pre_tokenizer; only byte-level BPE (ByteLevel) is supported")
    kind = spec["type"]
    if kind == "Sequence":
        parts = [_parse_pre_tokenizer(s) for s in spec["pretokenizers"]]
        if len(parts) > 1 and any(p[1] for p in parts):   # it would then apply to every split piece
            raise ValueError("ByteLevel add_prefix_space=true inside a pre_tokenizer Sequence is not supported")
        return [r for p in parts for r in p[0]], any(p[1] for p in parts)
    if kind == "Split":
        if spec.get("behavior") != "Isolated" or spec.get("invert"):
            raise ValueError(f"unsupported Split pre-tokenizer {spec}: only behavior=Isolated, invert=false")
        pat = spec["pattern"]
        src = translate_regex(pat["Regex"]) if "Regex" in pat else re.escape(pat["String"])
        return [re.compile(src)], False
    if kind == "ByteLevel":
        regexes = [re.compile(translate_regex(GPT2_PATTERN))] if spec.get("use_regex", True) else []
        return regexes, bool(spec.get("add_prefix_space", False))
    raise ValueError(f"unsupported pre_tokenizer type {kind!r} in tokenizer.json (supported: Split, ByteLevel, Sequence)")


def _isolated_split(regex, pieces):
    """tokenizers' Split(behavior=Isolated): every match and every gap between matches is a piece."""
    out = []
    for text in pieces:
        pos = 0
        for m in regex.finditer(text):
            if m.start() > pos:
                out.append(text[pos:m.start()])
            if m.end() > m.start():
                out.append(m.group(0))
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
    return out


class BPETokenizer(Tokenizer):
    """Byte-level BPE with the exact merge order of `tokenizers` (lowest rank first, then leftmost)."""

    def __init__(self, spec: dict, config: dict | None = None, path: str = "tokenizer.json"):
        # spec: the parsed tokenizer.json; path only names the source in error messages
        model = spec["model"]
        if model.get("type", "BPE") != "BPE":
            raise ValueError(f"{path}: model type {model.get('type')!r} is not BPE")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise ValueError(f"{path}: BPE option {key}={model[key]!r} is not supported (byte-level BPE has none)")
        if model.get("byte_fallback"):
            raise ValueError(f"{path}: byte_fallback BPE (Llama-2 style) is not byte-level; load tokenizer.model instead")
        self.vocab = dict(model["vocab"])
        self.ignore_merges = bool(model.get("ignore_merges", False))
        self.unk_id = self.vocab.get(model["unk_token"]) if model.get("unk_token") else None
        self.fuse_unk = bool(model.get("fuse_unk", False))
        self.merges = {}  # (left id, right id) -> (rank, merged id); a later duplicate wins, as in tokenizers
        for rank, m in enumerate(model["merges"]):
            a, b = m.split(" ") if isinstance(m, str) else m
            if a not in self.vocab or b not in self.vocab or a + b not in self.vocab:
                raise ValueError(f"{path}: merge #{rank} {m!r} uses a token missing from the vocab")
            self.merges[(self.vocab[a], self.vocab[b])] = (rank, self.vocab[a + b])

        added = spec.get("added_tokens") or []
        self.normalize = _parse_normalizer(spec.get("normalizer"))
        norm_added = [dict(t, content=self.normalize(t["content"]) if self.normalize else t["content"])
                      for t in added if t.get("normalized")]
        self.matcher = AddedTokenMatcher([t for t in added if not t.get("normalized")])  # on raw text
        self.norm_matcher = AddedTokenMatcher(norm_added)                                # on normalized text
        self.split_regexes, self.add_prefix_space = _parse_pre_tokenizer(spec.get("pre_tokenizer"))
        decoder = spec.get("decoder")
        if decoder is not None and decoder.get("type") != "ByteLevel":
            raise ValueError(f"{path}: decoder {decoder.get('type')!r} is not ByteLevel")

        self.added = {t["content"]: t["id"] for t in added}
        self.special_tokens = {t["content"]: t["id"] for t in added if t.get("special")}
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.id_to_token.update({i: t for t, i in self.added.items()})
        self.vocab_size = max(self.id_to_token) + 1
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache = {}
        self._pick_ids(config or {})

    def token_to_id(self, token: str):
        return self.added.get(token, self.vocab.get(token))

    def _encode_ordinary(self, text: str) -> list:
        ids = []
        for piece, tid in self.norm_matcher.split(self.normalize(text) if self.normalize else text):
            if tid is not None:
                ids.append(tid)
                continue
            if self.add_prefix_space and not piece.startswith(" "):
                piece = " " + piece
            words = [piece]
            for regex in self.split_regexes:
                words = _isolated_split(regex, words)
            for w in words:
                ids.extend(self._bpe(w))
        return ids

    def _bpe(self, word: str) -> list:
        """Byte-level BPE of one pre-tokenized word; mirrors tokenizers' `Word::merge_all` (cached)."""
        if word in self.cache:
            return self.cache[word]
        chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
        if self.ignore_merges and chars in self.vocab:
            return [self.vocab[chars]]
        syms = []
        for c in chars:     # a byte missing from the vocab: unk (fused if fuse_unk), or dropped without unk
            i = self.vocab.get(c, self.unk_id)
            if i is not None and not (self.fuse_unk and c not in self.vocab and syms and syms[-1] == i):
                syms.append(i)
        n = len(syms)
        nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        merges = self.merges
        heap = [(merges[p][0], i, merges[p][1]) for i, p in enumerate(zip(syms, syms[1:])) if p in merges]
        heapq.heapify(heap)     # (rank, position, merged id): lowest rank first, then leftmost
        while heap:
            rank, i, new = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j >= n or merges.get((syms[i], syms[j]), (None, None))[1] != new:
                continue        # stale entry: a neighbour was merged since it was pushed
            syms[i], alive[j], nxt[i] = new, False, nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            for left, right, pos in ((prv[i], i, prv[i]), (i, nxt[i], i)):  # new pairs with both neighbours
                if left >= 0 and right < n and (syms[left], syms[right]) in merges:
                    r, m = merges[(syms[left], syms[right])]
                    heapq.heappush(heap, (r, pos, m))
        out = [s for s, a in zip(syms, alive) if a]
        if len(self.cache) > 200_000:
            self.cache.clear()
        self.cache[word] = out
        return out

    def _decode_ordinary(self, ids: list) -> str:
        # As tokenizers' ByteLevel decoder: a token whose characters all map back to bytes gives those bytes,
        # any other token (e.g. an added token with a space or CJK) its UTF-8; invalid UTF-8 becomes U+FFFD.
        buf = bytearray()
        for i in ids:
            tok = self.id_to_token.get(i)
            if tok is None:
                raise ValueError(f"token id {i} is out of range for this tokenizer (vocab_size {self.vocab_size})")
            try:
                buf.extend(self.byte_decoder[c] for c in tok)
            except KeyError:
                buf.extend(tok.encode("utf-8"))
        return buf.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------
# SentencePiece (.model)

class SentencePieceTokenizer(Tokenizer):
    """SentencePiece model with control and unk pieces, and user-defined pieces written as markup (<...>), treated
    as special tokens. Other user-defined pieces (TIME_PIECES) are text: sentencepiece keeps each whole when it
    encodes, and decode(skip_special_tokens=True) keeps them."""

    def __init__(self, path: str, config: dict | None = None):
        self.sp = spm.SentencePieceProcessor(model_file=path)
        n = self.sp.get_piece_size()
        self.vocab_size = n
        types = _sentencepiece_piece_types(self.sp.serialized_model_proto())
        self.special_tokens = {piece: i for i, piece in enumerate(map(self.sp.id_to_piece, range(n)))
                               if types[i] in _SP_SPECIAL_TYPES
                               or (types[i] == _SP_USER_DEFINED and piece.startswith("<") and piece.endswith(">"))}
        self.matcher = AddedTokenMatcher([{"content": t, "id": i} for t, i in self.special_tokens.items()])
        eos, pad = self.sp.eos_id(), self.sp.pad_id()
        self._pick_ids(config or {}, eos if eos >= 0 else None, pad if pad >= 0 else None)

    def token_to_id(self, token: str):
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None   # unknown pieces map to unk_id otherwise

    def _encode_ordinary(self, text: str) -> list:
        return self.sp.encode(text)

    def _decode_ordinary(self, ids: list) -> str:
        # sentencepiece decodes control pieces to "", so special tokens are written out here, runs in between by sp.
        out, run = [], []
        special_ids = {i: t for t, i in self.special_tokens.items()}
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range for this tokenizer (vocab_size {self.vocab_size})")
            if i in special_ids:
                out.append(self.sp.decode(run))
                out.append(special_ids[i])
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)


_SP_SPECIAL_TYPES = (2, 3)      # sentencepiece_model.proto Type: UNKNOWN=2, CONTROL=3
_SP_USER_DEFINED = 4


def _read_varint(buf: bytes, i: int):
    shift = value = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def _sentencepiece_piece_types(proto: bytes) -> list:
    """Type of every piece, read from the serialized ModelProto (field 1: repeated SentencePiece, whose field 3
    is the type, NORMAL=1 by default); the Python API has no is_user_defined, and protobuf is not a dependency."""
    types, i = [], 0
    while i < len(proto):
        key, i = _read_varint(proto, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _read_varint(proto, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = _read_varint(proto, i)
            if field == 1:
                types.append(_piece_type(proto[i:i + size]))
            i += size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} in a SentencePiece model")
    return types


def _piece_type(msg: bytes) -> int:
    i, kind = 0, 1
    while i < len(msg):
        key, i = _read_varint(msg, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(msg, i)
            kind = value if field == 3 else kind
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = _read_varint(msg, i)
            i += size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} in a SentencePiece piece")
    return kind


def train_sentencepiece(texts, out_path: str, vocab_size: int, special_tokens=CHAT_SPECIAL_TOKENS,
                        text_pieces=()) -> Tokenizer:
    """Train the tiny default's SentencePiece BPE on `texts` and write `tokenizer.model`; returns it loaded.

    out_path: a `.model` file, or a directory that gets `tokenizer.model`. Each special token is a user-defined
    symbol (one id, ids 1.. in order; unk is 0; no BOS/EOS/PAD pieces: pad is `<|endoftext|>`), then each of
    `text_pieces` (ordinary text kept as one piece, e.g. TIME_PIECES). Digits are otherwise split (without time
    pieces 12.34 is one token per character; with them "12.3" "4"), unknown characters fall back to bytes,
    whitespace and newlines are kept as they are (identity normalization, no dummy prefix) so
    decode(encode(x)) == x.
    Deterministic: one thread, all sentences, no sampling. vocab_size is an upper bound on small corpora.
    """
    path = out_path if out_path.endswith(".model") else os.path.join(out_path, "tokenizer.model")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        user_defined_symbols=list(special_tokens) + list(text_pieces), byte_fallback=True, split_digits=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_by_whitespace=True,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, hard_vocab_limit=False, num_threads=1,
        max_sentence_length=1 << 20, minloglevel=2)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)   # atomic: a reader never sees half a model
    return load_tokenizer(path)


# ---------------------------------------------------------------------------
# Loading

def load_tokenizer(path: str) -> Tokenizer:
    """Directory or file. In a directory: tokenizer.json if byte-level, else tokenizer.model, else (Qwen2 layout)
    vocab.json + merges.txt; tokenizer_config.json is read when there (eos/pad names, added tokens)."""
    config, json_path, model_path = {}, None, None
    if os.path.isdir(path):
        cfg = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg):
            with open(cfg, encoding="utf-8") as f:
                config = json.load(f)
        json_path, model_path = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
        json_path = json_path if os.path.exists(json_path) else None
        model_path = model_path if os.path.exists(model_path) else None
        if json_path and model_path and not _is_byte_level(json_path):
            json_path = None    # Llama-2 style dirs: tokenizer.json is an sp-like BPE; use the .model
        has_vocab_merges = all(os.path.exists(os.path.join(path, f)) for f in ("vocab.json", "merges.txt"))
        if not (json_path or model_path or has_vocab_merges):
            raise FileNotFoundError(f"{path}: no tokenizer.json, tokenizer.model or vocab.json+merges.txt here")
    elif path.endswith(".json"):
        json_path = path
    elif os.path.exists(path):
        model_path = path
    else:
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist")
    if json_path:
        with open(json_path, encoding="utf-8") as f:
            return BPETokenizer(json.load(f), config, json_path)
    if model_path:
        return SentencePieceTokenizer(model_path, config)
    return BPETokenizer(_qwen2_spec_from_vocab_merges(path, config), config, path)


# Qwen2Tokenizer (slow) = NFC + this split regex + byte-level BPE; what the fast converter writes to tokenizer.json.
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def _qwen2_spec_from_vocab_merges(path: str, config: dict) -> dict:
    """A Qwen2-layout directory without tokenizer.json: vocab.json + merges.txt + tokenizer_config.json's
    added_tokens_decoder, assembled into the tokenizer.json the transformers converter would write."""
    with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
        merges = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#version")]
    added = [dict(v, id=int(k)) for k, v in config.get("added_tokens_decoder", {}).items()]
    return {"model": {"type": "BPE", "vocab": vocab, "merges": merges},
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
            "decoder": {"type": "ByteLevel"}, "added_tokens": added}


def _is_byte_level(json_path: str) -> bool:
    with open(json_path, encoding="utf-8") as f:
        return '"ByteLevel"' in json.dumps(json.load(f).get("pre_tokenizer"))
