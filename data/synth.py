"""The embedded default task: sums of products, where every line of a solution may or may not restate what is left.

A problem is a short sum of single-digit products, e.g. "3*4+5*2+6*7+2*9" (answer 82). A solution works
through the terms one line at a time, keeping a running total, and ends in \\boxed{N}. Each line except the last
may end by restating the terms still to come (", left ..."), or not:

    3*4=12, left 5*2+6*7+2*9          <- restated: the next line reads 5*2 from here
    5*2=10 so 12+10=22                <- not restated: the next line must find 6*7 further back
    6*7=42 so 22+42=64, left 2*9
    2*9=18 so 64+18=82
    \\boxed{82}

Every choice gives the same arithmetic in the same order and the same answer; what the choices decide is where
the next term is read from: the latest restatement, or, when there is none, the question itself, ever further
back as the trace grows. There is no word that names a style: the choice is made again at every line.

Training traces are "written for full attention": each line restates independently with probability
RESTATE_RATE (0.25), so most lines do not. A trace whose lines restate often enough, at the right places, reuses
only values a few lines back; one that rarely restates reaches back to the question. Nothing here knows about
attention windows: `lookback` only measures, after the fact, how far back a trace reuses values, which is what
decides whether a sliding-window model can follow it.

    >>> p = make_problem(random.Random(0))
    >>> p.prompt, p.answer
    ('7*1+5*9+8*7+5*8+6*4', 172)
    >>> restated(solve(p, [True, False, False, True]))
    [True, False, False, True]

How far back the traces reach, in tokens of the shipped tokenizer (chat-wrapped prompt; `lookback`):
restating at every line 24-28 (4 terms), 28-32 (5 terms); restating nowhere 43-52 and 58-71; the other patterns
lie in between (tests/test_data.py, README.md).
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import torch

RESTATE_RATE = 0.25    # per line, in the SFT data (traces written for full attention)
CORPUS_RATE = 0.5      # per line, in the pretraining text (the base model knows both kinds of line equally)
TERMS = (4, 5)         # a problem has 4 or 5 products (the pretraining text has no longer ones)
FACTORS = (1, 9)       # single-digit factors
LEFT = ", left "       # how a line restates the terms still to come


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


def solve(p: Problem, restate) -> str:
    """The worked solution of problem p. restate[i] says whether line i (0-based) restates the terms after it;
    it has one entry per line that has terms after it (len(p.terms) - 1 entries)."""
    restate = list(restate)
    if len(restate) != len(p.terms) - 1:
        raise ValueError(f"restate needs {len(p.terms) - 1} entries (one per line but the last), got {len(restate)}")
    lines, total = [], 0
    for i, (a, b) in enumerate(p.terms):
        line = f"{a}*{b}={a * b}" if i == 0 else f"{a}*{b}={a * b} so {total}+{a * b}={total + a * b}"
        total += a * b
        if i < len(restate) and restate[i]:
            line += LEFT + "+".join(f"{x}*{y}" for x, y in p.terms[i + 1:])
        lines.append(line)
    lines.append(f"\\boxed{{{total}}}")
    return "\n".join(lines)


def sample_solution(p: Problem, rate: float, rng: random.Random) -> str:
    """A solution whose lines restate independently, each with probability `rate`."""
    return solve(p, [rng.random() < rate for _ in p.terms[1:]])


def restated(completion: str) -> list[bool]:
    """For each line of a completion that works a term and is not the last such line: does it restate?
    (Measured on any text, the model's included; lines that are not of the form 'a*b=...' are skipped.)"""
    work = [ln for ln in completion.split("\n") if re.match(r"\s*\d\*\d=", ln)]
    return [LEFT.strip() in ln for ln in work[:-1]]


def restate_counts(completion: str) -> tuple[int, int]:
    """(lines that restate, lines that could), over the completion's working lines but the last."""
    r = restated(completion)
    return sum(r), len(r)


def pattern(completion: str) -> str:
    """How a completion's lines restate: "all" of those that could, "some", or "none" (also when none could)."""
    k, n = restate_counts(completion)
    return "all" if n and k == n else "some" if k else "none"


def problems(n: int, seed: int, exclude=(), **kw) -> list[Problem]:
    """n distinct problems from a seeded generator, none of them in `exclude` (e.g. the test set)."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        p = make_problem(rng, **kw)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


TEST_SEED = 1_000_003   # the held-out test problems come from this seed; training sets exclude them
VALID_SEED = 2_000_003  # the validation problems (for choosing settings), disjoint from test and training


def split(n_train: int, n_test: int, seed: int = 0, n_valid: int = 0, **kw):
    """(train, test) -- or (train, test, valid) when n_valid > 0: training problems from `seed`, held-out test
    problems from TEST_SEED, validation problems from VALID_SEED; the three sets are pairwise disjoint."""
    test = problems(n_test, TEST_SEED, **kw)
    valid = problems(n_valid, VALID_SEED, exclude=test, **kw) if n_valid else []
    train = problems(n_train, seed, exclude=test + valid, **kw)
    return (train, test, valid) if n_valid else (train, test)


def sft_pairs(probs: list[Problem], rate: float = RESTATE_RATE, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, response) pairs; each line of each response restates with probability `rate`, independently."""
    rng = random.Random(seed)
    return [(p.prompt, sample_solution(p, rate, rng)) for p in probs]


def corpus(n: int, seed: int, rate: float = CORPUS_RATE) -> list[str]:
    """Pretraining text: plain (unwrapped) problems with solutions whose lines restate half the time, so the
    base model can do the arithmetic and the copying but has never seen the chat format the SFT data uses."""
    rng = random.Random(seed)
    return [f"{p.prompt}\n{sample_solution(p, rate, rng)}" for p in problems(n, seed)]


# ---- intervening on a trace: constrained decoding on the line pattern (the demo's --ablations) ------------
WORKED = (re.compile(r"\d\*\d=\d+"), re.compile(r"\d\*\d=\d+ so \d+\+\d+=\d+"))  # line 0, later lines


class LineConstraint:
    """swarr.generate's `constrain` for this task: "forced" makes every working line that has terms after it
    restate, "banned" makes none restate; the model writes everything else, the restated terms included.
    Forced: once such a line's last number is written (WORKED matches the whole line), the only tokens allowed
    are more digits or the next characters of LEFT. Banned: on a working line no token may bring a ','. Rows are
    the samples of generate (row r belongs to prompt r // samples); n_terms[r] is that problem's term count."""

    def __init__(self, tok, vocab_size: int, mode: str, n_terms: list[int]):
        assert mode in ("forced", "banned"), mode
        self.mode, self.n_terms, self.texts = mode, n_terms, [tok.decode([i]) for i in range(vocab_size)]
        self.comma = torch.tensor([LEFT[0] in t for t in self.texts])
        # allowed[k]: what may follow a line whose last number is followed by the first k characters of LEFT
        # (digits, which continue the number, only while k = 0)
        self.allowed = {k: torch.tensor([(k == 0 and t.isdigit()) or LEFT.startswith(LEFT[:k] + t) and t != ""
                                         or (LEFT[:k] + t).startswith(LEFT) for t in self.texts])
                        for k in range(len(LEFT))}
        self.done = [""] * len(n_terms)

    @classmethod
    def of(cls, tok, vocab_size: int, mode: str, prompts: list[str], samples: int = 1):
        """The constraint for these chat prompts (each holding its problem, e.g. '3*4+5*2'), `samples` rows each."""
        return cls(tok, vocab_size, mode, [len(TERM.findall(p)) for p in prompts for _ in range(samples)])

    def __call__(self, logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        for r in range(logits.shape[0]):
            if out.shape[1]:
                self.done[r] += self.texts[int(out[r, -1])]
            lines = self.done[r].split("\n")
            line, worked = lines[-1], sum(bool(re.match(r"\d\*\d=", ln)) for ln in lines[:-1])
            if not re.match(r"\d\*\d=", line) or worked >= self.n_terms[r] - 1:
                continue  # not a working line, or the last one: nothing to restate
            if self.mode == "banned":
                logits[r, self.comma.to(logits.device)] = -math.inf
                continue
            m = next((k for k in range(len(LEFT)) if WORKED[min(worked, 1)].fullmatch(line[:len(line) - k] or "-")
                      and line.endswith(LEFT[:k])), None)
            if m is not None:
                logits[r, ~self.allowed[m].to(logits.device)] = -math.inf
        return logits


# ---- measuring a trace (for tables; the generator above never uses these) --------------------------------
TERM = re.compile(r"\d\*\d")
SUM = re.compile(r"(\d+)\+(\d+)=")


def lookback(tok, text: str, start: int = 0) -> int:
    """How far back, in tokens, the part of `text` from character `start` on reuses values: for each term
    a*b, and each operand of a sum x+y=, the token distance to the nearest earlier occurrence of the same
    string. Returns the largest distance (0 if nothing is reused). A copied token at position i is emitted by the
    query at position i-1, which sees keys i-W .. i-1 under a window of W keys; so one windowed layer can copy
    from d <= W tokens back. Stacked windowed layers can relay information further (up to layers x (W-1)), so
    lookback > W makes a trace hard for a sliding-window model, not impossible.
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


def trace_stats(tok, prompts: list[str], completions: list[str]) -> dict:
    """Traces' per-line restatement rate, and the distribution of how far back they reach (lookback, tokens):
    p10, median, p90, max, and every value sorted (lookbacks)."""
    counts = [restate_counts(c) for c in completions]
    reach = sorted(lookback(tok, p + c, len(p)) for p, c in zip(prompts, completions))
    q = lambda f: reach[min(len(reach) - 1, int(f * len(reach)))]  # noqa: E731
    return dict(restate_rate=sum(c[0] for c in counts) / max(1, sum(c[1] for c in counts)),
                lookback=dict(p10=q(0.1), median=q(0.5), p90=q(0.9), max=reach[-1]), lookbacks=reach)
