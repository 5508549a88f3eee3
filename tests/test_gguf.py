"""gguf_convert.py on GGUF files written here with the `gguf` package from tiny random HF checkpoints: tensors come
back exactly (F32) or within the quantization error (Q8_0, Q4_1), llama.cpp's Q/K permutation is undone, the
tokenizer and chat template survive, and the folder loads in swarr and transformers with equal logits."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, make_checkpoint
import swarr

gguf = pytest.importorskip("gguf")
from support import gguf_convert  # noqa: E402

TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
GGUF_NAMES = {v: k for k, v in gguf_convert.LAYER_NAMES.items()}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute): HF rotate-half rows -> interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf_model, folder, arch="llama", qtype=None, template=TEMPLATE):
    """A GGUF file as llama.cpp's converter writes it for `hf_model` (tokenizer from folder/tokenizer.json)."""
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    tj = json.loads((folder / "tokenizer.json").read_text())
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda x: x[1])
    tokens = [t for t, _ in vocab] + [f"[PAD{i}]" for i in range(len(vocab), cfg.vocab_size)]
    specials = {a["id"] for a in tj["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in specials else gguf.TokenType.USER_DEFINED if i >= len(vocab)
                       else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if template:
        w.add_chat_template(template)
    for name, t in hf_model.state_dict().items():
        a = t.detach().float().numpy()
        parts = name.split(".")
        if name.startswith("model.layers."):
            module = ".".join(parts[3:-1])
            gname = f"blk.{parts[2]}.{GGUF_NAMES[module]}.{parts[-1]}"
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                a = llama_cpp_permute(a, cfg.num_attention_heads if "q_proj" in module else cfg.num_key_value_heads)
        else:
            gname = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[
                ".".join(parts[:-1])] + "." + parts[-1]
        if qtype is not None and a.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    return finish(w, path)


def finish(w, path):
    """Write out what the GGUFWriter w holds (header, metadata, tensors) and close it; returns path."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(hf_model, its folder, its GGUF file) for a tiny random Llama with grouped-query attention."""
    d = tmp_path_factory.mktemp("gguf")
    hf = make_checkpoint(d / "hf", "LlamaForCausalLM", num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return hf, d / "hf", write_gguf(d / "tiny.gguf", hf, d / "hf")


def test_f32_round_trip_is_exact(tiny, tmp_path):
    hf, folder, path = tiny
    out = gguf_convert.convert(str(path), str(tmp_path / "out"))
    model, tok = swarr.load(out)
    state = model.state_dict()
    for name, t in hf.state_dict().items():
        assert torch.equal(state[name], t), name  # Q/K permutation undone exactly
    ref = swarr.Tokenizer(str(folder / "tokenizer.json"))
    for text in ["Hello world", "unicode: café 東京 🙂", "  spaces\n\n\ttabs 12345", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == ref.encode(text)
    assert tok.render([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_quantized_file_loads_in_swarr_and_transformers_alike(tiny, tmp_path, qtype):
    import transformers
    hf, folder, _ = tiny
    path = write_gguf(tmp_path / f"{qtype}.gguf", hf, folder, qtype=getattr(gguf.GGMLQuantizationType, qtype))
    out = gguf_convert.convert(str(path), str(tmp_path / "out"))
    model, tok = swarr.load(out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    q = model.state_dict()["model.layers.1.self_attn.q_proj.weight"]
    orig = hf.state_dict()["model.layers.1.self_attn.q_proj.weight"]
    assert 0 < (q - orig).abs().max() < (0.02 if qtype == "Q8_0" else 0.2) * orig.abs().max()  # quantized, unpermuted
    ids = torch.tensor([tok.encode("Tom has 3 apples and buys 15 more: 3 + 15 = 18.")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=2e-4, rtol=1e-4)
    htok = transformers.AutoTokenizer.from_pretrained(out)
    text = "unicode: café, naïve, 東京, emoji 🙂 x^2 + 2x"
    assert tok.encode(text) == htok(text, add_special_tokens=False)["input_ids"]
    conv = [{"role": "user", "content": "hi"}]
    assert tok.render(conv) == htok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "support.gguf_convert", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    return r.returncode, r.stderr


def test_bad_files_are_one_error_line(tiny, tmp_path):
    _, _, path = tiny
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) - 1000])  # truncated inside the tensor data
    (tmp_path / "head.gguf").write_bytes(data[:200])                # truncated inside the metadata
    # an unknown tensor type: the type field (uint32) after the first tensor's name, rank and dims
    r = gguf.GGUFReader(str(path))
    t = r.tensors[0]
    bad = bytearray(data)
    off = int(t.field.offset) + sum(int(p.nbytes) for p in t.field.parts[:-2])  # type is the second last part
    assert int.from_bytes(bad[off:off + 4], "little") == int(t.tensor_type)
    bad[off:off + 4] = (250).to_bytes(4, "little")
    (tmp_path / "type.gguf").write_bytes(bytes(bad))
    (tmp_path / "text.gguf").write_text("not a gguf file at all")
    for name in ("cut", "head", "type", "text", "missing"):
        rc, err = _cli(tmp_path / f"{name}.gguf", tmp_path / f"out-{name}")
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert not (tmp_path / f"out-{name}").exists() and not list(tmp_path.glob(f"out-{name}.tmp*"))
        assert not list(tmp_path.glob(f".out-{name}.*"))  # no temporary folder, no lock file
    rc, err = _cli(path, tmp_path)  # an existing folder is never overwritten
    assert rc == 2 and "exists" in err


def test_unsupported_architecture_is_one_error(tiny, tmp_path):
    hf, folder, _ = tiny
    path = write_gguf(tmp_path / "x.gguf", hf, folder, arch="gpt2")
    with pytest.raises(swarr.SwarrError, match="architecture 'gpt2' is not supported"):
        gguf_convert.convert(str(path), str(tmp_path / "out"))
