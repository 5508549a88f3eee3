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
import grader  # noqa: E402
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


@pytest.mark.parametrize("style", [synth.FAR, synth.NEAR])
def test_both_styles_give_the_correct_answer(style):
    for p in synth.problems(200, seed=1):
        text = synth.solve(p, style)
        assert boxed(text) == str(p.answer)
        assert grader.grade(text, str(p.answer))
        assert synth.style_of(text) == style


def test_styles_do_the_same_arithmetic():
    """The near style only adds ', left <rest>' to the lines: same products, same sums, same order."""
    p = synth.Problem(((3, 4), (5, 2), (6, 7), (2, 9)))
    assert synth.solve(p, synth.FAR) == "direct:\n3*4=12\n5*2=10 so 12+10=22\n6*7=42 so 22+42=64\n2*9=18 so 64+18=82\n\\boxed{82}"
    assert synth.solve(p, synth.NEAR) == ("step by step:\n3*4=12, left 5*2+6*7+2*9\n5*2=10 so 12+10=22, left 6*7+2*9\n"
                                          "6*7=42 so 22+42=64, left 2*9\n2*9=18 so 64+18=82\n\\boxed{82}")
    for p in synth.problems(100, seed=2):
        far, near = synth.solve(p, synth.FAR), synth.solve(p, synth.NEAR)
        assert re.sub(r", left [\d*+]+", "", near).split("\n")[1:] == far.split("\n")[1:]


def test_style_of():
    assert synth.style_of("direct:\n1*2=2\n\\boxed{2}") == synth.FAR
    assert synth.style_of(" step by step:\n1*2=2\n\\boxed{2}") == synth.NEAR
    assert synth.style_of("the answer is \\boxed{2}") is None
    assert synth.style_of("") is None


def test_near_share_and_split():
    train, test = synth.split(2000, 300, seed=0)
    assert not set(train) & set(test)
    assert len(set(train)) == 2000 and len(set(test)) == 300
    pairs = synth.sft_pairs(train, near_share=0.2, seed=0)
    share = sum(synth.style_of(r) == synth.NEAR for _, r in pairs) / len(pairs)
    assert abs(share - 0.2) < 0.03
    assert all(synth.style_of(r) == synth.FAR for _, r in synth.sft_pairs(train[:50], near_share=0.0))


def test_corpus_is_plain_text_of_both_styles():
    docs = synth.corpus(400, seed=0)
    assert not any("<|im_start|>" in d for d in docs)
    styles = [synth.style_of(d.split("\n", 1)[1]) for d in docs]
    assert 0.4 < styles.count(synth.NEAR) / len(styles) < 0.6 and None not in styles


# ---- the tokenizer and how far back traces reach -----------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return pretrain.make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_tokenizer_matches_the_tokenizers_library(tok):
    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(tok.path)
    for p in synth.problems(100, seed=0):
        for style in (synth.FAR, synth.NEAR):
            text = tok.chat(p.prompt) + synth.solve(p, style) + "<|im_end|>"
            ids = tok.encode(text)
            assert ids == hf.encode(text).ids
            assert tok.decode(ids) == text
    assert all(len(tok.encode(w)) == 1 for w in pretrain.WORDS)
    assert tok.encode("1234") == [tok.encode(c)[0] for c in "1234"]  # one token per digit


def test_lookback_separates_the_styles(tok):
    """Near traces reuse only what the previous line holds; far traces reach back to the question."""
    near, far = [], []
    for p in synth.problems(200, seed=0):
        prompt = tok.chat(p.prompt)
        near.append(synth.lookback(tok, prompt + synth.solve(p, synth.NEAR), len(prompt)))
        far.append(synth.lookback(tok, prompt + synth.solve(p, synth.FAR), len(prompt)))
    assert max(near) < 40 <= min(far)
    assert synth.lookback(tok, "1*2+3*4\n1*2=2", 8) == tok.encode("1*2+3*4\n").__len__()


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
    idx = torch.tensor([tok.encode(tok.chat("3*4+5*2") + "direct:\n3*4=12")])
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max() < 1e-4


def test_shipped_model_knows_the_task():
    """The pretrained model continues plain text "<problem>\\n<marker>" correctly in both styles."""
    model, tok = swarr.load(TINY)
    acc = pretrain.plain_accuracy(model, tok, synth.problems(20, seed=synth.TEST_SEED))
    assert acc["far"] >= 0.5 and acc["near"] >= 0.5, acc


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
