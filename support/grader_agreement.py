r"""Differential harness: our grader (support.grader, flexible mode) against math-verify, the field's reference, on
model-like rewrites of the datasets' own answers, each with the verdict it must get by construction.

    python -m support.grader_agreement [--n 6000] [--seed 0] [--out pairs.jsonl] [--data ../shared/data]

Pairs (gold, prediction, expected) come from the answers of MATH train, MATH-500 and GSM8K (train and test); each
rewrite kind says what a model does to an answer:
    bare           the answer alone, no marker                                          expected: correct
    prose          inside a sentence, in LaTeX or plain text                            expected: correct
    boxed_twice    boxed, then boxed again after a check                                expected: correct
    number_format  thousands separators, decimal commas (1,5 and 1.234,5), currency, trailing zeros: correct
    reorder        a set's items shuffled (correct); a tuple's items swapped (wrong)
    algebraic      an equivalent form: a/b for \frac{a}{b}, decimals, terms reordered, \sqrt{a^2 b}: correct
    interval_ineq  an interval or union as an inequality, 'x \in I' or set-builder notation   expected: correct
    near_miss      one number off by one, a bracket flipped, a fraction inverted, an item dropped, a rounding: wrong
math-verify parses the gold as '$gold$' and the whole prediction text, then verify(gold, prediction), as its README
does. Printed per kind: agreement of ours with math-verify, of each with the expected verdict, and the adjudicated
agreement (ours equals math-verify, or they differ and ours gives the expected verdict). docs/GRADER_AGREEMENT.md
explains every disagreement class. math-verify is a test-only dependency (requirements-test.txt).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import time
import warnings
from fractions import Fraction
from pathlib import Path

from . import grader

KINDS = ("bare", "prose", "boxed_twice", "number_format", "reorder", "algebraic", "interval_ineq", "near_miss")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
T, F = True, False


# ---- the gold answers ------------------------------------------------------------------------------------------

def load_golds(data: Path = DATA) -> dict[str, list[str]]:
    """{source: [gold answer, ...]} from MATH train, MATH-500 and GSM8K train + test, in file order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MATH train: 2 solutions with an empty \boxed{}
        return {"math_train": [r["answer"] for r in grader.load_math(data / "math" / "train.jsonl")],
                "math500": [r["answer"] for r in grader.load_math(data / "math500" / "test.jsonl")],
                "gsm8k": [r["answer"] for f in ("test", "train") for r in grader.load_gsm8k(data / "gsm8k" / f"{f}.jsonl")]}


# ---- rewrites: gold -> [(kind, prediction text, expected verdict)] ------------------------------------------------

_INT = re.compile(r"-?\d+")
_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def _top_split(s: str, sep: str = ",") -> list[str]:
    return [p.strip() for p in grader._split(s, sep)]


def _set_items(g: str) -> list[str] | None:
    """Items of an unordered answer: '1, -2' or '\\{1, -2\\}' (not a tuple, interval or named values)."""
    body = g[2:-2] if g.startswith("\\{") and g.endswith("\\}") else g
    if re.search(r"\\begin|\\text|\\mbox|,\\!|\{,\}", body):  # matrices, prose, thousands separators ('12,\!650')
        return None
    items = _top_split(body)
    if len(items) < 2 or any(not it or "=" in it or "\\le" in it or "<" in it or ">" in it for it in items):
        return None
    if body is g and (g[:1] in "([" or re.search(r"\d,\d{3}(?!\d)", g)):
        return None
    return items if len(set(items)) == len(items) else None


def _tuple_items(g: str) -> list[str] | None:
    m = re.fullmatch(r"\\left\s*\((.*)\\right\s*\)|\((.*)\)", g.strip())
    if not m:
        return None
    items = _top_split(m.group(1) or m.group(2))
    return items if len(items) >= 2 and len(set(items)) == len(items) and "\\infty" not in g else None


def _interval(g: str):
    """An interval or union of intervals with explicit ends -> [(lo, hi, lo_closed, hi_closed)], else None."""
    g = re.sub(r"\\left|\\right|\s", "", g)
    out = []
    for part in g.split("\\cup"):
        m = re.fullmatch(r"([(\[])([^,()\[\]]+|[^,]*\\frac\{[^{}]*\}\{[^{}]*\}[^,]*),([^,]+)([)\]])", part)
        if not m or re.search(r"[a-zA-Z]", re.sub(r"\\[a-zA-Z]+", "", m.group(2) + m.group(3))):
            return None  # ends with variables ('[a+b, b]') are not numbers a solution set can be checked with
        out.append((m.group(2), m.group(3), m.group(1) == "[", m.group(4) == "]"))
    if len(out) == 1 and not (out[0][2] or out[0][3]) and "infty" not in out[0][0] + out[0][1]:
        return None  # '(3, 4)' may be a point: not an interval by construction (see _maybe_point in the grader)
    return out


def _inequality(parts) -> str:
    """[(lo, hi, lc, hc)] -> 'a \\le x < b \\text{ or } x > c'."""
    conds = []
    for lo, hi, lc, hc in parts:
        le, lt = "\\le", "<"
        left = "" if "infty" in lo else f"{lo} {le if lc else lt} "
        right = "" if "infty" in hi else f" {le if hc else lt} {hi}"
        conds.append(f"{left}x{right}" if left or right else "x \\in \\mathbb{R}")
    return " \\text{ or } ".join(conds)


def _fraction_value(g: str) -> Fraction | None:
    m = re.fullmatch(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", g.strip())
    if m and int(m.group(3)):
        v = Fraction(int(m.group(2)), int(m.group(3)))
        return -v if m.group(1) else v
    return None


def _plain_number(g: str) -> str | None:
    g = g.strip().replace("\\$", "").replace("\\!", "").replace("{,}", ",")
    g = re.sub(r"^(-?\d{1,3}(?:,\d{3})+)(\.\d+)?$", lambda m: m.group(1).replace(",", "") + (m.group(2) or ""), g)
    return g if _NUM.fullmatch(g) else None


def _thousands(n: str, sep: str = ",", dec: str = ".") -> str:
    sign, rest = ("-", n[1:]) if n.startswith("-") else ("", n)
    whole, _, frac = rest.partition(".")
    groups = []
    while len(whole) > 3:
        whole, groups = whole[:-3], [whole[-3:]] + groups
    return sign + sep.join([whole] + groups) + (dec + frac if frac else "")


def _terms(g: str) -> list[str] | None:
    """Top-level terms of a sum, each with its sign: 'x^2 - 3x + 1' -> ['+x^2', '-3x', '+1']."""
    if re.search(r"[=<>,]|\\(?:le|ge|pm|cup|text|begin|in)\b", g):
        return None
    terms, depth, start = [], 0, 0
    for i, c in enumerate(g):
        depth += (c in "({[") - (c in ")}]")
        if depth == 0 and c in "+-" and i > 0 and g[i - 1] not in "^_{(" and g[:i].strip():
            terms.append(g[start:i].strip())
            start = i
    terms.append(g[start:].strip())
    terms = [t if t[:1] in "+-" else "+" + t for t in terms if t]
    return terms if len(terms) >= 2 and all(len(t) > 1 for t in terms) else None


def _near_misses(g: str, rng: random.Random) -> list[str]:
    out = []
    ints = list(_INT.finditer(g))
    if ints and not re.search(r"\\(?:mbox|text)\{[^{}]*\}\^", g):  # the last integer off by one (not a unit's power)
        m = ints[-1]
        out.append(g[:m.start()] + str(int(m.group()) + rng.choice([1, -1] if int(m.group()) > 1 else [1])) + g[m.end():])
    iv = _interval(g)
    if iv:  # one bracket flipped: an end included or excluded wrongly
        s = g.rstrip()
        flip = {")": "]", "]": ")"}
        if s[-1] in flip and "infty" not in s[-12:]:
            out.append(s[:-1] + flip[s[-1]])
    v = _fraction_value(g)
    if v is not None and v.numerator != v.denominator and v != 0:
        out.append(f"\\frac{{{v.denominator}}}{{{abs(v.numerator)}}}" if v > 0 else f"-\\frac{{{v.denominator}}}{{{-v.numerator}}}")
    items = _set_items(g)
    if items and len(items) >= 2:
        out.append(", ".join(items[:-1]))
    if re.fullmatch(r"\\sqrt\{?\d+\}?|\d*\\sqrt\{\d+\}|\\pi|\d+\\pi", g.strip()):
        out.append(f"{float(_approx(g)):.2f}")  # a rounding to two places is a different answer
    return [x for x in out if x != g]


def _approx(g: str) -> float:
    import math
    m = re.fullmatch(r"(\d*)\\sqrt\{?(\d+)\}?", g.strip())
    if m:
        return (int(m.group(1)) if m.group(1) else 1) * math.sqrt(int(m.group(2)))
    m = re.fullmatch(r"(\d*)\\pi", g.strip())
    return (int(m.group(1)) if m.group(1) else 1) * math.pi


def rewrites(g: str, source: str, rng: random.Random) -> list[tuple[str, str, bool]]:
    """The rewrites of one gold answer that apply to it: [(kind, prediction text, expected verdict)]."""
    out = [("bare", g, T)]
    num = _plain_number(g)
    latex = f"${g}$"
    if source == "gsm8k" and num is not None:
        out.append(("prose", rng.choice([f"So she pays {g} dollars in total.", f"Adding these up gives {g}.",
                                         f"The answer is {g}.", f"That makes {g} altogether."]), T))
    else:
        out.append(("prose", rng.choice([f"Putting it together, the answer is {latex}.", f"So the final result is {latex}.",
                                         f"Therefore, we get {latex}.", f"The answer is therefore {latex}, as claimed."]), T))
    out.append(("boxed_twice", f"We get $\\boxed{{{g}}}$. Checking the work once more, the result is \\boxed{{{g}}}.", T))
    if num is not None:
        forms = [f"{num}.0" if "." not in num else num + "0", f"${num}" if not num.startswith("-") else num + " €"]
        if abs(float(num)) >= 1000:
            forms += [_thousands(num), _thousands(num, ".", ",")] if "." in num else [_thousands(num)]
        if "." in num:
            forms.append(num.replace(".", ","))
        out.append(("number_format", f"The total comes to {rng.choice(forms)}.", T))
    v = _fraction_value(g)
    if v is not None and not num:
        den = v.denominator
        while den % 2 == 0:
            den //= 2
        while den % 5 == 0:
            den //= 5
        if den == 1:
            out.append(("number_format", f"The value is {float(v):g}.", T))
    items = _set_items(g.replace("\\pm", "\\pm "))
    if items:
        rng.shuffle(items)
        out.append(("reorder", f"The solutions are ${', '.join(items)}$.", T))
    elif "\\pm" in g and g.count("\\pm") == 1 and "," not in g:
        a, b = g.split("\\pm")
        out.append(("reorder", f"The solutions are ${a.strip()} - {b.strip()}$ and ${a.strip()} + {b.strip()}$.", T))
    tup = _tuple_items(g)
    if tup and not _interval(g):
        swapped = tup[1:] + tup[:1]
        out.append(("reorder", f"So the point is $({', '.join(swapped)})$.", F))
    alg = []
    m = re.fullmatch(r"(-?)\\[dt]?frac\{([^{},]+)\}\{([^{},]+)\}", g.strip())
    if m:
        alg.append(f"{m.group(1)}({m.group(2)})/({m.group(3)})")
        if v is not None and v.denominator in (2, 4, 5, 8, 10, 20, 25):
            alg.append(f"{float(v):g}")
    m = re.fullmatch(r"(\d+)\\sqrt\{(\d+)\}", g.strip())
    if m:
        alg.append(f"\\sqrt{{{int(m.group(1)) ** 2 * int(m.group(2))}}}")
    terms = _terms(g)
    if terms:
        rng.shuffle(terms)
        alg.append(" ".join(terms).lstrip("+").replace("+ -", "- "))
    m = re.fullmatch(r"(\d+)\\pi", g.strip())
    if m:
        alg.append(f"{m.group(1)} \\cdot \\pi")
    if alg:
        out.append(("algebraic", f"This simplifies to ${rng.choice(alg)}$.", T))
    iv = _interval(g)
    if iv:
        form = rng.choice(["ineq", "ineq", "in", "builder"])
        pred = {"ineq": _inequality(iv), "in": f"x \\in {g}", "builder": f"\\{{x \\mid {_inequality(iv)}\\}}"}[form]
        if form == "builder" and len(iv) > 1:
            pred = _inequality(iv)
        out.append(("interval_ineq", f"The solution set is ${pred}$.", T))
    misses = _near_misses(g, rng)
    if misses:
        out.append(("near_miss", rng.choice([f"The answer is ${rng.choice(misses)}$.", rng.choice(misses)]), F))
    return out


def make_pairs(n: int = 6000, seed: int = 0, data: Path = DATA) -> list[dict]:
    """n pairs (fewer only if the data has fewer), shared out evenly over the rewrite kinds: every gold of every
    source (in a seeded order, sources taking turns) gives its rewrites, and each kind takes its share from the
    front; a kind with fewer pairs than its share (intervals are rare) gives the rest to the others."""
    rng = random.Random(seed)
    golds = {k: rng.sample(v, len(v)) for k, v in load_golds(data).items()}
    buckets = {k: [] for k in KINDS}
    for i in range(max(map(len, golds.values()))):
        for source, gs in golds.items():
            if i < len(gs):
                for kind, pred, expected in rewrites(gs[i], source, rng):
                    buckets[kind].append({"source": source, "kind": kind, "gold": gs[i], "prediction": pred,
                                          "expected": expected})
    take, left = {}, n
    for j, kind in enumerate(sorted(KINDS, key=lambda k: len(buckets[k]))):
        take[kind] = min(len(buckets[kind]), left // (len(KINDS) - j))
        left -= take[kind]
    return [p for kind in KINDS for p in buckets[kind][:take[kind]]]


# ---- grading by both -----------------------------------------------------------------------------------------

def math_verify_grade(gold: str, prediction: str) -> bool:
    """math-verify's verdict, as its README uses it: the gold parsed first, then verify(gold, prediction)."""
    from math_verify import parse, verify
    return bool(verify(parse(f"${gold}$"), parse(prediction)))


def grade_pairs(pairs: list[dict], progress: bool = False) -> tuple[list[dict], dict]:
    """Adds "ours" (grader.grade, flexible) and "math_verify" to each pair; returns (rows, seconds taken by each)."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its timeout warnings go to the verdict instead
    secs = {"ours": 0.0, "math_verify": 0.0}
    for k, p in enumerate(pairs):
        t = time.perf_counter()
        p["ours"] = grader.grade(p["prediction"], p["gold"], mode="flexible")
        secs["ours"] += time.perf_counter() - t
        t = time.perf_counter()
        p["math_verify"] = math_verify_grade(p["gold"], p["prediction"])
        secs["math_verify"] += time.perf_counter() - t
        if progress and k % 500 == 499:
            print(f"graded {k + 1}/{len(pairs)}", file=sys.stderr, flush=True)
    return pairs, secs


# Every class of disagreement between ours and math-verify seen on these pairs; docs/GRADER_AGREEMENT.md says who
# is right in each and why. A pair that fits none is "unexplained" (tests/test_grader_agreement.py wants none).
CLASSES = {
    "interval as inequality": "math-verify compares a set with a relation only when the prediction is the set; "
                              "'2 \\le x < 5' and '\\{x | 2 \\le x < 5\\}' are the gold [2,5): ours is right",
    "base subscript": "math-verify drops a base subscript ('52_8' == '52_7'); ours compares numbers in base b as "
                      "strings: ours is right",
    "bare LaTeX": "an answer written with no math delimiters ('\\frac43', '\\text{C}', a pmatrix): math-verify "
                  "extracts LaTeX only inside $..$, \\[..\\] or \\boxed{}; ours reads a completion without prose as "
                  "the answer: ours is right",
    "bare plain text": "a plain answer with no delimiters ('(5,-5)', '2k', '3, 5, 7'): math-verify's plain-text "
                       "parser reads it differently from the gold's LaTeX (a tuple vs an interval, a list vs one "
                       "number, 2k unparsed): ours is right",
    "brace-less argument": "TeX's '\\frac\\pi 2' (arguments without braces): math-verify misreads it; ours is right",
}


def disagreement_class(row: dict) -> str | None:
    """Which of CLASSES a pair where ours and math-verify differ belongs to ("unexplained" if none), else None."""
    if row["ours"] == row["math_verify"]:
        return None
    pred = row["prediction"]
    if row["kind"] == "interval_ineq":
        return "interval as inequality"
    if re.search(r"\d_\{?\d", row["gold"]):
        return "base subscript"
    if row["kind"] == "bare":
        return "bare LaTeX" if "\\" in pred else "bare plain text"
    if re.search(r"\\[dt]?frac\s*(?:\\[a-z]+|\d)", pred):
        return "brace-less argument"
    return "unexplained"


def summarise(rows: list[dict]) -> dict[str, dict]:
    """{kind | 'all': {n, ours_mv, ours_expected, mv_expected, adjudicated}} as shares of n."""
    table = {}
    for key in ("all",) + KINDS:
        rs = [r for r in rows if key in ("all", r["kind"])]
        if rs:
            n = len(rs)
            table[key] = {"n": n, "ours_mv": sum(r["ours"] == r["math_verify"] for r in rs) / n,
                          "ours_expected": sum(r["ours"] == r["expected"] for r in rs) / n,
                          "mv_expected": sum(r["math_verify"] == r["expected"] for r in rs) / n,
                          "adjudicated": sum(r["ours"] == r["math_verify"] or r["ours"] == r["expected"] for r in rs) / n}
    return table


def format_table(table: dict[str, dict]) -> str:
    lines = [f"{'kind':14s} {'pairs':>6s} {'ours=mv':>8s} {'ours=exp':>9s} {'mv=exp':>7s} {'adjudicated':>12s}"]
    for k, c in table.items():
        lines.append(f"{k:14s} {c['n']:6d} {c['ours_mv']:8.3f} {c['ours_expected']:9.3f} {c['mv_expected']:7.3f} "
                     f"{c['adjudicated']:12.3f}")
    return "\n".join(lines)


def throughput(data: Path = DATA, seed: int = 0) -> float:
    """Answers graded per second, one thread, strict mode: each MATH-500 gold against its boxed rewrites (itself,
    an equivalent form, a near-miss, ...), caches cleared first."""
    rng = random.Random(seed)
    golds = load_golds(data)["math500"]
    pairs = [(f"So the answer is $\\boxed{{{p if k == 'bare' else grader.extract_answer(p, 'flexible') or p}}}$.", g)
             for g in golds for k, p, _ in rewrites(g, "math500", rng)]
    grader.is_equiv("x", "y")  # imports sympy
    grader._parse.cache_clear(), grader._norm.cache_clear()
    t = time.perf_counter()
    for c, g in pairs:
        grader.grade(c, g)
    return len(pairs) / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m support.grader_agreement", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=6000, help="number of (gold, prediction) pairs (default 6000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the gold sample and the rewrites")
    ap.add_argument("--out", help="write every pair with both verdicts here (JSONL)")
    ap.add_argument("--data", type=Path, default=DATA, help=f"the datasets' folder (default {DATA})")
    args = ap.parse_args(argv)
    try:
        import math_verify  # noqa: F401
    except ImportError:
        print("error: math-verify is not installed (pip install math-verify)", file=sys.stderr)
        return 2
    if not args.data.is_dir():
        print(f"error: {args.data}: no such folder (it holds MATH and GSM8K, see its SOURCES.md)", file=sys.stderr)
        return 2
    rows, secs = grade_pairs(make_pairs(args.n, args.seed, args.data), progress=True)
    print(format_table(summarise(rows)))
    print(f"time: ours {secs['ours']:.1f} s ({len(rows) / secs['ours']:.0f} pairs/s), math-verify "
          f"{secs['math_verify']:.1f} s ({len(rows) / secs['math_verify']:.0f} pairs/s)")
    classes: dict[str, list[dict]] = {}
    for r in rows:
        r["class"] = disagreement_class(r)
        if r["class"]:
            classes.setdefault(r["class"], []).append(r)
    print("\ndisagreements of ours and math-verify, by class (count, who matches the expected verdict, an example):")
    for name, rs in sorted(classes.items(), key=lambda kv: -len(kv[1])):
        ex = rs[0]
        print(f"  {name}: {len(rs)} pairs; ours right in {sum(r['ours'] == r['expected'] for r in rs)}, math-verify "
              f"in {sum(r['math_verify'] == r['expected'] for r in rs)}. e.g. gold {ex['gold']!r}, prediction "
              f"{ex['prediction']!r}: ours {ex['ours']}, math-verify {ex['math_verify']}")
    print(f"throughput: {throughput(args.data):.0f} MATH-500 answers/s graded (strict, one thread)")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
