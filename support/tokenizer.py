"""Tokenizers and chat templates from a HF checkpoint folder, offline: tokenizer.json read the way the
`tokenizers` library reads it, and the chat template rendered the way transformers renders it.

Two kinds of tokenizer.json are supported:
- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): turned into a tiktoken.Encoding (fast, compiled);
- SentencePiece-style BPE (Llama 2, Mistral): `▁` stands for a space (a Metaspace pre-tokenizer or a
  Prepend/Replace normalizer) and characters outside the vocabulary fall back to byte tokens <0xNN>;
  encoded here in plain Python with the same merge order as `tokenizers`.
encode(text) tokenizes text as written (special tokens in it become their ids); encode(text, add_special_tokens=True)
also adds what the post_processor adds to a plain text (e.g. BOS), as `tokenizers` does by default.
"""
from __future__ import annotations

import heapq
import json
import os
import re
import sys
import unicodedata
from datetime import datetime

import tiktoken

from .safe_io import SwarrError, read_json, read_text


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


def _parts(obj: dict | None, key: str) -> list[dict]:
    """A normalizer / pre-tokenizer / decoder / post-processor as a flat list (Sequence unrolled)."""
    if not obj:
        return []
    if obj["type"] == "Sequence":
        return [p for sub in obj[key] for p in _parts(sub, key)]
    return [obj]


def _split_regex(pre: dict | None, where: str) -> str:
    """A byte-level pre-tokenizer's splitting regex (Split / ByteLevel / Digits, possibly in a Sequence)."""
    regexes = []
    for p in _parts(pre, "pretokenizers"):
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
    for text in ["", probe, *probe]:
        if any(m.start() == m.end() for m in compiled.finditer(text)):
            raise SwarrError(f"{where}: the pre-tokenizer regex can match the empty string (in {text[:20]!r})")


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
    pre = tj.get("pre_tokenizer")
    parts = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if pre is not None and (not isinstance(parts, list) or
                            not all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in parts)):
        raise SwarrError(f"{path}: pre_tokenizer (and each of a Sequence's pretokenizers) needs a 'type'")
    for p in parts if pre is not None else []:
        pat = p.get("pattern")
        if p["type"] == "Split" and not (isinstance(pat, dict) and (isinstance(pat.get("Regex"), str)
                                                                    or isinstance(pat.get("String"), str))):
            raise SwarrError(f"{path}: Split pre-tokenizer needs a pattern {{'Regex': ...}} or {{'String': ...}}")
    norm = tj.get("normalizer")
    if norm is not None and not (isinstance(norm, dict) and isinstance(norm.get("type"), str)):
        raise SwarrError(f"{path}: normalizer needs a 'type'")


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    """tokenizer.json merges: "a b" strings (older files) or [a, b] pairs (newer files)."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


class SentencePieceBPE:
    """BPE over characters with `▁` for spaces and <0xNN> byte fallback, as `tokenizers` runs it for Llama 2 and
    Mistral. Pipeline per text segment (between special tokens): normalizer -> Metaspace -> BPE merges."""

    def __init__(self, tj: dict, where: str):
        model = tj["model"]
        self.vocab: dict[str, int] = model["vocab"]
        self.ranks = {p: r for r, p in enumerate(_merge_pairs(model.get("merges", [])))}
        self.byte_fallback, self.ignore_merges = bool(model.get("byte_fallback")), bool(model.get("ignore_merges"))
        self.unk = self.vocab.get(model.get("unk_token")) if model.get("unk_token") is not None else None
        self.fuse_unk = bool(model.get("fuse_unk"))
        self.normalizers = _parts(tj.get("normalizer"), "normalizers")
        for n in self.normalizers:
            if n["type"] not in ("Prepend", "Replace", "NFC", "NFKC") or (
                    n["type"] == "Replace" and "String" not in n["pattern"]):
                raise SwarrError(f"{where}: normalizer {n['type']!r} is not supported")
        pres = _parts(tj.get("pre_tokenizer"), "pretokenizers")
        if any(p["type"] != "Metaspace" for p in pres) or len(pres) > 1:
            raise SwarrError(f"{where}: pre-tokenizer {[p['type'] for p in pres]} is not supported with "
                             "SentencePiece-style BPE (Metaspace only)")
        self.meta = pres[0] if pres else None
        if self.meta and self.meta.get("prepend_scheme", "always") not in ("always", "first", "never"):
            raise SwarrError(f"{where}: Metaspace prepend_scheme {self.meta['prepend_scheme']!r} is not supported")
        self.decoders = _parts(tj.get("decoder"), "decoders")
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
_noted: set[str] = set()


def compile_template(source: str, where: str):
    """A jinja2 template in the sandbox transformers uses (ImmutableSandboxedEnvironment, trim_blocks,
    lstrip_blocks, loop controls) with its helpers: raise_exception, tojson, strftime_now."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise SwarrError(f"{where}: chat template does not compile ({type(e).__name__}: {e})") from None


def _special_text(v) -> str | None:
    """tokenizer_config.json spells special tokens as strings or as {"content": ...} objects."""
    return v.get("content") if isinstance(v, dict) else v


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
        self.byte_level = any(p["type"] == "ByteLevel" for p in _parts(tj.get("pre_tokenizer"), "pretokenizers")
                              + _parts(tj.get("decoder"), "decoders"))
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
            norm = [n["type"] for n in _parts(tj.get("normalizer"), "normalizers")]
            if norm not in ([], ["NFC"]):
                raise SwarrError(f"{path}: normalizer {norm} is not supported with byte-level BPE")
            self.nfc = norm == ["NFC"]
            try:
                self.enc = tiktoken.Encoding(name=os.path.basename(folder) or "tok",
                                             pat_str=_split_regex(tj.get("pre_tokenizer"), path),
                                             mergeable_ranks=ranks, special_tokens=self.special)
            except ValueError as e:  # tiktoken compiles the pre-tokenizer's regex (Rust regex syntax)
                raise SwarrError(f"{path}: pre_tokenizer regex does not compile ({str(e).splitlines()[0]})") from None
        else:
            self.sp = SentencePieceBPE(tj, path)
            self.sp.id_to_token.update({i: t for t, i in self.special.items()})  # decode writes specials as text
            ids = list(model["vocab"].values())
            by_len = sorted(self.special, key=len, reverse=True)
            self.special_re = re.compile("|".join(map(re.escape, by_len))) if by_len else None
        self.vocab_size = max([*ids, *self.special.values()]) + 1
        self.bos_ids, self.eos_ids = self._post_processor(tj.get("post_processor"), path)
        # The chat template and the special tokens it may use, from the files next to tokenizer.json.
        self.config = self._read_json(os.path.join(folder, "tokenizer_config.json"))
        self.template_source, self.template_where = self.config.get("chat_template"), "tokenizer_config.json"
        if isinstance(self.template_source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use"...}]
            named = {t.get("name"): t.get("template") for t in self.template_source if isinstance(t, dict)}
            self.template_source = named.get("default")
        for name in ("chat_template.jinja", "chat_template.json"):
            p = os.path.join(folder, name)
            if os.path.exists(p):
                with open(p, encoding="utf-8") as f:
                    text = f.read()
                self.template_source = json.loads(text)["chat_template"] if name.endswith(".json") else text
                self.template_where = name
                break
        self._template = None
        # Every tokenizer/template file found, copied verbatim by save().
        self.files = {}
        for name in TOKENIZER_FILES:
            p = os.path.join(folder, name)
            if os.path.isfile(p):
                with open(p, "rb") as f:
                    self.files[name] = f.read()

    @staticmethod
    def _read_json(p: str) -> dict:
        return read_json(p) if os.path.lexists(p) else {}

    def _post_processor(self, pp: dict | None, where: str) -> tuple[list[int], list[int]]:
        """What the post_processor puts before and after a single plain text (e.g. Llama's BOS)."""
        bos, eos = [], []
        for p in _parts(pp, "processors"):
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

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids. Special tokens written in the text (e.g. "<|im_start|>") are encoded as specials.
        add_special_tokens=True adds what the post_processor adds to a plain text (a raw prompt's BOS)."""
        if self.sp is None:
            ids = self.enc.encode(unicodedata.normalize("NFC", text) if self.nfc else text, allowed_special="all")
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
                if self.path not in _noted:
                    _noted.add(self.path)
                    print(f"note: {os.path.dirname(self.path) or '.'} has no chat template; using "
                          f"{'Llama 3 headers' if source is LLAMA3 else 'ChatML'}", file=sys.stderr)
            self._template = (compile_template(source, where), where)
        return self._template

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to messages [{"role": "system"|"user"|"assistant", "content": str}, ...],
        as transformers' apply_chat_template(..., tokenize=False) writes it. Encode the result with encode()
        (no add_special_tokens: the template writes its own BOS where it wants one)."""
        import jinja2
        tmpl, where = self.template()
        specials = {k: _special_text(self.config.get(k)) for k in
                    ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")}
        specials = {k: v for k, v in specials.items() if v is not None}
        try:
            return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt, **specials)
        except jinja2.exceptions.TemplateError as e:  # includes the sandbox's SecurityError and raise_exception
            raise SwarrError(f"{where}: chat template failed to render ({type(e).__name__}: {e})") from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise SwarrError(f"{where}: chat template failed to render ({type(e).__name__}: {e})") from None

    def chat(self, user: str, system: str | None = None) -> str:
        """One user message (after an optional system message) as a prompt for the assistant's answer."""
        msgs = [{"role": "system", "content": system}] if system is not None else []
        msgs.append({"role": "user", "content": user})
        return self.render(msgs, add_generation_prompt=True)

    def stop_ids(self, cfg) -> list[int]:
        """Token ids that end a completion: the config's eos, the tokenizer config's eos and the chat end-of-turn
        tokens."""
        eos = cfg.hf.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        ids |= {self.special[t] for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>",
                                          _special_text(self.config.get("eos_token"))) if t in self.special}
        return sorted(ids)
