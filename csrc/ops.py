"""The kernels of csrc/ as torch ops: torch.ops.swarr.fwd, bwd and decode, with fake tensors and autograd.

The schemas and the CPU/CUDA implementations are C++ (TORCH_LIBRARY in swa_cpu.cpp, the CUDA ones in
swa_cuda.cpp); this file builds them on first use, registers their fake (shape-only) versions and the forward's
backward with torch.library, so fake tensors, torch.compile and torch.export see them, and says which inputs they
take: `available(t, op)` is the whole choice of backend. `attention` and `decode` call the ops with the casts the
kernels need. Same contracts as swarr.attention_ref / swarr.decode_ref:
    q (B, Hq, N, D), k/v (B, Hkv, N, D) -> out (B, Hq, N, D); query i sees key j iff j <= i and i - j < window
    swarr::fwd(q, k, v, window, scale) -> (out, lse)   lse (B, Hq, N): float32 on CUDA, q's dtype on the CPU
    swarr::bwd(dout, q, k, v, out, lse, window, scale) -> (dq, dk, dv)
    swarr::decode(q (B, Hq, D), k_cache, v_cache (B, Hkv, S, D), valid (B,) int64, scale) -> (B, Hq, D)
SWARR_BACKEND=auto|ext|ref picks the backend (set_backend does the same); SWARR_POISON=1 makes the kernels NaN-fill
their outputs before writing them (tests use it to catch unwritten elements). On a GPU each op's kernel checks itself
against the reference on first use (self_check): one that disagrees is one line on stderr and the reference instead.
"""
import hashlib
import math
import os
import platform
import re
import shutil
import subprocess
import sys

import torch
import torch.nn.functional as F

from support.safe_io import SwarrError  # the project's one error type: a command line prints it as one line

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: build/ and csrc/ are here
OPS = ("fwd", "bwd", "decode")
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendError(SwarrError):
    """An unknown backend or op name, or the `ext` backend asked for where the kernels cannot be built."""


# ---- the choice of backend ----
_BACKEND = os.environ.get("SWARR_BACKEND", "auto")
# Under auto, the ops named in SWARR_CUDA_REF_OPS (fwd, bwd, decode; default none) take the reference on CUDA:
# csrc/gpu_check.py times both paths per op and prints the setting that picks the faster one of each.
_REF_OPS = {"cuda": {op for op in os.environ.get("SWARR_CUDA_REF_OPS", "").split(",") if op}}


def available(t: torch.Tensor, op: str) -> bool:
    """Does the compiled kernel run `op` (fwd, bwd or decode) for tensors like t under the current backend?
    Otherwise the PyTorch reference computes the same thing. On a device type in SELF_CHECK (CUDA), the kernel
    must first have agreed with the reference there (self_check)."""
    if _BACKEND == "ref" or load() is None:
        return False
    if _BACKEND == "auto" and op in _REF_OPS.get(t.device.type, ()):
        return False
    if t.device.type == "cpu":  # float32 kernels (float64 for checking); other inputs are computed in float32
        covered = True
    else:
        covered = t.device.type == "cuda" and status["cuda"] and t.dtype in CUDA_DTYPES
    if not covered or t.device.type not in SELF_CHECK:
        return covered
    agrees = _checked.get((str(t.device), op, _compute_dtype(t), t.shape[-1]))
    if agrees is None:
        agrees = self_check(t.device, op, _compute_dtype(t), t.shape[-1])
    return agrees or _BACKEND == "ext"


def set_backend(name: str):
    """'auto' (the extension if it builds, else the reference), 'ext' (the extension, or an error) or 'ref'."""
    global _BACKEND
    if name not in ("auto", "ext", "ref"):
        raise BackendError(f"unknown attention backend {name!r}: use auto, ext or ref")
    if _REF_OPS["cuda"] - set(OPS):
        raise BackendError(f"SWARR_CUDA_REF_OPS={','.join(sorted(_REF_OPS['cuda']))}: name ops among fwd, bwd, decode")
    if name == "ext" and load() is None:
        raise BackendError(f"the compiled attention extension is unavailable: {status['why']}")
    _BACKEND = name


def backend_name() -> str:
    """'ext' or 'ref': the backend attention and decode use (inputs the extension does not cover, such as
    float64 on a GPU or another device, still go to the reference)."""
    set_backend(_BACKEND)  # validates SWARR_BACKEND and, for auto/ext, builds or loads the extension
    return "ref" if _BACKEND == "ref" or load() is None else "ext"


# ---- the entry points (where available() says yes) ----
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The CPU kernels compute in float32 (float64 kept, for checking); the CUDA ones in fp32, fp16 or bf16."""
    if t.device.type == "cpu" and t.dtype not in (torch.float32, torch.float64):
        return torch.float32
    return t.dtype


def attention(q, k, v, window: int | None, scale: float | None = None) -> torch.Tensor:
    """Windowed causal attention by the kernels (differentiable): q (B,Hq,N,D), k/v (B,Hkv,N,D) -> (B,Hq,N,D);
    window None = full causal attention, scale None = 1/sqrt(D)."""
    dt = _compute_dtype(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    W = max(1, q.shape[2]) if window is None else int(window)
    out, _ = torch.ops.swarr.fwd(q.to(dt).contiguous(), k.to(dt).contiguous(), v.to(dt).contiguous(), W, scale)
    return out.to(q.dtype)


def decode(q, k_cache, v_cache, valid, scale: float | None = None) -> torch.Tensor:
    """One-token attention over a cache by the kernels: q (B,Hq,D), caches (B,Hkv,S,D), valid (B,) = number of
    filled slots per row (1 <= valid <= S) -> (B,Hq,D)."""
    dt = _compute_dtype(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    valid = valid.to(device=q.device, dtype=torch.long).contiguous()
    out = torch.ops.swarr.decode(q.to(dt).contiguous(), k_cache.to(dt).contiguous(), v_cache.to(dt).contiguous(),
                                 valid, scale)
    return out.to(q.dtype)


# ---- the self-check: on a device in SELF_CHECK, a kernel is trusted only once it has agreed with the reference ----
# The first time an op meets a (device, dtype, head dim), self_check runs the kernel on a small case (grouped-query
# attention, a narrow and a wide window, a length off the 64-row tiles; decode rows with 1, some and all slots
# filled) and compares it with the reference, computed in float64 on the same inputs. A kernel that disagrees (or
# raises) prints one line, and under `auto` that (device, op, dtype, head dim) takes the reference from then on;
# SWARR_BACKEND=ext keeps the kernel. The CPU kernels are checked by the test suite instead (tests/test_kernels.py):
# a run-time check there would cost every CPU process the check's time for nothing a test has not already shown.
SELF_CHECK = {"cuda"}  # device types whose kernels check themselves on first use
_checked: dict = {}  # (device, op, dtype, head dim) -> whether the kernel agreed with the reference
CHECK_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # fwd, decode
CHECK_CASE = dict(B=1, Hq=4, Hkv=2, N=130, windows=(5, 70), S=37, valid=(1, 20, 37))


def _rel_err(got, want) -> float:
    """max |got - want| relative to the size of want (at least 1); inf if got holds NaN or the wrong shape."""
    if got.shape != want.shape:
        return math.inf
    err = ((got.double() - want).abs().max() / want.abs().max().clamp(min=1.0)).item()
    return math.inf if math.isnan(err) else err


def _lse_ref(q, k, window: int, scale: float):
    """log-sum-exp over each query's window of the scaled scores: the forward's second output."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~_window_mask(q.shape[2], k.shape[2], window, q.device),
                                                      float("-inf"))
    return torch.logsumexp(s, -1)


def _decode_ref(q, k_cache, v_cache, valid, scale: float):
    """One query per row over the first valid[b] slots of its cache: swarr.decode_ref (this layer sits below swarr)."""
    rep = q.shape[1] // k_cache.shape[1]
    k, v = k_cache.repeat_interleave(rep, dim=1), v_cache.repeat_interleave(rep, dim=1)
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < valid[:, None]
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None, :], scale=scale)[:, :, 0]


def _check_errors(op: str, device, dtype, D: int) -> list[float]:
    """Relative errors of the kernel `op` against the float64 reference on CHECK_CASE, each to be held to the
    op's tolerance (the backward's, dq/dk/dv, to 4 times the forward's)."""
    c, scale = CHECK_CASE, D ** -0.5
    g = torch.Generator(device=device).manual_seed(0)  # its own generator: the program's random stream is untouched
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    if op == "decode":
        q, kc, vc = randn(len(c["valid"]), c["Hq"], D), *(randn(len(c["valid"]), c["Hkv"], c["S"], D) for _ in "kv")
        valid = torch.tensor(c["valid"], device=device)
        want = _decode_ref(q.double(), kc.double(), vc.double(), valid, scale)
        return [_rel_err(torch.ops.swarr.decode(q, kc, vc, valid, scale), want)]
    errors = []
    for W in c["windows"]:
        q, k, v = randn(c["B"], c["Hq"], c["N"], D), *(randn(c["B"], c["Hkv"], c["N"], D) for _ in "kv")
        if op == "fwd":
            out, lse = torch.ops.swarr.fwd(q, k, v, W, scale)
            errors += [_rel_err(out, _attention_ref(q.double(), k.double(), v.double(), W, scale)),
                       _rel_err(lse, _lse_ref(q.double(), k.double(), W, scale))]
            continue
        dout = randn(c["B"], c["Hq"], c["N"], D)
        with torch.enable_grad():
            qkv = [t.double().requires_grad_() for t in (q, k, v)]
            out = _attention_ref(*qkv, W, scale)
            want = torch.autograd.grad(out, qkv, dout.double())
        lse = _lse_ref(q.double(), k.double(), W, scale).to(torch.float32 if device.type == "cuda" else dtype)
        got = torch.ops.swarr.bwd(dout, q, k, v, out.detach().to(dtype), lse, W, scale)
        errors += [_rel_err(a, b) / 4 for a, b in zip(got, want)]
    return errors


@torch.compiler.disable  # runs eagerly, never traced into a compiled graph
def self_check(device, op: str, dtype, D: int) -> bool:
    """Does the kernel `op` agree with the reference on `device` for `dtype` and head dim D? Computed once per
    (device, op, dtype, D) and remembered; a disagreement (or an error) prints one line on stderr."""
    key = (str(device), op, dtype, D)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False  # not now (a CUDA graph is being captured): the reference this time, the check on a later call
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    try:
        with unset_fake_temporarily(), torch.inference_mode(False), torch.no_grad():  # real tensors, under tracing too
            errors = _check_errors(op, device, dtype, D)
        why = f"error {max(errors):.2g}, tolerance {CHECK_TOL[dtype]:g}" if max(errors) > CHECK_TOL[dtype] else ""
    except RuntimeError as e:  # the kernel refused the case (a head dim it does not take, ...)
        why = f"it raised {str(e).splitlines()[0][:200]}"
    _checked[key] = not why
    if why:
        keep = "SWARR_BACKEND=ext keeps it" if _BACKEND == "ext" else "using the PyTorch reference for it"
        print(f"swarr: the compiled {op} kernel disagrees with the reference on {device} for "
              f"{str(dtype).replace('torch.', '')}, head dim {D} ({why}); {keep}", file=sys.stderr)
    return _checked[key]


# ---- torch.library registrations: fake versions (shapes and dtypes only) and the forward's autograd ----
def _fake_fwd(q, k, v, window, scale):
    lse_dtype = torch.float32 if q.device.type == "cuda" else q.dtype
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype)


def _fake_bwd(dout, q, k, v, out, lse, window, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fake_decode(q, k_cache, v_cache, valid, scale):
    return q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    """The forward saves (q, k, v, out, lse); the backward recomputes the probabilities from lse."""
    q, k, v, window, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # saved for the backward, not a result to differentiate
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.window, ctx.scale = window, scale


@torch.autograd.function.once_differentiable  # a second derivative raises instead of coming out wrong
def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if available(q, "bwd"):
        dq, dk, dv = torch.ops.swarr.bwd(dout.contiguous(), q, k, v, out, lse, ctx.window, ctx.scale)
    else:  # the reference's backward: autograd through masked SDPA, recomputing the forward
        with torch.enable_grad():
            qkv = [t.detach().requires_grad_() for t in (q, k, v)]
            dq, dk, dv = torch.autograd.grad(_attention_ref(*qkv, ctx.window, ctx.scale), qkv, dout)
    return dq, dk, dv, None, None


def _attention_ref(q, k, v, window: int, scale: float):
    """Windowed causal attention by masked SDPA: swarr.attention_ref, the specification, with queries = keys."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_window_mask(q.shape[2], k.shape[2], window, q.device),
                                          scale=scale)


def _window_mask(n_q: int, n_k: int, window: int, device) -> torch.Tensor:
    """(n_q, n_k) bool: query i sees key j iff j <= i and i - j < window."""
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return (j <= i) & ((i - j) < window)


def _register():
    """Called by load, once, after the library is loaded: fake kernels for the three ops, the forward's autograd."""
    torch.library.register_fake("swarr::fwd", _fake_fwd)
    torch.library.register_fake("swarr::bwd", _fake_bwd)
    torch.library.register_fake("swarr::decode", _fake_decode)
    torch.library.register_autograd("swarr::fwd", _backward, setup_context=_setup_context)


# ---- building and loading csrc/ ----
status: dict = {}  # filled by load: {"ops": torch.ops.swarr or None, "cuda": bool, "why": str, "name": str}


def _build_name(with_cuda: bool) -> str:
    """Library name, unique per CPU + torch version, and with CUDA per GPU architecture + torch's CUDA version: the
    CPU code is built with -march=native and the CUDA code for one GPU, so a build folder shared between machines
    must never hand one a library compiled for another."""
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):  # Linux: the model name and the instruction-set flags
        with open("/proc/cpuinfo") as f:
            cpu = "".join(sorted({line for line in f if line.startswith(("model name", "flags", "Features"))}))
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    tag = hashlib.sha1(f"{cpu}|{platform.machine()}|{torch.__version__}|{arch_list}".encode()).hexdigest()[:10]
    if not with_cuda:
        return f"swarr_ext_{tag}"
    major, minor = torch.cuda.get_device_capability()
    return f"swarr_ext_{tag}_cuda_sm{major}{minor}_cu{(torch.version.cuda or '').replace('.', '')}"


def _cuda_plan(cpp_extension) -> tuple[bool, str]:
    """(build the CUDA kernels?, why not): a one-line reason whenever a GPU is there but they cannot be built."""
    if not torch.cuda.is_available():
        return False, ""
    cc, archs = torch.cuda.get_device_capability(), os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    listed = [tuple(map(int, a.split("."))) for a in re.findall(r"\d+\.\d+", archs)]
    if cc < (8, 0) or any(a < (8, 0) for a in listed):  # cp.async, bf16 tensor cores
        return False, f"they need sm_80 or newer; this GPU is sm_{cc[0]}{cc[1]}, TORCH_CUDA_ARCH_LIST={archs!r}"
    if listed and "PTX" not in archs and not any(a[0] == cc[0] and a <= cc for a in listed):  # no code it can run
        return False, f"TORCH_CUDA_ARCH_LIST={archs!r} builds no code this GPU (sm_{cc[0]}{cc[1]}) can run"
    nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        release = re.search(r"release (\d+)\.", out).group(1)
    except (OSError, subprocess.SubprocessError, AttributeError):
        return False, f"no working nvcc at {nvcc!r} (set CUDA_HOME)"
    if release != (torch.version.cuda or "").split(".")[0]:  # torch's build refuses other CUDA major versions
        return False, f"nvcc is CUDA {release}.x but torch was built with CUDA {torch.version.cuda}"
    return True, ""


def load():
    """Build csrc/ (the first time: torch.utils.cpp_extension and ninja, into ./build/; later processes load the
    cached library instantly), load it and register the ops; returns torch.ops.swarr, or None if it cannot be
    built (one line on stderr says why, and the reference computes the same thing). Never raises."""
    if status:
        return status["ops"]
    from torch.utils import cpp_extension  # imported on first use: it brings in setuptools (~0.5 s)
    with_cuda, no_cuda_why = _cuda_plan(cpp_extension)
    if no_cuda_why:  # the CPU kernels are still built; CUDA tensors take the reference
        print(f"swarr: CUDA kernels not built: {no_cuda_why}; CUDA tensors use the PyTorch reference", file=sys.stderr)
    name = _build_name(with_cuda)
    build_dir = os.path.join(_ROOT, "build", name)
    sources = [os.path.join(_ROOT, "csrc", "swa_cpu.cpp")]
    sources += [os.path.join(_ROOT, "csrc", f) for f in ("swa_cuda.cpp", "swa_cuda.cu")] if with_cuda else []
    # -fopenmp: at::parallel_for is header code and threads only when compiled with OpenMP (the process's one
    # libgomp, already loaded by torch, is shared). -ffp-contract=fast: fused multiply-adds (off in ISO C++ mode).
    cflags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    if platform.machine() in ("x86_64", "AMD64"):
        cflags += ["-march=native", "-mprefer-vector-width=512"]  # built where it runs; see _build_name
    try:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
        cpp_extension.verify_ninja_availability()
        os.makedirs(build_dir, exist_ok=True)
        if not os.path.exists(os.path.join(build_dir, name + ".so")):
            print(f"swarr: compiling csrc/ into build/{name} (first use only, under a minute)", file=sys.stderr)
        cpp_extension.load(name=name, sources=sources, build_directory=build_dir, with_cuda=with_cuda,
                           extra_cflags=cflags, extra_ldflags=["-fopenmp"], extra_cuda_cflags=["-O3", "-lineinfo"],
                           is_python_module=False)
        _register()
        status.update(ops=torch.ops.swarr, cuda=with_cuda, why=no_cuda_why, name=name)
    except Exception as e:  # a failed build must never stop the library: the reference computes the same thing
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "error:" in ln), lines[0] if lines else type(e).__name__)  # 1st diagnostic
        status.update(ops=None, cuda=False, why=why[:300])
        print(f"swarr: compiled attention unavailable ({status['why']}); using the PyTorch reference", file=sys.stderr)
    return status["ops"]
