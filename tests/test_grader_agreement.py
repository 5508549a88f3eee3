"""Our grader against math-verify (the field's reference) on a seeded subset of the differential harness
(support/grader_agreement.py): model-like rewrites of the datasets' answers, each with its expected verdict.
About 10 s; needs ../shared/data and math-verify (a test-only dependency), and skips with the reason otherwise."""
import importlib.util
import logging
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from support import grader_agreement as ga  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not ga.DATA.is_dir(), reason=f"{ga.DATA} not present (the datasets sit beside the repo)"),
    pytest.mark.skipif(importlib.util.find_spec("math_verify") is None,
                       reason="math-verify not installed (pip install -r requirements-test.txt)"),
]
N, SEED = 400, 1


@pytest.fixture(scope="module")
def rows():
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    pairs = ga.make_pairs(N, SEED)
    return ga.grade_pairs(pairs)[0]


def test_pairs_cover_every_kind(rows):
    kinds = {r["kind"] for r in rows}
    assert len(rows) == N and kinds == set(ga.KINDS)
    assert {r["source"] for r in rows} == {"math_train", "math500", "gsm8k"}
    assert any(not r["expected"] for r in rows) and any(r["expected"] for r in rows)


def test_agreement_per_kind(rows):
    """Ours gives the expected verdict on >= 0.97 of the pairs of every kind; where math-verify is reliable (all
    but answers with no delimiters and intervals written as inequalities), ours also agrees with it on >= 0.97."""
    table = ga.summarise(rows)
    print("\n" + ga.format_table(table))
    for kind, cell in table.items():
        assert cell["ours_expected"] >= 0.97, (kind, cell)
        assert cell["adjudicated"] >= 0.97, (kind, cell)
        if kind not in ("all", "bare", "interval_ineq"):
            assert cell["ours_mv"] >= 0.97, (kind, cell)


def test_every_disagreement_is_a_documented_class(rows):
    classes = [ga.disagreement_class(r) for r in rows]
    unexplained = [r for r, c in zip(rows, classes) if c == "unexplained"]
    assert not unexplained, unexplained
    assert {c for c in classes if c} <= set(ga.CLASSES)
    doc = (ROOT / "docs" / "GRADER_AGREEMENT.md").read_text()
    assert all(name in doc for name in ga.CLASSES)


def test_near_misses_are_wrong_and_rewrites_right(rows):
    """Spot checks of the construction: every near-miss is graded wrong by ours, every boxed-twice pair right."""
    assert all(not r["ours"] for r in rows if r["kind"] == "near_miss")
    assert all(r["ours"] for r in rows if r["kind"] == "boxed_twice")
