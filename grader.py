"""Math answers: extraction from model output, safe equivalence, dataset loaders and the math prompt.

    >>> grade("3 + 15 = 18, so the total is \\boxed{18}.", "18")
    True
"""
from __future__ import annotations

import json
import re
import signal
import threading
import warnings
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

# Model output is untrusted text. Nothing here evaluates a string (no eval, exec, sympify, parse_expr).
# is_equiv compares in layers, cheapest first:
#   1. normalised strings  ('\\dfrac{1}{2}' -> '\\frac{1}{2}', '\\$1,\\!000' -> '1000', '30^\\circ' -> '30')
#   2. plain numbers as exact Fractions ('0.5' == '1/2' == '\\frac{1}{2}'; '50\\%' == '0.5')
#   3. our own recursive-descent parser for the LaTeX / plain-math subset of competition answers builds
#      sympy objects (plus tuples, intervals, sets, matrices); expressions are compared numerically at a few
#      points (cheap, rejects most) and, when they agree, confirmed by simplify(a - b) == 0.
# Safety of layer 3: answers over MAX_ANSWER_CHARS are compared as strings only; the parser refuses deep
# nesting, exponents and factorials whose results would be huge (big-int arithmetic in C cannot be
# interrupted), and everything else runs under a SIGALRM wall-clock limit. Signals only work in the main
# thread, so from other threads is_equiv stops after layer 2 (a documented fallback: numbers and strings
# still grade; symbolic answers read as not equivalent). Typical speed: ~5,000 gradings/s.

MAX_ANSWER_CHARS = 1000  # longer answers are compared as stripped strings only
TIME_LIMIT_S = 0.5       # wall-clock bound of the symbolic layer for one comparison
REL_TOL = 1e-6           # tolerance when a decimal is involved (see _close)
MAX_EXP = 10_000         # largest |numerator| or denominator of a rational exponent
MAX_DIGITS = 10_000      # largest integer (in digits) a power may produce; n! needs n <= 1000
MAX_DEPTH = 50           # nesting depth of the parser


def _last_boxed(text: str) -> str | None:
    """Content of the last well-formed \\boxed{..} / \\fbox{..} / '\\boxed 5' in text, else None."""
    end = len(text)
    for _ in range(5):  # look at the last few occurrences only: bounded work on hostile input
        i = max(text.rfind("\\boxed", 0, end), text.rfind("\\fbox", 0, end))
        if i < 0:
            return None
        end, j = i, i + (6 if text.startswith("\\boxed", i) else 5)
        m = re.compile(r"\s*(\{)|\s+([^\s${}]+)").match(text, j)
        if m and m.group(1):  # brace group: scan at most 10k chars for its matching '}'
            depth, start = 0, m.start(1)
            for k in range(start, min(len(text), start + 10_000)):
                depth += (text[k] == "{") - (text[k] == "}")
                if depth == 0:
                    if text[start + 1:k].strip():
                        return text[start + 1:k].strip()
                    break
        elif m:
            return m.group(2)
    return None


def extract_answer(text: str) -> str | None:
    """Final answer of a completion: last \\boxed{}, else GSM8K's '#### N', else 'answer is X' / 'Answer: X'.
    extract_answer(r"so $x = \\boxed{\\frac{1}{2}}$.") -> '\\frac{1}{2}';  extract_answer("no idea") -> None"""
    if not isinstance(text, str):
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    i = text.rfind("####")
    if i >= 0 and text[i + 4:].split("\n", 1)[0].strip():
        return text[i + 4:].split("\n", 1)[0].strip()
    for m in reversed(list(re.finditer(r"(?i)\banswer(?:\s+is\b|\s*:)[\s:*]*", text))[-5:]):
        tail = text[m.end():m.end() + 500].split("\n", 1)[0].strip(" *")
        math = re.match(r"\$+([^$]+)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", tail)  # $x$, \(x\), \[x\]
        tail = next(g for g in math.groups() if g) if math else re.split(r"\.(?:\s|$)", tail)[0]
        if tail.strip(" .,;"):
            return tail.strip(" .,;")
    return None


_UNICODE = str.maketrans({"−": "-", "×": "*", "·": "*", "π": "\\pi ", "∞": "\\infty ", "√": "\\sqrt "})
_TEXT = r"\\(?:text|textbf|textrm|textit|textnormal|mbox|mathrm|mathbf)\s*"


def _norm(s: str) -> str:
    """Canonical string of an answer. r'\\$1,\\!000.' -> '1000';  r'\\dfrac12' -> '\\frac12';
    r'15\\mbox{ cm}^2' -> '15';  r'\\text{(B)}' -> 'B';  'x = 5' -> '5';  r'\\left( 1, 2 \\right]' -> '(1,2]'"""
    s = re.sub(r"[\x00-\x1f\x7f]", " ", s).translate(_UNICODE).strip()
    s = re.sub(r"\\!\s*|\\left(?![a-z])|\\right(?![a-z])|\\[bB]igg?[lr]?(?![a-z])|\\displaystyle", "", s)
    s = re.sub(r"\\[dtc]frac", r"\\frac", s).replace("{,}", ",")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\circ|\\degree", "", s)
    s = re.sub(r"\\?[%$]|(?<!\\)\\[ ,;:]|~", " ", s).strip()
    m = re.fullmatch(_TEXT + r"\{([^{}]*)\}", s)
    s = m.group(1).strip() if m else re.sub(_TEXT + r"\{[^{}]*\}(\^\{?[23]\}?)?", " ", s).strip()
    m = re.fullmatch(r"([-+]?[\d.,/]+)\s+(?!pi\b)[a-zA-Z]{2,}(\s+[a-zA-Z]+)*\.?", s)  # '18 dollars'
    s = m.group(1) if m else s
    s = re.sub(r"(?<![_^]\d)(?<=\d)\s+(?=\d)|\s+(?:and|or)\s+", ",", s)  # '3 and 5', '3 5' -> '3,5' (not 35)
    if not re.search(r"[(\[]|\\\{", s):  # thousands separators, unless commas could separate items
        s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])|\s+", lambda m: m.group(1) + " " if m.group(1) else "", s)
    s = re.sub(r"(?<=\d)_\{(\w+)\}", r"_\1", s).rstrip(".")  # base subscripts: 204_{5} -> 204_5
    s = re.sub(r"^[a-zA-Z]=(?=[^=,]*$)|^[a-zA-Z]\\in(?![a-z])", "", s)  # 'x=5' -> '5', 'x\in[1,2]' -> '[1,2]'
    m = re.fullmatch(r"\(([A-Ea-e])\)|([A-E])", s)  # multiple choice
    if m:
        return (m.group(1) or m.group(2)).upper()
    return s.lower() if re.fullmatch(r"[a-zA-Z]{3,}", s) else s  # words: 'East' == 'east'


def _number(s: str):
    """Plain number -> (Fraction, inexact) or None. '-3/4' -> (Fraction(-3, 4), False); '2.50' -> (5/2, True)."""
    if re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?", s):  # exponent <= 999: no huge ints
        return Fraction(s), bool(re.search(r"[.eE]", s))
    m = re.fullmatch(r"(-?)(?:\\frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)/(-?\d+))", s)
    if m and int(m.group(3) or m.group(5)) != 0:
        value = Fraction(int(m.group(2) or m.group(4)), int(m.group(3) or m.group(5)))
        return (-value if m.group(1) else value), False
    return None


def _close(x, y, inexact: bool) -> bool:
    """Tolerance policy. Integers and finite decimals are compared exactly (1000000.5 != 1000000). Only when
    a decimal (inexact) meets a value with no finite decimal expansion (1/3, sqrt 2, pi) is a relative error
    of REL_TOL allowed: 0.3333333 == 1/3 and 3.14159265 == pi, but 0.333 != 1/3 (a rounding is not the answer)."""
    if x == y or not inexact or all(isinstance(v, Fraction) and _terminates(v.denominator) for v in (x, y)):
        return x == y
    return bool(abs(x - y) <= REL_TOL * max(abs(x), abs(y)))


def _terminates(q: int) -> bool:
    """Does 1/q have a finite decimal expansion, i.e. q = 2^a 5^b?"""
    for f in (2, 5):
        while q % f == 0:
            q //= f
    return q == 1


class _Refuse(Exception):
    """The answer is outside the supported subset, or too big to build safely."""


_FUNCS = {"sin": "sin", "cos": "cos", "tan": "tan", "cot": "cot", "sec": "sec", "csc": "csc", "ln": "log",
          "log": "log", "exp": "exp", "arcsin": "asin", "arccos": "acos", "arctan": "atan"}
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "theta", "lambda", "mu", "phi", "psi", "omega",
          "rho", "sigma", "tau"}
_WORDS = {"sqrt", "frac", "pi", "inf", "infty", "infinity", "cdot", "times", "div", "binom"} | set(_FUNCS)
_TOKEN = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+|\\[a-zA-Z]+|\\.|[a-zA-Z]+|\S)")


class _Parser:
    """Recursive descent from a LaTeX / plain-math string to a sympy expression. Grammar:
        expr   := term (('+' | '-') term)*
        term   := factor (('*' | '/' | \\cdot | \\times | \\div)? factor)*       juxtaposition multiplies
        factor := ('-' | '+') factor  |  atom '!'* ('^' factor)?
        atom   := number | letter ('_' sub)? | \\pi | \\infty | \\alpha.. | '(' expr ')' | '{' expr '}'
                | '|' expr '|' | \\frac A A | \\sqrt[n]? A | \\binom A A | \\sin^k? A ...
        A      := '{' expr '}' or a single character or command (TeX: \\frac12 = 1/2, \\sqrt2)
    Conventions: i is the imaginary unit, e is Euler's number, '3\\frac12' is the mixed number 7/2, and
    'x^23' is x**23 (plain-math reading). Sympy evaluates each node as it is built (e.g. 10^10 -> 10000000000),
    but only after _pow/_factorial checked that the result stays small, so no number in the tree can grow
    beyond MAX_DIGITS and the later simplify never meets a hidden 10^(10^10).
    _Parser(r'\\frac{\\sqrt2}{2}').parse() -> sqrt(2)/2"""

    def __init__(self, s: str):
        import sympy
        self.sp, self.s, self.i, self.depth = sympy, s, 0, 0

    def peek(self) -> tuple[str, int]:
        m = _TOKEN.match(self.s, self.i)
        if not m:
            return "", len(self.s)
        tok = m.group(1)
        if tok.isalpha() and tok not in _WORDS:
            tok = tok[0]  # 'xy' is x times y
        return tok, m.start(1) + len(tok)

    def take(self, expect: str | None = None) -> str:
        tok, self.i = self.peek()
        if expect is not None and tok != expect:
            raise _Refuse(f"expected {expect!r}, got {tok!r}")
        return tok

    def parse(self):
        x = self.expr()
        if self.peek()[0]:
            raise _Refuse(f"unexpected {self.peek()[0]!r}")
        return x

    def expr(self):
        x = self.term()
        while self.peek()[0] in ("+", "-"):
            x = x + self.term() if self.take() == "+" else x - self.term()
        return x

    def term(self):
        x = self.factor()
        while True:
            tok = self.peek()[0]
            if tok in ("*", "\\cdot", "\\times", "cdot", "times"):
                self.take()
                x = x * self.factor()
            elif tok in ("/", "\\div", "div"):
                self.take()
                x = x / self.factor()
            elif tok and (tok[0].isalnum() or tok[0] == "." or tok in "({" or tok.lstrip("\\") in
                          _WORDS | _GREEK):
                x = x * self.factor()  # implicit multiplication: 2x, 2\pi, (a+5)(b+2)
            else:
                return x

    def factor(self):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _Refuse("nesting too deep")
            if self.peek()[0] in ("-", "+"):
                return -self.factor() if self.take() == "-" else self.factor()
            x = self.atom()
            while self.peek()[0] == "!":
                self.take()
                x = self._factorial(x)
            if self.peek()[0] == "^":
                self.take()
                x = self._pow(x, self.factor())
            return x
        finally:
            self.depth -= 1

    def arg(self):
        """One TeX macro argument: '{..}', or a single digit ('\\frac12'), letter or command."""
        tok, end = self.peek()
        if tok[:1].isdigit():
            self.i = end - len(tok) + 1
            return self.sp.Integer(int(tok[0]))
        return self.atom()

    def group(self, close: str):
        x = self.expr()
        self.take(close)
        return x

    def atom(self):
        sp, tok = self.sp, self.take()
        name = tok.lstrip("\\")
        if tok[:1].isdigit() or tok[:1] == ".":
            x = sp.Rational(Fraction(tok).numerator, Fraction(tok).denominator)  # no string parsing
            if self.peek()[0] == "_":
                raise _Refuse("number base subscripts are compared as strings")
            if tok.isdigit() and self.peek()[0] == "\\frac":  # mixed number 3\frac12 = 7/2
                frac = self.atom()
                return x + frac if frac.is_Rational else x * frac
            return x
        if tok and tok in "({[":
            return self.group({"(": ")", "{": "}", "[": "]"}[tok])
        if tok == "|":
            return sp.Abs(self.group("|"))
        if name == "frac":
            return self.arg() / self.arg()
        if name == "sqrt":
            n = self.group("]") if self.peek()[0] == "[" and self.take() else sp.Integer(2)
            return self._pow(self.arg(), 1 / n)
        if name == "binom":
            n, k = self.arg(), self.arg()
            if (n.is_number or k.is_number) and not (n.is_Integer and k.is_Integer and abs(n) <= 1000):
                raise _Refuse("binomial too large")
            return sp.binomial(n, k)
        if name in _FUNCS:
            k = self.factor() if self.peek()[0] == "^" and self.take() else sp.Integer(1)  # \sin^2 x
            base = self.arg() if name == "log" and self.peek()[0] == "_" and self.take() else None
            x = self.atom() if self.peek()[0] in ("(", "{") else self.factor()
            while self.peek()[0][:1].isalnum() and self.peek()[0] not in _WORDS:  # \sin 2x = sin(2x)
                x = x * self.factor()
            f = getattr(sp, _FUNCS[name])
            return self._pow(f(x, base) if base is not None else f(x), k)
        if name == "pi":
            return sp.pi
        if name in ("infty", "inf", "infinity"):
            return sp.oo
        if name in _GREEK or (len(tok) == 1 and tok.isalpha()):
            if tok in ("i", "e"):
                return sp.I if tok == "i" else sp.E
            sub = "_" + str(self.arg()) if self.peek()[0] == "_" and self.take() else ""  # x_1, a_{n}
            return sp.Symbol(name + sub)
        raise _Refuse(f"unsupported token {tok!r}")

    def _pow(self, b, e):
        """b**e, refusing results that could not be computed quickly (10^10^10, 9^(9^9), 2^(1/10^9))."""
        if e.is_Rational:
            if abs(e.p) > MAX_EXP or e.q > MAX_EXP:
                raise _Refuse("exponent too large")
            if b.is_Rational and b not in (0, 1, -1):
                if abs(e) * max(abs(b.p).bit_length(), b.q.bit_length()) * 0.302 > MAX_DIGITS:
                    raise _Refuse("power too large")
        elif e.is_number and abs(complex(e.evalf(15))) > MAX_EXP:
            raise _Refuse("exponent too large")
        x = self.sp.Pow(b, e)
        if x.is_Pow and x.exp.is_Rational and max(abs(x.exp.p), x.exp.q) > MAX_EXP:  # (x^9999)^9999
            raise _Refuse("exponent too large")
        return x

    def _factorial(self, n):
        if n.is_number and not (n.is_Integer and 0 <= n <= 1000):
            raise _Refuse("factorial too large")
        return self.sp.factorial(n)


def _split(s: str, sep: str) -> list[str]:
    """Split at top-level occurrences of sep: _split('(1,2),3', ',') -> ['(1,2)', '3']."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        depth += (s[i] in "([{") - (s[i] in ")]}")
        if depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i = start = i + len(sep)
        else:
            i += 1
    return parts + [s[start:]]


def _encloses(s: str, i: int) -> bool:
    """True if the bracket at s[i] is closed by the last character of s."""
    depth = 0
    for j in range(i, len(s)):
        depth += (s[j] in "([{") - (s[j] in ")]}")
        if depth == 0:
            return j == len(s) - 1
    return False


@lru_cache(maxsize=4096)
def _parse(s: str, depth: int = 0):
    """Normalised answer -> sympy expression, or (kind, tag, items) for structured answers:
    '(1,2]' -> ('seq', '(]', (1, 2));  '\\{3,1\\}' and '3,1' -> ('set', '', (3, 1));  'A\\cupB' -> ('union',..);
    '1\\pm\\sqrt2' -> ('set', '', (1+sqrt(2), 1-sqrt(2)));  pmatrix -> ('mat', '2x1', items);  'y=2x' -> 2*x;
    'x+y=1' -> ('eq', '', (x + y - 1,))."""
    if depth > 10:
        raise _Refuse("nesting too deep")
    sub = lambda parts: tuple(_parse(p, depth + 1) for p in parts)  # noqa: E731
    m = re.fullmatch(r"\\begin\{[pbv]?matrix\}(.*?)(\\\\)?\\end\{[pbv]?matrix\}", s)
    if m:
        rows = [r.split("&") for r in m.group(1).split("\\\\")]
        if len({len(r) for r in rows}) != 1:
            raise _Refuse("ragged matrix")
        return ("mat", f"{len(rows)}x{len(rows[0])}", sub(c for r in rows for c in r))
    if len(_split(s, "\\cup")) > 1:
        return ("union", "", sub(_split(s, "\\cup")))
    if s.startswith("\\{") and s.endswith("\\}") and _encloses(s, 1):
        return ("set", "", sub(_pm(_split(s[2:-2], ","))))
    if s[:1] in "([" and s[-1:] in ")]" and _encloses(s, 0) and len(_split(s[1:-1], ",")) > 1:
        return ("seq", s[0] + s[-1], sub(_split(s[1:-1], ",")))
    if len(_split(s, ",")) > 1 or "\\pm" in s:  # '1,-2' and '1\pm\sqrt2' are sets of solutions
        return ("set", "", sub(_pm(_split(s, ","))))
    if "=" in s:
        lhs, rhs = _split(s, "=") if len(_split(s, "=")) == 2 else ("", "")
        if re.fullmatch(r"[a-zA-Z](_\w+)?", lhs):
            return _parse(rhs, depth + 1)
        return ("eq", "", (_Parser(lhs).parse() - _Parser(rhs).parse(),))
    return _Parser(s).parse()


def _pm(items: list[str]) -> list[str]:
    """Expand \\pm: ['1\\pm2', '5'] -> ['1+2', '1-2', '5']."""
    return [x for it in items for x in ([it.replace("\\pm", "+"), it.replace("\\pm", "-")]
                                        if "\\pm" in it else [it])]


def _same(a, b, inexact: bool) -> bool:
    """Structural comparison of two _parse results; sympy leaves go to _same_expr."""
    one = lambda v: v[2][0] if isinstance(v, tuple) and v[0] == "set" and len(v[2]) == 1 else v  # noqa: E731
    if isinstance(a, tuple) != isinstance(b, tuple):  # a one-element set equals its element: {5} == 5
        a, b = one(a), one(b)
    if isinstance(a, tuple) != isinstance(b, tuple):
        return False
    if not isinstance(a, tuple):
        return _same_expr(a, b, inexact)
    if a[:2] != b[:2] or len(a[2]) != len(b[2]):
        return False
    if a[0] == "eq":  # same equation up to a nonzero constant factor: x+y=1 vs 2x+2y-2=0
        import sympy
        ratio = sympy.simplify(a[2][0] / b[2][0])
        return not ratio.free_symbols and ratio.is_finite is True and ratio != 0
    if a[0] in ("set", "union"):  # unordered: greedy matching is enough for an equivalence relation
        rest = list(b[2])
        for x in a[2]:
            j = next((j for j, y in enumerate(rest) if _same(x, y, inexact)), None)
            if j is None:
                return False
            rest.pop(j)
        return True
    return all(_same(x, y, inexact) for x, y in zip(a[2], b[2]))


def _same_expr(a, b, inexact: bool) -> bool:
    """Two sympy expressions: first numerically at a few rational points (cheap, rejects most), then, for exact
    answers with variables, simplify(a - b) == 0 must confirm. _same_expr(sqrt(2)/2, 1/sqrt(2), False) -> True"""
    import sympy as sp
    if a == b:
        return True
    if any(x.has(sp.oo, -sp.oo, sp.zoo, sp.nan) for x in (a, b)):
        return False
    syms = sorted(a.free_symbols | b.free_symbols, key=str)
    if not syms and a.is_Rational and b.is_Rational:
        return _close(Fraction(a.p, a.q), Fraction(b.p, b.q), inexact)
    for j in range(3 if syms else 1):  # sympy Floats with 30 digits: no overflow at 2^2008
        pt = {s: sp.Rational(3 + 2 * k + j, 7 + j) for k, s in enumerate(syms)}
        _check_magnitudes(a, pt), _check_magnitudes(b, pt)
        x, y = sp.N(a, 30, subs=pt), sp.N(b, 30, subs=pt)
        if not (x.is_finite and y.is_finite and abs(x - y) <= (REL_TOL if inexact else 1e-20) * max(abs(x), abs(y))):
            return False
    return inexact or not syms or sp.simplify(a - b) == 0


def _check_magnitudes(e, pt: dict) -> None:
    """Refuse to evaluate e at pt if a function or power would get an argument beyond 1e300. mpmath carries
    huge values in their exponents, but exp(10^2567) takes seconds and (x^y)!! at x=3/7 computes a gamma with
    10^10-bit numbers in C, which no timer can interrupt. Children are checked before parents: each N() is cheap."""
    import sympy as sp
    for node in sp.postorder_traversal(e):
        if isinstance(node, (sp.Function, sp.Pow)):
            for v in (sp.N(arg, 15, subs=pt) for arg in node.args if not arg.is_Symbol):
                if not (v.is_finite and abs(v) < 1e300):
                    raise _Refuse("value too large to evaluate")


class _Timeout(BaseException):
    """Raised by the SIGALRM handler. A BaseException, so that sympy's own `except Exception` cannot swallow it."""


def _symbolic_equiv(g: str, p: str) -> bool:
    """Layer 3 under a SIGALRM wall-clock limit of TIME_LIMIT_S (caller checks we are in the main thread)."""
    def on_alarm(signum, frame):
        raise _Timeout()
    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
        try:
            inexact = bool(re.search(r"\d\.|\.\d", g + " " + p))
            return _same(_parse(g), _parse(p), inexact)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except (Exception, _Timeout):  # _Refuse, _Timeout, anything sympy raises: not equivalent
        return False
    finally:
        signal.signal(signal.SIGALRM, old)


@lru_cache(maxsize=None)
def _sympy_ready() -> bool:
    """Import sympy and simplify once outside the timer: the first call loads submodules (~1 s)."""
    import sympy
    x = sympy.Symbol("x")
    return sympy.simplify(sympy.cot(x) - sympy.cos(x) / sympy.sin(x)) == 0


def is_equiv(gold: str, pred: str | None) -> bool:
    """Is the predicted final answer the same as the gold one? Never raises, time-bounded.
    is_equiv(r'\\frac{1}{2}', '0.5') -> True;  is_equiv('(1,2)', '[1,2]') -> False;  is_equiv('5', None) -> False"""
    if gold is None or pred is None:
        return False
    try:
        gold, pred = str(gold), str(pred)
        if len(gold) > MAX_ANSWER_CHARS or len(pred) > MAX_ANSWER_CHARS:
            return gold.strip() == pred.strip()
        g, p = _norm(gold), _norm(pred)
        if g == p:
            return bool(g)
        x, y = _number(g), _number(p)
        if x and y:  # '25%' also matches 0.25
            xs, ys = [x[0]] + [x[0] / 100] * ("%" in gold), [y[0]] + [y[0] / 100] * ("%" in pred)
            return any(_close(u, v, x[1] or y[1]) for u in xs for v in ys)
        if threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_REAL)[0]:
            return False  # no way to bound the time of sympy here: symbolic layer skipped
        return _sympy_ready() and _symbolic_equiv(g, p)
    except (Exception, _Timeout):
        return False


def grade(completion: str, gold: str) -> bool:
    """Reward check: grade('... so the total is \\boxed{18}.', '18') -> True"""
    return is_equiv(gold, extract_answer(completion))


# ---- dataset loaders: JSONL files -> [{"question", "answer", ...metadata}] ----

def _records(path):
    """Yield (line_number, dict) of a JSONL file; a malformed line raises ValueError('file:line: why')."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: data file not found")
    if not path.is_file():  # a folder, or a FIFO that would block the read
        raise ValueError(f"{path}: not a regular file")
    with open(path, "rb") as f:  # bytes, decoded line by line: a bad byte is reported with its line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 text (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            except RecursionError:
                raise ValueError(f"{path}:{n}: JSON nested too deeply") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            yield n, rec


def _field(rec: dict, where: str, *names: str) -> str:
    for k in names:
        if isinstance(rec.get(k), (str, int, float)) and not isinstance(rec.get(k), bool):
            return str(rec[k])
    raise ValueError(f"{where}: missing field {' or '.join(map(repr, names))}")


def load_gsm8k(path) -> list[dict]:
    """GSM8K: {"question", "answer": "...\\n#### 1,000"} -> {"question", "answer": "1000", "solution", "id"}."""
    out = []
    for n, r in _records(path):
        sol = _field(r, f"{path}:{n}", "answer")
        if "####" not in sol:
            raise ValueError(f"{path}:{n}: answer has no '#### N' line")
        out.append({"question": _field(r, f"{path}:{n}", "question"), "solution": sol,
                    "answer": sol.rsplit("####", 1)[1].strip().replace(",", ""), "id": f"{Path(path).stem}/{n}"})
    return out


def load_math(path) -> list[dict]:
    """MATH / MATH-500: {"problem", "solution", ["answer"], "type"|"subject", "level"} -> {"question",
    "answer" (the answer field, else the last \\boxed{} of the solution), "solution", "subject", "level", "id"}."""
    out = []
    for n, r in _records(path):
        sol = _field(r, f"{path}:{n}", "solution")
        ans = _field(r, f"{path}:{n}", "answer") if "answer" in r else _last_boxed(sol)
        if ans is None:  # a data defect, not a format error (2 empty \boxed{} in MATH train): warn, skip
            warnings.warn(f"{path}:{n}: no 'answer' field and no \\boxed{{...}} in the solution; skipped")
            continue
        level = re.search(r"\d+", str(r.get("level", "")))
        out.append({"question": _field(r, f"{path}:{n}", "problem"), "answer": ans, "solution": sol,
                    "subject": r.get("subject") or r.get("type"), "level": int(level[0]) if level else None,
                    "id": r.get("unique_id") or f"{Path(path).stem}/{n}"})
    return out


def load_jsonl(path) -> list[dict]:
    """Generic {"prompt" | "question", "answer", ...} -> {"question", "answer", "id", ...other fields kept}."""
    return [{"id": f"{Path(path).stem}/{n}", **r, "question": _field(r, f"{path}:{n}", "prompt", "question"),
             "answer": _field(r, f"{path}:{n}", "answer")} for n, r in _records(path)]


def load_dataset(path) -> list[dict]:
    """Pick the loader from the first record's keys: 'problem' -> MATH, 'question' with a '####' answer ->
    GSM8K, anything else -> load_jsonl."""
    first = next((r for _, r in _records(path)), None)
    if first is None:
        raise ValueError(f"{path}: no records")
    if "problem" in first:
        return load_math(path)
    if "question" in first and "####" in str(first.get("answer", "")):
        return load_gsm8k(path)
    return load_jsonl(path)


def math_prompt(question: str) -> str:
    """User message for a problem (Qwen2.5-Math style): math_prompt('What is 2+3?') ->
    'What is 2+3?\\nPlease reason step by step, and put your final answer within \\boxed{}.'"""
    return f"{question.strip()}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
