"""The embedded default: the synthetic task (data/synth.py), the tokenizer and the shipped tiny SA model
(data/tiny-sa/), and the script that pretrains it (data/pretrain.py)."""
import json
import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "data"))
from support import grader  # noqa: E402
import swarr  # noqa: E402
import synth  # noqa: E402
import pretrain  # noqa: E402

torch.set_num_threads(2)
TINY = os.path.join(ROOT, "data", "tiny-sa")


def boxed(text):  # the last \boxed{N}
    return re.findall(r"\\boxed\{(\d+)\}", text)[-1]


# ---- the generator ---------------------------------------------------------------------------------------
def test_generator_is_deterministic_per_seed():
    assert synth.problems(50, seed=3) == synth.problems(50, seed=3)
    assert synth.problems(50, seed=3) != synth.problems(50, seed=4)
    assert synth.sft_pairs(synth.problems(50, 3), seed=1) == synth.sft_pairs(synth.problems(50, 3), seed=1)
    assert synth.corpus(20, seed=5) == synth.corpus(20, seed=5)


def test_problem_shape():
    for p in synth.problems(300, seed=0):
        assert synth.TERMS[0] <= len(p.terms) <= synth.TERMS[1]
        assert len(set(p.terms)) == len(p.terms)  # no product twice: "the next term" is never ambiguous
        assert all(synth.FACTORS[0] <= f <= synth.FACTORS[1] for t in p.terms for f in t)
        assert re.fullmatch(r"\d\*\d(\+\d\*\d)*", p.prompt)
        assert p.answer == sum(a * b for a, b in p.terms)


def patterns(p):
    """Every restatement pattern of problem p: one bool per line but the last."""
    n = len(p.terms) - 1
    return [[bool(m >> i & 1) for i in range(n)] for m in range(2 ** n)]


def test_every_pattern_gives_the_correct_answer_and_the_same_arithmetic():
    """Restating only appends ', left <terms still to come>' to a line: same products, sums and answer."""
    for p in synth.problems(60, seed=1):
        plain = synth.solve(p, [False] * (len(p.terms) - 1))
        for pattern in patterns(p):
            text = synth.solve(p, pattern)
            assert boxed(text) == str(p.answer) and grader.grade(text, str(p.answer))
            assert synth.restated(text) == pattern
            assert re.sub(r", left [\d*+]+", "", text) == plain
            for i, (line, r) in enumerate(zip(text.split("\n"), pattern)):  # a line restates exactly what is left
                assert (line.split(", left ")[1] if r else None) == (
                    "+".join(f"{a}*{b}" for a, b in p.terms[i + 1:]) if r else None)
    p = synth.Problem(((3, 4), (5, 2), (6, 7), (2, 9)))
    assert synth.solve(p, [True, False, True]) == ("3*4=12, left 5*2+6*7+2*9\n5*2=10 so 12+10=22\n"
                                                   "6*7=42 so 22+42=64, left 2*9\n2*9=18 so 64+18=82\n\\boxed{82}")
    with pytest.raises(ValueError):
        synth.solve(p, [True])


def test_restated_reads_model_text():
    assert synth.restated("1*2=2, left 3*4\n3*4=12 so 2+12=14\n\\boxed{14}") == [True]
    assert synth.restated("garbage\n1*2=2\n3*4=12 so 2+12=14, left 5*6\n") == [False]  # the last line never counts
    assert synth.restate_counts("the answer is \\boxed{2}") == (0, 0)


def test_no_style_marker_the_choice_is_made_at_every_line():
    """No opening word names a style: every solution opens with its first product; restating is decided per line."""
    probs = synth.problems(200, 0)
    for p, (_, r) in zip(probs, synth.sft_pairs(probs, rate=0.5, seed=0)):
        assert r.startswith(f"{p.terms[0][0]}*{p.terms[0][1]}=")
    pats = [tuple(synth.restated(r)) for _, r in synth.sft_pairs(synth.problems(2000, 0, terms=(5, 5)), 0.5, 0)]
    assert len(set(pats)) == 16  # every pattern occurs: no all-or-nothing style


@pytest.mark.parametrize("rate", [0.125, 0.25, 0.5])
def test_per_line_rate_is_as_configured_and_independent(rate):
    pairs = synth.sft_pairs(synth.problems(4000, seed=0), rate=rate, seed=0)
    lines = [synth.restated(r) for _, r in pairs]
    flat = [x for ls in lines for x in ls]
    assert abs(sum(flat) / len(flat) - rate) < 0.02
    for i in range(3):  # the same rate at every line position ...
        col = [ls[i] for ls in lines]
        assert abs(sum(col) / len(col) - rate) < 0.03
    both = [ls[i] and ls[i + 1] for ls in lines for i in range(len(ls) - 1)]  # ... and no dependence between lines
    assert abs(sum(both) / len(both) - rate * rate) < 0.02
    assert synth.sft_pairs(synth.problems(50, 0), rate=rate, seed=1) == synth.sft_pairs(synth.problems(50, 0), rate, 1)


def test_splits_are_disjoint():
    train, test, valid = synth.split(3000, 300, seed=0, n_valid=300)
    assert len(set(train)) == 3000 and len(set(test)) == 300 and len(set(valid)) == 300
    assert not set(train) & set(test) and not set(train) & set(valid) and not set(test) & set(valid)
    assert synth.split(3000, 300, seed=5)[1] == test  # the test set does not depend on the training seed
    assert synth.split(100, 300, seed=0)[0] != synth.split(100, 300, seed=1)[0]


def test_nothing_that_makes_the_data_knows_a_window():
    """The generator takes no window, and the demo's data (SFT pairs, RL prompts, test problems, ceiling traces)
    are the same whatever --window is."""
    import inspect
    for fn in (synth.make_problem, synth.solve, synth.sample_solution, synth.problems, synth.split, synth.sft_pairs,
               synth.corpus):
        assert not {"w", "window", "W"} & set(inspect.signature(fn).parameters)
        assert "window" not in inspect.getsource(fn).lower()
    import demo
    model, tok = swarr.load(TINY)
    data = [demo.task(demo.parser().parse_args(["--window", str(w), "--n-train", "300"]), tok, model.cfg)
            for w in (24, 64)]
    assert data[0] == data[1]


def test_corpus_is_plain_text_restating_half_the_lines():
    docs = synth.corpus(400, seed=0)
    assert not any("<|im_start|>" in d for d in docs)
    flat = [x for d in docs for x in synth.restated(d.split("\n", 1)[1])]
    assert abs(sum(flat) / len(flat) - synth.CORPUS_RATE) < 0.05


# ---- the tokenizer and how far back traces reach -----------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return pretrain.make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_tokenizer_matches_the_tokenizers_library(tok):
    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(tok.path)
    for p in synth.problems(100, seed=0):
        for pattern in (patterns(p)[0], patterns(p)[-1], patterns(p)[5]):
            text = tok.chat(p.prompt) + synth.solve(p, pattern) + "<|im_end|>"
            ids = tok.encode(text)
            assert ids == hf.encode(text).ids
            assert tok.decode(ids) == text
    assert all(len(tok.encode(w)) == 1 for w in pretrain.WORDS)
    assert tok.encode("1234") == [tok.encode(c)[0] for c in "1234"]  # one token per digit


def test_lookback_is_set_by_where_lines_restate(tok):
    """Restating at every line keeps every reuse a line or so back; restating nowhere reaches back to the
    question; the ranges are the ones synth's docstring states (4, 5, 6 terms)."""
    every, none = {}, {}
    for p in synth.problems(300, seed=0):
        prompt, n = tok.chat(p.prompt), len(p.terms)
        every.setdefault(n, []).append(synth.lookback(tok, prompt + synth.solve(p, [True] * (n - 1)), len(prompt)))
        none.setdefault(n, []).append(synth.lookback(tok, prompt + synth.solve(p, [False] * (n - 1)), len(prompt)))
    ranges = {n: ((min(every[n]), max(every[n])), (min(none[n]), max(none[n]))) for n in every}
    assert ranges == {4: ((24, 28), (43, 52)), 5: ((28, 32), (58, 71))}, ranges
    p = synth.problems(1, seed=3, terms=(5, 5))[0]
    prompt = tok.chat(p.prompt)
    reach = lambda pat: synth.lookback(tok, prompt + synth.solve(p, pat), len(prompt))
    assert reach([True, True, True, False]) < reach([True, False, True, False]) < reach([True, False, False, False])
    assert reach([True, False, False, False]) < reach([False] * 4)
    assert synth.lookback(tok, "1*2+3*4\n1*2=2", 8) == tok.encode("1*2+3*4\n").__len__()


# ---- constrained decoding on the line pattern (the demo's --ablations) ------------------------------------
def scripted(tok, constraint, p, prefer: bool, noise: float = 0.0, seed: int = 0) -> str:
    """Decode with `constraint` from a scripted policy that writes a correct solution of p and, at each line, would
    rather restate (prefer=True) or not: the preferred continuation gets logit 10, any other correct solution's
    next token 5, random noise elsewhere. The constraint decides what is written where the two disagree."""
    import itertools
    sols = [synth.solve(p, pat) for pat in itertools.product([False, True], repeat=len(p.terms) - 1)]
    first, g = synth.solve(p, [prefer] * (len(p.terms) - 1)), torch.Generator().manual_seed(seed)
    out = torch.zeros(1, 0, dtype=torch.long)
    for _ in range(300):
        done = tok.decode(out[0].tolist())
        if done in sols:
            break
        logits = noise * torch.randn(1, tok.vocab_size, generator=g)
        for rank, target in enumerate([first] + sols):
            if target.startswith(done) and len(target) > len(done):
                i = tok.encode(target[len(done):])[0]
                logits[0, i] = max(float(logits[0, i]), 10.0 if rank == 0 else 5.0)
        out = torch.cat([out, constraint(logits, out).argmax(1, keepdim=True)], 1)
    return tok.decode(out[0].tolist())


def test_forced_restating_always_restates_and_banned_never_does(tok):
    """A policy that would not restate restates at every line under "forced"; one that would restate never does
    under "banned"; either way it writes a correct solution, and the last line (nothing left) is never forced."""
    for p in synth.problems(40, seed=11):
        for mode, prefer, want in (("forced", False, True), ("banned", True, False)):
            text = scripted(tok, synth.LineConstraint.of(tok, tok.vocab_size, mode, [tok.chat(p.prompt)]), p, prefer)
            assert synth.restated(text) == [want] * (len(p.terms) - 1), (mode, text)
            assert text.endswith(f"\\boxed{{{p.answer}}}") and ", left" not in text.split("\n")[-2]
        free = scripted(tok, lambda logits, out: logits, p, False)  # unconstrained, the policy has its way
        assert synth.restated(free) == [False] * (len(p.terms) - 1)


def test_banned_restating_never_emits_the_pattern_under_noise(tok):
    """Random logits, biased towards ',' and ' left': banned rows never restate; forced rows restate on every
    working line they finish with terms after it (the constraint leaves malformed lines to the model)."""
    comma, left = tok.encode(",")[0], tok.encode(" left")[0]
    for seed in range(30):
        p = synth.problems(1, seed=seed)[0]
        c = synth.LineConstraint.of(tok, tok.vocab_size, "banned", [tok.chat(p.prompt)])
        text = scripted(tok, lambda lg, out: c(lg + 4.0 * torch.nn.functional.one_hot(
            torch.tensor([comma, left]), tok.vocab_size).sum(0), out), p, True, noise=3.0, seed=seed)
        assert not any(synth.restated(text)), text


def test_constraint_rows_follow_their_problems(tok):
    """Rows r*samples .. r*samples+samples-1 belong to prompt r; a row's term count decides its last line."""
    a, b = synth.problems(2, seed=0, terms=(4, 4))[0], synth.problems(2, seed=0, terms=(5, 5))[0]
    c = synth.LineConstraint.of(tok, tok.vocab_size, "forced", [tok.chat(a.prompt), tok.chat(b.prompt)], samples=3)
    assert c.n_terms == [4, 4, 4, 5, 5, 5]


# ---- the shipped checkpoint and the script that makes it -------------------------------------------------
def test_shipped_checkpoint_loads_and_is_what_the_readme_says():
    model, tok = swarr.load(TINY)
    cfg = model.cfg
    assert cfg.arch == "Qwen2ForCausalLM"
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim) == (4, 128, 4, 2, 384)
    assert model.windows == [None] * 4  # pretrained with full attention
    assert tok.vocab_size == cfg.vocab_size
    assert 0.7e6 < sum(p.numel() for p in model.parameters()) < 1e6
    assert os.path.getsize(os.path.join(TINY, "model.safetensors")) < 5e6
    with open(os.path.join(TINY, "tokenizer.json")) as f:
        assert json.load(f) == pretrain.tokenizer_json()  # the script's tokenizer, byte for byte in content
    assert tok.stop_ids(cfg) == sorted([tok.special["<|im_end|>"], tok.special["<|endoftext|>"]])


def test_shipped_checkpoint_loads_in_transformers():
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(TINY).eval()
    model, tok = swarr.load(TINY)
    idx = torch.tensor([tok.encode(tok.chat("3*4+5*2") + "3*4=12, left 5*2\n5*2=10 so 12+10=22")])
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max() < 1e-4


def test_shipped_model_knows_the_task():
    """The pretrained model continues plain text "<problem>\\n" with a correct solution."""
    model, tok = swarr.load(TINY)
    acc = pretrain.plain_accuracy(model, tok, synth.problems(20, seed=synth.TEST_SEED))
    assert acc["greedy"] >= 0.5 and acc["sampled"] >= 0.5, acc


def test_pretrain_script_reproduces_the_architecture(tmp_path):
    out = pretrain.main(["--out", str(tmp_path / "m"), "--steps", "3", "--docs", "64", "--batch-size", "4",
                         "--eval", "0", "--log-every", "1"], log=lambda s: None)
    a, ta = swarr.load(out)
    b, tb = swarr.load(TINY)
    assert a.cfg.hf["architectures"] == b.cfg.hf["architectures"]
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert ta.json_text == tb.json_text
    with open(os.path.join(out, "pretrain.json")) as f:
        assert json.load(f)["steps"] == 3
