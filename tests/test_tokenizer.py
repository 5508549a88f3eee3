"""tokenizer.py against the `tokenizers` library and transformers' apply_chat_template, on tokenizers and chat
templates built here: byte-level BPE (ChatML, Llama 3 style) and SentencePiece-style BPE (Llama 2 / Mistral)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED_DATA, make_checkpoint, train_tokenizer
import swarr
from support import evaluate
from support import tokenizer as T

TEXTS = ["Hello world", "unicode: café naïve 東京 🙂 ñ", "digits 1234567 3.14159 -42", "  many   spaces\n\n\n\t end ",
         "<s>user\nhi</s>\n", "x^2+2x+1=(x+1)^2 \\boxed{84}", "'s 're don't", "", " ", "a</s>  b<s>",
         "emoji 😀🙂👍🏽 and combining e\u0301 ", "\n", "line one\nline two\r\n  indented\n", "12+34=46", "ß∑∞ — “quotes”"]

# Chat templates in the styles of real checkpoints (written here): ChatML with a default system message (Qwen 2.5,
# SmolLM2), Llama 3 headers with bos_token and trim, Mistral's [INST] with raise_exception on bad role order.
CHATML_DEFAULT_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
HEADERS = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_end|>\\n\\n' + message['content'] | trim + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\\n\\n' }}{% endif %}")
INST = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\\n\\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "  Add 12 and 30.  "}],
]


def sentencepiece_tokenizer(path, style: str):
    """A SentencePiece-style BPE tokenizer.json as Llama 2 / Mistral ship it: <unk> <s> </s>, the 256 byte tokens
    <0x00>..<0xFF>, then merges learnt here. style: "legacy" (Prepend + Replace normalizer, Mistral 7B v0.1),
    "first" (Metaspace, prepend_scheme first, no split: newer conversions), "split" (Metaspace with split)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from conftest import CORPUS
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if style == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=style == "split")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    # a small alphabet, so that CJK, accents and emoji go through the byte fallback
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        limit_alphabet=40, show_progress=False))
    tj = json.loads(tok.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for t, _ in sorted(tj["model"]["vocab"].items(), key=lambda x: x[1]):
        vocab.setdefault(t, len(vocab))
    tj["model"]["vocab"] = vocab
    for a in tj["added_tokens"]:
        a["id"] = vocab[a["content"]]
    tok = Tokenizer.from_str(json.dumps(tj))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def write_config(folder, template=None, jinja_file=False, **specials):
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **specials}
    if template is not None and not jinja_file:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    if template is not None and jinja_file:
        (folder / "chat_template.jinja").write_text(template)


@pytest.mark.parametrize("style", ["legacy", "first", "split"])
def test_sentencepiece_style_matches_tokenizers(tmp_path, style):
    from tokenizers import Tokenizer
    path = str(sentencepiece_tokenizer(tmp_path, style))
    ref, ours = Tokenizer.from_file(path), T.Tokenizer(path)
    assert ours.sp is not None
    fallback = 0
    for t in TEXTS + [" ".join(TEXTS), "\n".join(TEXTS)]:
        for add in (False, True):
            assert ours.encode(t, add_special_tokens=add) == ref.encode(t, add_special_tokens=add).ids, (t, add)
        ids = ref.encode(t, add_special_tokens=False).ids
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False), t
        fallback += sum(3 <= i < 259 for i in ids)
    assert fallback > 20  # the byte fallback was exercised
    gsm8k = SHARED_DATA / "gsm8k" / "test.jsonl"  # a long text (one word when Metaspace does not split): GSM8K's
    if gsm8k.is_file():                              # answers beside the repo, else this repo's README
        with open(gsm8k) as f:
            long = "\n".join(json.loads(next(f))["answer"] for _ in range(100))
    else:
        long = (ROOT / "README.md").read_text()[:20000]
    assert ours.encode(long) == ref.encode(long, add_special_tokens=False).ids
    assert ours.encode("hi", add_special_tokens=True)[0] == 1  # BOS from the post_processor


def test_bos_follows_the_post_processor(tmp_path):
    """Byte-level with a TemplateProcessing that adds BOS (Llama 3) and without one (Qwen, SmolLM2)."""
    from tokenizers import Tokenizer, processors
    path = train_tokenizer(tmp_path / "plain")
    plain = T.Tokenizer(str(path)).encode("hi there", add_special_tokens=True)
    assert plain == Tokenizer.from_file(str(path)).encode("hi there").ids
    ref = Tokenizer.from_file(str(path))
    bos = ref.token_to_id("<|endoftext|>")
    ref.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])])
    (tmp_path / "bos").mkdir()
    ref.save(str(tmp_path / "bos" / "tokenizer.json"))
    ours = T.Tokenizer(str(tmp_path / "bos" / "tokenizer.json"))
    for t in TEXTS:
        assert ours.encode(t, add_special_tokens=True) == ref.encode(t).ids
        assert ours.encode(t) == ref.encode(t, add_special_tokens=False).ids
    assert ours.encode("x", add_special_tokens=True)[0] == bos


@pytest.mark.parametrize("kind", ["chatml-config", "headers-jinja", "inst-sentencepiece"])
def test_template_matches_apply_chat_template(tmp_path, kind):
    import transformers
    if kind == "inst-sentencepiece":
        sentencepiece_tokenizer(tmp_path, "first")
        write_config(tmp_path, INST, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    elif kind == "headers-jinja":  # the template in chat_template.jinja (how transformers 5 saves it)
        train_tokenizer(tmp_path)
        write_config(tmp_path, HEADERS, jinja_file=True, bos_token="<|endoftext|>", eos_token="<|im_end|>")
    else:
        train_tokenizer(tmp_path)
        write_config(tmp_path, CHATML_DEFAULT_SYSTEM, eos_token="<|im_end|>")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = T.Tokenizer(str(tmp_path / "tokenizer.json"))
    convs = CONVERSATIONS if kind != "inst-sentencepiece" else CONVERSATIONS[:2] + [CONVERSATIONS[2][1:]]
    for conv in convs:
        for gen in (True, False):
            want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert ours.render(conv, add_generation_prompt=gen) == want
            assert ours.encode(want) == hf(want, add_special_tokens=False)["input_ids"]
    assert ours.chat("What is 2+3?") == hf.apply_chat_template(CONVERSATIONS[0], tokenize=False,
                                                               add_generation_prompt=True)
    assert ours.chat("What is 2+3?", system="You are terse.") == hf.apply_chat_template(
        CONVERSATIONS[1], tokenize=False, add_generation_prompt=True)


def test_fallback_is_chatml_and_said_once(tmp_path, capsys):
    path = str(train_tokenizer(tmp_path))
    tok = T.Tokenizer(path)
    assert tok.chat("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.chat("hi", system="S").startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi")
    T.Tokenizer(path).chat("again")
    err = capsys.readouterr().err
    assert err.count("no chat template; using ChatML") == 1


@pytest.mark.parametrize("template,says", [
    ("{% for m in messages %}{{ m['content'] }", "does not compile"),                       # Jinja syntax error
    ("{{ messages.__class__.__mro__ }}", "SecurityError"),                                   # the sandbox forbids it
    ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "SecurityError"),
    ("{% for m in messages %}{{ m['content'].upper() }}{% endfor %}{% if messages|length < 5 %}"
     "{{ raise_exception('need five messages') }}{% endif %}", "need five messages"),       # the template's own check
    ("{% set x = messages.append(1) %}", "failed to render"),                                # immutable sandbox
])
def test_bad_template_is_one_error(tmp_path, template, says):
    train_tokenizer(tmp_path)
    write_config(tmp_path, template)
    with pytest.raises(swarr.SwarrError, match=says):
        T.Tokenizer(str(tmp_path / "tokenizer.json")).chat("hi")


def test_bad_template_on_the_command_line(tmp_path):
    make_checkpoint(tmp_path, "LlamaForCausalLM")
    write_config(tmp_path, "{% if %}")
    r = subprocess.run([sys.executable, str(ROOT / "swarr.py"), "generate", "--model", str(tmp_path), "--prompt", "hi",
                        "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "chat template does not compile" in r.stderr


def test_save_keeps_every_tokenizer_file_and_transformers_reads_the_template(tmp_path):
    import transformers
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_checkpoint(src, "LlamaForCausalLM")
    write_config(src, HEADERS, jinja_file=True, bos_token="<|endoftext|>", eos_token="<|im_end|>")
    (src / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    model, tok = swarr.load(str(src))
    swarr.save(model.set_window(4), tok, str(dst))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                 "generation_config.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    hf = transformers.AutoTokenizer.from_pretrained(str(dst))
    conv = CONVERSATIONS[2]
    want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert swarr.load(str(dst))[1].render(conv) == want


def test_unsupported_tokenizer_is_one_error(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps({"model": {"type": "Unigram", "vocab": {"a": 0}}}))
    with pytest.raises(swarr.SwarrError, match="Unigram"):
        T.Tokenizer(str(p))
    sentencepiece_tokenizer(tmp_path, "first")
    tj = json.loads(p.read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    p.write_text(json.dumps(tj))
    with pytest.raises(swarr.SwarrError, match="Whitespace"):
        T.Tokenizer(str(p))


def test_system_flag_reaches_every_prompt(tmp_path):
    import train_rl
    import train_sft
    train_tokenizer(tmp_path)
    write_config(tmp_path, CHATML_DEFAULT_SYSTEM, eos_token="<|im_end|>")
    tok, rec = T.Tokenizer(str(tmp_path / "tokenizer.json")), {"question": "What is 2+3?", "answer": "5"}
    assert evaluate.record_prompt(tok, rec).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert evaluate.record_prompt(tok, rec, system="Be terse.").startswith("<|im_start|>system\nBe terse.<|im_end|>\n"
                                                                         "<|im_start|>user\nWhat is 2+3?")
    cfg = swarr.Config(arch="LlamaForCausalLM", vocab_size=400, dim=8, n_layers=1, n_heads=1, n_kv_heads=1,
                       head_dim=8, hidden_dim=8, hf={"eos_token_id": 2})
    prompt, response = train_sft.sft_pair(tok, cfg, rec, "Be terse.")
    assert prompt == evaluate.record_prompt(tok, rec, system="Be terse.") and response.endswith("<|im_end|>")
    for p in (train_sft.parser(), train_rl.parser()):
        assert p.parse_args(["--system", "Be terse."]).system == "Be terse." and p.parse_args([]).system is None
    for cmd in ("generate --prompt x", "eval --data d.jsonl"):
        args = evaluate.build_parser().parse_args([*cmd.split(), "--model", "m", "--system", "Be terse."])
        assert args.system == "Be terse."
