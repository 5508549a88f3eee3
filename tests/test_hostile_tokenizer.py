"""A downloaded checkpoint's tokenizer and chat-template files as an attacker would write them: each case is one
SwarrError (one `error:` line on the command line) within the budgets of support/tokenizer.py, never a traceback,
a hang, a memory bomb or a silently wrong tokenization. Cases written here, one per kind of harm."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, make_checkpoint, train_tokenizer
from support import tokenizer as T
from support.safe_io import SwarrError
from test_tokenizer import sentencepiece_tokenizer

LIMIT_S = T.TEMPLATE_TIME_S + 6  # every case ends within its budget plus the slack of a busy machine


def folder_with(tmp_path, template=None, **config):
    """A byte-level tokenizer folder (trained here) with a tokenizer_config.json holding `template`."""
    train_tokenizer(tmp_path)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    if template is not None:
        cfg["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path / "tokenizer.json"


def edit_tokenizer(path, fn):
    tj = json.loads(path.read_text())
    fn(tj)
    path.write_text(json.dumps(tj))
    return path


def one_error(fn, *words):
    """fn() raises one SwarrError, on one line, naming the words, within LIMIT_S."""
    t0 = time.perf_counter()
    with pytest.raises(SwarrError) as e:
        fn()
    took, msg = time.perf_counter() - t0, str(e.value)
    assert took < LIMIT_S, (took, msg)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# ---- 1. chat templates: hangs and resource bombs ---------------------------------------------------------
BOMBS = [  # (id, template, words of the error)
    ("loop-1e10", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "2.0 s"),
    ("range-1e10", "{% for i in range(10**10) %}{% endfor %}", "Range too big"),
    ("power-tower", "{{ 7**(7**10) }}", "bits"),
    ("power-big", "{{ 3 ** 1000000 }}", "bits"),
    ("product-big", "{% set a = 2 ** 60000 %}{{ a * a }}", "bits"),
    ("recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("recursion-exponential", "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}"
                              "{% endmacro %}{{ f(0) }}", "2.0 s"),
    ("str-repeat", "{{ 'x' * 10**12 }}", "1,000,000,000,000"),
    ("list-repeat", "{{ ['a'] * 10**9 }}", "more than 4,000,000"),
    ("message-repeat", "{{ messages[0]['content'] * 10**8 }}", "more than 4,000,000"),
    ("tojson-indent", "{{ messages | tojson(indent=10**9) }}", "tojson"),
    ("doubling", "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                 "{{ ns.s }}", "more than 4,000,000"),
    ("doubling-plus", "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                      "{% endfor %}", "more than 4,000,000"),
    ("nested-growth", "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}"
                      "{% set ns.l = [ns.l, 'x' * 1000000] %}{% endfor %}", "namespace attribute"),
    ("ljust", "{{ 'x'.ljust(10**10) }}", "str.ljust"),
    ("expandtabs", "{{ ('\\t' * 1000).expandtabs(1000000) }}", "tabs"),
    ("replace-empty", "{{ ('x' * 1000).replace('', 'y' * 100000) }}", "replace"),
    ("format-width", "{{ '{:>999999999}'.format('x') }}", "format"),
    ("format-nested-width", "{{ '{:>{}}'.format('x', 999999999) }}", "format"),
    ("percent-width", "{{ '%999999999d' % 1 }}", "%-format"),
    ("percent-star", "{{ '%*d' % (999999999, 1) }}", "%-format"),
    ("format-filter", "{{ '%999999999s' | format('x') }}", "%-format"),
    ("center", "{{ 'a' | center(10**10) }}", "center"),
    ("indent", "{{ ('a\\n' * 1000) | indent(100000) }}", "indent"),
    ("join-many", "{{ ((('x' * 1000000),) * 1000) | join }}", "more than 4,000,000"),
    ("join-separator", "{{ range(100000) | map('string') | join('y' * 3000000) }}", "join"),
    ("str-join", "{{ ('y' * 3000000).join(range(100000) | map('string')) }}", "join"),
    ("sum-lists", "{{ [[1] * 20] * 100000 | sum(start=[]) }}", "sum"),
    ("output", "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "wrote more than"),
    ("lipsum", "{{ lipsum(n=10**6) }}", "2.0 s"),
    ("block-set", "{% set x %}{% for i in range(100000) %}{% for j in range(100) %}{{ j }}{% endfor %}{% endfor %}"
                  "{% endset %}{{ x | length }}", "chat template"),
    ("deep-parens", "{{ " + "(" * 2000 + "1" + ")" * 2000 + " }}", "RecursionError"),
    ("float-overflow", "{{ 10.0 ** 400 }}", "OverflowError"),
    ("zero-division", "{{ 1 // 0 }}", "ZeroDivisionError"),
    ("multi-line-exception", "{{ raise_exception('first\\nsecond\\nthird') }}", "first second third"),
]


@pytest.mark.parametrize("template,words", [c[1:] for c in BOMBS], ids=[c[0] for c in BOMBS])
def test_template_bomb_is_one_error_within_budget(tmp_path, template, words):
    tok = T.Tokenizer(str(folder_with(tmp_path, template)))
    one_error(lambda: tok.chat("hi"), "tokenizer_config.json", "chat template", words)


def test_budgets_hold_in_a_worker_thread(tmp_path):
    """A thread (no SIGALRM there) gets the same deadline: the trace hook is per thread."""
    tok = T.Tokenizer(str(folder_with(tmp_path, BOMBS[0][1])))
    out = []
    worker = threading.Thread(target=lambda: out.append(one_error(lambda: tok.chat("hi"), "2.0 s")))
    worker.start()
    worker.join(LIMIT_S + 5)
    assert not worker.is_alive() and len(out) == 1


def test_memory_budget(monkeypatch):
    """Memory the size checks cannot see (many objects, each small) is stopped by the resident-memory check."""
    if T._rss() is None:
        pytest.skip("no /proc/self/statm: the memory budget is not checked on this system")
    monkeypatch.setattr(T, "TEMPLATE_MAX_MEMORY", 64 << 20)

    def grow():
        kept = []
        for _ in range(16):  # 40 MiB each, above malloc's largest mmap threshold (32 MiB): fresh pages, never
            kept.append(bytearray(40 << 20))  # memory an earlier test freed and the heap kept resident; touched
            kept[-1][::4096] = b"x" * len(kept[-1][::4096])
            time.sleep(0.005)  # (a render's own pace: the watcher reads every millisecond, and a loaded machine
            #                   may not schedule it during a burst of a few milliseconds)
    with pytest.raises(T.TemplateBudget, match="MiB of memory"):
        T._bounded(grow)


def test_a_compile_bomb_is_bounded_too(tmp_path):
    """jinja2 folds constants while compiling: the budgets hold there as well."""
    tok = T.Tokenizer(str(folder_with(tmp_path, "{{ 'x' | center(4000000) | center(4000001) | indent(4000000) }}")))
    one_error(lambda: tok.chat("hi"), "chat template")
    tok = T.Tokenizer(str(folder_with(tmp_path, "x" * (T.TEMPLATE_MAX_SOURCE + 1))))
    one_error(lambda: tok.chat("hi"), "1,000,001 characters")


def test_ordinary_numbers_and_strings_still_render(tmp_path):
    """The budgets refuse sizes, not numbers: a timestamp printed, a default, a 1 MB system prompt are fine."""
    template = ("{{ x | default(1700000000) }} {{ '%d' % 1700000000 }} {{ '{:>5}'.format(17) }} {{ 'ab' * 3 }} "
                "{{ messages | tojson(indent=2) }}{% for m in messages %}{{ m['content'] | length }}{% endfor %}")
    tok = T.Tokenizer(str(folder_with(tmp_path, template)))
    out = tok.chat("y" * 1_000_000, system="s")
    assert out.startswith("1700000000 1700000000    17 ababab [\n  {\n    \"role\": \"system\"")
    assert out.endswith("11000000")


def test_fifo_template_file_does_not_block(tmp_path):
    folder_with(tmp_path)
    os.mkfifo(tmp_path / "chat_template.jinja")
    one_error(lambda: T.Tokenizer(str(tmp_path / "tokenizer.json")), "chat_template.jinja", "not a regular file")


def test_template_without_generation_prompt_gets_one_note(tmp_path, capsys):
    tok = T.Tokenizer(str(folder_with(tmp_path, "{% for m in messages %}{{ m['content'] }}\n{% endfor %}")))
    assert tok.chat("hi") == "hi\n" and tok.chat("again") == "again\n"
    T.Tokenizer(str(tmp_path / "tokenizer.json")).chat("third")
    err = capsys.readouterr().err
    assert err.count("note: ") == 1 and "writes no generation prompt" in err and "error" not in err


# ---- 2. pre-tokenizer regexes -------------------------------------------------------------------------------
def split_regex(pattern, **split):
    def fn(tj):
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False, **split},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    return fn


@pytest.mark.parametrize("pattern,words", [
    (r"a+(?=b)|[\s\S]", "takes over"),        # quadratic: every start scans the run again
    (r"(a|aa)+(?=c)|[\s\S]", "gives up"),     # exponential: tiktoken's engine hits its backtracking limit
], ids=["quadratic", "exponential"])
def test_backtracking_regex_refused_at_load(tmp_path, capfd, pattern, words):
    path = edit_tokenizer(train_tokenizer(tmp_path), split_regex(pattern))
    one_error(lambda: T.Tokenizer(str(path)), "tokenizer.json", "pre-tokenizer regex", words)
    assert capfd.readouterr().err == ""  # Rust's panic message is muted


def test_regex_giving_up_on_a_long_run_is_one_error(tmp_path, capfd):
    """The GPT-2 regex's `\\s+(?!\\S)` overflows tiktoken's backtracking stack on ~1M spaces (ordinary text for
    the regex, but no token can come of it): one error, nothing printed by Rust."""
    tok = T.Tokenizer(str(train_tokenizer(tmp_path)))
    one_error(lambda: tok.encode(" " * 1_000_000 + "x"), "gives up", "1,000,001 characters")
    assert capfd.readouterr().err == ""
    assert tok.decode(tok.encode(" " * 100_000 + "x")) == " " * 100_000 + "x"  # long, but within its limit


# ---- 3. strict reads ----------------------------------------------------------------------------------------
def write(name, data):
    return lambda folder: (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def mkdir(name):
    return lambda folder: (folder / name).mkdir()


def config(**fields):
    return lambda folder: (folder / "tokenizer_config.json").write_text(json.dumps(fields))


def tok_json(fn):
    return lambda folder: edit_tokenizer(folder / "tokenizer.json", fn)


def drop_merged_token(tj):  # a SentencePiece merge whose result is gone from the vocabulary
    a, b = tj["model"]["merges"][0] if isinstance(tj["model"]["merges"][0], list) else \
        tj["model"]["merges"][0].split(" ")
    del tj["model"]["vocab"][a + b]


STRICT = [  # (id, base tokenizer, mutation, words of the error)
    ("template-json-malformed", "byte", write("chat_template.json", "{"), ["chat_template.json", "malformed JSON"]),
    ("template-json-list", "byte", write("chat_template.json", "[]"), ["chat_template.json", "JSON object"]),
    ("template-json-number", "byte", write("chat_template.json", '{"chat_template": 5}'),
     ["chat_template.json", "must be a string"]),
    ("template-json-missing", "byte", write("chat_template.json", '{"template": "x"}'),
     ["chat_template.json", "chat_template"]),
    ("template-jinja-latin1", "byte", write("chat_template.jinja", b"caf\xe9"), ["chat_template.jinja", "UTF-8"]),
    ("template-jinja-folder", "byte", mkdir("chat_template.jinja"), ["chat_template.jinja", "not a regular file"]),
    ("template-config-number", "byte", config(chat_template=5), ["tokenizer_config.json", "chat_template"]),
    ("template-config-no-default", "byte", config(chat_template=[{"name": "tool_use", "template": "x"}]),
     ["tokenizer_config.json", "'default'"]),
    ("template-config-bad-list", "byte", config(chat_template=[1]), ["tokenizer_config.json", "chat_template"]),
    ("eos-number", "byte", config(eos_token=5), ["tokenizer_config.json", "eos_token"]),
    ("eos-content-number", "byte", config(eos_token={"content": 5}), ["tokenizer_config.json", "eos_token"]),
    ("eos-list-of-numbers", "byte", config(eos_token=["<|im_end|>", 5]), ["tokenizer_config.json", "eos_token"]),
    ("eos-empty-list", "byte", config(eos_token=[]), ["tokenizer_config.json", "eos_token"]),
    ("bos-list", "byte", config(bos_token=["<|im_start|>"]), ["tokenizer_config.json", "bos_token"]),
    ("post-processor-no-type", "byte", tok_json(lambda t: t.update(post_processor={"single": []})),
     ["post_processor", "type"]),
    ("post-processor-missing-special", "byte", tok_json(lambda t: t.update(post_processor={
        "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                                                 {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [], "special_tokens": {}})), ["post_processor", "'<bos>'"]),
    ("post-processor-id-past-vocab", "byte", tok_json(lambda t: t.update(post_processor={
        "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}],
        "pair": [], "special_tokens": {"<bos>": {"id": "<bos>", "ids": [10 ** 6], "tokens": ["<bos>"]}}})),
     ["post_processor", "'<bos>'"]),
    ("post-processor-bert-bad", "byte", tok_json(lambda t: t.update(post_processor={
        "type": "BertProcessing", "cls": ["[CLS]"], "sep": ["[SEP]", 1]})), ["BertProcessing", "cls"]),
    ("pre-sequence-no-list", "byte", tok_json(lambda t: t.update(pre_tokenizer={"type": "Sequence"})),
     ["pre_tokenizer", "pretokenizers"]),
    ("normalizer-sequence-no-list", "byte", tok_json(lambda t: t.update(normalizer={"type": "Sequence"})),
     ["normalizer", "normalizers"]),
    ("decoder-no-type", "byte", tok_json(lambda t: t.update(decoder=[])), ["decoder", "type"]),
    ("merges-string", "byte", tok_json(lambda t: t["model"].update(merges="a b")), ["model.merges"]),
    ("merges-numbers", "byte", tok_json(lambda t: t["model"].update(merges=[[1, 2]])), ["model.merges"]),
    ("merges-three", "byte", tok_json(lambda t: t["model"].update(merges=["a b c"])), ["model.merges"]),
    ("subword-prefix", "byte", tok_json(lambda t: t["model"].update(continuing_subword_prefix="##")),
     ["continuing_subword_prefix"]),
    ("sp-merge-not-in-vocab", "sp", tok_json(drop_merged_token), ["model.merges", "not in the vocabulary"]),
    ("sp-unk-missing", "sp", tok_json(lambda t: t["model"].update(unk_token="<nope>")), ["unk_token"]),
    ("sp-replace-regex", "sp", tok_json(lambda t: t.update(normalizer={
        "type": "Replace", "pattern": {"Regex": " "}, "content": "▁"})), ["normalizer", "Replace"]),
    ("sp-strip-bad", "sp", tok_json(lambda t: t.update(decoder={"type": "Strip", "content": " ", "start": "1",
                                                                  "stop": 0})), ["Strip", "start"]),
]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    train_tokenizer(root / "byte")
    sentencepiece_tokenizer(root / "sp", "first")
    return root


@pytest.mark.parametrize("kind,mutate,words", [c[1:] for c in STRICT], ids=[c[0] for c in STRICT])
def test_strict_read_is_one_error(bases, tmp_path, kind, mutate, words):
    folder = tmp_path / "ck"
    shutil.copytree(bases / kind, folder)
    mutate(folder)
    one_error(lambda: T.Tokenizer(str(folder / "tokenizer.json")).chat("hi"), *words)


def test_eos_list_gives_every_stop_token(tmp_path):
    """HF lets eos be a list (config.json, generation_config.json): every entry stops a completion; a
    template's eos_token is the first."""
    path = folder_with(tmp_path, "{{ eos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
                       eos_token=["<|im_end|>", {"content": "<|endoftext|>"}])
    tok = T.Tokenizer(str(path))
    cfg = type("Cfg", (), {"hf": {"eos_token_id": None}})()
    assert set(tok.stop_ids(cfg)) >= {tok.special["<|im_end|>"], tok.special["<|endoftext|>"]}
    assert tok.render([{"role": "user", "content": "hi"}]) == "<|im_end|>hi"


def test_named_default_template_is_used(tmp_path):
    path = folder_with(tmp_path, [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}])
    assert T.Tokenizer(str(path)).chat("hi") == "D"


# ---- 4. never silently wrong --------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate,words", [
    (split_regex(r"\p{L}+"), ["does not give text back"]),                      # spaces and digits left out
    (split_regex(r"\s+", behavior="Removed"), ["behavior", "Removed"]),
    (split_regex(r"\s+", behavior="MergedWithPrevious"), ["MergedWithPrevious"]),
    (split_regex(r"\s+", invert=True), ["invert"]),
], ids=["regex-not-covering", "split-removed", "split-merged", "split-invert"])
def test_unimplemented_byte_level_settings_are_refused(tmp_path, mutate, words):
    path = edit_tokenizer(train_tokenizer(tmp_path), mutate)
    one_error(lambda: T.Tokenizer(str(path)), "tokenizer.json", *words)


@pytest.mark.parametrize("replacement", ["", "ab", " ", None])
def test_metaspace_replacement_must_be_one_character(tmp_path, replacement):
    path = sentencepiece_tokenizer(tmp_path, "first")
    edit_tokenizer(path, lambda t: t["pre_tokenizer"].update(replacement=replacement))
    one_error(lambda: T.Tokenizer(str(path)), "Metaspace replacement")


def test_round_trip_catches_a_misread_setting(tmp_path):
    """A SentencePiece normalizer that maps a letter away: encode -> decode loses it, so the load is refused."""
    path = sentencepiece_tokenizer(tmp_path, "first")
    edit_tokenizer(path, lambda t: t.update(normalizer={"type": "Replace", "pattern": {"String": "o"},
                                                         "content": "0"}))
    one_error(lambda: T.Tokenizer(str(path)), "does not give text back", "Hell0")


# ---- the command line: one `error:` line per class, a `note:` line for the last ------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ck = tmp_path_factory.mktemp("ck") / "model"
    make_checkpoint(ck, "LlamaForCausalLM")
    return ck


def run_generate(folder):
    return subprocess.run([sys.executable, str(ROOT / "swarr.py"), "generate", "--model", str(folder), "--prompt",
                           "x", "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("mutate,words", [
    (config(chat_template="{{ 7**(7**10) }}"), ["chat template", "bits"]),
    (tok_json(split_regex(r"a+(?=b)|[\s\S]")), ["tokenizer.json", "takes over"]),
    (write("chat_template.json", "{"), ["chat_template.json", "malformed JSON"]),
    (tok_json(split_regex(r"\s+", behavior="Removed")), ["tokenizer.json", "Removed"]),
], ids=["template-bomb", "backtracking-regex", "strict-read", "unimplemented-setting"])
def test_command_line_gives_one_error_line(checkpoint, tmp_path, mutate, words):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    mutate(ck)
    r = run_generate(ck)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_command_line_notes_a_missing_generation_prompt(checkpoint, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    config(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")(ck)
    r = run_generate(ck)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: ") and "generation prompt" in lines[0], r.stderr
