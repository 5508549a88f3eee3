"""Generation on a GPU (skipped without one): the decode step replayed from a CUDA graph, the same step run eagerly,
and the PyTorch reference backend give the same tokens, for a ragged batch whose ring buffers wrap around (prompts
shorter and longer than the window, many more new tokens than the window)."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import swarr  # noqa: E402
from csrc import ops  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

PROMPTS = [[5, 9, 2], list(range(10, 23)), [7] * 8]  # lengths 3, 13 (> both windows), 8 (= W of layer 0)


@pytest.fixture
def backend():
    yield
    ops.set_backend("auto")


class CountingStep(swarr.CudaGraphStep if torch.cuda.is_available() else object):
    """swarr.CudaGraphStep, counting its graph replays (the test must show the graph was used, not only built)."""
    replays = 0

    def __call__(self, tok):
        if self.graph is not None:
            CountingStep.replays += 1
        return super().__call__(tok)


class EagerStep:
    """The same decode step without a CUDA graph: the model's forward on the caches, every step."""

    def __init__(self, model, caches, B):
        self.model, self.caches = model, caches

    def __call__(self, tok):
        return self.model(tok[:, None], caches=self.caches)[:, -1]


def tiny_model(dtype=torch.float32, head_dim=16):
    torch.manual_seed(0)
    cfg = swarr.Config(arch="LlamaForCausalLM", vocab_size=101, dim=64, n_layers=3, n_heads=4, n_kv_heads=2,
                       head_dim=head_dim, hidden_dim=96, windows=[8, None, 5])
    return swarr.Transformer(cfg).to(device="cuda", dtype=dtype).eval()


def run(model, backend_name, graph, monkeypatch, new_tokens=30):
    """Greedy tokens (B, T) and the final caches, through prefill + decode_loop, the step replayed from a CUDA graph
    (graph=True) or run eagerly."""
    monkeypatch.setattr(swarr, "CudaGraphStep", CountingStep if graph else EagerStep)
    ops.set_backend(backend_name)
    caches = swarr.make_caches(model, len(PROMPTS), max(map(len, PROMPTS)) + new_tokens)
    logits = swarr.prefill(model, PROMPTS, caches)
    g = swarr.decode_loop(model, caches, logits, new_tokens)
    return g.tokens, g.caches


def test_graph_eager_and_reference_agree(backend, monkeypatch):
    model = tiny_model()
    assert ops.load() is not None and ops.status["cuda"], ops.status.get("why")
    runs = {}
    for name in ("ref", "ext"):
        for graph in (False, True):
            CountingStep.replays = 0
            runs[name, graph] = run(model, name, graph, monkeypatch)
            assert (CountingStep.replays > 20) == graph  # 30 tokens: 2 eager steps, then replays
    tokens = runs["ref", False][0]
    assert tokens.shape == (3, 30)
    for key, (t, caches) in runs.items():
        assert torch.equal(t, tokens), key
    # every ring buffer has wrapped: each row saw more tokens than its window
    caches = runs["ext", True][1]
    assert int(caches[0].pos.min()) > 2 * 8 and caches[0].slots == 8 and caches[2].slots == 5
    # graph replay and eager steps leave the same caches (same kernels, same inputs)
    for a, b in zip(runs["ext", True][1], runs["ext", False][1]):
        assert torch.equal(a.pos, b.pos) and torch.allclose(a.k, b.k, atol=1e-6) and torch.allclose(a.v, b.v, atol=1e-6)


def test_generate_matches_a_row_by_row_run(backend):
    """Batched generation with graphs (the default) equals generating each prompt alone, and n_samples rows of a
    greedy group are identical copies."""
    model = tiny_model()
    ops.set_backend("ext")
    batch = swarr.generate(model, PROMPTS, 25, n_samples=2)
    for r, p in enumerate(PROMPTS):
        alone = swarr.generate(model, [p], 25)
        assert torch.equal(batch.tokens[2 * r], alone.tokens[0]) and torch.equal(batch.tokens[2 * r + 1],
                                                                                 alone.tokens[0])


def test_bf16_tensor_core_prefill_graph_vs_eager(backend, monkeypatch):
    """bf16 with head dim 64 (the tensor-core forward in prefill): graph and eager decoding give identical tokens,
    and the prefill logits agree with the reference backend to bf16 accuracy."""
    model = tiny_model(torch.bfloat16, head_dim=64)
    t_graph, _ = run(model, "ext", True, monkeypatch)
    t_eager, _ = run(model, "ext", False, monkeypatch)
    assert torch.equal(t_graph, t_eager)
    logits = {}
    for name in ("ext", "ref"):
        ops.set_backend(name)
        caches = swarr.make_caches(model, len(PROMPTS), 40)
        logits[name] = swarr.prefill(model, PROMPTS, caches).float()
    err = (logits["ext"] - logits["ref"]).abs().max() / logits["ref"].abs().max()
    assert err < 3e-2, float(err)
