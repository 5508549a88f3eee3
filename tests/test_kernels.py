"""The compiled windowed attention (csrc/: torch.ops.swarr.fwd, bwd, decode and csrc/ops.py) against the PyTorch
reference in swarr.py, and the ops as torch.library sees them (torch.library.opcheck, torch.compile, torch.export).

CPU tests always run (the extension must build wherever a C++ compiler is present); CUDA tests skip without a
GPU; the nvcc test compiles the CUDA sources wherever nvcc is installed, so a CUDA compile error fails here too.
Inputs are fresh random normals; references are computed in float64.
"""
import contextlib
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import swarr  # noqa: E402
from csrc import ops  # noqa: E402

# (B, Hq, Hkv, N, D, W): the guide's edge cases -- N in {1, W-1, W, W+1, 2W, 2W+3}, W = 1, W >= N, grouped-query
# attention, batch > 1, lengths that are not multiples of the CPU tiles (32 queries, 64 keys), odd head dims.
CASES = [
    (1, 2, 1, 1, 16, 4),      # a single token
    (2, 4, 2, 15, 16, 16),    # N = W - 1
    (1, 2, 2, 16, 32, 16),    # N = W
    (1, 4, 1, 17, 16, 16),    # N = W + 1
    (2, 2, 1, 32, 16, 16),    # N = 2W
    (1, 6, 3, 35, 64, 16),    # N = 2W + 3, GQA 2
    (2, 2, 2, 100, 24, 1),    # W = 1 (each query sees itself), head dim not a multiple of 16
    (1, 4, 2, 70, 8, 200),    # W >= N: plain causal attention
    (1, 8, 2, 131, 64, 33),   # GQA 4, N and W off the tile sizes
    (2, 4, 4, 97, 40, 64),
    (1, 2, 1, 300, 64, 256),  # several query tiles with a window wider than a tile
]
IDS = [f"B{b}-H{h}/{hk}-N{n}-D{d}-W{w}" for b, h, hk, n, d, w in CASES]


@pytest.fixture(scope="module")
def lib():
    """torch.ops.swarr, built and loaded."""
    lib = ops.load()
    assert lib is not None, f"the extension did not build: {ops.status['why']}"
    return lib


@pytest.fixture
def poison(monkeypatch):
    """Kernels NaN-fill their outputs before writing: an element they skip stays NaN and fails the comparison."""
    monkeypatch.setenv("SWARR_POISON", "1")


@pytest.fixture
def backend():
    """Restore the backend after a test that changes it."""
    yield
    ops.set_backend("auto")


def qkv(B, Hq, Hkv, N, D, dtype=torch.float64, device="cpu", grad=False):
    return [torch.randn(B, h, N, D, dtype=dtype, device=device, requires_grad=grad) for h in (Hq, Hkv, Hkv)]


def rel_err(a, b):
    """max |a - b| relative to the size of b (at least 1: exact zeros, e.g. dq for W = 1, stay meaningful)."""
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any(), "NaN in the output: an element was never written"
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def lse_ref(q, k, window, scale):
    rep = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * scale
    s = s.masked_fill(~swarr.window_mask(q.shape[2], k.shape[2], window, q.device), float("-inf"))
    return torch.logsumexp(s, -1)


# ---------------------------------------------------------------------------------------------------------------
# CPU


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_cpu(lib, poison, case):
    B, Hq, Hkv, N, D, W = case
    q, k, v = qkv(B, Hq, Hkv, N, D)
    scale = D ** -0.5
    ref = swarr.attention_ref(q, k, v, W)
    out, lse = lib.fwd(q.float(), k.float(), v.float(), W, scale)  # float32 kernel vs float64 reference
    assert out.dtype == torch.float32 and out.shape == q.shape and lse.shape == (B, Hq, N)
    assert rel_err(out, ref) < 1e-4
    assert rel_err(lse, lse_ref(q, k, W, scale)) < 1e-4
    out64, _ = lib.fwd(q, k, v, W, scale)  # the float64 instantiation agrees to rounding
    assert rel_err(out64, ref) < 1e-12


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_cpu(lib, poison, case):
    B, Hq, Hkv, N, D, W = case
    q, k, v = qkv(B, Hq, Hkv, N, D, grad=True)
    ref = swarr.attention_ref(q, k, v, W)
    dout = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (q, k, v), dout)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = swarr.attention(q32, k32, v32, W)
    grads = torch.autograd.grad(out, (q32, k32, v32), dout.float())
    for name, g, gr in zip("qkv", grads, grads_ref):
        assert g.shape == gr.shape and rel_err(g, gr) < 1e-4, f"d{name}"


def test_gradcheck_cpu(lib):
    """torch.autograd.gradcheck through swarr.attention, which runs the float64 CPU kernel."""
    assert ops.backend_name() == "ext"
    for B, Hq, Hkv, N, D, W in [(1, 2, 1, 9, 4, 3), (2, 2, 2, 5, 3, 1), (1, 4, 2, 7, 8, 16)]:
        q, k, v = qkv(B, Hq, Hkv, N, D, grad=True)
        assert torch.autograd.gradcheck(lambda q, k, v: swarr.attention(q, k, v, W), (q, k, v))


def test_full_attention_and_scale(lib):
    q, k, v = qkv(2, 4, 2, 50, 16)
    assert rel_err(swarr.attention(q, k, v, None), swarr.attention_ref(q, k, v, None)) < 1e-12
    assert rel_err(swarr.attention(q, k, v, 7, scale=0.3), swarr.attention_ref(q, k, v, 7, scale=0.3)) < 1e-12


def test_huge_window_is_full_attention(lib):
    """A window far beyond the length (up to INT64_MAX) means full causal attention; index arithmetic such as j + W
    must not overflow (the glue clamps W to N)."""
    q, k, v = qkv(1, 4, 2, 37, 8, grad=True)
    ref = swarr.attention_ref(q, k, v, None)
    dout = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (q, k, v), dout)
    for W in (38, 2 ** 62, 2 ** 63 - 1):
        out = swarr.attention(q, k, v, W)
        assert rel_err(out, ref) < 1e-12, W
        for g, gr in zip(torch.autograd.grad(out, (q, k, v), dout), grads_ref):
            assert rel_err(g, gr) < 1e-12, W


def test_wrapper_casts_and_makes_contiguous(lib):
    """bf16 inputs are computed in float32 on the CPU and returned as bf16; (B, N, H, D) views are accepted."""
    x = torch.randn(2, 40, 4, 16)  # (B, N, H, D) as a projection produces it
    q = x.transpose(1, 2)          # non-contiguous (B, H, N, D)
    k, v = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    ref = swarr.attention_ref(q.double(), k.double(), v.double(), 9)
    assert rel_err(swarr.attention(q, k, v, 9), ref) < 1e-4
    out = swarr.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 9)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 3e-2


def ring_caches(lengths, W, Hkv, D, dtype=torch.float64):
    """Simulate decoding: row b has seen lengths[b] tokens; its ring buffer holds the last min(len, W) of them at
    slot = position % W. Returns the full key/value sequences and the caches."""
    B, T = len(lengths), max(lengths)
    k_seq, v_seq = torch.randn(B, Hkv, T, D, dtype=dtype), torch.randn(B, Hkv, T, D, dtype=dtype)
    k_cache = torch.randn(B, Hkv, W, D, dtype=dtype)  # unwritten slots hold garbage, never zeros
    v_cache = torch.randn(B, Hkv, W, D, dtype=dtype)
    for b, n in enumerate(lengths):
        for pos in range(max(0, n - W), n):
            k_cache[b, :, pos % W], v_cache[b, :, pos % W] = k_seq[b, :, pos], v_seq[b, :, pos]
    valid = torch.tensor([min(n, W) for n in lengths])
    return k_seq, v_seq, k_cache, v_cache, valid


@pytest.mark.parametrize("W,Hq,Hkv,D", [(16, 4, 2, 16), (1, 2, 1, 8), (37, 8, 2, 64), (5, 3, 3, 24)])
def test_decode_cpu(lib, poison, W, Hq, Hkv, D):
    # rows at different lengths: before the buffer fills, full, right after wrap-around, long after it
    lengths = [1, W - 1 or 1, W, W + 1, 2 * W, 2 * W + 3]
    k_seq, v_seq, k_cache, v_cache, valid = ring_caches(lengths, W, Hkv, D)
    q = torch.randn(len(lengths), Hq, D, dtype=torch.float64)
    ref = swarr.decode_ref(q, k_cache, v_cache, valid)
    assert rel_err(lib.decode(q.float(), k_cache.float(), v_cache.float(), valid, D ** -0.5), ref) < 1e-4
    assert rel_err(swarr.decode(q, k_cache, v_cache, valid), ref) < 1e-12
    # and the ring buffer means exactly the window: the last query of the sequence under windowed attention
    for b, n in enumerate(lengths):
        q_seq = torch.zeros(1, Hq, n, D, dtype=q.dtype)
        q_seq[0, :, -1] = q[b]
        last = swarr.attention_ref(q_seq, k_seq[b:b + 1, :, :n], v_seq[b:b + 1, :, :n], W)[0, :, -1]
        assert rel_err(swarr.decode(q[b:b + 1], k_cache[b:b + 1], v_cache[b:b + 1], valid[b:b + 1])[0], last) < 1e-12


def test_bad_inputs_raise(lib):
    q, k, v = qkv(1, 4, 2, 10, 8, dtype=torch.float32)
    q1, scale = q[:, :, 0].contiguous(), 0.5  # one decode query per row
    bad = {
        "window 0": lambda: lib.fwd(q, k, v, 0, scale),
        "int dtype": lambda: lib.fwd(q.int(), k.int(), v.int(), 4, scale),
        "dtype mismatch": lambda: lib.fwd(q, k.double(), v, 4, scale),
        "non-contiguous": lambda: lib.fwd(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), 4, scale),
        "3-D input": lambda: lib.fwd(q[0], k[0], v[0], 4, scale),
        "heads not a multiple": lambda: lib.fwd(torch.randn(1, 3, 10, 8), k, v, 4, scale),
        "k/v shapes differ": lambda: lib.fwd(q, k, v[:, :, :5].contiguous(), 4, scale),
        "length mismatch": lambda: lib.fwd(q[:, :, :5].contiguous(), k, v, 4, scale),
        "bwd lse shape": lambda: lib.bwd(q, q, k, v, q, torch.zeros(1, 4, 9), 4, scale),
        "decode valid 0": lambda: lib.decode(q1, k, v, torch.tensor([0]), scale),
        "decode valid > S": lambda: lib.decode(q1, k, v, torch.tensor([11]), scale),
        "decode valid int32": lambda: lib.decode(q1, k, v, torch.tensor([3], dtype=torch.int32), scale),
        "decode valid shape": lambda: lib.decode(q1, k, v, torch.tensor([3, 3]), scale),
    }
    for name, call in bad.items():
        with pytest.raises(RuntimeError, match="swarr"):
            call()
            pytest.fail(f"no error for {name}")


def test_backend_switch(lib, backend):
    q, k, v = qkv(1, 2, 1, 20, 8)
    assert ops.backend_name() == "ext" and ops.available(q, "fwd")
    assert not ops.available(q.to("meta"), "fwd")  # a device the kernels do not cover takes the reference
    ops.set_backend("ref")
    assert ops.backend_name() == "ref" and not any(ops.available(q, op) for op in ops.OPS)
    assert rel_err(swarr.attention(q, k, v, 5), swarr.attention_ref(q, k, v, 5)) < 1e-12
    ops.set_backend("ext")
    assert ops.backend_name() == "ext"
    with pytest.raises(ops.BackendError):
        ops.set_backend("fast")


def test_model_ext_matches_ref(lib, backend):
    """A small GQA model with a windowed and a full layer: same logits, gradients and greedy tokens on both."""
    torch.manual_seed(0)
    cfg = swarr.Config(arch="LlamaForCausalLM", vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=16, hidden_dim=96, windows=[6, None])
    model = swarr.Transformer(cfg).double()
    idx = torch.randint(0, 97, (2, 23))
    results = {}
    for name in ("ref", "ext"):
        ops.set_backend(name)
        model.zero_grad()
        logits = model(idx)
        logits.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        gen = swarr.generate(model, [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10]], 12)
        results[name] = (logits.detach(), grads, gen.tokens)
    (l_ref, g_ref, t_ref), (l_ext, g_ext, t_ext) = results["ref"], results["ext"]
    assert rel_err(l_ext, l_ref) < 1e-10
    assert max(rel_err(a, b) for a, b in zip(g_ext, g_ref)) < 1e-10
    assert torch.equal(t_ext, t_ref)


# ---------------------------------------------------------------------------------------------------------------
# The ops as torch.library sees them: schema, fake (shape-only) kernels, autograd registration, and the traced
# forward and backward under dynamic shapes (torch.library.opcheck); torch.compile and torch.export through them

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck_args(op, device, dtype):
    """Small inputs for one op: GQA 4/2, N = 37 (off the CPU tiles) with a window of 5; fwd's inputs require grad,
    so opcheck also checks its autograd registration and traces its backward (which calls swarr::bwd)."""
    def rnd(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)
    if op == "decode":
        return rnd(2, 4, 8), rnd(2, 2, 6, 8), rnd(2, 2, 6, 8), torch.tensor([3, 6], device=device), 0.3
    q, k, v = rnd(2, 4, 37, 8, grad=True), rnd(2, 2, 37, 8, grad=True), rnd(2, 2, 37, 8, grad=True)
    if op == "fwd":
        return q, k, v, 5, 0.3
    out, lse = torch.ops.swarr.fwd(q.detach(), k.detach(), v.detach(), 5, 0.3)
    return torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 5, 0.3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("op", ops.OPS)
def test_opcheck_cpu(lib, op, dtype):
    result = torch.library.opcheck(getattr(lib, op).default, opcheck_args(op, "cpu", dtype), test_utils=OPCHECK_UTILS)
    assert result == {name: "SUCCESS" for name in OPCHECK_UTILS}


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ops.OPS)
def test_opcheck_cuda(lib, op, dtype):
    assert ops.status["cuda"], "CUDA is available but the extension was built without it"
    result = torch.library.opcheck(getattr(lib, op).default, opcheck_args(op, "cuda", dtype), test_utils=OPCHECK_UTILS)
    assert result == {name: "SUCCESS" for name in OPCHECK_UTILS}


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # inside torch's compiler
def test_compile_matches_eager(lib):
    """torch.compile(fullgraph=True) traces the backend choice and the op (its fake kernel gives the shapes) with no
    graph break; the compiled forward and backward equal eager's."""
    def attend(q, k, v):
        assert ops.available(q, "fwd")  # the choice swarr.attention makes, a constant to the tracer
        return ops.attention(q, k, v, 5)
    q, k, v = qkv(1, 4, 2, 37, 8, dtype=torch.float32, grad=True)
    dout = torch.randn_like(q)
    eager = attend(q, k, v)
    compiled = torch.compile(attend, fullgraph=True)(q, k, v)
    assert torch.equal(compiled, eager)
    for g, ge in zip(torch.autograd.grad(compiled, (q, k, v), dout), torch.autograd.grad(eager, (q, k, v), dout)):
        assert torch.equal(g, ge)


def test_export_sees_the_ops(lib):
    """torch.export records swarr::fwd and swarr::decode as single nodes; the exported program runs them."""
    class Attend(torch.nn.Module):
        def forward(self, q, k, v, q1, k_cache, v_cache, valid):
            return ops.attention(q, k, v, 5), ops.decode(q1, k_cache, v_cache, valid)
    q1, k_cache, v_cache, valid, _ = opcheck_args("decode", "cpu", torch.float32)
    args = (*qkv(1, 4, 2, 37, 8, dtype=torch.float32), q1, k_cache, v_cache, valid)
    program = torch.export.export(Attend(), args)
    targets = [n.target for n in program.graph.nodes]
    assert torch.ops.swarr.fwd.default in targets and torch.ops.swarr.decode.default in targets
    for got, want in zip(program.module()(*args), Attend()(*args)):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES + [(1, 4, 2, 200, 128, 70), (2, 8, 2, 513, 64, 100)],
                         ids=IDS + ["D128", "D64-long"])
def test_forward_backward_cuda(lib, poison, dtype, case):
    B, Hq, Hkv, N, D, W = case
    assert ops.status["cuda"], "CUDA is available but the extension was built without it"
    q, k, v = (t.to(dtype) for t in qkv(B, Hq, Hkv, N, D, dtype=torch.float32, device="cuda"))
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))  # the reference sees the same rounded inputs
    ref = swarr.attention_ref(q, k, v, W)
    dout = torch.randn_like(ref).to(dtype)
    grads_ref = torch.autograd.grad(ref, (q, k, v), dout.double())
    qd, kd, vd = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = swarr.attention(qd, kd, vd, W)
    assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]
    _, lse = lib.fwd(qd.detach(), kd.detach(), vd.detach(), W, D ** -0.5)
    assert rel_err(lse, lse_ref(q.detach(), k.detach(), W, D ** -0.5)) < TOL[dtype]
    grads = torch.autograd.grad(out, (qd, kd, vd), dout)
    for name, g, gr in zip("qkv", grads, grads_ref):
        assert rel_err(g, gr) < 4 * TOL[dtype], f"d{name}"


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_cuda(lib, poison, dtype):
    W, Hq, Hkv, D = 37, 8, 2, 64
    lengths = [1, W - 1, W, W + 1, 2 * W + 3]
    _, _, k_cache, v_cache, valid = ring_caches(lengths, W, Hkv, D, dtype=torch.float32)
    q = torch.randn(len(lengths), Hq, D)
    q, k_cache, v_cache = (t.to(dtype).cuda() for t in (q, k_cache, v_cache))
    ref = swarr.decode_ref(q.double(), k_cache.double(), v_cache.double(), valid.cuda())
    out = swarr.decode(q, k_cache, v_cache, valid.cuda())
    assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]


@cuda
def test_cuda_graph_generation_matches_cpu():
    """On CUDA, decode_loop runs two eager steps, captures the step as a CUDA graph and replays it: the greedy
    tokens are those of the CPU (float64, a windowed and a full layer, GQA, rows of different lengths)."""
    torch.manual_seed(0)
    cfg = swarr.Config(arch="LlamaForCausalLM", vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=16, hidden_dim=96, windows=[6, None])
    model = swarr.Transformer(cfg).double()
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10]]
    on_cpu = swarr.generate(model, prompts, 20).tokens
    assert torch.equal(swarr.generate(model.cuda(), prompts, 20).tokens.cpu(), on_cpu)


@cuda
def test_bad_inputs_cuda(lib):
    q, k, v = qkv(1, 4, 2, 10, 8, dtype=torch.float32, device="cuda")
    q1 = q[:, :, 0].contiguous()
    for call in (lambda: lib.fwd(q, k, v, 0, 0.5), lambda: lib.fwd(q.double(), k.double(), v.double(), 4, 0.5),
                 lambda: lib.fwd(q, k.cpu(), v, 4, 0.5), lambda: lib.fwd(q.transpose(2, 3), k, v, 4, 0.5),
                 lambda: lib.decode(q1, k, v, torch.tensor([0], device="cuda"), 0.5),  # as on the CPU: valid in [1, S]
                 lambda: lib.decode(q1, k, v, torch.tensor([11], device="cuda"), 0.5),
                 lambda: lib.decode(q1, k, v, torch.tensor([3]), 0.5)):  # valid on another device
        with pytest.raises(RuntimeError, match="swarr"):
            call()


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_window_cuda(lib, poison, dtype):
    """W far beyond N (up to INT64_MAX) is full causal attention on the GPU too, forward and backward."""
    q, k, v = (t.to(dtype).requires_grad_() for t in qkv(1, 4, 2, 150, 64, dtype=torch.float32, device="cuda"))
    dout = torch.randn_like(q)
    out_full = swarr.attention(q, k, v, None)
    g_full = torch.autograd.grad(out_full, (q, k, v), dout)
    for W in (2 ** 62, 2 ** 63 - 1):
        out = swarr.attention(q, k, v, W)
        assert torch.equal(out, out_full)
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), g_full))


# ---------------------------------------------------------------------------------------------------------------
# The CUDA sources compile (no GPU needed, only nvcc)


def _nvcc():
    from torch.utils.cpp_extension import CUDA_HOME
    path = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    return path if path and os.path.exists(path) else shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_kernels_compile(tmp_path, arch):
    """nvcc compiles the kernels for A100-class (sm_80: mma.sync, ldmatrix, cp.async) and Hopper (sm_90) cards, with
    no register spills and no stack frame in any kernel (ptxas's resource report)."""
    r = subprocess.run([_nvcc(), "-c", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-O3",
                        "-Xptxas", "-v,-warn-spills", str(ROOT / "csrc" / "swa_cuda.cu"), "-o",
                        str(tmp_path / "swa_cuda.o")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    report = r.stdout + r.stderr
    frames = [ln for ln in report.splitlines() if "stack frame" in ln]
    assert len(frames) >= 3 * 6, report[-2000:]  # every kernel of the three dtypes was compiled for this arch
    assert all(ln.strip().startswith("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
               for ln in frames), report[-4000:]
    assert f"for 'sm_{arch}'" in report


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_cuda_glue_compiles(tmp_path):
    """nvcc compiles the torch glue (swa_cuda.cpp). torch's CPU-only wheels lack one generated header of c10/cuda;
    a stand-in is written for the check."""
    nvcc = _nvcc()
    csrc = ROOT / "csrc"
    from torch.utils.cpp_extension import include_paths
    incs = include_paths()
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in incs):
        stub = tmp_path / "inc" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        incs = [str(tmp_path / "inc")] + incs
    # nvcc hands a .cpp file to the host compiler, adding CUDA's own include folder
    args = [nvcc, "-c", "-std=c++17"] + [f"-I{p}" for p in incs]
    r = subprocess.run(args + [str(csrc / "swa_cuda.cpp"), "-o", str(tmp_path / "glue.o")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]


# ---------------------------------------------------------------------------------------------------------------
# Building: the library's name, the CUDA fallback and its reason; the per-op choice of backend


def test_build_name_keys_the_gpu_and_cuda_version(monkeypatch):
    """A build folder shared between machines never hands a library to another GPU architecture, another CUDA
    version or another TORCH_CUDA_ARCH_LIST."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    h100 = ops._build_name(True)
    assert h100.endswith("_cuda_sm90_cu128") and ops._build_name(False) == h100.split("_cuda")[0]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert ops._build_name(True).endswith("_cuda_sm80_cu128")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert ops._build_name(True).endswith("_cuda_sm80_cu130")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert ops._build_name(True).split("_cuda")[0] != h100.split("_cuda")[0]


def _fake_nvcc(tmp_path, release):
    """A CUDA_HOME whose bin/nvcc prints the version banner of CUDA `release`."""
    nvcc = tmp_path / f"cuda{release}" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.88'\n")
    nvcc.chmod(0o755)
    return type("cpp_extension", (), {"CUDA_HOME": str(nvcc.parent.parent)})


def test_cuda_plan_says_why_it_falls_back(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    ext13 = _fake_nvcc(tmp_path, "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ops._cuda_plan(ext13) == (False, "")  # no GPU: nothing to fall back from, nothing to say
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert ops._cuda_plan(ext13) == (True, "")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    ok, why = ops._cuda_plan(ext13)
    assert not ok and "sm_80" in why and "sm_75" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0;9.0+PTX")
    ok, why = ops._cuda_plan(ext13)
    assert not ok and "TORCH_CUDA_ARCH_LIST='7.0;9.0+PTX'" in why
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0")
    assert ops._cuda_plan(ext13) == (True, "")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;8.6")  # sm_8x code does not run on sm_90
    ok, why = ops._cuda_plan(ext13)
    assert not ok and "no code this GPU (sm_90) can run" in why
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0+PTX")  # PTX: the driver compiles it for the GPU
    assert ops._cuda_plan(ext13) == (True, "")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;8.6")  # within a major version, older code runs
    assert ops._cuda_plan(ext13) == (True, "")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    ok, why = ops._cuda_plan(ext13)
    assert not ok and "nvcc is CUDA 13.x" in why and "12.8" in why
    assert ops._cuda_plan(_fake_nvcc(tmp_path, "12.6")) == (True, "")
    ok, why = ops._cuda_plan(type("cpp_extension", (), {"CUDA_HOME": None}))
    assert not ok and "nvcc" in why


def test_cuda_fallback_prints_its_reason_once(lib):
    """A GPU the kernels cannot use: the CPU kernels still load, CUDA tensors take the reference, and one line on
    stderr says why, however often the extension is asked for."""
    script = ("import torch, swarr\n"
              "from csrc import ops\n"
              "torch.cuda.is_available = lambda: True\n"
              "torch.cuda.get_device_capability = lambda *a: (7, 0)\n"
              "for _ in range(3):\n"
              "    assert ops.load() is not None\n"
              "assert ops.backend_name() == 'ext' and ops.status['cuda'] is False\n"
              "print(ops.status['name'])\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("swarr:")]
    assert len(lines) == 1 and "CUDA kernels not built" in lines[0] and "sm_70" in lines[0], r.stderr
    assert "_cuda" not in r.stdout


def test_ref_ops_send_single_ops_to_the_reference(lib, backend, monkeypatch):
    """SWARR_CUDA_REF_OPS's mechanism (exercised here on the CPU's entry): under auto, each named op takes the
    reference and the others keep the extension; results agree either way; an unknown op name is refused.
    The backward's reference is csrc/ops.py's own masked SDPA (it cannot import swarr)."""
    calls = []
    for mod, fn, name in ((swarr, "attention_ref", "attention_ref"), (swarr, "decode_ref", "decode_ref"),
                          (ops, "_attention_ref", "attention_ref")):
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    q, k, v = qkv(1, 4, 2, 30, 8, grad=True)
    dout = torch.randn_like(q)
    ops.set_backend("auto")
    assert all(ops.available(q, op) for op in ops.OPS)
    out = swarr.attention(q, k, v, 7)
    ext_grads = torch.autograd.grad(out, (q, k, v), dout)
    assert calls == []
    monkeypatch.setitem(ops._REF_OPS, "cpu", {"bwd"})
    assert ops.available(q, "fwd") and not ops.available(q, "bwd") and ops.available(q, "decode")
    out2 = swarr.attention(q, k, v, 7)
    assert calls == [] and torch.equal(out, out2)  # the forward is still the extension's
    grads = torch.autograd.grad(out2, (q, k, v), dout)
    assert calls == ["attention_ref"]  # the backward went through the reference
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(grads, ext_grads))
    monkeypatch.setitem(ops._REF_OPS, "cpu", {"fwd", "decode"})
    calls.clear()
    swarr.attention(q, k, v, 7)
    _, _, k_cache, v_cache, valid = ring_caches([3, 9], 5, 2, 8)
    swarr.decode(torch.randn(2, 4, 8, dtype=torch.float64), k_cache, v_cache, valid)
    assert calls == ["attention_ref", "decode_ref"]
    ops.set_backend("ext")  # an explicit backend overrides the per-op choice
    assert all(ops.available(q, op) for op in ops.OPS)
    calls.clear()
    swarr.attention(q, k, v, 7)
    assert calls == []
    monkeypatch.setitem(ops._REF_OPS, "cuda", {"bwd", "backward"})
    with pytest.raises(ops.BackendError, match="SWARR_CUDA_REF_OPS"):
        ops.set_backend("auto")


# ---------------------------------------------------------------------------------------------------------------
# The self-check: on a device in ops.SELF_CHECK (CUDA), each op's kernel is compared with the reference on first
# use per (device, dtype, head dim); one that disagrees prints one line and is not used (SWARR_BACKEND=ext keeps
# it). Exercised here on the CPU, whose kernels are replaced in the dispatcher by deliberately wrong ones.


@pytest.fixture
def self_check(lib, monkeypatch, backend):
    """The CPU kernels check themselves as CUDA's do, from a clean slate of checks."""
    monkeypatch.setattr(ops, "SELF_CHECK", {"cuda", "cpu"})
    monkeypatch.setattr(ops, "_checked", {})


@contextlib.contextmanager
def cpu_kernel(op, fn):
    """swarr::op's CPU kernel replaced by fn in the dispatcher: the self-check and every real call run fn."""
    impl = torch.library.Library("swarr", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
        impl.impl(op, fn, "CPU")
    try:
        yield
    finally:
        impl._destroy()  # the compiled kernel is back


def _ref_grads(dout, q, k, v, window, scale):
    with torch.enable_grad():
        qkv_ = [t.detach().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(ops._attention_ref(*qkv_, window, scale), qkv_, dout)


def _wrong_bwd(dout, q, k, v, out, lse, window, scale):
    dq, dk, dv = _ref_grads(dout, q, k, v, window, scale)
    dv = dv.clone()
    dv[:, :, :8] = 0  # the first key tile's dv never written
    return dq, dk, dv


WRONG = {  # realistic kernel bugs: a window off by one, a tile left out, the newest cache slot missed
    "fwd": lambda q, k, v, window, scale: (ops._attention_ref(q, k, v, window + 1, scale),
                                           ops._lse_ref(q, k, window + 1, scale)),
    "bwd": _wrong_bwd,
    "decode": lambda q, k_cache, v_cache, valid, scale: ops._decode_ref(q, k_cache, v_cache,
                                                                        (valid - 1).clamp(min=1), scale),
}


def _swarr_lines(capfd):
    return [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("swarr:")]


def test_self_check_passes_the_real_kernels(self_check, capfd):
    """The compiled kernels agree with the reference: no line, every op available, each check done once, and the
    program's random stream untouched by the check's inputs."""
    state = torch.get_rng_state()
    for dtype in (torch.float32, torch.float64):
        for D in (8, 64):
            q = torch.randn(1, 2, 3, D, dtype=dtype)
            assert all(ops.available(q if op != "decode" else q[:, :, 0], op) for op in ops.OPS)
    assert len(ops._checked) == 12 and all(ops._checked.values())
    assert ops.available(torch.randn(1, 2, 3, 8, dtype=torch.bfloat16), "fwd")  # computed in float32: checked
    assert len(ops._checked) == 12 and _swarr_lines(capfd) == []
    with torch.inference_mode():  # first use under inference mode (generation): the backward's check still runs
        assert all(ops.available(torch.randn(1, 2, 3, 24), op) for op in ("fwd", "bwd"))
    assert len(ops._checked) == 14 and all(ops._checked.values())
    torch.randn(1)  # (the state tensors compare equal only if no draw came between)
    assert not torch.equal(state, torch.get_rng_state())
    torch.set_rng_state(state)
    ops._checked.clear()
    ops.available(torch.ones(1, 2, 3, 8), "fwd")
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("op", ops.OPS)
def test_a_wrong_kernel_is_one_line_and_the_reference(self_check, capfd, op):
    q, k, v = qkv(2, 4, 2, 45, 16, grad=True)
    dout = torch.randn_like(q)
    _, _, k_cache, v_cache, valid = ring_caches([1, 7, 30], 11, 2, 16)
    q1 = torch.randn(3, 4, 16, dtype=torch.float64)
    with cpu_kernel(op, WRONG[op]):
        for _ in range(2):  # checked once: one line however often the op is asked for
            assert [ops.available(q if o != "decode" else q1, o) for o in ops.OPS] == [o != op for o in ops.OPS]
        lines = _swarr_lines(capfd)
        assert len(lines) == 1 and f"compiled {op} kernel disagrees" in lines[0] and "float64" in lines[0], lines
        assert "head dim 16" in lines[0] and "using the PyTorch reference" in lines[0]
        # what the model computes is the reference's
        out = swarr.attention(q, k, v, 9)
        assert rel_err(out, swarr.attention_ref(q, k, v, 9)) < 1e-12
        grads = torch.autograd.grad(out, (q, k, v), dout)
        want = torch.autograd.grad(swarr.attention_ref(q, k, v, 9), (q, k, v), dout)
        assert all(rel_err(g, w) < 1e-12 for g, w in zip(grads, want))
        assert rel_err(swarr.decode(q1, k_cache, v_cache, valid), swarr.decode_ref(q1, k_cache, v_cache, valid)) < 1e-12
        # forcing the extension still uses it (the wrong kernel's output comes out)
        ops.set_backend("ext")
        assert all(ops.available(q if o != "decode" else q1, o) for o in ops.OPS)
        if op == "fwd":
            assert rel_err(swarr.attention(q, k, v, 9), swarr.attention_ref(q, k, v, 10)) < 1e-12
        elif op == "bwd":
            assert torch.equal(torch.autograd.grad(swarr.attention(q, k, v, 9), v, dout)[0][:, :, :8],
                               torch.zeros_like(v[:, :, :8]))
        else:
            assert rel_err(swarr.decode(q1, k_cache, v_cache, valid),
                           swarr.decode_ref(q1, k_cache, v_cache, (valid - 1).clamp(min=1))) < 1e-12
        assert _swarr_lines(capfd) == []
        ops.set_backend("auto")
    # another head dim or dtype is a case of its own: checked (and passed) by the real kernel
    assert ops.available(torch.randn(1, 2, 3, 32, dtype=torch.float64)[..., 0, :] if op == "decode"
                         else torch.randn(1, 2, 3, 32, dtype=torch.float64), op)
    assert not ops.available(q if op != "decode" else q1, op)  # the failed one stays on the reference


def test_a_kernel_that_raises_or_writes_nan_is_not_used(self_check, capfd):
    def raises(*a):
        raise RuntimeError("swarr: no kernel for this case\nsecond line")
    with cpu_kernel("decode", raises):
        assert not ops.available(torch.randn(2, 4, 8, dtype=torch.float64), "decode")
    with cpu_kernel("fwd", lambda q, k, v, w, s: (torch.full_like(q, math.nan), torch.zeros(q.shape[:3],
                                                                                             dtype=q.dtype))):
        assert not ops.available(torch.randn(1, 2, 3, 8, dtype=torch.float64), "fwd")
    lines = _swarr_lines(capfd)
    assert len(lines) == 2 and "raised swarr: no kernel for this case" in lines[0] and "second" not in lines[0]
    assert "error inf" in lines[1], lines


def test_the_cpu_does_not_self_check_by_default(lib, monkeypatch, backend):
    """CPU kernels are checked by this suite, not at run time: by default no check runs on the CPU, and a kernel
    swapped in is used as it is."""
    monkeypatch.setattr(ops, "_checked", {})
    assert ops.SELF_CHECK == {"cuda"}
    q, k, v = qkv(1, 2, 1, 20, 8)
    with cpu_kernel("fwd", WRONG["fwd"]):
        assert ops.available(q, "fwd")
        assert rel_err(swarr.attention(q, k, v, 5), swarr.attention_ref(q, k, v, 6)) < 1e-12
    assert ops._checked == {}


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # inside torch's compiler
def test_self_check_under_compile_and_export(self_check):
    """The check runs on real tensors even when the first use is inside torch.compile or torch.export (fake
    tensors), and a traced program uses the kernel only if it agreed."""
    def attend(q, k, v):
        return swarr.attention(q, k, v, 5)
    q, k, v = qkv(1, 4, 2, 37, 8, dtype=torch.float32)
    compiled = torch.compile(attend)(q, k, v)  # first use inside the tracer
    assert ops._checked == {("cpu", "fwd", torch.float32, 8): True}
    assert torch.equal(compiled, attend(q, k, v))
    assert torch.equal(torch.compile(attend, fullgraph=True)(q, k, v), compiled)  # checked: no graph break

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return swarr.attention(q, k, v, 5)
    ops._checked.clear()
    with cpu_kernel("fwd", WRONG["fwd"]):
        program = torch.export.export(Attend(), (q, k, v))
        assert ops._checked == {("cpu", "fwd", torch.float32, 8): False}
        assert torch.ops.swarr.fwd.default not in [n.target for n in program.graph.nodes]
        assert rel_err(program.module()(q, k, v), swarr.attention_ref(q, k, v, 5)) < 1e-6


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_self_check_passes_on_cuda(lib, monkeypatch, capfd, dtype):
    """The CUDA kernels pass their own first-use check (tensor-core head dims 64 and 128, and a generic one), so
    the CUDA tests above that go through swarr.attention / swarr.decode exercise the kernels, not a fallback."""
    monkeypatch.setattr(ops, "_checked", {})
    for D in (24, 64, 128):
        q = torch.randn(1, 2, 3, D, device="cuda", dtype=dtype)
        assert all(ops.available(q if op != "decode" else q[:, :, 0], op) for op in ops.OPS), ops._checked
    assert len(ops._checked) == 9 and all(ops._checked.values()) and _swarr_lines(capfd) == []
