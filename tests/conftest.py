"""Shared fixtures: tiny random HF checkpoints written by transformers itself, with a BPE tokenizer.json
trained here by the `tokenizers` library (no network)."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

CORPUS = ["The answer is 42.", "Tom has 3 apples and buys 15 more: 3 + 15 = 18.",
          "unicode: café, naïve, 東京, emoji 🙂", "   whitespace   runs\n\n\ttabs", "x^2 + 2x + 1 = (x+1)^2",
          "Question: what is 12 * 7? Answer: \\boxed{84}"] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


ARCHS = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]


def hf_config(arch: str, **kw):
    import transformers
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, eos_token_id=2)
    if arch == "Qwen3ForCausalLM":
        base["head_dim"] = 16
    if arch == "MistralForCausalLM":
        base["sliding_window"] = None
    base.update(kw)
    cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    return cls(**base)


def make_checkpoint(path: Path, arch: str, seed: int = 0, shard: bool = False, attn="eager", **kw):
    """A tiny random `arch` checkpoint saved by transformers at `path`; returns the HF model (float32, eval)."""
    import transformers
    torch.manual_seed(seed)
    cfg = hf_config(arch, **kw)
    cfg._attn_implementation = attn
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # random biases and norm weights, so that loading them wrong shows
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(0.5 if "norm" in n else 0.0, 0.1)
    model.save_pretrained(path, max_shard_size="60KB" if shard else "5GB")
    train_tokenizer(path)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: tiny models and ops run fastest on one, and two threads spin-waiting on
    each other on a small shared CPU cost ~10x (measured). Modules opt in with usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """One checkpoint per architecture, plus a sharded and a tied-embedding one."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {a: root / a for a in ARCHS}
    for a in ARCHS:
        make_checkpoint(out[a], a)
    out["sharded"] = root / "sharded"
    make_checkpoint(out["sharded"], "Qwen2ForCausalLM", seed=1, shard=True)
    out["tied"] = root / "tied"
    make_checkpoint(out["tied"], "LlamaForCausalLM", seed=2, tie_word_embeddings=True)
    return out


def shared_file(*parts):
    """A file of ../shared/data, or a skip that says why: the datasets sit beside the repo on the project's machines
    and in CI, not in a user's clone."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"needs {path}: ../shared/data sits beside the repo on the project's machines and in CI only")
    return path
