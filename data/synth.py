"""The embedded default task: sums of products, solvable in two natural trace styles.

A problem is a short sum of single-digit products, e.g. "3*4+5*2+6*7+2*9" (answer 82). A solution works
through the terms one line at a time, keeping a running total, and ends in \\boxed{N}. It comes in two styles
that do the same arithmetic in the same order and differ only in where the next term is read from:

    direct: (the "far" style)                  step by step: (the "near" style)
    3*4=12                                     3*4=12, left 5*2+6*7+2*9
    5*2=10 so 12+10=22                         5*2=10 so 12+10=22, left 6*7+2*9
    6*7=42 so 22+42=64                         6*7=42 so 22+42=64, left 2*9
    2*9=18 so 64+18=82                         2*9=18 so 64+18=82
    \\boxed{82}                                 \\boxed{82}

"direct" reads every term from the question itself, ever further back as the trace grows: natural for a
model that can attend to everything. "step by step" restates the terms still left at the end of each line,
so everything a line needs (its term, the previous total, the rest of the list) is in the line before it.
Nothing here knows about attention windows; `lookback` only measures, after the fact, how far back a
trace reuses values, which is what decides whether a sliding-window model can follow it.

Training traces are "written for full attention": mostly direct, a minority (`near_share`, default 0.2)
step by step. The first word of the answer names the style, so a model that imitates the data picks
"step by step" about near_share of the time. Problems come from a seeded generator; train and test sets
use disjoint seeds and `split` keeps test problems out of training sets.

    >>> p = make_problem(random.Random(0))
    >>> p.prompt, p.answer, style_of(solve(p, "near"))
    ('7*1+5*9+8*7+5*8+6*4', 172, 'near')

How far back the traces reach, in tokens of the shipped tokenizer (chat-wrapped prompt; `lookback`):
    4 terms: direct 46-55, step by step 29-30      5 terms: direct 61-74, step by step 33-34
so any window W with 35 <= W <= 46 separates them (the demo uses W = 40).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

FAR, NEAR = "far", "near"
MARKERS = {FAR: "direct:", NEAR: "step by step:"}   # the first words of an answer name its style
NEAR_SHARE = 0.2       # share of "step by step" traces in the SFT data (traces written for full attention)
TERMS = (4, 5)         # a problem has 4 or 5 products
FACTORS = (1, 9)       # single-digit factors


@dataclass(frozen=True)
class Problem:
    terms: tuple  # ((a, b), ...): the products, in order; no product appears twice

    @property
    def prompt(self) -> str:
        return "+".join(f"{a}*{b}" for a, b in self.terms)

    @property
    def answer(self) -> int:
        return sum(a * b for a, b in self.terms)


def make_problem(rng: random.Random, terms=TERMS, factors=FACTORS) -> Problem:
    """One problem: n in [terms[0], terms[1]] distinct products of factors in [factors[0], factors[1]]."""
    n = rng.randint(*terms)
    out = []
    while len(out) < n:
        t = (rng.randint(*factors), rng.randint(*factors))
        if t not in out:
            out.append(t)
    return Problem(tuple(out))


def solve(p: Problem, style: str) -> str:
    """The worked solution of problem p in style FAR ("direct") or NEAR ("step by step")."""
    if style not in MARKERS:
        raise ValueError(f"style must be {FAR!r} or {NEAR!r}, got {style!r}")
    lines, total = [MARKERS[style]], 0
    for i, (a, b) in enumerate(p.terms):
        line = f"{a}*{b}={a * b}" if i == 0 else f"{a}*{b}={a * b} so {total}+{a * b}={total + a * b}"
        total += a * b
        rest = p.terms[i + 1:]
        if style == NEAR and rest:
            line += ", left " + "+".join(f"{x}*{y}" for x, y in rest)
        lines.append(line)
    lines.append(f"\\boxed{{{total}}}")
    return "\n".join(lines)


def style_of(completion: str) -> str | None:
    """FAR, NEAR, or None, from the marker that opens the completion."""
    s = completion.lstrip()
    return next((st for st, m in MARKERS.items() if s.startswith(m)), None)


def problems(n: int, seed: int, exclude=(), **kw) -> list[Problem]:
    """n distinct problems from a seeded generator, none of them in `exclude` (e.g. the test set)."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        p = make_problem(rng, **kw)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


TEST_SEED = 1_000_003  # the held-out problems come from this seed; training sets exclude them


def split(n_train: int, n_test: int, seed: int = 0, **kw) -> tuple[list[Problem], list[Problem]]:
    """Training problems (from `seed`) and held-out test problems (from TEST_SEED), disjoint."""
    test = problems(n_test, TEST_SEED, **kw)
    return problems(n_train, seed, exclude=test, **kw), test


def sft_pairs(probs: list[Problem], near_share: float = NEAR_SHARE, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, response) pairs: each problem solved in the near style with probability near_share."""
    rng = random.Random(seed)
    return [(p.prompt, solve(p, NEAR if rng.random() < near_share else FAR)) for p in probs]


def corpus(n: int, seed: int) -> list[str]:
    """Pretraining text: plain (unwrapped) problems with solutions of both styles in equal parts, so the base
    model can do the arithmetic and copying but has never seen the chat format the SFT data uses."""
    rng = random.Random(seed)
    return [f"{p.prompt}\n{solve(p, rng.choice([FAR, NEAR]))}" for p in problems(n, seed)]


# ---- measuring a trace (for tables; the generator above never uses these) --------------------------------
TERM = re.compile(r"\d\*\d")
SUM = re.compile(r"(\d+)\+(\d+)=")


def lookback(tok, text: str, start: int = 0) -> int:
    """How far back, in tokens, the part of `text` from character `start` on reuses values: for each term
    a*b, and each operand of a sum x+y=, the token distance to the nearest earlier occurrence of the same
    string. Returns the largest distance (0 if nothing is reused). A sliding-window model with window W can
    only copy what is fewer than W tokens back, so a trace with lookback >= W needs something it cannot see.
    `tok` is a swarr.Tokenizer; `text` is prompt + completion (chat wrapped or not)."""
    ids = tok.encode(text)
    ends, pos = [], 0  # char offset where each token ends
    for t in ids:
        pos += len(tok.decode([t]))
        ends.append(pos)

    def token_at(c):  # index of the token holding character c
        lo, hi = 0, len(ends) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if ends[mid] > c:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def numbers_and_terms(upto):  # (string, char offset) of every term and number before `upto`
        out = [(m.group(), m.start()) for m in TERM.finditer(text, 0, upto)]
        out += [(m.group(), m.start()) for m in re.finditer(r"(?<![\d*])\d+(?![\d*])", text[:upto])]
        return out

    uses = [(m.group(), m.start()) for m in TERM.finditer(text, start)]
    uses += [(m.group(g), m.start(g)) for m in SUM.finditer(text, start) for g in (1, 2)]
    best = 0
    for s, c in uses:
        prev = [o for v, o in numbers_and_terms(c) if v == s]
        if prev:
            best = max(best, token_at(c) - token_at(max(prev)))
    return best
