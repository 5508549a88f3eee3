"""Tokenizers and chat templates from a HF checkpoint folder, offline: tokenizer.json read the way the
`tokenizers` library reads it, and the chat template rendered the way transformers renders it.

Two kinds of tokenizer.json are supported:
- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): turned into a tiktoken.Encoding (fast, compiled);
- SentencePiece-style BPE (Llama 2, Mistral): `▁` stands for a space (a Metaspace pre-tokenizer or a
  Prepend/Replace normalizer) and characters outside the vocabulary fall back to byte tokens <0xNN>;
  encoded here in plain Python with the same merge order as `tokenizers`.
encode(text) tokenizes text as written (special tokens in it become their ids); encode(text, add_special_tokens=True)
also adds what the post_processor adds to a plain text (e.g. BOS), as `tokenizers` does by default.

A checkpoint's tokenizer files come from the internet: every part Tokenizer reads is checked (one SwarrError
naming the file and the field), settings it does not implement are refused, and at load a probe text must come
back from encode -> decode and the pre-tokenizer regex must split long runs of each kind of character within
REGEX_PROBE_S. The chat template is code we run: it renders in jinja2's immutable sandbox within the TEMPLATE_*
budgets below (time, characters, integer size, memory), and breaking one is one SwarrError.
"""
from __future__ import annotations

import functools
import heapq
import json
import os
import re
import string
import sys
import time
import unicodedata
from contextlib import contextmanager
from datetime import datetime

import tiktoken

from .safe_io import SwarrError, read_json, read_text, short

# Budgets of a chat template (a downloaded checkpoint's template is code we run; real ones need a few ms and KB).
TEMPLATE_TIME_S = 2.0              # wall-clock time of one compile or render, in any thread
TEMPLATE_MAX_CHARS = 4_000_000     # characters of the rendered prompt, and of any string, list or number the
                                   # template builds or passes on (about 1M tokens: past any model's context)
TEMPLATE_MAX_SOURCE = 1_000_000    # characters of the template's source
TEMPLATE_MAX_INT_BITS = 65_536     # bits of an integer the template computes with * or **
TEMPLATE_MAX_MEMORY = 1 << 30      # bytes of resident memory a render may add (Linux; checked every ms)
# Budgets of a tokenizer.json pre-tokenizer regex, checked at load on long runs of each kind of character.
REGEX_PROBE_CHARS = 4_000          # length of each probe run (real regexes split one in well under 1 ms)
REGEX_PROBE_S = 0.05               # the most time one probe run may take (a quadratic regex takes ~0.2 s)
QUIET_ABOVE_CHARS = 10_000         # longer texts are encoded with stderr muted: tiktoken's regex engine can
                                   # panic on long runs (~500K spaces), and Rust prints the panic before we
                                   # turn it into one error line


GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Files of a checkpoint that describe its tokenizer or chat format: save() copies every one it finds.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "generation_config.json")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (how tokenizer.json spells bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


PART_LISTS = {"normalizer": "normalizers", "pre_tokenizer": "pretokenizers", "decoder": "decoders",
              "post_processor": "processors"}  # tokenizer.json field -> the list a Sequence of it holds


def _parts(tj: dict, field: str, where: str = "tokenizer.json") -> list[dict]:
    """A normalizer / pre-tokenizer / decoder / post-processor as a flat list (Sequence unrolled); each part an
    object with a 'type', each Sequence with its list, or one SwarrError."""
    key = PART_LISTS[field]

    def flat(obj) -> list[dict]:
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            raise SwarrError(f"{where}: {field} (and each part of a Sequence) needs a 'type', got {short(obj)}")
        if obj["type"] != "Sequence":
            return [obj]
        if not isinstance(obj.get(key), list):
            raise SwarrError(f"{where}: {field} of type Sequence needs a list {key!r}, got {short(obj.get(key))}")
        return [p for sub in obj[key] for p in flat(sub)]
    return [] if tj.get(field) is None else flat(tj[field])


def _check_fields(part: dict, where: str, what: str, **kinds):
    """Each named field of a tokenizer.json part has its type: kinds maps a field to (type or tuple of types)."""
    for name, kind in kinds.items():
        v = part.get(name)
        if isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)) or not isinstance(v, kind):
            raise SwarrError(f"{where}: {what} field {name!r} must be {_kind_name(kind)}, got {short(v)}")


def _kind_name(kind) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", dict: "an object", list: "a list",
             type(None): "null"}
    return " or ".join(names.get(k, k.__name__) for k in (kind if isinstance(kind, tuple) else (kind,)))


def _split_regex(tj: dict, where: str) -> str:
    """A byte-level pre-tokenizer's splitting regex (Split / ByteLevel / Digits, possibly in a Sequence)."""
    regexes = []
    for p in _parts(tj, "pre_tokenizer", where):
        if p["type"] == "Split":
            regexes.append(p["pattern"].get("Regex") or re.escape(p["pattern"]["String"]))
        elif p["type"] == "ByteLevel":
            if p.get("add_prefix_space"):
                raise SwarrError(f"{where}: ByteLevel add_prefix_space is not supported")
            if p.get("use_regex", True):
                regexes.append(GPT2_SPLIT)
        elif p["type"] == "Digits":
            regexes.insert(0, r"\p{N}" if p.get("individual_digits") else r"\p{N}+")
        else:
            raise SwarrError(f"{where}: pre-tokenizer {p['type']!r} is not supported with byte-level BPE")
    pat = "|".join(regexes) or r"[\s\S]+"  # no splitting at all: the whole text is one piece
    _check_no_empty_match(pat, where)
    return pat


def _check_no_empty_match(pat: str, where: str):
    """tiktoken panics (a Rust panic, not a Python error) on a piece of length 0, i.e. on a pre-tokenizer regex
    that can match the empty string (`a*`, `x|`, a lone lookahead). Probe it on text of every character class."""
    import regex  # tiktoken's own dependency; its syntax is close to the Rust regex tiktoken compiles
    try:
        compiled = regex.compile(pat)
    except regex.error:
        return  # tiktoken reports the syntax error itself
    probe = "Hello, World! It's 2024: x^2 + 3.14 = y_1\n\n\t  café naïve 東京 🙂 ÿ \"q\" (a) [b] {c} <d> #@$%&*~`|"
    try:
        for text in ["", probe, *probe]:
            if any(m.start() == m.end() for m in compiled.finditer(text, timeout=REGEX_PROBE_S * 20)):
                raise SwarrError(f"{where}: the pre-tokenizer regex can match the empty string (in {text[:20]!r})")
    except TimeoutError:  # Python's engine backtracks where Rust's may not: the timed probe in Tokenizer decides
        return


ROUND_TRIP_PROBE = ("Hello, World! It's 2024: x^2 + 3.14 = y_1 and 0123456789.\n\n\tTabs\tand  two  spaces   three    "
                    "four\r\nline\n \n  café naïve ß Ünïcödé 東京 🙂👍🏽 \"q\" (a) [b] {c} <d> #@$%&*~`|\\ end")
# runs of each kind of character, and their pairs, for the pre-tokenizer regex's timed probe
_REGEX_PROBE_UNITS = (" ", "\n", "\t", "\r\n", " \n", "a", "A", "1", "!", "'", "é", "東", "🙂", "a ", " a", "a1",
                      "1 ", "!a", "'s", "\n ")


@contextmanager
def _quiet_stderr():
    """Mute file descriptor 2 (where Rust prints a panic) for the duration."""
    try:
        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _is_panic(e: BaseException) -> bool:
    return type(e).__name__ == "PanicException"  # pyo3's, a BaseException: tiktoken's Rust code gave up


def _encoding(name: str, pat: str, ranks: dict, special: dict, where: str) -> tiktoken.Encoding:
    """tiktoken.Encoding over the pre-tokenizer regex; a regex Rust cannot compile is one SwarrError."""
    try:
        with _quiet_stderr():
            return tiktoken.Encoding(name=name, pat_str=pat, mergeable_ranks=ranks, special_tokens=special)
    except ValueError as e:  # tiktoken compiles the pre-tokenizer's regex (Rust regex syntax)
        raise SwarrError(f"{where}: pre_tokenizer regex does not compile ({str(e).splitlines()[0]})") from None
    except BaseException as e:
        if _is_panic(e):
            raise SwarrError(f"{where}: pre_tokenizer regex is refused by tiktoken ({_one_line(e)})") from None
        raise


def _tiktoken_encode(enc: tiktoken.Encoding, text: str, where: str) -> list[int]:
    """enc.encode(text); the regex engine giving up (its backtracking or stack limit, on a long run of one
    kind of character) is one SwarrError."""
    try:
        if len(text) <= QUIET_ABOVE_CHARS:
            return enc.encode(text, allowed_special="all")
        with _quiet_stderr():
            return enc.encode(text, allowed_special="all")
    except BaseException as e:
        if not _is_panic(e) and not isinstance(e, ValueError):
            raise
        raise SwarrError(f"{where}: the pre-tokenizer regex gives up on this text of {len(text):,} characters "
                         f"({_one_line(e, 120)})") from None


def _check_regex_time(pat: str, where: str):
    """The pre-tokenizer regex splits a run of REGEX_PROBE_CHARS of each kind of character (then a different one)
    within REGEX_PROBE_S: one that backtracks (time growing with the square of a run, or faster) is refused at
    load rather than hanging on a long prompt. Timed on tiktoken's own engine with single-byte tokens only."""
    probe_enc = _encoding("probe", pat, {bytes([b]): b for b in range(256)}, {}, where)
    for unit in _REGEX_PROBE_UNITS:
        run = unit * (REGEX_PROBE_CHARS // len(unit))
        for text in (run, run + "x", run + " ", run + "1"):
            for attempt in range(3):  # a slow run is timed again: the machine may have been busy
                t0 = time.perf_counter()
                try:
                    with _quiet_stderr():
                        probe_enc.encode_ordinary(text)
                except BaseException as e:
                    if not _is_panic(e):
                        raise
                    raise SwarrError(f"{where}: the pre-tokenizer regex gives up on a run of {len(run):,} x "
                                     f"{unit!r} ({_one_line(e, 120)})") from None
                if time.perf_counter() - t0 <= REGEX_PROBE_S:
                    break
            else:
                raise SwarrError(f"{where}: the pre-tokenizer regex takes over {REGEX_PROBE_S} s on a run of "
                                 f"{len(run):,} x {unit!r} (it backtracks: a long prompt would hang)")


def check_tokenizer_json(tj: dict, path: str):
    """The fields of a tokenizer.json that Tokenizer reads, checked with one error line each. Duplicate ids
    are caught here: tiktoken would panic on them (a Rust panic, not a Python error)."""
    model = tj.get("model")
    if not isinstance(model, dict):
        raise SwarrError(f"{path}: field 'model' must be an object")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise SwarrError(f"{path}: model.vocab must be an object mapping tokens to ids, got {type(vocab).__name__}")
    seen: dict[int, str] = {}
    added = tj.get("added_tokens", [])
    if not isinstance(added, list) or not all(isinstance(t, dict) for t in added):
        raise SwarrError(f"{path}: added_tokens must be a list of objects")
    for t in added:
        if not isinstance(t.get("content"), str) or not t["content"]:
            raise SwarrError(f"{path}: an added token has no 'content' string: {t!r}"[:300])
    specials = {t["content"]: t.get("id") for t in added}
    for kind, table in (("model.vocab", {k: v for k, v in vocab.items() if k not in specials}),
                        ("added_tokens", specials)):
        for tok, i in table.items():
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 2 ** 31:
                raise SwarrError(f"{path}: {kind}: token {tok!r} has id {i!r}, not an integer in [0, 2**31)")
            if i in seen:
                raise SwarrError(f"{path}: {kind}: id {i} is given to both {seen[i]!r} and {tok!r}")
            seen[i] = tok
    for name in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(name) not in (None, "", 0):  # BPE options that change the tokens: not implemented
            raise SwarrError(f"{path}: model.{name} {short(model[name])} is not supported")
    merges = model.get("merges", [])
    bad = [merges] if not isinstance(merges, list) else [m for m in merges if not _is_merge(m)]
    if bad:
        raise SwarrError(f"{path}: model.merges must be a list of \"a b\" strings or [a, b] pairs, got {short(bad[0])}")
    for p in _parts(tj, "pre_tokenizer", path):
        if p["type"] == "Split":
            pat = p.get("pattern")
            if not (isinstance(pat, dict) and (isinstance(pat.get("Regex"), str) or isinstance(pat.get("String"), str))):
                raise SwarrError(f"{path}: Split pre-tokenizer needs a pattern {{'Regex': ...}} or {{'String': ...}}")
            if p.get("behavior", "Isolated") != "Isolated" or p.get("invert", False) is not False:
                raise SwarrError(f"{path}: Split pre-tokenizer with behavior {short(p.get('behavior'))} and invert "
                                 f"{short(p.get('invert'))} is not supported (behavior Isolated, invert false only)")
        elif p["type"] == "Metaspace":
            r = p.get("replacement")
            if not isinstance(r, str) or len(r) != 1 or r == " ":
                raise SwarrError(f"{path}: Metaspace replacement must be one character other than a space, "
                                 f"got {short(r)}")
            _check_fields(p, path, "Metaspace", split=(bool, type(None)), prepend_scheme=(str, type(None)))
    byte_level = any(p["type"] == "ByteLevel" for p in _parts(tj, "pre_tokenizer", path) + _parts(tj, "decoder", path))
    for field in ("normalizer",) if byte_level else ("normalizer", "decoder"):  # byte-level decodes bytes itself
        for p in _parts(tj, field, path):
            if p["type"] == "Replace":
                pat = p.get("pattern")
                if not (isinstance(pat, dict) and isinstance(pat.get("String"), str) and pat["String"]):
                    raise SwarrError(f"{path}: {field} Replace is supported with a non-empty pattern "
                                     f"{{'String': ...}} only, got {short(pat)}")
                _check_fields(p, path, f"{field} Replace", content=str)
            elif p["type"] == "Prepend":
                _check_fields(p, path, f"{field} Prepend", prepend=str)
            elif p["type"] == "Strip":
                _check_fields(p, path, f"{field} Strip", content=str, start=int, stop=int)
                if not 0 <= p["start"] <= 1000 or not 0 <= p["stop"] <= 1000:
                    raise SwarrError(f"{path}: {field} Strip start/stop must be in [0, 1000]")
            elif p["type"] == "Metaspace":
                r = p.get("replacement")
                if not isinstance(r, str) or len(r) != 1:
                    raise SwarrError(f"{path}: decoder Metaspace replacement must be one character, got {short(r)}")
    for p in _parts(tj, "post_processor", path):
        if p["type"] == "TemplateProcessing":
            single, table = p.get("single"), p.get("special_tokens")
            if not isinstance(single, list) or not all(isinstance(x, dict) for x in single) or not isinstance(table, dict):
                raise SwarrError(f"{path}: post_processor TemplateProcessing needs a list 'single' and an object "
                                 "'special_tokens'")
            for piece in single:
                if "SpecialToken" not in piece:
                    continue
                name = piece["SpecialToken"].get("id") if isinstance(piece["SpecialToken"], dict) else None
                ids = table.get(name, {}).get("ids") if isinstance(name, str) and isinstance(table.get(name), dict) \
                    else None
                if not isinstance(ids, list) or not all(type(i) is int and i in seen for i in ids):
                    raise SwarrError(f"{path}: post_processor TemplateProcessing names the special token "
                                     f"{short(name)}, which its special_tokens or the vocabulary lack")
        elif p["type"] in ("RobertaProcessing", "BertProcessing"):
            for k in ("cls", "sep"):
                v = p.get(k)
                if not (isinstance(v, list) and len(v) == 2 and type(v[1]) is int and v[1] in seen):
                    raise SwarrError(f"{path}: post_processor {p['type']} field {k!r} must be [token, id] with an "
                                     f"id of the vocabulary, got {short(v)}")


def _is_merge(m) -> bool:
    return isinstance(m, (str, list)) and len(_merge_pair(m)) == 2 and all(isinstance(x, str) and x for x in _merge_pair(m))


def _merge_pair(m) -> tuple:
    """tokenizer.json merges: "a b" strings (older files) or [a, b] pairs (newer files)."""
    return tuple(m.split(" ")) if isinstance(m, str) else tuple(m)


class SentencePieceBPE:
    """BPE over characters with `▁` for spaces and <0xNN> byte fallback, as `tokenizers` runs it for Llama 2 and
    Mistral. Pipeline per text segment (between special tokens): normalizer -> Metaspace -> BPE merges."""

    def __init__(self, tj: dict, where: str):
        model = tj["model"]
        self.vocab: dict[str, int] = model["vocab"]
        self.ranks = {}
        for r, (a, b) in enumerate(map(_merge_pair, model.get("merges", []))):
            if a + b not in self.vocab:  # encode would look the merged symbol up
                raise SwarrError(f"{where}: model.merges: the merge {a!r} + {b!r} gives {a + b!r}, which is not "
                                 "in the vocabulary")
            self.ranks[a, b] = r  # a repeated merge: the last rank counts, as in `tokenizers`
        self.byte_fallback, self.ignore_merges = bool(model.get("byte_fallback")), bool(model.get("ignore_merges"))
        unk = model.get("unk_token")
        if unk is not None and (not isinstance(unk, str) or unk not in self.vocab):
            raise SwarrError(f"{where}: model.unk_token {short(unk)} is not a token of the vocabulary")
        self.unk = self.vocab[unk] if unk is not None else None
        self.fuse_unk = bool(model.get("fuse_unk"))
        self.normalizers = _parts(tj, "normalizer", where)
        for n in self.normalizers:
            if n["type"] not in ("Prepend", "Replace", "NFC", "NFKC"):
                raise SwarrError(f"{where}: normalizer {n['type']!r} is not supported")
        pres = _parts(tj, "pre_tokenizer", where)
        if any(p["type"] != "Metaspace" for p in pres) or len(pres) > 1:
            raise SwarrError(f"{where}: pre-tokenizer {[p['type'] for p in pres]} is not supported with "
                             "SentencePiece-style BPE (Metaspace only)")
        self.meta = pres[0] if pres else None
        if self.meta and self.meta.get("prepend_scheme", "always") not in ("always", "first", "never"):
            raise SwarrError(f"{where}: Metaspace prepend_scheme {self.meta['prepend_scheme']!r} is not supported")
        self.decoders = _parts(tj, "decoder", where)
        for d in self.decoders:
            if d["type"] not in ("Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"):
                raise SwarrError(f"{where}: decoder {d['type']!r} is not supported")
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.cache: dict[str, list[int]] = {}

    def normalize(self, s: str) -> str:
        for n in self.normalizers:
            if n["type"] == "Prepend":
                s = n["prepend"] + s if s else s
            elif n["type"] == "Replace":
                s = s.replace(n["pattern"]["String"], n["content"])
            else:
                s = unicodedata.normalize(n["type"], s)
        return s

    def pre_tokenize(self, s: str, at_start: bool) -> list[str]:
        if not self.meta:
            return [s]
        r = self.meta["replacement"]
        s = s.replace(" ", r)
        scheme = self.meta.get("prepend_scheme", "always" if self.meta.get("add_prefix_space", True) else "never")
        if s and not s.startswith(r) and (scheme == "always" or (scheme == "first" and at_start)):
            s = r + s
        if not self.meta.get("split", True):
            return [s]
        return [w for w in re.split(f"(?={re.escape(r)})", s) if w]  # "▁a▁▁b" -> "▁a", "▁", "▁b"

    def bpe(self, word: str) -> list[int]:
        if word in self.cache:
            return self.cache[word]
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        syms: list[str] = []
        for ch in word:
            if ch in self.vocab:
                syms.append(ch)
            elif self.byte_fallback and all(f"<0x{b:02X}>" in self.vocab for b in ch.encode()):
                syms.extend(f"<0x{b:02X}>" for b in ch.encode())
            elif self.fuse_unk and syms and syms[-1] is None:
                continue
            else:
                syms.append(None)  # unknown character
        # Merge the lowest-ranked adjacent pair first (leftmost among equals), as `tokenizers` does: a heap of
        # candidate pairs over a linked list of symbols, so a long text costs O(n log n), not O(n^2).
        nxt, prev = list(range(1, len(syms) + 1)), list(range(-1, len(syms) - 1))
        heap = [(self.ranks[p], i, *p) for i, p in enumerate(zip(syms, syms[1:])) if p in self.ranks]
        heapq.heapify(heap)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i]
            if syms[i] != a or j >= len(syms) or syms[j] != b:
                continue  # stale: one side was merged since this pair was pushed
            syms[i], syms[j] = a + b, ""  # "" marks a symbol merged into its left neighbour
            nxt[i] = nxt[j]
            if nxt[i] < len(syms):
                prev[nxt[i]] = i
            for left, right in ((prev[i], i), (i, nxt[i])):
                if left >= 0 and right < len(syms) and (syms[left], syms[right]) in self.ranks:
                    heapq.heappush(heap, (self.ranks[syms[left], syms[right]], left, syms[left], syms[right]))
        syms = [s for s in syms if s != ""]
        if None in syms and self.unk is None:
            raise SwarrError(f"cannot encode {word!r}: a character is outside the vocabulary and there is no unk_token")
        ids = [self.unk if s is None else self.vocab[s] for s in syms]
        if len(word) < 64:
            self.cache[word] = ids
        return ids

    def encode(self, segment: str, at_start: bool) -> list[int]:
        s = self.normalize(segment)
        return [i for w in self.pre_tokenize(s, at_start) for i in self.bpe(w)]

    def decode(self, tokens: list[str]) -> bytes:
        """The decoder chain (Replace, ByteFallback, Fuse, Strip, Metaspace), token list in, bytes out."""
        for d in self.decoders:
            if d["type"] == "Replace":
                tokens = [t.replace(d["pattern"]["String"], d["content"]) for t in tokens]
            elif d["type"] == "ByteFallback":
                out, run = [], b""
                for t in tokens + [None]:
                    m = re.fullmatch(r"<0x([0-9A-F]{2})>", t) if t is not None else None
                    if m:
                        run += bytes([int(m.group(1), 16)])
                        continue
                    if run:
                        try:
                            out.append(run.decode("utf-8"))
                        except UnicodeDecodeError:
                            out.extend("\ufffd" * len(run))
                        run = b""
                    if t is not None:
                        out.append(t)
                tokens = out
            elif d["type"] == "Fuse":
                tokens = ["".join(tokens)]
            elif d["type"] == "Strip":
                c, start, stop = d["content"], d.get("start", 0), d.get("stop", 0)
                stripped = []
                for t in tokens:
                    for _ in range(start):
                        t = t[1:] if t.startswith(c) else t
                    for _ in range(stop):
                        t = t[:-1] if t.endswith(c) else t
                    stripped.append(t)
                tokens = stripped
            elif d["type"] == "Metaspace":
                r = d["replacement"]
                tokens = [(t.replace(r, " ")[1:] if i == 0 and t.startswith(r) and d.get("prepend_scheme") != "never"
                           else t.replace(r, " ")) for i, t in enumerate(tokens)]
        return "".join(tokens).encode("utf-8")


# ---- chat templates, rendered the way transformers renders them ----
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
_noted: set[tuple[str, str]] = set()  # (tokenizer path, note) said on stderr already


class TemplateBudget(BaseException):
    """A chat template ran past a TEMPLATE_* budget. A BaseException, so that no `except Exception` on the way
    (jinja2's, the helpers') swallows it; render() turns it into one SwarrError."""


def _weight(x, limit: int = TEMPLATE_MAX_CHARS) -> int:
    """Characters of the strings plus items of the containers x holds (nested ones too, each object once),
    counted until the count passes limit."""
    from jinja2.utils import Namespace
    total, stack, seen = 0, [x], set()
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            total += len(v)
        elif isinstance(v, (list, tuple, dict, set, frozenset, Namespace)) and id(v) not in seen:
            seen.add(id(v))
            if isinstance(v, Namespace):
                v = object.__getattribute__(v, "_Namespace__attrs")
            total += len(v) + 1
            if total <= limit:
                stack.extend(v.items() if isinstance(v, dict) else v)
        elif isinstance(v, int) and v.bit_length() > 64:
            total += v.bit_length() // 3  # about its decimal digits
        else:
            total += 1
    return total


def _sized(v, what: str = "a value"):
    """v, if it holds at most TEMPLATE_MAX_CHARS (else TemplateBudget)."""
    if _weight(v) > TEMPLATE_MAX_CHARS:
        raise TemplateBudget(f"built {what} of more than {TEMPLATE_MAX_CHARS:,} characters")
    return v


def _count_arg(n, what: str):
    """A number that sizes a result (a width, an indent, a count) is at most TEMPLATE_MAX_CHARS."""
    if isinstance(n, int) and abs(n) > TEMPLATE_MAX_CHARS:
        raise TemplateBudget(f"asked {what} for {n:,} (more than {TEMPLATE_MAX_CHARS:,})")


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent(fmt: str, args):
    """`fmt % args` (and the format filter) writes at most TEMPLATE_MAX_CHARS: widths and precisions summed."""
    widths = [w for m in _PERCENT_SPEC.finditer(fmt) for w in m.groups() if w]
    _count_arg(sum(int(w) for w in widths if w != "*"), "a %-format width")
    if "*" in widths:
        for v in args if isinstance(args, tuple) else (args,):
            _count_arg(v, "a %-format width")


def _check_str_format(fmt: str, args, kwargs):
    """str.format / format_map: the widths and precisions in the replacement fields, summed, and any number
    passed (a nested {} width) at most TEMPLATE_MAX_CHARS."""
    total = 0
    for _, _, spec, _ in string.Formatter().parse(fmt):
        total += sum(int(d) for d in re.findall(r"\d+", spec or ""))
        if spec and "{" in spec:
            for v in (*args, *kwargs.values()):
                _count_arg(v, "a format width")
    _count_arg(total, "format widths")


def _check_binop(op: str, left, right):
    """Before `left op right` for the operators that can build something huge in one step."""
    ints = isinstance(left, int) and isinstance(right, int)
    if op == "**" and ints and right > 0 and abs(left) > 1 and right * (abs(left).bit_length() - 1) > TEMPLATE_MAX_INT_BITS:
        raise TemplateBudget(f"asked for {left} ** {right}, an integer of more than {TEMPLATE_MAX_INT_BITS} bits")
    if op == "*" and ints and left.bit_length() + right.bit_length() > TEMPLATE_MAX_INT_BITS:
        raise TemplateBudget(f"asked for a product of more than {TEMPLATE_MAX_INT_BITS} bits")
    if op == "*" and not ints:
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(n, int) and isinstance(seq, (str, bytes, list, tuple)) and n > 0 and \
                _weight(seq) * n > TEMPLATE_MAX_CHARS:
            raise TemplateBudget(f"asked to repeat {type(seq).__name__} {n:,} times (more than "
                                 f"{TEMPLATE_MAX_CHARS:,} characters)")
    if op == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        _sized((left, right), "a concatenation")
    if op == "%" and isinstance(left, str):
        _check_percent(left, right)


# str methods whose numbers size the result: width (ljust...), tab size, count
_SIZING_METHODS = ("ljust", "rjust", "center", "zfill", "expandtabs")


def _check_call(obj, args, kwargs):
    """Before a call from the template: what it is given holds at most TEMPLATE_MAX_CHARS, and a str method is
    not asked to build more (a width, `expandtabs`, `replace`, a format spec)."""
    _sized((args, kwargs), "arguments")
    target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    owner, name = getattr(target, "__self__", None), getattr(target, "__name__", "")
    if not isinstance(owner, (str, bytes)):
        return
    if name in _SIZING_METHODS:
        for v in (*args, *kwargs.values()):
            _count_arg(v, f"str.{name}")
    if name in ("format", "format_map") and isinstance(owner, str):
        _check_str_format(owner, args, kwargs if name == "format" else (args[0] if args else {}))
    elif name == "expandtabs" and args:
        _count_arg(owner.count("\t" if isinstance(owner, str) else b"\t") * args[0], "expanded tabs")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], type(owner)):
        grows = len(args[1]) * (owner.count(args[0]) if args[0] else len(owner) + 1)
        _count_arg(len(owner) + grows, "str.replace")


# filters whose numbers size the result (the format filter's numbers are values: _check_percent)
_SIZING_FILTERS = ("center", "indent", "wordwrap", "truncate", "batch", "slice", "tojson", "round")


def _check_filter(name: str, value, args, kwargs):
    """Before a filter: numbers it is given at most TEMPLATE_MAX_CHARS, and what it would build (indent,
    format, replace, sum of lists) too."""
    _sized((value, args, kwargs), f"the input of filter {name}")
    if name in _SIZING_FILTERS:
        for v in (*args, *kwargs.values()):
            _count_arg(v, f"filter {name}")
    if name == "indent" and isinstance(value, str):
        width = (args or [kwargs.get("width", 4)])[0]
        width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        _count_arg(len(value) + (value.count("\n") + 1) * width, "filter indent")
    elif name == "format" and isinstance(value, str):
        _check_percent(value, tuple(args) or kwargs)
    elif name == "replace" and isinstance(value, str) and len(args) >= 2 and isinstance(args[0], str):
        grows = len(str(args[1])) * (value.count(args[0]) if args[0] else len(value) + 1)
        _count_arg(len(value) + grows, "filter replace")
    elif name == "sum" and not isinstance(kwargs.get("start", args[1] if len(args) > 1 else 0), (int, float)):
        raise TemplateBudget("asked filter sum to add non-numbers")


def _joinable(items, sep) -> list:
    """The items a join would write (a generator run here, within the time budget), if what it writes, separators
    included, fits TEMPLATE_MAX_CHARS."""
    out, n, step = [], 0, len(sep) if isinstance(sep, (str, bytes)) else 0
    for x in items:
        out.append(x)
        n += _weight(x) + step
        _count_arg(n, "a join")
    return out


def _budget_filter(name: str, f):
    """Filter f, checked before (_check_filter) and after (its result holds at most TEMPLATE_MAX_CHARS)."""
    from jinja2.utils import _PassArg
    skip = 1 if _PassArg.from_obj(f) is not None else 0  # the context / environment jinja2 passes first

    @functools.wraps(f)
    def checked(*args, **kwargs):
        if name == "join" and len(args) > skip:
            sep = args[skip + 1] if len(args) > skip + 1 else kwargs.get("d", "")
            args = (*args[:skip], _joinable(args[skip], sep), *args[skip + 1:])
        _check_filter(name, args[skip] if len(args) > skip else None, args[skip + 1:], kwargs)
        return _sized(f(*args, **kwargs), f"the output of filter {name}")
    return checked


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson filter (json.dumps with these defaults), written piece by piece so that its size is
    checked as it grows."""
    out, n = [], 0
    for piece in json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys).iterencode(x):
        n += len(piece)
        if n > TEMPLATE_MAX_CHARS:
            raise TemplateBudget(f"wrote JSON of more than {TEMPLATE_MAX_CHARS:,} characters")
        out.append(piece)
    return "".join(out)


def _sized_concat(pieces) -> str:
    """jinja2's concat (the rendered text, a macro's or a {% set %} block's output), stopped past the budget."""
    out, n = [], 0
    for p in pieces:
        n += len(p)
        if n > TEMPLATE_MAX_CHARS:
            raise TemplateBudget(f"wrote more than {TEMPLATE_MAX_CHARS:,} characters")
        out.append(p)
    return "".join(out)


def _rss() -> int | None:
    """Resident memory of this process in bytes (Linux), else None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _bounded(fn, *args):
    """fn(*args) within TEMPLATE_TIME_S and TEMPLATE_MAX_MEMORY, in any thread: a trace hook (this thread only)
    checks the clock at every line, call and return of Python code under fn (a template's loops are Python
    code) and the resident memory every millisecond. Work inside one C call is not interrupted: the other
    budgets keep each C call small."""
    deadline, base = time.perf_counter() + TEMPLATE_TIME_S, _rss()
    next_memory_check = 0.0

    def hook(frame, event, arg):
        nonlocal next_memory_check
        now = time.perf_counter()
        if now > deadline:
            raise TemplateBudget(f"took more than {TEMPLATE_TIME_S} s")  # Python then removes the hook
        if base is not None and now > next_memory_check:
            next_memory_check = now + 0.001
            if (_rss() or 0) - base > TEMPLATE_MAX_MEMORY:
                raise TemplateBudget(f"took more than {TEMPLATE_MAX_MEMORY >> 20} MiB of memory")
        return hook
    old = sys.gettrace()
    sys.settrace(hook)
    try:
        return fn(*args)
    finally:
        sys.settrace(old)


@functools.cache
def _sandbox_class():
    """jinja2's ImmutableSandboxedEnvironment (transformers' sandbox) with the budgets: the operators that can
    build much in one step, calls, filters, namespace attributes, `~` and the output are size-checked."""
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class SizedNamespace(Namespace):
        def __setitem__(self, name, value):
            super().__setitem__(name, _sized(value, "a namespace attribute"))

    class SizedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node, frame):  # `a ~ b`: joined after a size check, not by jinja2's str_join
            if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
                return super().visit_Concat(node, frame)
            self.write("environment.sized_join((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BudgetSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})
        code_generator_class = SizedCodeGenerator

        def __init__(self, **kw):
            super().__init__(finalize=lambda v: _sized(v, "an output"), **kw)
            self.concat = _sized_concat
            self.sized_join = lambda items: _sized_concat(map(str, _sized(items, "a ~ concatenation")))
            self.globals["namespace"] = SizedNamespace
            self.filters = {k: _budget_filter(k, f) for k, f in self.filters.items()}

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return _sized(super().call_binop(context, operator, left, right), f"the result of {operator}")

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
            if getattr(__obj, "__name__", "") == "join" and isinstance(getattr(__obj, "__self__", None), str) \
                    and len(args) == 1:
                args = (_joinable(args[0], __obj.__self__),)
            _check_call(__obj, args, kwargs)
            return _sized(super().call(__context, __obj, *args, **kwargs), "the result of a call")
    return BudgetSandbox


def compile_template(source: str, where: str):
    """A jinja2 template in the sandbox transformers uses (ImmutableSandboxedEnvironment, trim_blocks,
    lstrip_blocks, loop controls) with its helpers: raise_exception, tojson, strftime_now; within the budgets."""
    import jinja2

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    if len(source) > TEMPLATE_MAX_SOURCE:
        raise SwarrError(f"{where}: chat template of {len(source):,} characters (at most {TEMPLATE_MAX_SOURCE:,})")
    env = _sandbox_class()(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _budget_filter("tojson", _tojson)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return _bounded(env.from_string, source)
    except TemplateBudget as e:
        raise SwarrError(f"{where}: chat template does not compile: it {e}") from None
    except Exception as e:  # a syntax error, nesting too deep for the parser, a number too long to read...
        raise SwarrError(f"{where}: chat template does not compile ({type(e).__name__}: {_one_line(e)})") from None


def _one_line(e: BaseException, n: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= n else text[:n] + "..."


SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _special_text(v) -> str | None:
    """tokenizer_config.json spells special tokens as strings or as {"content": ...} objects."""
    return v.get("content") if isinstance(v, dict) else v


def _special_tokens(config: dict, where: str) -> dict[str, list[str]]:
    """tokenizer_config.json's special tokens, name -> texts: each a string, a {"content": string} object or
    null; eos_token may also be a list of them (each is a stop token; a template's `eos_token` is the first)."""
    out = {}
    for k in SPECIAL_KEYS:
        v = config.get(k)
        vs = v if k == "eos_token" and isinstance(v, list) else [v]
        texts = [_special_text(x) for x in vs if x is not None]
        if not all(isinstance(t, str) for t in texts) or (isinstance(v, list) and not texts):
            raise SwarrError(f"{where}: {k} must be a string or {{\"content\": string}}"
                             f"{' (or a list of them)' if k == 'eos_token' else ''}, got {short(v)}")
        if texts:
            out[k] = texts
    return out


class Tokenizer:
    """A checkpoint's tokenizer: `encode`/`decode` token-equal to the `tokenizers` library, `chat` rendering its
    chat template. Token ids are the checkpoint's ids; `special` maps each added token's text to its id."""

    def __init__(self, path: str):
        self.path, folder = path, os.path.dirname(os.path.abspath(path))
        if not os.path.lexists(path):
            raise SwarrError(f"{path}: tokenizer file not found")
        self.json_text = read_text(path)
        tj = read_json(path, self.json_text)
        check_tokenizer_json(tj, path)
        model = tj["model"]
        if model.get("type") != "BPE":
            raise SwarrError(f"{path}: tokenizer model {model.get('type')!r} is not supported "
                             "(BPE only: byte-level, or SentencePiece-style with byte fallback)")
        self.special = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        self.byte_level = any(p["type"] == "ByteLevel" for p in _parts(tj, "pre_tokenizer", path)
                              + _parts(tj, "decoder", path))
        if self.byte_level:
            self.sp, self.nfc = None, False
            byte_of = {c: b for b, c in bytes_to_unicode().items()}
            ranks = {}
            for tok, i in model["vocab"].items():
                try:
                    ranks[bytes(byte_of[c] for c in tok)] = i
                except KeyError:
                    raise SwarrError(f"{path}: token {tok!r} is not byte-level BPE") from None
            for s in self.special:
                ranks.pop(s.encode(), None)
            ids = list(ranks.values())
            # tiktoken must be able to spell any text from single bytes (it would panic otherwise). Some real
            # vocabularies (SmolLM2's) lack a few rare control bytes: they get ids past the vocabulary.
            extra = self.unspellable_from = max([*ids, *self.special.values()]) + 1
            for b in (b for b in range(256) if bytes([b]) not in ranks):
                ranks[bytes([b])], extra = extra, extra + 1
            norm = [n["type"] for n in _parts(tj, "normalizer", path)]
            if norm not in ([], ["NFC"]):
                raise SwarrError(f"{path}: normalizer {norm} is not supported with byte-level BPE")
            self.nfc = norm == ["NFC"]
            pat = _split_regex(tj, path)
            self.enc = _encoding(os.path.basename(folder) or "tok", pat, ranks, self.special, path)
            _check_regex_time(pat, path)
        else:
            self.sp, self.nfc = SentencePieceBPE(tj, path), False
            self.sp.id_to_token.update({i: t for t, i in self.special.items()})  # decode writes specials as text
            ids = list(model["vocab"].values())
            by_len = sorted(self.special, key=len, reverse=True)
            self.special_re = re.compile("|".join(map(re.escape, by_len))) if by_len else None
        self.vocab_size = max([*ids, *self.special.values()]) + 1
        self.bos_ids, self.eos_ids = self._post_processor(tj, path)
        self._check_round_trip()
        # The chat template and the special tokens it may use, from the files next to tokenizer.json.
        config_path = os.path.join(folder, "tokenizer_config.json")
        self.config = self._read_json(config_path)
        self.special_texts = _special_tokens(self.config, config_path)
        self.template_source, self.template_where = self._template_source(folder, self.config)
        self._template = None
        self._generation_prompt_checked = False
        # Every tokenizer/template file found, copied verbatim by save().
        self.files = {}
        for name in TOKENIZER_FILES:
            p = os.path.join(folder, name)
            if os.path.isfile(p):
                try:
                    with open(p, "rb") as f:
                        self.files[name] = f.read()
                except OSError as e:
                    raise SwarrError(f"{p}: cannot read ({e.strerror})") from None

    @staticmethod
    def _read_json(p: str) -> dict:
        return read_json(p) if os.path.lexists(p) else {}

    @staticmethod
    def _template_source(folder: str, config: dict) -> tuple[str | None, str]:
        """The chat template's source and the file it is from: chat_template.jinja (a regular UTF-8 file),
        else chat_template.json ({"chat_template": string}), else tokenizer_config.json's chat_template (a string,
        or a list of {"name", "template"} objects of which "default" is used, as transformers does)."""
        for name in ("chat_template.jinja", "chat_template.json"):
            p = os.path.join(folder, name)
            if os.path.lexists(p):
                source = read_text(p) if name.endswith(".jinja") else read_json(p).get("chat_template")
                if not isinstance(source, str):
                    raise SwarrError(f"{p}: field 'chat_template' must be a string, got {short(source)}")
                return source, name
        source, where = config.get("chat_template"), os.path.join(folder, "tokenizer_config.json")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                       for t in source):
                raise SwarrError(f"{where}: chat_template as a list must hold {{\"name\": string, \"template\": "
                                 f"string}} objects, got {short(source)}")
            named = {t["name"]: t["template"] for t in source}
            if "default" not in named:
                raise SwarrError(f"{where}: chat_template names templates {sorted(named)} but none 'default'")
            source = named["default"]
        if source is not None and not isinstance(source, str):
            raise SwarrError(f"{where}: chat_template must be a string, got {short(source)}")
        return source, "tokenizer_config.json"

    def _post_processor(self, tj: dict, where: str) -> tuple[list[int], list[int]]:
        """What the post_processor puts before and after a single plain text (e.g. Llama's BOS)."""
        bos, eos = [], []
        for p in _parts(tj, "post_processor", where):
            if p["type"] == "TemplateProcessing":
                seen_a = False
                for piece in p["single"]:
                    if "Sequence" in piece:
                        seen_a = True
                    elif "SpecialToken" in piece:
                        ids = p["special_tokens"][piece["SpecialToken"]["id"]]["ids"]
                        (eos if seen_a else bos).extend(ids)
            elif p["type"] in ("RobertaProcessing", "BertProcessing"):
                bos, eos = [p["cls"][1]], [p["sep"][1]]
            elif p["type"] != "ByteLevel":
                raise SwarrError(f"{where}: post-processor {p['type']!r} is not supported")
        return bos, eos

    def _check_round_trip(self):
        """decode(encode(probe)) must give the probe back: ASCII, digits, accents, CJK, emoji, runs of spaces,
        tabs and newlines. A pre-tokenizer regex that leaves text out, or a setting this file misreads, fails it.
        Only characters the vocabulary can spell are probed (SmolLM2's lacks some control bytes; a SentencePiece
        vocabulary without byte fallback maps others to <unk>, as `tokenizers` does)."""
        if self.sp is None:
            known = {b for b in range(256) if self.enc.encode_single_token(bytes([b])) < self.unspellable_from}
            probe = "".join(c for c in ROUND_TRIP_PROBE if set(c.encode()) <= known)
        else:
            probe = "".join(c for c in ROUND_TRIP_PROBE if c == " " or self.sp.byte_fallback or c in self.sp.vocab)
        try:
            back = self.decode(self.encode(probe))
        except SwarrError as e:
            raise SwarrError(f"{self.path}: the tokenizer cannot encode its probe text ({e})") from None
        if back != (unicodedata.normalize("NFC", probe) if self.nfc else probe):
            i = next((i for i, (x, y) in enumerate(zip(probe, back)) if x != y), min(len(probe), len(back)))
            raise SwarrError(f"{self.path}: the tokenizer does not give text back: {probe[max(0, i - 10):i + 20]!r} "
                             f"decodes as {back[max(0, i - 10):i + 20]!r} (a pre-tokenizer regex that leaves text "
                             "out, or a setting not implemented)")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids. Special tokens written in the text (e.g. "<|im_start|>") are encoded as specials.
        add_special_tokens=True adds what the post_processor adds to a plain text (a raw prompt's BOS)."""
        if self.sp is None:
            ids = _tiktoken_encode(self.enc, unicodedata.normalize("NFC", text) if self.nfc else text, self.path)
            bad = [i for i in ids if i >= self.unspellable_from]
            if bad:
                raise SwarrError(f"{self.path}: the vocabulary cannot spell byte "
                                 f"{self.enc.decode_single_token_bytes(bad[0])!r} "
                                 "of the text (no token holds it)")
        else:
            ids, pos = [], 0
            for m in list(self.special_re.finditer(text)) if self.special_re else []:
                if m.start() > pos:
                    ids += self.sp.encode(text[pos:m.start()], at_start=pos == 0)
                ids.append(self.special[m.group()])
                pos = m.end()
            if pos < len(text):
                ids += self.sp.encode(text[pos:], at_start=pos == 0)
        return self.bos_ids + ids + self.eos_ids if add_special_tokens else ids

    def decode(self, ids) -> str:
        """Ids -> text. Ids without a token (checkpoints pad the embedding past the vocabulary) are skipped."""
        ids = [int(i) for i in ids]
        if self.sp is not None:
            toks = [self.sp.id_to_token.get(i) for i in ids]
            return self.sp.decode([t for t in toks if t is not None]).decode("utf-8", errors="replace")
        try:
            data = self.enc.decode_bytes(ids)
        except KeyError:
            data = b"".join(self.enc.decode_single_token_bytes(i) for i in ids if self._known(i))
        return data.decode("utf-8", errors="replace")

    def _known(self, i: int) -> bool:
        try:
            self.enc.decode_single_token_bytes(i)
            return True
        except KeyError:
            return False

    # ---- chat ----
    def template(self):
        """The compiled chat template: the checkpoint's own, else ChatML (or Llama 3 headers when the vocabulary
        has those tokens, not ChatML's), said once per checkpoint on stderr."""
        if self._template is None:
            source, where = self.template_source, f"{os.path.dirname(self.path) or '.'}/{self.template_where}"
            if not source:
                llama3 = "<|start_header_id|>" in self.special and "<|im_start|>" not in self.special
                source = LLAMA3 if llama3 else CHATML
                where = f"{self.path} (built-in fallback)"
                self._note(f"has no chat template; using {'Llama 3 headers' if source is LLAMA3 else 'ChatML'}")
            self._template = (compile_template(source, where), where)
        return self._template

    def _note(self, what: str):
        """One `note:` line on stderr, once per checkpoint and message."""
        if (self.path, what) not in _noted:
            _noted.add((self.path, what))
            print(f"note: {os.path.dirname(self.path) or '.'} {what}", file=sys.stderr)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to messages [{"role": "system"|"user"|"assistant", "content": str}, ...],
        as transformers' apply_chat_template(..., tokenize=False) writes it. Encode the result with encode()
        (no add_special_tokens: the template writes its own BOS where it wants one). The render runs within
        the TEMPLATE_* budgets; breaking one, or any error of the template, is one SwarrError."""
        tmpl, where = self.template()
        specials = {k: v[0] for k, v in self.special_texts.items()}
        try:
            return _bounded(lambda: _sized_concat(tmpl.generate(
                messages=messages, add_generation_prompt=add_generation_prompt, **specials)))
        except TemplateBudget as e:
            raise SwarrError(f"{where}: chat template stopped: it {e}") from None
        except Exception as e:  # jinja2's errors (the sandbox's SecurityError, raise_exception) and Python's
            raise SwarrError(f"{where}: chat template failed to render ({type(e).__name__}: {_one_line(e)})") from None

    def chat(self, user: str, system: str | None = None) -> str:
        """One user message (after an optional system message) as a prompt for the assistant's answer. A
        template that writes no generation prompt (the same text without add_generation_prompt) gets a note."""
        msgs = [{"role": "system", "content": system}] if system is not None else []
        msgs.append({"role": "user", "content": user})
        text = self.render(msgs, add_generation_prompt=True)
        if not self._generation_prompt_checked:
            self._generation_prompt_checked = True
            if self.render(msgs, add_generation_prompt=False) == text:
                self._note("has a chat template that writes no generation prompt (the same text with and without "
                           "add_generation_prompt): the model may continue the user's turn")
        return text

    def stop_ids(self, cfg) -> list[int]:
        """Token ids that end a completion: the config's eos, the tokenizer config's eos (every one, when it is a
        list) and the chat end-of-turn tokens."""
        eos = cfg.hf.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        ids |= {self.special[t] for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>",
                                          *self.special_texts.get("eos_token", [])) if t in self.special}
        return sorted(ids)
