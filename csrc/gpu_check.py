"""The CUDA kernels judged in one call: build, correctness against float64, then speed against PyTorch's GPU peers.

    python3 csrc/gpu_check.py [--out DIR] [--budget 420]

Expected time: about 4 minutes on one H100/H200, the build included (1-2 minutes of it). The check keeps to its
--budget (default 420 s): a stage that would start too late is skipped and says so, so under a wall-clock limit
of ~450 s (timeout_s=450) it always ends by itself, with its report and summary written.

It prints one progress line per case or size as it goes, then one summary line per target (below). Every stage's
result is in gpu_check.json (in --out, default $OUT or .), rewritten after every stage, so a late failure or a
timeout loses nothing; build.log, pytest.log and flex.json sit beside it. Every subprocess has a timeout.
Stages, in order:
  env      the card, versions, and two ceilings measured here: device copy GB/s, bf16 matmul TFLOP/s
  build    csrc.ops.load() in a subprocess (the build name carries the GPU's compute capability and torch's
           CUDA version), then loaded here
  correct  out, lse, dq, dk, dv of the extension (csrc.ops.attention) against a float64 reference, per row: the
           largest |x - ref| / RMS(ref row) of any row (lse, a logarithm: its absolute error). Passes when the
           extension's error is at most 2x that of PyTorch's SDPA with a window mask in the same dtype (and, for
           lse, under 1e-4). Cases: fp16 and bf16, GQA 8/2, D 64 and 128, lengths W-1, W, W+1, 2W+3, and a middle
           block of 192 queries at N=32768, W=4096 (the rest of the gradient must be exactly zero there). Outputs
           are NaN-poisoned first, so an element the kernels never write fails.
  speed    forward and backward, bf16, B=1, 16 heads, D 64 and 128, N 8192 and 32768, W 512 and 4096: the
           extension, SDPA flash (causal, full attention) and SDPA with a window mask (the `ref` backend).
           CUDA events, medians, two input sets in turn.
  decode   one token over the caches, bf16, B=8, 32/8 heads, D=128, timed as replays of a CUDA graph of 8 calls
           on 8 caches (one per layer): the extension and the reference on a W-slot ring buffer, plain SDPA on the
           same ring, SDPA over a full cache of 8k and 32k; then a random 8-layer model (swarr.CudaGraphStep)
           generating at context 8k and 32k, windowed (W=4096) and full attention.
  flex     compiled FlexAttention with a sliding-window block mask (kv <= q and q - kv < W: W keys including the
           query itself) at the speed stage's sizes. It runs in a subprocess started at the beginning, so its
           compilation overlaps the build; it times only after the speed stage is done.
  pytest   tests/test_kernels.py and tests/test_cuda_generate.py (CUDA tests and torch.library.opcheck included).
The last lines are one summary per target: correctness; forward >= 3x SDPA flash at N=32k, W=4096, bf16;
decode time flat in the context length; which backend is faster per op (for SWARR_CUDA_REF_OPS); the tests.
"""
import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import swarr  # noqa: E402  (the reference, the model and its CUDA-graph decode step)
from csrc import ops  # noqa: E402  (the kernels under test)
from support.safe_io import SwarrError, run_cli  # noqa: E402

STAGES = ("env", "build", "correct", "speed", "decode", "flex", "pytest")
SKIPPABLE = STAGES[2:]
TARGET = dict(N=32768, W=4096)  # the size of the speed target: forward >= 3x SDPA flash causal
LSE_BOUND = 1e-4                 # lse is float32 in every implementation: a fixed bound on its absolute error


# ---------------------------------------------------------------------------------------------------------------
# command line, report file, subprocesses

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python3 csrc/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or ".", help="folder for gpu_check.json and the logs "
                   "(default: $OUT, else the current folder)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check; a stage that would "
                   "start too late is skipped and says so (default 420, for a 450 s timeout)")
    p.add_argument("--skip", default="", help=f"comma-separated stages to leave out: {', '.join(SKIPPABLE)}")
    p.add_argument("--flex-worker", action="store_true", help=argparse.SUPPRESS)  # the flex stage's subprocess
    a = p.parse_args(argv)
    a.skip = {s for s in a.skip.split(",") if s}
    unknown = a.skip - set(SKIPPABLE)
    if unknown:
        raise SwarrError(f"--skip: cannot skip {', '.join(sorted(unknown))}; choose from {', '.join(SKIPPABLE)}")
    if not (a.budget > 0 and math.isfinite(a.budget)):
        raise SwarrError(f"--budget must be a positive number of seconds, got {a.budget}")
    return a


def _clean(x):
    """JSON-safe copy: non-finite floats become strings ("inf", "nan"), tuples lists, other objects their str()."""
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


class Report:
    """gpu_check.json, rewritten (atomically) whenever a stage ends; `left()` is the budget still unspent."""

    def __init__(self, out: str, budget: float):
        self.dir = Path(out)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SwarrError(f"--out {out}: cannot create the folder ({e.strerror})") from None
        self.path = self.dir / "gpu_check.json"
        self.t0, self.budget = time.time(), budget
        self.data = {"command": "python3 csrc/gpu_check.py", "budget_s": budget}

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def set(self, key, value):
        self.data[key] = value
        self.data["elapsed_s"] = round(time.time() - self.t0, 1)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(_clean(self.data), indent=1, allow_nan=False))
        os.replace(tmp, self.path)


def run_bounded(cmd, timeout: float, log: Path, cwd=ROOT, env=None):
    """Run cmd with a timeout, output to `log`; on timeout its whole process group (the compilers it started
    included) is killed. Returns (exit status or None on timeout, seconds, output tail)."""
    t = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = None
    return rc, round(time.time() - t, 1), log.read_text(errors="replace")[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# timing: CUDA events (host clock on the CPU), median of repetitions that alternate between input sets

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn, device, target_s=0.3, min_reps=3, max_reps=30):
    """Median ms of fn(i) for i = 0, 1, 2, ... (fn picks its input set from i). One warm-up call also sizes the
    number of repetitions to about target_s seconds."""
    sync(device)
    t = time.perf_counter()
    fn(0)
    sync(device)
    est = time.perf_counter() - t
    reps = int(min(max_reps, max(min_reps, target_s / max(est, 1e-6))))
    times = []
    for i in range(1, reps + 1):
        if torch.device(device).type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(i)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn(i)
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def graph_ms(calls, device, replays=20):
    """ms per call of `calls` (a list of no-argument functions, e.g. one decode per layer), captured together
    into one CUDA graph and replayed: launch overhead out, as in generation. On the CPU: a plain loop."""
    def run_all(_=0):
        for c in calls:
            c()
    if torch.device(device).type != "cuda":
        return timed_ms(run_all, device) / len(calls)
    s = torch.cuda.Stream()  # warm-up on a side stream (cuBLAS handles, the extension's checks) before capture
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run_all()
        run_all()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run_all()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(replays):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / replays / len(calls)


def window_pairs(N: int, W: int) -> int:
    """(query, key) pairs a windowed causal attention computes: sum over i of min(i + 1, W)."""
    W = min(W, N)
    return W * (W + 1) // 2 + (N - W) * W


# ---------------------------------------------------------------------------------------------------------------
# correctness

def row_err(x, ref, floor_frac=0.25):
    """Largest per-row error: max over rows of max_d |x - ref| / RMS(ref row), rows along the last dim. A row whose
    RMS is under floor_frac x the median row RMS is measured against that floor instead: some rows are (nearly)
    zero by construction (dq of the first query: its softmax is a single 1), and there the rounding of the terms,
    not the row's size, sets the error. NaN anywhere -> inf."""
    x, ref = x.detach().double(), ref.detach().double()
    if torch.isnan(x).any() or torch.isinf(x).any():
        return math.inf
    rms = ref.pow(2).mean(-1, keepdim=True).sqrt()
    floor = float(rms.flatten().median()) * floor_frac if rms.numel() else 0.0
    rms = rms.clamp_min(max(floor, 1e-300))
    return float(((x - ref).abs() / rms).amax()) if x.numel() else 0.0


def abs_err(x, ref):
    """Largest absolute difference (for lse: the relative error of each softmax normaliser). NaN -> inf."""
    x, ref = x.detach().double(), ref.detach().double()
    if torch.isnan(x).any() or torch.isinf(x).any():
        return math.inf
    return float((x - ref).abs().amax()) if x.numel() else 0.0


def lse_reference(q, k, W, scale):
    rep = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(rep, 1).transpose(-1, -2)) * scale
    s = s.masked_fill(~swarr.window_mask(q.shape[2], k.shape[2], W, q.device), float("-inf"))
    return torch.logsumexp(s, -1)


def ext_impl(q, k, v, W):
    """The extension: differentiable out (ops.attention) and its saved lse (torch.ops.swarr.fwd)."""
    out = ops.attention(q, k, v, W)
    dt = q.dtype if q.is_cuda else torch.float32  # the CPU kernels compute 16-bit inputs in float32
    _, lse = torch.ops.swarr.fwd(*(t.detach().to(dt).contiguous() for t in (q, k, v)), W, q.shape[-1] ** -0.5)
    return out, lse


def correctness_cases(full=True):
    """(B, Hq, Hkv, N, D, W, rows): lengths around the window for each head dim (W = 64, a tile multiple, for D=64;
    W = 80, off the tiles, for D=128), and a middle block rows = (lo, hi) of a long sequence. full=False: the same
    cases at toy sizes (the CPU test)."""
    edges, (N, W, n_rows, off) = (((64, 64), (128, 80)), (32768, 4096, 192, 37)) if full else \
        (((16, 16), (32, 20)), (160, 24, 20, 5))
    cases = []
    for D, w in edges:
        cases += [(2, 8, 2, n, D, w, None) for n in (w - 1, w, w + 1, 2 * w + 3)]
    lo = N // 2 + off  # not on a 64-query block boundary
    cases += [(1, 8, 2, N, D, W, (lo, lo + n_rows)) for D, _ in edges]
    return cases


def check_case(case, dtype, device, impl=ext_impl, seed=0):
    """Errors of impl and of the SDPA peer (same dtype, window mask) against float64, and the pass verdict.
    With rows = (lo, hi), only those queries get an output gradient: the reference runs on the keys they see,
    [lo - W + 1, hi), and impl's dk/dv must be exactly zero outside them."""
    B, Hq, Hkv, N, D, W, rows = case
    g = torch.Generator(device=device).manual_seed(seed)
    lo, hi = rows or (0, N)
    ks = max(0, lo - W + 1)  # the first key any checked query sees
    rnd = lambda h: torch.randn(B, h, N, D, device=device, generator=g).to(dtype)  # noqa: E731
    q, k, v, dout = rnd(Hq), rnd(Hkv), rnd(Hkv), rnd(Hq)
    dout[:, :, :lo] = 0
    dout[:, :, hi:] = 0
    scale = D ** -0.5

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = impl(*leaves, W)
    dq, dk, dv = torch.autograd.grad(out, leaves, dout)
    res = {"outside_nonzero": int((dk[:, :, :ks] != 0).sum() + (dk[:, :, hi:] != 0).sum()
                                  + (dv[:, :, :ks] != 0).sum() + (dv[:, :, hi:] != 0).sum())}
    got = {"out": out[:, :, lo:hi], "lse": lse[:, :, lo:hi], "dq": dq[:, :, lo:hi], "dk": dk[:, :, ks:hi],
           "dv": dv[:, :, ks:hi]}
    del out, lse, dq, dk, dv, leaves

    def run(kind):  # the sub-sequence [ks, hi) in float64 (the reference) or in dtype (the SDPA peer)
        sub = [t[:, :, ks:hi].to(torch.float64 if kind == "ref" else dtype).requires_grad_() for t in (q, k, v)]
        o = swarr.attention_ref(*sub, W)
        grads = torch.autograd.grad(o, sub, dout[:, :, ks:hi].to(o.dtype))
        r = lo - ks
        res = {"out": o.detach()[:, :, r:], "dq": grads[0][:, :, r:], "dk": grads[1], "dv": grads[2]}
        if kind == "ref":  # SDPA does not return its lse: lse has a fixed bound instead of a peer
            res["lse"] = lse_reference(*(t.detach() for t in sub[:2]), W, scale)[:, :, r:]
        return res
    ref = run("ref")
    peer = run("peer")
    ok = res["outside_nonzero"] == 0
    for name in got:
        if name == "lse":
            e, p, bound = abs_err(got[name], ref[name]), None, LSE_BOUND
        else:
            e, p = row_err(got[name], ref[name]), row_err(peer[name], ref[name])
            bound = 2 * p
        res[name] = {"ext": e, "sdpa": p, "bound": bound, "ok": e <= bound}
        ok &= e <= bound
    res["ok"] = bool(ok)
    return res


def stage_correct(device, full=True, impl=ext_impl, dtypes=(torch.float16, torch.bfloat16)):
    """Every case in every dtype, with outputs NaN-poisoned. Returns the rows and the verdict."""
    old = os.environ.get("SWARR_POISON")
    os.environ["SWARR_POISON"] = "1"
    try:
        rows = []
        for dtype in dtypes:
            for case in correctness_cases(full):
                r = check_case(case, dtype, device, impl)
                B, Hq, Hkv, N, D, W, blk = case
                r["case"] = f"{str(dtype)[6:]} B={B} H={Hq}/{Hkv} N={N} D={D} W={W}" + (f" rows {blk}" * bool(blk))
                rows.append(r)
                errs = " ".join(f"{n} {r[n]['ext']:.1e}/{r[n]['bound']:.1e}" for n in ("out", "lse", "dq", "dk", "dv"))
                print(f"  {r['case']}: {'ok' if r['ok'] else 'FAIL'} (error/bound) {errs}", flush=True)
    finally:
        if old is None:
            os.environ.pop("SWARR_POISON", None)
        else:
            os.environ["SWARR_POISON"] = old
    worst = max((r[n]["ext"] / r[n]["bound"] if r[n]["bound"] > 0 else math.inf)
                for r in rows for n in ("out", "lse", "dq", "dk", "dv"))
    return {"cases": rows, "passed": sum(r["ok"] for r in rows), "total": len(rows), "worst_err_over_bound": worst,
            "ok": all(r["ok"] for r in rows)}


# ---------------------------------------------------------------------------------------------------------------
# speed: forward and backward

def speed_grid(full=True):
    """(D, N, W) in the order they are timed: the target first, so a short budget still measures it."""
    if not full:
        return [(16, 256, 32), (16, 128, 64)]
    return [(D, N, W) for N in (32768, 8192) for W in (4096, 512) for D in (64, 128)]


def time_fwd_bwd(fn, sets, device):
    """(forward ms, backward ms) of fn(q, k, v): forward under no_grad; backward as autograd.grad of a forward
    kept alive per input set (retain_graph), so only the backward kernels are timed."""
    with torch.no_grad():
        fwd = timed_ms(lambda i: fn(*sets[i % len(sets)][:3]), device)
    outs = []
    for q, k, v, _ in sets:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        outs.append((fn(*leaves), leaves))
    bwd = timed_ms(lambda i: torch.autograd.grad(outs[i % len(outs)][0], outs[i % len(outs)][1],
                                                 sets[i % len(sets)][3], retain_graph=True), device)
    return fwd, bwd


def flash_causal(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def stage_speed(device, rep=None, full=True, dtype=torch.bfloat16, H=16):
    """The extension vs SDPA flash causal vs SDPA with a window mask, forward and backward, at every grid size."""
    rows, flash = [], {}
    for D, N, W in speed_grid(full):
        if rep is not None and rep.left() < 30:
            rows.append({"D": D, "N": N, "W": W, "skipped": "budget"})
            continue
        sets = [[torch.randn(1, H, N, D, device=device, dtype=dtype) for _ in range(4)] for _ in range(2)]
        r = {"D": D, "N": N, "W": W, "B": 1, "H": H, "dtype": str(dtype)[6:]}
        r["ext_fwd_ms"], r["ext_bwd_ms"] = time_fwd_bwd(lambda q, k, v: ops.attention(q, k, v, W), sets, device)
        r["ref_fwd_ms"], r["ref_bwd_ms"] = time_fwd_bwd(lambda q, k, v: swarr.attention_ref(q, k, v, W), sets,
                                                        device)
        if (D, N) not in flash:
            try:
                flash[D, N] = time_fwd_bwd(flash_causal, sets, device)
            except RuntimeError as e:  # no flash kernel for this dtype/device
                flash[D, N] = (None, None)
                r["flash_error"] = str(e).splitlines()[0][:200]
        r["flash_fwd_ms"], r["flash_bwd_ms"] = flash[D, N]
        fl = 4 * window_pairs(N, W) * D * H  # forward flops; the backward does 2.5x as many (5 products vs 2)
        r["ext_fwd_tflops"] = fl / r["ext_fwd_ms"] / 1e9
        r["ext_bwd_tflops"] = 2.5 * fl / r["ext_bwd_ms"] / 1e9
        if r["flash_fwd_ms"]:
            r["fwd_x_flash"] = r["flash_fwd_ms"] / r["ext_fwd_ms"]
            r["fwdbwd_x_flash"] = (r["flash_fwd_ms"] + r["flash_bwd_ms"]) / (r["ext_fwd_ms"] + r["ext_bwd_ms"])
        r["fwd_x_ref"], r["bwd_x_ref"] = r["ref_fwd_ms"] / r["ext_fwd_ms"], r["ref_bwd_ms"] / r["ext_bwd_ms"]
        print(f"  D={D} N={N} W={W}: ext fwd {r['ext_fwd_ms']:.3f} bwd {r['ext_bwd_ms']:.3f} ms | flash causal "
              f"{r['flash_fwd_ms'] or float('nan'):.3f} / {r['flash_bwd_ms'] or float('nan'):.3f} | SDPA mask "
              f"{r['ref_fwd_ms']:.3f} / {r['ref_bwd_ms']:.3f}", flush=True)
        rows.append(r)
        del sets
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------------------------
# decode

def stage_decode(device, full=True, dtype=torch.bfloat16):
    """Kernel level (CUDA graph of one call per layer) and model level (swarr.CudaGraphStep at two contexts)."""
    B, Hq, Hkv, D, layers = (8, 32, 8, 128, 8) if full else (2, 4, 2, 16, 2)
    windows, contexts = ((512, 4096), (8192, 32768)) if full else ((16,), (64, 128))
    res = {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "layers_per_graph": layers, "kernel": [], "model": []}
    qs = [torch.randn(B, Hq, D, device=device, dtype=dtype) for _ in range(layers)]

    def caches(S):
        return [(torch.randn(B, Hkv, S, D, device=device, dtype=dtype),
                 torch.randn(B, Hkv, S, D, device=device, dtype=dtype)) for _ in range(layers)]

    def calls(fn, kv, valid):
        return [lambda q=q, k=k, v=v: fn(q, k, v, valid) for q, (k, v) in zip(qs, kv)]

    sdpa = lambda q, k, v, _: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)  # noqa: E731
    for S in windows + contexts:
        kv = caches(S)
        valid = torch.full((B,), S, device=device, dtype=torch.long)
        r = {"slots": S, "kind": "ring W" if S in windows else "full context"}
        r["ext_us"] = 1e3 * graph_ms(calls(ops.decode, kv, valid), device)
        if S in windows:
            r["ref_us"] = 1e3 * graph_ms(calls(swarr.decode_ref, kv, valid), device)
        r["sdpa_us"] = 1e3 * graph_ms(calls(sdpa, kv, valid), device)
        r["ext_GBps"] = 2 * B * Hkv * S * D * kv[0][0].element_size() / (r["ext_us"] * 1e3)
        res["kernel"].append(r)
        print(f"  decode {r['kind']} {S}: ext {r['ext_us']:.1f} us ({r['ext_GBps']:.0f} GB/s), SDPA "
              f"{r['sdpa_us']:.1f} us" + (f", ref {r['ref_us']:.1f} us" if "ref_us" in r else ""), flush=True)
        del kv
    res["model"] = model_decode(device, full, dtype)
    return res


def model_decode(device, full=True, dtype=torch.bfloat16):
    """ms per generated token of a random model whose caches already hold `context` tokens, windowed (all layers
    W) and full attention. The windowed model's time should not depend on the context."""
    if full:
        cfg = dict(vocab_size=8192, dim=2048, n_layers=8, n_heads=16, n_kv_heads=4, head_dim=128, hidden_dim=5632)
        B, W, contexts, steps = 8, 4096, (8192, 32768), 30
    else:
        cfg = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48)
        B, W, contexts, steps = 2, 16, (32, 64), 4
    torch.manual_seed(0)
    model = swarr.Transformer(swarr.Config(arch="LlamaForCausalLM", **cfg)).to(device=device, dtype=dtype).eval()
    rows = []
    for window in (W, None):
        model.set_window(window)
        for ctx in contexts:
            cs = swarr.make_caches(model, B, ctx + steps + 4)
            for c in cs:
                c.k.normal_()
                c.v.normal_()
                c.pos.fill_(ctx)
            tok = torch.randint(0, cfg["vocab_size"], (B,), device=device)
            with torch.no_grad():
                if torch.device(device).type == "cuda":
                    step = swarr.CudaGraphStep(model, cs, B)
                else:
                    step = lambda t: model(t[:, None], caches=cs)[:, -1]  # noqa: E731
                for _ in range(3):  # two eager steps, then the capture
                    step(tok)
                ms = timed_ms(lambda i: step(tok), device, min_reps=steps, max_reps=steps)
            rows.append({"window": window, "context": ctx, "ms_per_token": ms,
                         "cache_MiB": sum(c.nbytes() for c in cs) / 2 ** 20})
            print(f"  model decode window={window} context={ctx}: {ms:.3f} ms/token", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# FlexAttention (subprocess: compiling can take long, and a hang must not take the check with it)

def sliding_window_mask_mod(W: int):
    """FlexAttention mask for our W (keys a query sees, itself included): kv <= q and q - kv < W.
    (The often-seen `q - kv <= W` lets W + 1 keys through.)"""
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < W)
    return mask_mod


def flex_worker(out: Path, deadline: float):
    """Compile and check FlexAttention at every speed-grid size, write flex.ready, wait for flex.go (the main
    process's own timing is done), then time; flex.json is rewritten after each size."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    torch._dynamo.config.cache_size_limit = 64  # one compiled variant per size is fine
    flex = torch.compile(flex_attention)
    res = {"mask": "kv <= q & q - kv < W", "rows": []}
    save = lambda: (out / "flex.json").write_text(json.dumps(_clean(res), indent=1))  # noqa: E731
    # the translation of W, checked on a small problem first (float32, against the reference)
    q, k, v = (torch.randn(1, 4, 300, 64, device="cuda") for _ in range(3))
    bm = create_block_mask(sliding_window_mask_mod(37), None, None, 300, 300, device="cuda")
    res["small_check_err"] = row_err(flex(q, k, v, block_mask=bm), swarr.attention_ref(q, k, v, 37))
    save()
    prepared = []
    for D, N, W in speed_grid(True):
        if time.time() > deadline - 20:
            break
        try:
            bm = create_block_mask(sliding_window_mask_mod(W), None, None, N, N, device="cuda")
            sets = [[torch.randn(1, 16, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
                    for _ in range(2)]
            leaves = [t.clone().requires_grad_() for t in sets[0][:3]]
            o = flex(*leaves, block_mask=bm)  # compile forward and backward now
            torch.autograd.grad(o, leaves, sets[0][3])
            torch.cuda.synchronize()
            prepared.append((D, N, W, bm, sets))
        except Exception as e:  # one size that fails to compile leaves the others
            res.setdefault("errors", []).append(f"D={D} N={N} W={W}: {type(e).__name__}: {str(e)[:300]}")
        res["compiled_until_s"] = round(time.time(), 1)
        save()
    (out / "flex.ready").write_text("ready")
    while not (out / "flex.go").exists() and time.time() < deadline - 10:
        time.sleep(0.5)
    for D, N, W, bm, sets in prepared:
        if time.time() > deadline - 5:
            break
        fwd, bwd = time_fwd_bwd(lambda q, k, v: flex(q, k, v, block_mask=bm), sets, "cuda")
        res["rows"].append({"D": D, "N": N, "W": W, "flex_fwd_ms": fwd, "flex_bwd_ms": bwd})
        save()
    res["done"] = True
    save()


# ---------------------------------------------------------------------------------------------------------------
# the other stages and the summary

def stage_env(device):
    p = torch.cuda.get_device_properties(device)
    info = {"device": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
            "memory_GiB": round(p.total_memory / 2 ** 30, 1), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "SWARR_CUDA_REF_OPS": os.environ.get("SWARR_CUDA_REF_OPS", "")}
    from torch.utils.cpp_extension import CUDA_HOME
    try:
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else "nvcc"
        r = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30)
        info["nvcc"] = r.stdout.strip().splitlines()[-1] if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvcc"] = f"unavailable: {e}"
    # the two ceilings: a 1 GiB device-to-device copy (bytes read + written) and a bf16 matmul on random data
    a = torch.randn(2 ** 28, device=device)
    b = torch.empty_like(a)
    ms = timed_ms(lambda i: b.copy_(a), device)
    info["copy_GBps"] = 2 * a.nbytes / (ms * 1e6)
    n = 8192
    x, y = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device,
                                                                               dtype=torch.bfloat16)
    info["matmul_bf16_TFLOPs"] = 2 * n ** 3 / (timed_ms(lambda i: x @ y, device) * 1e9)
    return info


def stage_build(rep: Report, timeout: float):
    code = ("import json; from csrc import ops; ops.load(); "
            "print('SWARR_EXT', json.dumps({k: v for k, v in ops.status.items() if k != 'ops'}))")
    rc, secs, tail = run_bounded([sys.executable, "-c", code], timeout, rep.dir / "build.log")
    info = {"build_s": secs, "exit": rc, "log_tail": tail[-1500:]}
    if rc is None:
        raise RuntimeError(f"the build did not finish in {timeout:.0f} s (build.log)")
    ops.load()  # built now: loads the cached library
    info.update({k: v for k, v in ops.status.items() if k != "ops"})
    if not ops.status.get("cuda"):
        raise RuntimeError(f"the extension was built without CUDA: {ops.status.get('why') or tail[-300:]}")
    ops.set_backend("ext")
    return info


def stage_pytest(rep: Report, timeout: float):
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_kernels.py",
           "tests/test_cuda_generate.py"]
    rc, secs, tail = run_bounded(cmd, timeout, rep.dir / "pytest.log")
    last = [ln for ln in tail.splitlines() if ln.strip()]
    failed = [ln for ln in tail.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return {"exit": rc, "seconds": secs, "result": last[-1] if last else "", "failed": failed[:20],
            "ok": rc == 0}


def op_choice(speed_rows, decode_rows):
    """Per op, which backend was faster at every measured size: 'ext', 'ref', or 'mixed' (the default stays)."""
    pairs = {"fwd": [(r["ext_fwd_ms"], r["ref_fwd_ms"]) for r in speed_rows if "ext_fwd_ms" in r],
             "bwd": [(r["ext_bwd_ms"], r["ref_bwd_ms"]) for r in speed_rows if "ext_bwd_ms" in r],
             "decode": [(r["ext_us"], r["ref_us"]) for r in decode_rows if "ref_us" in r]}
    out = {}
    for op, ps in pairs.items():
        if not ps:
            continue
        faster = {"ext" if e <= r else "ref" for e, r in ps}
        out[op] = {"choice": faster.pop() if len(faster) == 1 else "mixed",
                   "ref_over_ext": [round(r / e, 2) for e, r in ps]}
    return out


def summary(res: dict) -> list[str]:
    """One line per target (PASS / FAIL / NOT RUN), from whatever stages produced results."""
    lines = []
    env = res.get("env", {})
    lines.append(f"== gpu_check: {env.get('device', '?')} (sm {env.get('capability', '?')}), torch "
                 f"{env.get('torch', '?')} CUDA {env.get('torch_cuda', '?')}, {res.get('elapsed_s', '?')} s; "
                 f"ceilings {env.get('copy_GBps', float('nan')):.0f} GB/s copy, "
                 f"{env.get('matmul_bf16_TFLOPs', float('nan')):.0f} TFLOP/s bf16 matmul")
    b = res.get("build", {})
    lines.append(f"build    {'PASS' if b.get('cuda') else 'FAIL'}  {b.get('build_s', '?')} s, "
                 f"{b.get('name', b.get('error', ''))}")
    c = res.get("correct", {})
    if "total" in c:
        lines.append(f"correct  {'PASS' if c['ok'] else 'FAIL'}  {c['passed']}/{c['total']} cases within bounds "
                     f"(ext error <= 2x SDPA-with-mask's, per row; lse < {LSE_BOUND}); worst error/bound "
                     f"{c['worst_err_over_bound']:.2f}")
    else:
        lines.append(f"correct  NOT RUN  {c.get('error') or c.get('status', '')}")
    rows = [r for r in res.get("speed", {}).get("rows", []) if "ext_fwd_ms" in r]
    tgt = [r for r in rows if r["N"] == TARGET["N"] and r["W"] == TARGET["W"] and r.get("fwd_x_flash")]
    if tgt:
        ok = all(r["fwd_x_flash"] >= 3 for r in tgt)
        lines.append(f"fwd 3x   {'PASS' if ok else 'FAIL'}  N={TARGET['N']} W={TARGET['W']} bf16, forward vs SDPA "
                     f"flash causal: " + ", ".join(f"D={r['D']} {r['fwd_x_flash']:.2f}x ({r['ext_fwd_ms']:.2f} vs "
                                                   f"{r['flash_fwd_ms']:.2f} ms)" for r in tgt)
                     + "; fwd+bwd " + ", ".join(f"D={r['D']} {r['fwdbwd_x_flash']:.2f}x" for r in tgt))
    else:
        lines.append("fwd 3x   NOT RUN")
    fx = res.get("flex", {})
    flex = {(r["D"], r["N"], r["W"]): r for r in fx.get("rows", [])}
    vs = []
    for r in rows:
        f = flex.get((r["D"], r["N"], r["W"]))
        if f and r["N"] == TARGET["N"]:
            vs.append(f"D={r['D']} W={r['W']} {f['flex_fwd_ms'] / r['ext_fwd_ms']:.2f}x/"
                      f"{f['flex_bwd_ms'] / r['ext_bwd_ms']:.2f}x")
    mask_ok = fx.get("small_check_err", math.inf) < 1e-3  # the W translation, checked against the reference
    if vs:
        lines.append(f"flex     {'info' if mask_ok else 'FAIL (mask check)'}  N={TARGET['N']}, FlexAttention time "
                     f"over ext time (fwd/bwd): " + ", ".join(vs))
    else:
        lines.append(f"flex     NOT RUN  {fx.get('error') or fx.get('status', '')}")
    model = res.get("decode", {}).get("model", [])
    by = {(r["window"], r["context"]): r["ms_per_token"] for r in model}
    ctx = sorted({r["context"] for r in model})
    win = [w for w in {r["window"] for r in model} if w is not None]
    if len(ctx) == 2 and win and (win[0], ctx[0]) in by and (win[0], ctx[1]) in by:
        g = by[win[0], ctx[1]] / by[win[0], ctx[0]]
        full = (f"; full attention {by[None, ctx[1]] / by[None, ctx[0]]:.2f}x"
                if (None, ctx[0]) in by and (None, ctx[1]) in by else "")
        lines.append(f"decode   {'PASS' if g <= 1.15 else 'FAIL'}  flat in context: W={win[0]} model, time/token "
                     f"at {ctx[1]} over {ctx[0]} = {g:.2f}x (target <= 1.15x){full}")
    else:
        lines.append("decode   NOT RUN")
    ops = op_choice(rows, res.get("decode", {}).get("kernel", []))
    if ops:
        ref_ops = [op for op, o in ops.items() if o["choice"] == "ref"]
        lines.append("per-op   " + ", ".join(f"{op}: {o['choice']} faster (ref/ext time {o['ref_over_ext']})"
                                             for op, o in ops.items())
                     + f" -> SWARR_CUDA_REF_OPS={','.join(ref_ops) or '(empty: ext everywhere)'}")
    p = res.get("pytest", {})
    lines.append(f"pytest   {'PASS' if p.get('ok') else ('FAIL' if 'exit' in p else 'NOT RUN')}  "
                 f"{p.get('result', p.get('error', p.get('status', '')))}")
    return lines


def run_stage(rep: Report, skip: dict, name: str, need_s: float, fn):
    """Run one stage unless skipped (skip: stage -> reason) or out of budget; record its result (or its error) and
    save the report."""
    if name in skip:
        rep.set(name, {"status": f"skipped ({skip[name]})"})
        return None
    if rep.left() < need_s:
        rep.set(name, {"status": f"skipped: {rep.left():.0f} s of budget left, the stage needs ~{need_s:.0f} s"})
        print(f"[{name}] skipped (budget)", flush=True)
        return None
    print(f"[{name}] ...", flush=True)
    t = time.time()
    try:
        out = fn()
    except Exception as e:  # a failed stage is recorded; the ones after it still try
        out = {"error": f"{type(e).__name__}: {str(e)[:500]}", "traceback": traceback.format_exc()[-2000:]}
        print(f"[{name}] error: {out['error']}", flush=True)
    out["stage_s"] = round(time.time() - t, 1)
    rep.set(name, out)
    return out


def main(argv=None):
    a = parse_args(argv)
    if a.flex_worker:
        return flex_worker(Path(a.out), time.time() + a.budget)
    if not torch.cuda.is_available():
        raise SwarrError("no CUDA device: gpu_check needs one (the CPU tests are `pytest tests`)")
    rep, device = Report(a.out, a.budget), "cuda"
    for f in ("flex.ready", "flex.go", "flex.json"):
        (rep.dir / f).unlink(missing_ok=True)
    skip = {s: "--skip" for s in a.skip}
    run_stage(rep, skip, "env", 0, lambda: stage_env(device))
    flex_proc = None
    if "flex" not in a.skip:  # compiles while the build runs; times only after the speed and decode stages
        flex_budget = max(10.0, rep.left() - 90)
        flex_log = open(rep.dir / "flex.log", "w")
        flex_proc = subprocess.Popen([sys.executable, __file__, "--flex-worker", "--out", str(rep.dir), "--budget",
                                      str(flex_budget)], cwd=ROOT, stdout=flex_log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
    build = run_stage(rep, skip, "build", 60, lambda: stage_build(rep, min(240.0, rep.left() - 30)))
    if not (build and build.get("cuda")):
        skip.update({s: "no CUDA extension" for s in ("correct", "speed", "decode") if s not in skip})
    run_stage(rep, skip, "correct", 40, lambda: stage_correct(device))
    if flex_proc is not None:  # let its compilation finish before timing anything (bounded wait)
        t_end = time.time() + min(60.0, max(0.0, rep.left() - 150))
        while flex_proc.poll() is None and not (rep.dir / "flex.ready").exists() and time.time() < t_end:
            time.sleep(0.5)
        rep.set("flex_compiled_before_speed", (rep.dir / "flex.ready").exists())
    run_stage(rep, skip, "speed", 40, lambda: stage_speed(device, rep))
    run_stage(rep, skip, "decode", 25, lambda: stage_decode(device))
    if flex_proc is not None:
        (rep.dir / "flex.go").write_text("go")

        def collect():
            try:
                flex_proc.wait(timeout=max(1.0, rep.left() - 75))
            except subprocess.TimeoutExpired:
                os.killpg(flex_proc.pid, signal.SIGKILL)
                flex_proc.wait()
            f = rep.dir / "flex.json"
            out = json.loads(f.read_text()) if f.exists() else {}
            out["exit"] = flex_proc.returncode
            if flex_proc.returncode != 0:
                log = (rep.dir / "flex.log").read_text(errors="replace")
                out["error"] = f"worker exit {flex_proc.returncode}: " + (log.strip().splitlines() or [""])[-1][:300]
            return out
        run_stage(rep, {}, "flex", 0, collect)
    else:
        rep.set("flex", {"status": "skipped (--skip)"})
    run_stage(rep, skip, "pytest", 30, lambda: stage_pytest(rep, min(180.0, rep.left() - 5)))
    lines = summary(rep.data)
    rep.set("summary", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    run_cli(main)
