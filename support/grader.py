r"""Math answers: extraction from model output, safe equivalence, dataset loaders and the math prompt.

    >>> grade("3 + 15 = 18, so the total is \\boxed{18}.", "18")
    True
    >>> judge("x \\geq 5", "[5, \\infty)")
    Verdict(correct=True, gold='x \\geq 5', pred='[5, \\infty)', reason='same value', timed_out=False)

Command line: `python -m support.grader FILE.jsonl [--out OUT.jsonl] [--mode strict|flexible]` grades (gold,
prediction[, expected]) records; `python -m support.grader_agreement` measures this grader against math-verify.
"""
from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time
import warnings
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from .safe_io import SwarrError, check_out_file, run_cli, write_text_atomic

# Model output is untrusted text. Nothing here evaluates a string (no eval, exec, sympify, parse_expr).
# judge(gold, pred) compares in layers, cheapest first:
#   1. normalised strings  ('\\dfrac{1}{2}' -> '\\frac{1}{2}', '\\$1,\\!000' -> '1000', '30^\\circ' -> '30')
#   2. plain numbers as exact Fractions ('0.5' == '1/2' == '\\frac{1}{2}'; '50\\%' == '0.5'; '1000,99' == '1000.99')
#   3. our own recursive-descent parser for the LaTeX / plain-math subset of competition answers builds
#      sympy objects and structures (tuples, intervals, sets, named values, relations, ratios, matrices);
#      expressions are compared numerically at a few points (cheap, rejects most) and, when they agree,
#      confirmed by simplify(a - b) == 0.
# Safety of layer 3: answers over MAX_ANSWER_CHARS are compared as strings only; the parser refuses deep
# nesting, exponents and factorials whose results would be huge (big-int arithmetic in C cannot be
# interrupted), and everything else runs under a deadline of TIME_LIMIT_S, in any thread (see _bounded): SIGALRM
# in the main thread when the caller runs no interval timer, else a per-thread profile hook that checks the
# clock at every function call inside the parser and sympy. When time runs out the answer is "not equivalent"
# and the verdict says so (Verdict.timed_out, Verdict.reason).
#
# Conventions (each is tested in tests/test_grader_conventions.py; docs/GRADER_AGREEMENT.md measures them against
# math-verify on 5,000+ rewrites of the datasets' answers and lists every disagreement, with who is right and why):
# - Two extraction modes, as lm-evaluation-harness reports GSM8K. strict (the default, and the RL reward) reads
#   only an answer the completion marks: the last \\boxed{}, else GSM8K's '#### N', else 'the answer is ...' /
#   'Answer: ...'. flexible (eval reports it beside strict) falls back to the last math span or plain number or
#   bracket pair of the text ('... which is 1,000.99€' -> '1,000.99'). The reward stays strict as a format
#   incentive: under flexible, a policy would be paid for whatever number it happened to write last, so it
#   would learn to end on guesses; under strict it is paid only for an answer it commits to, which is also
#   the form eval and users read. Boxes side by side ('\\boxed{1}, \\boxed{2}', 'k = \\boxed{45}, n = \\boxed{2}')
#   are one answer, except against a gold that is one value, where only the last box counts (MATH's own
#   convention: boxing several guesses gains nothing). Math spans, and plain numbers, joined by 'and', 'or',
#   ';' or commas are one answer ('$1$ and $-2$' -> '1, -2'). Prose before an answer is dropped ('the answer
#   is the interval [2,5)' -> '[2,5)'; 'the vector $v$' -> 'v').
# - Rounding: exact values compare exactly (integers, fractions, finite decimals: 1000000.5 != 1000000).
#   A decimal meets a value without a finite decimal expansion (1/3, sqrt 2, pi) only within a relative
#   REL_TOL = 1e-6, i.e. about 7 significant digits: 0.3333333 == 1/3, but 0.333 != 1/3 and 3.14 != pi (a
#   rounding to a few places is a different answer, unless the gold itself is that decimal). The same rule
#   holds for numbers, set items, tuple and matrix entries, interval ends and expressions (0.5x == x/2,
#   0.5x != 0.5000001x, 0.3333333x == x/3).
# - Numbers: a comma followed by exactly three digits is a thousands separator when every group of the number
#   has three digits ('1,000' and '10,455' are numbers, '3,5,250' and '1,2,100' are lists of numbers; inside
#   brackets commas always separate items). In a prediction, a lone comma with no space after it and followed by
#   another count of digits is a decimal comma when the gold is a single number ('1000,99' == '1000.99');
#   everywhere else it separates items (a gold '3,5' is a list and does not match '3.5'). '1.000,99' (dots between
#   groups of three, then a comma) is the same decimal comma. ';' separates items like a comma ('1; -2').
#   Currency (\\$, €, £, 'dollars'), percent signs, degrees and units after a number ('5 cm', '12 m²') are
#   dropped; '25\\%' also equals 0.25.
# - Final answers: 'x = 5', 'f(x) = 5', '(p,q) = (3,2)', 'V_1:V_2 = 11:21' give their right-hand side; a chain
#   'x = 5+5+1 = 11' gives its last one; 'A \\approx B' gives B, and also A when B is A rounded.
# - Sets and tuples: a bare list ('1, -2', two \\boxed{} in a row, '1 \\text{ and } 2', '\\pm 3') is a set of
#   solutions, compared unordered; '(1,2)' is ordered. Named values ('k = 45, n = 2') compare by name, or in
#   order against an unnamed list or tuple.
# - Relations: 'x \\geq 5', 'x >= 5', '5 \\le x' and 'x \\in [5, \\infty)' are the same; a linear inequality in
#   one variable becomes its interval ('-x > -1' is 'x < 1'), and so does one in |linear| ('1 \\le |z| \\le 3/2' is
#   [-3/2,-1] u [1,3/2]); other relations compare up to a positive factor. \\gt, \\lt, \\neq, \\geqslant, >=, !=
#   and the unicode signs are spellings of the same relations. A function's value is a variable ('0 < f(x) < 1').
# - Intervals vs inequalities when only one side names the variable: a gold that names it ('-2 \\le x \\le 7',
#   'x \\in (3,4)') accepts a bare interval. A bare gold accepts a prediction that names the variable unless
#   the gold could be a point: '(3, 4)' with finite ends is as often an ordered pair as an open interval, so
#   '3 < x < 4' does not match it (a policy must not turn a point into an inequality and be rewarded). A range
#   of a function's value ('0 < f(x) < 1') is never a point, so it meets a bare '(0, 1)'.
# - Matrices: pmatrix, bmatrix, matrix and '[\\begin{array}..]' are the same; a column vector equals the tuple
#   of its entries.
# Where math-verify (the field's reference) disagrees, ours is right in every class seen on 6,000 rewrites of the
# datasets' answers (python -m support.grader_agreement; docs/GRADER_AGREEMENT.md has counts and examples):
# - bare LaTeX ('\\frac43', '\\text{C}', a pmatrix, with no $..$): math-verify extracts nothing; ours reads a
#   completion without prose as its answer.
# - interval as inequality ('[2,5)' vs '2 \\le x < 5' or '\\{x | 2 \\le x < 5\\}'): math-verify compares a set with a
#   relation only when the prediction is the set; both are the same solution set.
# - bare plain text ('(1, 2, 3)', '2k'): math-verify's plain-text parser reads it unlike the gold's LaTeX.
# - base subscript ('204_5' vs '204_6'): math-verify drops the base and calls them equal; ours compares strings.
# - brace-less argument ('\\frac\\pi 2'): math-verify misreads TeX's unbraced arguments.

MAX_ANSWER_CHARS = 1000  # longer answers are compared as stripped strings only
TIME_LIMIT_S = 0.5       # wall-clock bound of the symbolic layer for one comparison, in any thread
REL_TOL = 1e-6           # tolerance when a decimal meets a non-terminating value (see _close)
SIG_DIGITS = 7           # ... and the decimal must carry this many significant digits
MAX_EXP = 10_000         # largest |numerator| or denominator of a rational exponent
MAX_DIGITS = 10_000      # largest integer (in digits) a power may produce; n! needs n <= 1000
MAX_DEPTH = 50           # nesting depth of the parser
MODES = ("strict", "flexible")  # extraction: an explicit final-answer marker, or also the last expression


class Verdict(NamedTuple):
    """A grading with its evidence: the answers as compared and why they are (not) equivalent."""
    correct: bool
    gold: str | None
    pred: str | None       # the extracted answer (grade_detail) or the prediction as given (judge)
    reason: str            # 'same string' | 'same number' | 'same value' | 'different ...' | 'no answer' | ...
    timed_out: bool = False


# ---- extraction ---------------------------------------------------------------------------------------------

def _boxes(text: str, limit: int = 8) -> list[tuple[int, int, str]]:
    """(start, end, content) of the last few well-formed \\boxed{..} / \\fbox{..} / '\\boxed 5', in text order."""
    out, end = [], len(text)
    for _ in range(limit):  # bounded work on hostile input
        i = max(text.rfind("\\boxed", 0, end), text.rfind("\\fbox", 0, end))
        if i < 0:
            break
        end, j = i, i + (6 if text.startswith("\\boxed", i) else 5)
        m = re.compile(r"\s*(\{)|\s+([^\s${}]+)").match(text, j)
        if m and m.group(1):  # brace group: scan at most 10k chars for its matching '}'
            depth, start = 0, m.start(1)
            for k in range(start, min(len(text), start + 10_000)):
                depth += (text[k] == "{") - (text[k] == "}")
                if depth == 0:
                    if text[start + 1:k].strip():
                        out.append((i, k + 1, text[start + 1:k].strip()))
                    break
        elif m:
            out.append((i, m.end(), m.group(2)))
    return out[::-1]


def _last_boxed(text: str) -> str | None:
    """Content of the last well-formed \\boxed{..} in text, else None."""
    boxes = _boxes(text, 5)
    return boxes[-1][2] if boxes else None


_NAME_EQ = r"((?:\\?[a-zA-Z]+)(?:_\{?\w+\}?)?(?:\([a-z]\))?)\s*=\s*"  # 'k = ', 'a_1 = ', 'f(x) = ' before a box
# What may stand between two boxes of one final answer: '$, $', ' and ', '\text{ or }', '\quad', 'n = '.
_BOX_GAP = re.compile(r"[\s$,;]*(?:(?:\\text\{\s*)?(?:and|or)\s*\}?|\\q?quad)?[\s$,;]*(?:" + _NAME_EQ + r")?[\s$]*")


def _final_boxes(text: str) -> str | None:
    """The final boxed answer; boxes written next to each other form one answer (a list, or named values),
    unless they all hold the same value in different forms (then the last one is the answer):
    '$x=\\boxed{1}$ and $\\boxed{2}$' -> '1, 2';  'k = \\boxed{45}, n = \\boxed{2}' -> 'k=45, n=2'."""
    boxes = _boxes(text)
    if not boxes:
        return None
    run, names = [boxes[-1]], []
    for prev in reversed(boxes[:-1]):
        gap = _BOX_GAP.fullmatch(text, prev[1], run[0][0])
        if not gap:
            break
        names.insert(0, gap.group(1))
        run.insert(0, prev)
    if len(run) == 1 or all(is_equiv(run[-1][2], b[2]) for b in run[:-1]):  # '$15\frac{39}{40}$, or $\frac{639}{40}$'
        return run[-1][2]
    first = re.search(_NAME_EQ + r"[\s$]*$", text[max(0, run[0][0] - 40):run[0][0]])
    names.insert(0, first.group(1) if first else None)
    if all(names) and len(set(names)) == len(names):
        return ", ".join(f"{n}={b[2]}" for n, b in zip(names, run))
    return ", ".join(b[2] for b in run)


# display or inline math: $$..$$, \[..\], \(..\), $..$
_ANSWER_SPANS = re.compile(r"\$+([^$]+)\$+|\\\((.+?)\\\)|\\\[(.+?)\\\]")
_SPAN_GAP = re.compile(r"[\s,;]*(?:and|or)?[\s,;]*")
_MATH = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)|\$([^$]+)\$", re.S)
# Prose before an answer ('the interval ', 'approximately '): words of 2+ letters, not a function's name.
_PROSE = re.compile(r"(?:(?!(?:sin|cos|tan|cot|sec|csc|log|ln|exp|arc\w+|pi)\b)[A-Za-z]{2,}\s+)+(?=[^A-Za-z\s])")
# A plain (non-LaTeX) answer in prose: a bracket pair ('[2,5)', '(3, 4)') or a number ('1,000.99', '-3/4', '25%'),
# and runs of them joined by ', ', ';', 'and', 'or' ('1 and -2').
_PLAIN_ITEM = (r"(?:[\[(]\s*[-+]?[\w.\\]+\s*,\s*[-+]?[\w.\\]+\s*[\])]"
               r"|(?<![\w.])[-+]?(?:\d(?:[\d,.]*\d)?|\.\d+)(?:\s*/\s*\d+)?%?(?![\w]))")
_PLAIN_RUN = re.compile(rf"{_PLAIN_ITEM}(?:(?:\s*;\s*|,\s+|\s+(?:and|or)\s+){_PLAIN_ITEM})*")


def _span_run(spans: list, text: str) -> str:
    """Math spans written side by side ('$1$ and $-2$') as one answer: '1, -2'."""
    run = [spans[0]]
    for a, b in zip(spans, spans[1:]):
        if not _SPAN_GAP.fullmatch(text, a.end(), b.start()):
            break
        run.append(b)
    return ", ".join(next(g for g in span.groups() if g).strip(" ,;").rstrip(".") for span in run)


def _is_math(span: str) -> bool:
    """Words between two '$' are prose between prices ('$5 and $6'), not math."""
    return bool(span) and not re.search(r"[a-zA-Z]{3,}", re.sub(r"\\[a-zA-Z]+(\{[^{}]*\})?", "", span))


def _answer_after(tail: str) -> str | None:
    """The answer that follows 'the answer is': math spans ('$x = 3$ or $x = -3$' -> 'x = 3, x = -3'; 'the vector
    $v$' -> 'v'), else the sentence without its leading prose ('the interval [2,5).' -> '[2,5)')."""
    tail = tail.replace("\\$", "  ")  # an escaped dollar is a currency sign, not a math delimiter
    spans = list(_ANSWER_SPANS.finditer(tail))
    if spans and re.fullmatch(r"(?:[A-Za-z]{2,}\s+)*", tail[:spans[0].start()]):
        return _span_run(spans, tail) or None
    tail = re.split(r"\.(?:\s|$)", tail)[0]
    tail = _PROSE.sub("", tail, count=1) if _PROSE.match(tail) else tail
    return tail.strip(" ,;").rstrip(".") or None


# A prose word in flexible extraction: 2+ letters, not a LaTeX command, not 'and'/'or' (they join answers).
_WORD = re.compile(r"(?<![\\a-zA-Z])(?!(?:and|or|sin|cos|tan|cot|sec|csc|log|ln|exp|pi|infty)\b)[a-zA-Z]{2,}\b")


def _last_expression(text: str) -> str | None:
    """Flexible extraction, the first that ends last of: the last math span of the text ('$1$ and $-2$' as one
    answer); what follows the last prose word, when it holds math ('... we get \\frac{17}{21}.', 'so x = 5',
    '... which is 1,000.99€'); the last plain number or bracket pair ('18 dollars in total' -> '18')."""
    text = text[-5000:].rstrip()
    line = text.strip().rstrip(".")
    if "\n" not in line and len(line) <= 200 and not _WORD.search(re.sub(r"\\[a-zA-Z]+\s*(\{[^{}]*\})?", " ", line)):
        return line or None  # no prose at all ('C', '\\text{east}', '864 \\mbox{ inches}^2'): the text is the answer
    text = text.replace("\\$", "  ")  # an escaped dollar is a currency sign, not a math delimiter
    math, math_end = None, -1
    spans = [m for m in _MATH.finditer(text) if _is_math(next(g for g in m.groups() if g).strip(" .,;"))]
    if spans:
        k = len(spans) - 1
        while k > 0 and _SPAN_GAP.fullmatch(text, spans[k - 1].end(), spans[k].start()):
            k -= 1
        math, math_end = _span_run(spans[k:], text), spans[-1].end()
    prose = _MATH.sub(lambda m: " " * len(m.group()), text)
    prose = re.sub(_TEXT + r"\{[^{}]*\}|\\(?:begin|end)\{\w+\}", lambda m: " " * len(m.group()), prose)
    words = list(_WORD.finditer(prose, max(0, len(prose) - 300)))
    start = words[-1].end() if words else max(0, len(prose) - 300)
    tail = prose[start:].lstrip(" \n,:;*").rstrip(" \n.,:;!?*")
    if re.search(r"[\d\\]", tail) and start >= math_end and len(tail) <= 200 and "$" not in tail:
        return re.sub(r"\s*;\s*|\s+(?:and|or)\s+", ", ", tail)
    plain = None
    for plain in _PLAIN_RUN.finditer(prose):
        pass
    if plain is not None and plain.end() > math_end:
        return re.sub(r"\s*;\s*|\s+(?:and|or)\s+", ", ", plain.group())
    return math


def extract_answer(text: str, mode: str = "strict") -> str | None:
    """Final answer of a completion. strict: the last \\boxed{} (adjacent boxes joined), else GSM8K's '#### N', else
    'the (final) answer is X' / 'Answer: X'. flexible: the same, else the last math span or plain number (see
    _last_expression).  extract_answer(r"so $x = \\boxed{\\frac{1}{2}}$.") -> '\\frac{1}{2}';
    extract_answer("so x = 3") -> None;  extract_answer("so x = 3", "flexible") -> '3'"""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(text, str):
        return None
    boxed = _final_boxes(text)
    if boxed is not None:
        return boxed
    i = text.rfind("####")
    if i >= 0 and text[i + 4:].split("\n", 1)[0].strip():
        return text[i + 4:].split("\n", 1)[0].strip()
    for m in reversed(list(re.finditer(r"(?i)\banswers?(?:\s+(?:is|are)\b|\**\s*:)[\s:*]*", text))[-5:]):
        answer = _answer_after(text[m.end():m.end() + 500].split("\n", 1)[0].strip(" *"))
        if answer:
            return answer
    return _last_expression(text) if mode == "flexible" else None


# ---- normalisation ------------------------------------------------------------------------------------------

_UNICODE = str.maketrans({"−": "-", "×": "*", "·": "*", "⋅": "*", "÷": "/", "π": "\\pi ", "∞": "\\infty ",
                          "√": "\\sqrt ", "≤": "\\le ", "≥": "\\ge ", "≠": "\\ne ", "≈": "\\approx ",
                          "∈": "\\in ", "∪": "\\cup ", "±": "\\pm ", "²": "^2", "³": "^3", "€": " ", "£": " ",
                          "¥": " ", "₹": " ", "½": "\\frac12", "⅓": "\\frac13",
                          "⅔": "\\frac23", "¼": "\\frac14", "¾": "\\frac34", "\u2009": " ", "\u00a0": " "})
_TEXT = r"\\(?:text|textbf|textrm|textit|textnormal|mbox|mathrm|mathbf|operatorname)\s*"
_REL_SPELLINGS = [(r"\\geq?(?:slant)?(?![a-zA-Z])|>=", r"\\ge "), (r"\\leq?(?:slant)?(?![a-zA-Z])|<=", r"\\le "),
                  (r"\\neq?(?![a-zA-Z])|!=", r"\\ne "), (r"\\(?:approx|simeq)(?![a-zA-Z])", r"\\approx "),
                  (r"\\lt(?![a-zA-Z])", "<"), (r"\\gt(?![a-zA-Z])", ">")]
_UNIT = r"(?:cm|mm|km|m|kg|mg|g|ml|mL|L|s|sec|min|h|hr|hrs|ft|yd|mi|mph|lb|lbs|oz)(?![a-zA-Z])"
_RELATION = re.compile(r"<|>|\\le(?![a-zA-Z])|\\ge(?![a-zA-Z])|\\ne(?![a-zA-Z])")
_VAR = r"(?:[a-zA-Z]|\\(?:alpha|beta|gamma|delta|epsilon|theta|lambda|mu|phi|psi|omega|rho|sigma|tau))(?:_\{?\w+\}?|')*"
# Left-hand sides that only name the answer: x, a_1, f(x), f^{-1}(x), (p,q), V_1:V_2, AB, \angle ABC.
_NAME = re.compile(rf"{_VAR}(?:\^\{{?-1\}}?)?(?:\([a-zA-Z](?:,[a-zA-Z])*\))?|\({_VAR}(?:,{_VAR})+\)|{_VAR}(?::{_VAR})+"
                   r"|[A-Z]{2,3}|m?\\angle ?[A-Z]{1,3}")
_TUPLE_NAME = re.compile(rf"\(({_VAR}(?:,{_VAR})+)\)")


_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())} | {"thirty": 30, "forty": 40, "fifty": 50, "hundred": 100}
_PLAIN = re.compile(r"-?\d+(?:\.\d+)?")


@lru_cache(maxsize=16384)
def _norm(s: str) -> str:
    """Canonical string of an answer. r'\\$1,\\!000.' -> '1000';  r'\\dfrac12' -> '\\frac12';
    r'15\\mbox{ cm}^2' -> '15';  r'\\text{(B)}' -> 'B';  'x = 5' -> '5';  r'\\left( 1, 2 \\right]' -> '(1,2]';
    'x >= 5' -> 'x\\ge5';  'x = 5+5+1 = 11' -> '11';  '3,5,250' -> '3,5,250';  '10,455' -> '10455'"""
    if _PLAIN.fullmatch(s):  # most GSM8K answers: nothing to do
        return s
    s = re.sub(r"[\x00-\x1f\x7f]", " ", s).translate(_UNICODE).strip().rstrip(",;")
    s = re.sub(r"\\!\s*|\\left(?![a-z])|\\right(?![a-z])|\\[bB]igg?[lr]?(?![a-z])|\\displaystyle|\\hline", "", s)
    s = re.sub(r"\\[dtc]frac", r"\\frac", s).replace("{,}", ",").replace("\\colon", ":").replace("\\mid", "|")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\circ|\\degree|\\euro|\\pounds|\\textdollar|\\textsterling", "", s)
    for pattern, repl in _REL_SPELLINGS:
        s = re.sub(pattern, repl, s)
    s = re.sub(r"\\langle(?![a-z])", "(", re.sub(r"\\rangle(?![a-z])", ")", s))  # vectors <1, 2> are tuples
    s = re.sub(r"\\varnothing|\\emptyset|\\\{\s*\\\}|\\O(?![a-zA-Z])", r"\\emptyset", s)
    s = re.sub(r"\\(?:mathbb\{R\}|R)(?![a-zA-Z])|\\text\{\s*all real numbers\s*\}", r"(-\\infty,\\infty)", s)
    s = re.sub(r"\\?[%$]|(?<!\\)\\[ ,;:]|~|\\q?quad", " ", s).strip().replace(";", ",")  # '1; -2' is a list
    s = re.sub(_TEXT + r"\{\s*(and|or)\s*\}", r" \1 ", s)  # '3 \text{ and } 5', 'x<1 \text{ or } x>2'
    s = re.sub(r"(?<=\d)\s*(?:\^\{?)?(?:" + _TEXT + r"\{(?:st|nd|rd|th)\}|(?:st|nd|rd|th)\b)\}?", "", s)  # 5^{\text{th}}
    m = re.fullmatch(_TEXT + r"\{([^{}]*)\}", s)
    s = m.group(1).strip() if m else re.sub(_TEXT + r"\{[^{}]*\}(\^\{?[23]\}?)?", " ", s).strip()
    s = re.sub(r"(?i)\bpercent\b", " ", s).strip()
    m = re.fullmatch(r"([-+]?[\d.,/]+)(?:\s*" + _UNIT + r"|\s+(?!pi\b)[a-zA-Z]{2,})(?:\^\{?[23]\}?)?"
                     r"(?:/[a-zA-Z]+(?:\^\{?[23]\}?)?)?(?:\s+[a-zA-Z]+)*\.?", s)  # '18 dollars', '5cm', '12 m^2'
    s = m.group(1) if m else s
    joiner = " \\lor " if _RELATION.search(s) else ","  # 'x<1 or x>2' is a union; '3 and 5' a list
    s = re.sub(r"\s+or\s+|\\lor(?![a-z])|\\vee(?![a-z])", lambda m: joiner, s)
    s = re.sub(r"\s+and\s+|\\land(?![a-z])|\\wedge(?![a-z])", lambda m: " \\land " if joiner != "," else ",", s)
    s = re.sub(r",\s*,", ",", s)  # '1, 2, and 3'
    s = re.sub(r"(?<![_^]\d)(?<=\d)\s+(?=\d)", ",", s)  # '3 5' -> '3,5' (not 35); '1 000' -> '1,000' -> 1000
    if not re.search(r"[(\[]|\\\{", s):  # thousands separators: every group after the first has 3 digits
        s = re.sub(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?!\d|,\d)", lambda m: m.group().replace(",", ""), s)
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])|\s+", lambda m: m.group(1) + " " if m.group(1) else "", s)
    s = re.sub(r"(?<=\d)_\{(\w+)\}", r"_\1", s).rstrip(".").strip(",;")  # base subscripts: 204_{5} -> 204_5
    if len(_split(s, ",")) == 1:
        s = _rhs(s) or s
    if s.lower() in _NUMBER_WORDS:  # 'six' == 6
        return str(_NUMBER_WORDS[s.lower()])
    m = re.fullmatch(r"\(([A-Ea-e])\)|([A-E])", s)  # multiple choice
    if m:
        return (m.group(1) or m.group(2)).upper()
    return s.lower() if re.fullmatch(r"[a-zA-Z]{3,}", s) else s  # words: 'East' == 'east'


def _rhs(s: str) -> str | None:
    """The value an equation states, or None: 'x=5' -> '5';  'x=5+5+1=11' -> '11' (a chain gives its last side);
    '(p,q)=(3,2)' -> '(3,2)';  '5+5+1=11' -> '11';  'x+y=1' -> None (an equation, not a value)."""
    parts = _split(s, "=")
    if len(parts) < 2 or not all(p.strip() for p in parts[1:]):
        return None
    lhs = parts[0]
    if not lhs.strip():  # the name was text and is gone: '\mathbf{v} = ..' -> '= ..'
        return parts[-1]
    if len(parts) == 2 and _TUPLE_NAME.fullmatch(lhs) and parts[1][:1] in "([":
        return None  # '(p,q)=(3,2)' keeps its names: _parse makes it named values
    if len(parts) > 2 or _NAME.fullmatch(lhs) or not re.search(r"[a-zA-Z]", re.sub(r"\\[a-zA-Z]+", "", lhs)):
        return parts[-1]
    return None


def _split(s: str, sep: str) -> list[str]:
    """Split at top-level occurrences of sep: _split('(1,2),3', ',') -> ['(1,2)', '3']."""
    if sep not in s:
        return [s]
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        depth += (s[i] in "([{") - (s[i] in ")]}")
        if depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i = start = i + len(sep)
        else:
            i += 1
    return parts + [s[start:]]


def _split_relations(s: str) -> tuple[list[str], list[str]]:
    """'-2\\le x<7' -> (['-2', 'x', '7'], ['\\le', '<']): split at top-level <, >, \\le, \\ge, \\ne."""
    parts, ops, depth, start, i = [], [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and c in "<>\\":
            m = _RELATION.match(s, i)
            if m:
                parts.append(s[start:i])
                ops.append(m.group())
                i = start = m.end()
                continue
        i += 1
    return parts + [s[start:]], ops


def _number(s: str):
    """Plain number -> (Fraction, inexact) or None. '-3/4' -> (Fraction(-3, 4), False); '2.50' -> (5/2, True)."""
    if s.isascii() and s.isdigit() and len(s) < 4300:  # the common case (int() refuses longer strings)
        return Fraction(int(s)), False
    if re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?", s):  # exponent <= 999: no huge ints
        return Fraction(s), bool(re.search(r"[.eE]", s))
    m = re.fullmatch(r"(-?)(\d*)\.(\d*)\\overline\{?(\d+)\}?", s)  # 0.1\overline{6} = 1/6
    if m:
        head, rep = m.group(2) + m.group(3), m.group(4)
        value = (Fraction(int(head + rep) - int(head or "0"), (10 ** len(rep) - 1) * 10 ** len(m.group(3))))
        return (-value if m.group(1) else value), False
    m = re.fullmatch(r"(-?)(?:\\frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)/(-?\d+)|\\frac(\d)(\d))", s)
    if m and int(m.group(3) or m.group(5) or m.group(7)) != 0:
        value = Fraction(int(m.group(2) or m.group(4) or m.group(6)), int(m.group(3) or m.group(5) or m.group(7)))
        return (-value if m.group(1) else value), False
    return None


def _decimal_comma(s: str):
    """'1000,99' -> (Fraction(100099, 100), True): one comma not followed by exactly three digits; '1.000,99' (dots
    between groups of three digits, then a decimal comma) -> the same; else None."""
    m = re.fullmatch(r"([-+]?\d+),(\d{1,2}|\d{4,})|([-+]?\d{1,3}(?:\.\d{3})+),(\d+)", s)
    if not m:
        return None
    whole, frac = (m.group(1), m.group(2)) if m.group(1) else (m.group(3).replace(".", ""), m.group(4))
    return Fraction(f"{whole}.{frac}"), True


def _close(x, y, inexact: bool) -> bool:
    """Tolerance policy. Integers and finite decimals are compared exactly (1000000.5 != 1000000). Only when
    a decimal (inexact) meets a value with no finite decimal expansion (1/3, sqrt 2, pi) is a relative error
    of REL_TOL allowed: 0.3333333 == 1/3 and 3.14159265 == pi, but 0.333 != 1/3 (a rounding is not the answer)."""
    if x == y or not inexact or all(isinstance(v, Fraction) and _terminates(v.denominator) for v in (x, y)):
        return x == y
    if not all(_enough_digits(v) for v in (x, y) if isinstance(v, Fraction) and _terminates(v.denominator)):
        return False
    return bool(abs(x - y) <= REL_TOL * max(abs(x), abs(y)))


def _enough_digits(v: Fraction) -> bool:
    """Does the finite decimal v carry SIG_DIGITS significant digits? 0.3333333 does (7); 3053.63 (972 pi rounded
    to two places) does not, though it is within REL_TOL of 972 pi."""
    n, scale = abs(v.numerator), 1
    while (n * scale) % v.denominator and scale < 10 ** 40:
        scale *= 10
    m = n * scale // v.denominator
    while m and m % 10 == 0:
        m //= 10
    return scale >= 10 ** 40 or len(str(m)) >= SIG_DIGITS


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


# ---- structured answers: _parse(normalised string) -> sympy expression or (kind, tag, items) ----------------

_MATRIX = re.compile(r"[\[(]?\\begin\{([pbB]?matrix|array)\}(?:\{[lcr|]*\})?(.*?)(?:\\\\)?\\end\{\1\}[\])]?")
_FVALUE = re.compile(rf"{_VAR}\([a-zA-Z]\)")  # f(x), g_1(t): a function's value, named as a variable
_IN = re.compile(rf"({_VAR}(?:\([a-zA-Z]\))?)\\in(?![a-zA-Z])(.+)")


def _side(p: str):
    """One side of a relation: 'f(x)' stands for the function's value (one variable), anything else is parsed."""
    import sympy as sp
    return sp.Symbol(p.strip()) if _FVALUE.fullmatch(p.strip()) else _Parser(p).parse()


@lru_cache(maxsize=4096)
def _parse(s: str, depth: int = 0):
    """Normalised answer -> sympy expression, or (kind, tag, items) for structured answers:
    '(1,2]' -> ('seq', '(]', (1, 2));  '\\{3,1\\}' and '3,1' -> ('set', '', (3, 1));  'A\\cupB' -> ('union',..);
    '1\\pm\\sqrt2' -> ('set', '', (1+sqrt(2), 1-sqrt(2)));  pmatrix -> ('mat', '2x1', items);  'y=2x' -> 2*x;
    'x+y=1' -> ('eq', '', (x + y - 1,));  'k=45,n=2' -> ('named', ('k', 'n'), (45, 2));  '11:21' -> ('ratio',..);
    'x\\ge5' and 'x\\in[5,\\infty)' -> ('in', 'x', (('seq', '[)', (5, oo)),));  'x^2>4' -> ('rel', '>', (x**2-4,));
    '\\frac{22}{7}\\approx3.14' -> ('approx', '', (22/7, 157/50))."""
    if depth > 10:
        raise _Refuse("nesting too deep")
    sub = lambda parts: tuple(_parse(p, depth + 1) for p in parts)  # noqa: E731
    m = _MATRIX.fullmatch(s)
    if m:
        rows = [r.split("&") for r in m.group(2).split("\\\\")]
        if len({len(r) for r in rows}) != 1:
            raise _Refuse("ragged matrix")
        return ("mat", f"{len(rows)}x{len(rows[0])}", sub(c for r in rows for c in r))
    if "\\approx" in s:
        return _approx(_split(s, "\\approx"), depth)
    m = _IN.fullmatch(s)
    if m:
        return ("in", m.group(1), (_parse(m.group(2), depth + 1),))
    m = re.fullmatch(rf"\\\{{({_VAR})[|:](.+)\\\}}", s)  # set-builder: \{x | x > 3\}
    if m:
        cond = _parse(m.group(2), depth + 1)
        if _kind(cond) == "in" and cond[1] == m.group(1):
            return cond
        raise _Refuse("set-builder condition is not a solution set of its variable")
    if "\\lor" in s or "\\land" in s:  # only written by _norm between relations
        return _combine([_combine(sub(_split(p, "\\land")), "and") for p in _split(s, "\\lor")], "or")
    commas = _split(s, ",")
    if len(commas) == 1 and _RELATION.search(s):
        parts, ops = _split_relations(s)
        if len(parts) > 1:
            return _relation([_side(p) for p in parts], ops)
    if len(_split(s, "\\cup")) > 1:
        return ("union", "", sub(_split(s, "\\cup")))
    if s.startswith("\\{") and s.endswith("\\}") and _encloses(s, 1):
        return ("set", "", sub(_pm(_split(s[2:-2], ","))))
    if s[:1] in "([" and s[-1:] in ")]" and _encloses(s, 0) and len(_split(s[1:-1], ",")) > 1:
        return ("seq", s[0] + s[-1], sub(_split(s[1:-1], ",")))
    if len(commas) > 1 or "\\pm" in s:  # '1,-2' and '1\pm\sqrt2' are sets of solutions
        named = [_named(p) for p in commas]
        if len(commas) > 1 and all(named) and len({n for n, _ in named}) == len(named):
            return ("named", tuple(n for n, _ in named), sub(v for _, v in named))
        items = sub(_pm([nv[1] if nv else p for p, nv in zip(commas, named)]))  # 'x=1, x=2' -> {1, 2}
        if len(items) > 1 and all(_kind(x) == "in" and x[1] == items[0][1] for x in items):
            return _combine(items, "or")  # 'x<-2, x>3'
        return ("set", "", items)
    if "=" in s:
        parts = _split(s, "=")
        m = _TUPLE_NAME.fullmatch(parts[0])
        if m and len(parts) == 2 and _kind(value := _parse(parts[1], depth + 1)) == "seq":  # (p,q) = (3,2)
            names = tuple(m.group(1).split(","))
            if len(names) == len(value[2]) == len(set(names)):
                return ("named", names, value[2])
        if _rhs(s):
            return _parse(_rhs(s), depth + 1)
        if len(parts) != 2:
            raise _Refuse("not an equation")
        return ("eq", "", (_Parser(parts[0]).parse() - _Parser(parts[1]).parse(),))
    if len(_split(s, ":")) > 1:
        return ("ratio", "", sub(_split(s, ":")))
    return _Parser(s).parse()


def _kind(x) -> str | None:
    return x[0] if isinstance(x, tuple) else None


def _named(item: str):
    """'k=45' -> ('k', '45');  'x=5+5+1=11' -> ('x', '11');  '45' -> None."""
    parts = _split(item, "=")
    return (parts[0], parts[-1]) if len(parts) > 1 and _NAME.fullmatch(parts[0]) and parts[-1] else None


def _pm(items: list[str]) -> list[str]:
    """Expand \\pm: ['1\\pm2', '5'] -> ['1+2', '1-2', '5']."""
    return [x for it in items for x in ([it.replace("\\pm", "+"), it.replace("\\pm", "-")]
                                        if "\\pm" in it else [it])]


def _encloses(s: str, i: int) -> bool:
    """True if the bracket at s[i] is closed by the last character of s."""
    depth = 0
    for j in range(i, len(s)):
        depth += (s[j] in "([{") - (s[j] in ")]}")
        if depth == 0:
            return j == len(s) - 1
    return False


def _approx(parts: list[str], depth: int):
    """'A \\approx B': B, and also A when B is A rounded or truncated to B's decimals ('x \\approx 3.14' -> 3.14)."""
    import sympy as sp
    parts = [p for p in parts if p]
    if parts and _NAME.fullmatch(parts[0]):
        parts = parts[1:]
    if not parts:
        raise _Refuse("nothing is approximated")
    approx = _parse(parts[-1], depth + 1)
    if len(parts) == 1:
        return approx
    exact = _parse(_rhs(parts[0]) or parts[0], depth + 1)
    if _kind(exact) or _kind(approx) or exact.free_symbols or approx.free_symbols:
        return approx
    places = len(parts[-1].split(".")[1]) if re.fullmatch(r"-?\d*\.\d+", parts[-1]) else 0
    _check_magnitudes(exact, {})
    diff = sp.N(exact - approx, 30)
    return ("approx", "", (exact, approx)) if diff.is_real and abs(diff) < sp.Rational(1, 10 ** places) else approx


# Relations. A linear inequality in one variable becomes ('in', var, interval or union); an interval is
# (lo, hi, lo_closed, hi_closed) while it is built, ('seq', '[)', (lo, hi)) in the result.

def _relation(exprs: list, ops: list[str]):
    """[-2, x, 7], ['\\le', '<'] -> ('in', 'x', (('seq', '[)', (-2, 7)),));  [x**2, 4], ['>'] -> ('rel', '>', ..)."""
    pieces = []  # (e, kind): e > 0, e >= 0 or e != 0
    for lhs, op, rhs in zip(exprs, ops, exprs[1:]):
        e = rhs - lhs if op in ("<", "\\le") else lhs - rhs
        pieces.append((e, {"<": ">", ">": ">", "\\le": "\\ge", "\\ge": "\\ge", "\\ne": "\\ne"}[op]))
    syms = set().union(*(e.free_symbols for e, _ in pieces))
    if len(syms) == 1:
        v = syms.pop()
        sets = [_solve_linear(e, kind, v) or _solve_abs(e, kind, v) for e, kind in pieces]
        if all(x is not None for x in sets):
            result = sets[0]
            for other in sets[1:]:
                result = _intersect(result, other)
            return ("in", str(v), (_as_struct(result),))
    if len(pieces) != 1:
        raise _Refuse("chain of non-linear relations")
    return ("rel", pieces[0][1], (pieces[0][0],))


def _solve_linear(e, kind: str, v):
    """Solution set of e > 0 / e >= 0 / e != 0 for e = c*v + d with a real number c != 0, else None."""
    import sympy as sp
    c = e.diff(v)
    d = sp.expand(e - c * v)
    if c.free_symbols or d.free_symbols or not (c.is_positive or c.is_negative):
        return None
    root = -d / c
    if kind == "\\ne":
        return [(-sp.oo, root, False, False), (root, sp.oo, False, False)]
    closed = kind == "\\ge"
    return [(root, sp.oo, closed, False)] if c.is_positive else [(-sp.oo, root, False, closed)]


def _solve_abs(e, kind: str, v):
    """Solution set of c*|p*v + q| + d > 0 (>= 0, != 0) with real numbers c, d, p != 0, q, else None:
    1 <= |z| becomes z <= -1 or z >= 1, so '1 \\le |z| \\le 3/2' is [-3/2, -1] u [1, 3/2]."""
    import sympy as sp
    found = e.atoms(sp.Abs)
    if len(found) != 1:
        return None
    a = found.pop()
    t = sp.Dummy("t")
    in_t = _solve_linear(e.subs(a, t), kind, t)  # the condition on t = |w|
    w = a.args[0]
    p = w.diff(v)
    q = sp.expand(w - p * v)
    if in_t is None or e.subs(a, t).has(v) or p.free_symbols or q.free_symbols or not (p.is_positive or p.is_negative):
        return None
    out = []
    for lo, hi, lc, hc in in_t:
        if bool(lo < 0):
            lo, lc = sp.Integer(0), True  # |w| >= 0 always
        if bool(hi < lo) or (hi == lo and not (lc and hc)):
            continue
        pieces = [(-hi, hi, hc, hc)] if lo == 0 and lc else [(lo, hi, lc, hc), (-hi, -lo, hc, lc)]  # w in these
        for wlo, whi, wlc, whc in pieces:  # v = (w - q) / p
            vlo, vhi = (wlo - q) / p, (whi - q) / p
            out.append((vlo, vhi, wlc, whc) if p.is_positive else (vhi, vlo, whc, wlc))
    return out or None


def _intersect(xs: list, ys: list) -> list:
    out = []
    for lo1, hi1, lc1, hc1 in xs:
        for lo2, hi2, lc2, hc2 in ys:
            lo, lc = (lo1, lc1) if bool(lo1 > lo2) else (lo2, lc2) if bool(lo2 > lo1) else (lo1, lc1 and lc2)
            hi, hc = (hi1, hc1) if bool(hi1 < hi2) else (hi2, hc2) if bool(hi2 < hi1) else (hi1, hc1 and hc2)
            if bool(lo < hi) or (lo == hi and lc and hc):
                out.append((lo, hi, lc, hc))
    if not out:
        raise _Refuse("empty solution set")
    return out


def _as_struct(intervals: list):
    items = tuple(("seq", ("[" if lc else "(") + ("]" if hc else ")"), (lo, hi)) for lo, hi, lc, hc in intervals)
    return items[0] if len(items) == 1 else ("union", "", items)


def _intervals(x) -> list | None:
    """('seq', '[)', (a, b)) or a union of such -> [(a, b, True, False), ..], else None."""
    if _kind(x) == "union":
        parts = [_intervals(p) for p in x[2]]
        return None if any(p is None for p in parts) else [i for p in parts for i in p]
    if _kind(x) == "seq" and len(x[2]) == 2 and not any(map(_kind, x[2])):
        return [(x[2][0], x[2][1], x[1][0] == "[", x[1][1] == "]")]
    return None


def _combine(items, how: str):
    """Items joined by 'and' (intersection) or 'or' (union) of one variable's solution sets."""
    if len(items) == 1:
        return items[0]
    if not all(_kind(x) == "in" and x[1] == items[0][1] for x in items):
        raise _Refuse("'and'/'or' between relations of different variables")
    sets = [_intervals(x[2][0]) for x in items]
    if any(s is None for s in sets):
        raise _Refuse("'and'/'or' between non-interval sets")
    result = sets[0]
    for other in sets[1:]:
        result = _intersect(result, other) if how == "and" else result + other
    return ("in", items[0][1], (_as_struct(result),))


# ---- comparison -----------------------------------------------------------------------------------------------

def _same(a, b, inexact: bool) -> bool:
    """Do two _parse results mean the same answer? a comes from the gold, b from the prediction (the one
    asymmetric rule: a bare gold that could be a point does not accept an interval that names its variable)."""
    ka, kb = _kind(a), _kind(b)
    if ka == "approx":
        return any(_same(x, b, inexact) for x in a[2])
    if kb == "approx":
        return any(_same(a, y, inexact) for y in b[2])
    if ka == "in" or kb == "in":
        if ka == kb:
            return a[1] == b[1] and _same(a[2][0], b[2][0], inexact)
        if ka == "in":  # the gold names the variable: a bare interval or set is the same answer
            return _same(a[2][0], b, inexact)
        # ... a range 'f(x) < 1' is never a point, so it meets a bare '(0, 1)'
        return (not _maybe_point(a) or bool(_FVALUE.fullmatch(b[1]))) and _same(a, b[2][0], inexact)
    if ka == "named" or kb == "named":
        if ka == kb:
            if sorted(a[1]) != sorted(b[1]):
                return False
            by_name = dict(zip(b[1], b[2]))
            return all(_same(x, by_name[n], inexact) for n, x in zip(a[1], a[2]))
        other = b if ka == "named" else a  # named values against an unnamed list or tuple: in order
        if not (_kind(other) == "set" or (_kind(other) == "seq" and other[1] == "()")) or len(a[2]) != len(b[2]):
            return False
        return all(_same(x, y, inexact) for x, y in zip(a[2], b[2]))
    if ka == "ratio" or kb == "ratio":
        return _same_ratio(a, b, inexact)
    if {ka, kb} == {"mat", "seq"}:  # a column vector equals the tuple of its entries; [[1,2],[3,4]] a matrix
        mat, seq = (a, b) if ka == "mat" else (b, a)
        rows = seq[2]
        if seq[1] == "[]" and all(_kind(r) == "seq" and r[1] == "[]" and len(r[2]) == len(rows[0][2]) for r in rows):
            shape, entries = f"{len(rows)}x{len(rows[0][2])}", tuple(x for r in rows for x in r[2])
        elif seq[1] == "()":
            shape, entries = f"{len(rows)}x1", rows
        else:
            return False
        return mat[1] == shape and all(_same(x, y, inexact) for x, y in zip(mat[2], entries))
    one = lambda v: v[2][0] if _kind(v) == "set" and len(v[2]) == 1 else v  # noqa: E731
    if (ka is None) != (kb is None):  # a one-element set equals its element: {5} == 5
        a, b = one(a), one(b)
        ka, kb = _kind(a), _kind(b)
    if {ka, kb} == {None, "eq"}:
        return _solves(a if ka == "eq" else b, b if ka == "eq" else a)
    if (ka is None) != (kb is None):
        return False
    if ka is None:
        return _same_expr(a, b, inexact)
    if a[:2] != b[:2] or len(a[2]) != len(b[2]):
        return False
    if ka in ("eq", "rel"):  # same relation up to a constant factor: nonzero for = and !=, positive for > and >=
        import sympy
        ratio = sympy.simplify(a[2][0] / b[2][0])
        if ratio.free_symbols or ratio.is_finite is not True or ratio == 0:
            return False
        return ka == "eq" or a[1] == "\\ne" or ratio.is_positive is True
    if ka in ("set", "union"):  # unordered: greedy matching is enough for an equivalence relation
        rest = list(b[2])
        for x in a[2]:
            j = next((j for j, y in enumerate(rest) if _same(x, y, inexact)), None)
            if j is None:
                return False
            rest.pop(j)
        return True
    return all(_same(x, y, inexact) for x, y in zip(a[2], b[2]))


def _solves(eq, value) -> bool:
    """'y = 2x+3' was reduced to its value 2x+3; does the equation '2x - y + 3 = 0' say the same? Yes when it is
    linear in the one variable the value lacks, and substituting the value makes it vanish identically."""
    import sympy as sp
    e, missing = eq[2][0], eq[2][0].free_symbols - value.free_symbols
    if len(missing) != 1:
        return False
    v = missing.pop()
    c = e.diff(v)
    return bool(c.is_number and c != 0 and not (e - c * v).has(v) and sp.simplify(e.subs(v, value)) == 0)


def _maybe_point(x) -> bool:
    """'(3, 4)' with finite ends reads as a point as often as an open interval."""
    import sympy as sp
    return (_kind(x) == "seq" and x[1] == "()" and len(x[2]) == 2 and
            not any(_kind(v) is None and v.has(sp.oo, -sp.oo) for v in x[2]))


def _same_ratio(a, b, inexact: bool) -> bool:
    """'11:21' == '22:42' == '\\frac{11}{21}': ratios are equal when their terms are proportional."""
    if _kind(a) != "ratio":
        a, b = b, a
    if any(_kind(v) for v in a[2]) or (_kind(b) == "ratio" and any(_kind(v) for v in b[2])):
        return False
    if _kind(b) is None:
        return len(a[2]) == 2 and a[2][1] != 0 and _same_expr(a[2][0] / a[2][1], b, inexact)
    if _kind(b) != "ratio" or len(a[2]) != len(b[2]) or a[2][0] == 0 or b[2][0] == 0:
        return False
    return all(_same_expr(x / a[2][0], y / b[2][0], inexact) for x, y in zip(a[2][1:], b[2][1:]))


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
    if not syms and inexact and any(v.is_Rational and not _enough_digits(Fraction(v.p, v.q)) for v in (a, b)):
        return False  # a decimal of few digits against a value without a finite expansion (see _close)
    if inexact and _finite_decimals(a) and _finite_decimals(b):  # 0.5x vs 0.5000001x: exact, as for numbers
        inexact = False
    for j in range(3 if syms else 1):  # sympy Floats with 30 digits: no overflow at 2^2008
        pt = {s: sp.Rational(3 + 2 * k + j, 7 + j) for k, s in enumerate(syms)}
        _check_magnitudes(a, pt), _check_magnitudes(b, pt)
        x, y = sp.N(a, 30, subs=pt), sp.N(b, 30, subs=pt)
        if not (x.is_finite and y.is_finite):
            return False
        (xr, xi), (yr, yi) = x.as_real_imag(), y.as_real_imag()  # |x - y| <= tol * max(|x|, |y|), squared
        dr, di, tol = xr - yr, xi - yi, REL_TOL if inexact else 1e-20  # (sympy's abs and ** are slow here)
        if dr * dr + di * di > tol * tol * max(xr * xr + xi * xi, yr * yr + yi * yi):
            return False
    return inexact or not syms or sp.simplify(a - b) == 0


def _finite_decimals(e) -> bool:
    """Is every number in e a finite decimal (no 1/3, no pi, no sqrt 2, no function values)?"""
    import sympy as sp
    return (all(_terminates(r.q) for r in e.atoms(sp.Rational)) and not e.atoms(sp.NumberSymbol, sp.Function)
            and all(p.exp.is_Integer for p in e.atoms(sp.Pow)))


def _check_magnitudes(e, pt: dict) -> None:
    """Refuse to evaluate e at pt if a function or power would get an argument beyond 1e300. mpmath carries
    huge values in their exponents, but exp(10^2567) takes seconds and (x^y)!! at x=3/7 computes a gamma with
    10^10-bit numbers in C, which no deadline can interrupt. Children are checked before parents: each N() is cheap."""
    import sympy as sp
    for node in sp.postorder_traversal(e):
        if isinstance(node, (sp.Function, sp.Pow)):
            for v in (sp.N(arg, 15, subs=pt) for arg in node.args if not arg.is_Symbol):
                if not (v.is_finite and abs(v) < 1e300):
                    raise _Refuse("value too large to evaluate")


# ---- the time bound -----------------------------------------------------------------------------------------

class _Timeout(BaseException):
    """Raised by the deadline hook. A BaseException, so that sympy's own `except Exception` cannot swallow it."""


def _bounded(fn, *args):
    """fn(*args) within TIME_LIMIT_S of wall-clock time, in any thread; raises _Timeout when time is up.
    Two clocks, the same bound and the same verdicts: in the main thread, when the caller runs no interval timer
    of its own, SIGALRM interrupts the work for free; anywhere else (worker threads, a caller's timer running) a
    profile hook checks the clock at every function call, which costs about 2x on the symbolic layer."""
    if (threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
            and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)):
        return _bounded_by_alarm(fn, *args)
    return _bounded_by_hook(fn, *args)


def _bounded_by_alarm(fn, *args):
    def on_alarm(signum, frame):
        raise _Timeout()
    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, old)


def _bounded_by_hook(fn, *args):
    """sys.setprofile installs a hook for this thread only; Python calls it at every call and return of Python
    and C functions, so the parser, sympy and mpmath all pass by the clock. Signals and timers are untouched; a
    profiler the caller runs in this thread is paused for the call. Neither clock interrupts work inside one C
    call (big-int arithmetic): the parser keeps those small."""
    deadline = time.perf_counter() + TIME_LIMIT_S

    def hook(frame, event, arg):
        if time.perf_counter() > deadline:
            raise _Timeout()  # Python then removes the hook; the finally below restores the caller's one
    old = sys.getprofile()
    sys.setprofile(hook)
    try:
        result = fn(*args)
    finally:
        sys.setprofile(old)
    if time.perf_counter() > deadline:  # the _Timeout was swallowed by a bare `except:` somewhere: still late
        raise _Timeout()
    return result


def _symbolic(g: str, p: str) -> bool:
    inexact = bool(re.search(r"\d\.|\.\d", g + " " + p))
    return _same(_parse(g), _parse(p), inexact)


@lru_cache(maxsize=None)
def _sympy_ready() -> bool:
    """Import sympy and simplify once outside the deadline: the first call loads submodules (~1 s)."""
    import sympy
    x = sympy.Symbol("x")
    return sympy.simplify(sympy.cot(x) - sympy.cos(x) / sympy.sin(x)) == 0


# ---- the API: judge / is_equiv compare answers, grade_detail / grade grade completions --------------------------

def judge(gold, pred) -> Verdict:
    """Compare a predicted final answer with the gold one; never raises, time-bounded in any thread.
    judge('x \\in [-2,7]', '-2 \\le x \\le 7').correct -> True;  judge('5', None).reason -> 'no answer'"""
    if gold is None or pred is None or not str(pred).strip():
        return Verdict(False, gold, pred, "no answer")
    gold, pred = str(gold), str(pred)
    try:
        if len(gold) > MAX_ANSWER_CHARS or len(pred) > MAX_ANSWER_CHARS:
            ok = gold.strip() == pred.strip()
            return Verdict(ok, gold, pred, f"longer than {MAX_ANSWER_CHARS} chars: compared as strings")
        g, p = (_norm(_final_boxes(x) or x if "\\boxed" in x else x) for x in (gold, pred))  # '\boxed{1}, \boxed{2}'
        if not g:
            return Verdict(False, gold, pred, "empty gold answer")
        if g == p:
            return Verdict(True, gold, pred, "same string")
        x, y = _number(g), _number(p)
        if x and not y and not re.search(r",\s", pred):  # '1000,99' in a prediction; a gold's '3,5' is a list
            y = _decimal_comma(p)
        if x and y:  # '25%' also matches 0.25
            pct = re.compile(r"%|(?i:percent)")
            xs = [x[0]] + [x[0] / 100] * bool(pct.search(gold))
            ys = [y[0]] + [y[0] / 100] * bool(pct.search(pred))
            ok = any(_close(u, v, x[1] or y[1]) for u in xs for v in ys)
            return Verdict(ok, gold, pred, "same number" if ok else "different numbers")
        if re.fullmatch(r"[a-z]{3,}", g) or re.fullmatch(r"[a-z]{3,}", p):  # words ('east') compare as words
            return Verdict(False, gold, pred, "different words")
        _sympy_ready()
        try:
            ok = _bounded(_symbolic, g, p)
        except _Timeout:
            return Verdict(False, gold, pred, f"time limit ({TIME_LIMIT_S} s) reached in the symbolic layer: "
                                              "not equivalent", True)
        return Verdict(ok, gold, pred, "same value" if ok else "different")
    except _Refuse as e:
        return Verdict(False, gold, pred, f"not comparable ({e})")
    except Exception as e:  # anything sympy raises: not equivalent, and say what happened
        return Verdict(False, gold, pred, f"not comparable ({type(e).__name__})")
    except _Timeout:
        return Verdict(False, gold, pred, "time limit reached", True)


def is_equiv(gold, pred) -> bool:
    """Is the predicted final answer the same as the gold one? Never raises, time-bounded in any thread.
    is_equiv(r'\\frac{1}{2}', '0.5') -> True;  is_equiv('(1,2)', '[1,2]') -> False;  is_equiv('5', None) -> False"""
    return judge(gold, pred).correct


def grade_detail(completion: str, gold, mode: str = "strict") -> Verdict:
    """Reward check with its evidence: the answer extracted from the completion (extract_answer(completion, mode)),
    compared with the gold. mode="strict" (the RL reward) needs a final-answer marker; mode="flexible" also reads
    the last expression of an unmarked completion. Boxes written side by side are one answer ('\\boxed{1},
    \\boxed{2}' matches the gold '1, 2'); against a gold that is one value, only the last box counts, as in MATH's
    own answers ('\\boxed{12}, \\boxed{18}' matches '18'): boxing several guesses never gains anything.
    grade_detail('so \\boxed{18}.', '18') -> Verdict(correct=True, gold='18', pred='18', reason='same string', ..)
    grade_detail('so it is 18.', '18').reason -> 'no answer';  grade_detail('so it is 18.', '18', 'flexible') -> True"""
    pred = extract_answer(completion, mode)
    verdict = judge(gold, pred)
    if not verdict.correct and pred is not None and gold is not None:
        last = _last_boxed(completion)
        if last is not None and last != pred and len(_split(_norm(str(gold)), ",")) == 1 and "\\pm" not in str(gold):
            return judge(gold, last)
    return verdict


def grade(completion: str, gold, mode: str = "strict") -> bool:
    """Reward check: grade('... so the total is \\boxed{18}.', '18') -> True;  grade('it is 18', '18') -> False;
    grade('it is 18', '18', mode='flexible') -> True"""
    return grade_detail(completion, gold, mode).correct


# ---- dataset loaders: JSONL files -> [{"question", "answer", ...metadata}] ----
# Every record is read strictly (one ValueError 'file:line: why' for anything wrong), with two rules for text:
# - a gold answer must be something an answer can match: an empty one, a JSON number that is not finite (NaN,
#   Infinity, 1e999) and the text 'nan' are refused, naming the line (the grader would mark every answer to
#   them wrong, or right for the wrong reason). 'inf' or '\infty' as text is infinity, a real answer, and kept.
# - a lone UTF-16 surrogate (JSON "\ud800", which no UTF-8 text can hold) is replaced by U+FFFD, with one
#   warning per file: the record is kept and can be tokenized, graded, printed and written.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_surrogates(x, counter: list):
    """x with every lone surrogate in its strings (keys too) replaced by U+FFFD; counter[0] counts the strings."""
    if isinstance(x, str):
        if _SURROGATE.search(x):
            counter[0] += 1
            return _SURROGATE.sub("\ufffd", x)
        return x
    if isinstance(x, list):
        return [_no_surrogates(v, counter) for v in x]
    if isinstance(x, dict):
        return {_no_surrogates(k, counter): _no_surrogates(v, counter) for k, v in x.items()}
    return x


def _records(path):
    """Yield (line_number, dict) of a JSONL file; a malformed line raises ValueError('file:line: why'), and so
    does a file that cannot be read (no permission)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: data file not found")
    if not path.is_file():  # a folder, or a FIFO that would block the read
        raise ValueError(f"{path}: not a regular file")
    try:
        f = open(path, "rb")  # bytes, decoded line by line: a bad byte is reported with its line
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    replaced, lines = [0], []
    with f:
        for n, raw in _lines(f, path):
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
            if "\\u" in line:  # (only a \u escape can give a lone surrogate: strict UTF-8 holds none)
                before = replaced[0]
                rec = _no_surrogates(rec, replaced)
                if replaced[0] > before:
                    lines.append(n)
            yield n, rec
    if lines:
        warnings.warn(f"{path}: lone UTF-16 surrogates replaced by U+FFFD on {len(lines)} line(s): "
                      f"{', '.join(map(str, lines[:5]))}{', ...' if len(lines) > 5 else ''}")


def _lines(f, path):
    """(line number, bytes) of an open file; a read error (EIO) is a ValueError naming the file."""
    n = 0
    while True:
        try:
            raw = f.readline()
        except OSError as e:
            raise ValueError(f"{path}:{n + 1}: cannot read ({e.strerror})") from None
        if not raw:
            return
        n += 1
        yield n, raw


def _field(rec: dict, where: str, *names: str) -> str:
    for k in names:
        if isinstance(rec.get(k), (str, int, float)) and not isinstance(rec.get(k), bool):
            return str(rec[k])
    raise ValueError(f"{where}: missing field {' or '.join(map(repr, names))}")


def _gold(rec: dict, where: str, *names: str) -> str:
    """The gold answer field of a record (_field), refused if nothing can match it (see the top of the loaders)."""
    value = next((rec[k] for k in names if k in rec and not isinstance(rec[k], bool)), None)
    if isinstance(value, float) and not abs(value) < float("inf"):  # NaN, Infinity, 1e999
        raise ValueError(f"{where}: the gold answer is {value} (a JSON number that is not finite); not an answer")
    return _checked_gold(_field(rec, where, *names), where)


def _checked_gold(answer: str, where: str) -> str:
    if not answer.strip():
        raise ValueError(f"{where}: the gold answer is empty")
    if answer.strip().lower().lstrip("+-") == "nan":
        raise ValueError(f"{where}: the gold answer is {answer.strip()!r}, not a number; not an answer")
    return answer


def load_gsm8k(path) -> list[dict]:
    """GSM8K: {"question", "answer": "...\\n#### 1,000"} -> {"question", "answer": "1000", "solution", "id"}."""
    out = []
    for n, r in _records(path):
        sol = _field(r, f"{path}:{n}", "answer")
        if "####" not in sol:
            raise ValueError(f"{path}:{n}: answer has no '#### N' line")
        answer = _checked_gold(sol.rsplit("####", 1)[1].strip().replace(",", ""), f"{path}:{n}")
        out.append({"question": _field(r, f"{path}:{n}", "question"), "solution": sol,
                    "answer": answer, "id": f"{Path(path).stem}/{n}"})
    return out


def load_math(path) -> list[dict]:
    """MATH / MATH-500: {"problem", "solution", ["answer"], "type"|"subject", "level"} -> {"question",
    "answer" (the answer field, else the last \\boxed{} of the solution), "solution", "subject", "level", "id"}."""
    out = []
    for n, r in _records(path):
        sol = _field(r, f"{path}:{n}", "solution")
        ans = _gold(r, f"{path}:{n}", "answer") if "answer" in r else _last_boxed(sol)
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
             "answer": _gold(r, f"{path}:{n}", "answer")} for n, r in _records(path)]


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


# ---- command line: python -m support.grader FILE.jsonl -------------------------------------------------------------------

def _expected(value, where: str):
    if value is None or isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
        return value.strip().lower() in ("true", "yes")
    raise ValueError(f"{where}: 'expected' must be true/false, got {value!r}")


def grade_file(path, mode: str = "flexible") -> list[dict]:
    """Verdicts of a JSONL file of {"gold" | "answer", "prediction" | "completion"[, "expected"][, "category"]}.
    A "completion" is a model's whole output (its final answer is extracted in `mode`); a "prediction" is an answer,
    or an output with a marked answer. Reads and checks the whole file before grading anything."""
    rows = []
    for n, rec in _records(path):
        where = f"{path}:{n}"
        gold = _gold(rec, where, "gold", "answer")
        text = _field(rec, where, "completion" if "completion" in rec else "prediction", "pred")
        rows.append((n, rec, gold, text, _expected(rec.get("expected"), where)))
    if not rows:
        raise ValueError(f"{path}: no records")
    out = []
    for n, rec, gold, text, expected in rows:
        # a completion's answer is extracted; a prediction is an answer, unless it marks one (\boxed, 'answer is')
        bare = "completion" not in rec and extract_answer(text) is None
        v = judge(gold, text) if bare else grade_detail(text, gold, mode)
        row = {"line": n, "gold": gold, "extracted": v.pred, "correct": v.correct, "reason": v.reason,
               "timed_out": v.timed_out}
        if expected is not None:
            row["expected"] = expected
        if "category" in rec:
            row["category"] = str(rec["category"])
        out.append(row)
    return out


def agreement(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """{category: (agreeing, total)} over rows that carry an expected verdict; 'all' sums them."""
    table: dict[str, list[int]] = {}
    for r in rows:
        if "expected" in r:
            for key in ("all", r.get("category")) if r.get("category") else ("all",):
                cell = table.setdefault(key, [0, 0])
                cell[0] += r["correct"] == r["expected"]
                cell[1] += 1
    return {k: (a, n) for k, (a, n) in table.items()}


def main(argv=None) -> int:
    """`python -m support.grader FILE.jsonl [--out F]`: bad input, an --out that cannot be written (checked before
    grading) and Ctrl-C are one `error:` line each (safe_io.run_cli); --out is replaced whole or not at all."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m support.grader", description="Grade (gold, prediction) records of a "
                                 "JSONL file; print each verdict with the extracted answer as JSONL.")
    ap.add_argument("file", help='JSONL: {"gold", "prediction" or "completion", optional "expected", "category"}')
    ap.add_argument("--out", help="write the verdicts here instead of stdout")
    ap.add_argument("--mode", choices=MODES, default="flexible", help="extraction from completions: strict needs a "
                    "final-answer marker (the RL reward); flexible (default) also reads the last expression")
    args = ap.parse_args(argv)
    if args.out:
        run_cli(check_out_file, args.out)
    run_cli(_grade_cli, args)
    return 0


def _grade_cli(args):
    try:
        with warnings.catch_warnings(record=True) as notes:  # (a lone surrogate replaced): one `note:` line each
            warnings.simplefilter("always")
            rows = grade_file(args.file, args.mode)
    except (OSError, ValueError) as e:
        raise SwarrError(str(e)) from None
    for w in notes:
        print(f"note: {w.message}", file=sys.stderr)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.out:
        write_text_atomic(args.out, text)  # an existing file is replaced whole or not at all
    else:
        sys.stdout.write(text)
    n_right = sum(r["correct"] for r in rows)
    print(f"graded {len(rows)} records: {n_right} correct, {sum(r['timed_out'] for r in rows)} timed out",
          file=sys.stderr)
    for key, (a, n) in sorted(agreement(rows).items(), key=lambda kv: (kv[0] != "all", kv[0])):
        print(f"agreement with expected verdicts [{key}]: {a}/{n} = {a / n:.3f}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
