"""Benchmarks of windowed attention: the peers measured side by side in one run and shown as ratios.

    python bench.py [kernel | e2e | all] [--quick] [--json PATH] [--threads N]        (default: all)
    e2e flags: [--model M] [--device D] [--dtype T] [--windows W,..] [--contexts C,..] [--batches B,..]
               [--steps S] [--prefill-max C]
    e.g. python bench.py e2e --model qwen2.5-1.5b --device cuda --dtype bfloat16

kernel: one row per (op, N, W). The compiled extension (swarr.attention, swarr.decode) against chunked SDPA
(queries in chunks of 128, each against only its key window; pure PyTorch), flex (torch.compile'd FlexAttention
with a sliding-window block mask; forward only: it has no CPU backward), SDPA causal (full attention, the model
before the conversion) and SDPA banded (a banded boolean mask: computes the whole N x N square); for decode, SDPA
over the W-slot ring buffer and over a full N-token cache. Every candidate that computes windowed attention is first
checked against a float64 reference on fresh random inputs (gradients too). Times are medians of >= 3 repetitions,
the candidates of a row taking turns so that load from other jobs hits them alike; ratio = peer time / ext time.
Work (flops, bytes) is counted exactly and the achieved rates stand beside this machine's fp32 matmul rate and copy
bandwidth, measured in the same run.

e2e: SA (full attention) vs SWA at each window, per model, batch and context, through the real generation path
(swarr.make_caches, swarr.prefill, swarr.decode_loop): steady-state decode tok/s with caches filled up to the
context, the predicted speed-up from the bytes a decode step reads, the KV bytes the caches hold, prefill time.
A run whose memory allocation fails is reported as "does not fit". On a CPU that other jobs are using, --threads 1
avoids stalls of ms per parallel op.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import swarr
from csrc import ops
from support.checkpoint import DTYPES, param_count
from support.flags import check_device, check_flags, check_window
from support.safe_io import SwarrError, run_cli

REPS = 3     # every timed row is the median of at least this many repetitions
CHUNK = 128  # query chunk of the chunked-SDPA peer
TOL = 1e-3   # max |error| against the float64 reference for a candidate to count as computing the same thing
SAME_RESULT = ("ext", "chunked SDPA", "flex", "SDPA banded", "SDPA ring")  # SDPA causal / full cache: full attention


# ---------------------------------------------------------------------------------------------------------------
# measuring


def measure(candidates: dict, reps: int = REPS, warmup: int = 1) -> dict:
    """{name: (fn, make_args)} -> {name: median ms of fn(*args)} over max(reps, REPS) repetitions after a warm-up.
    The candidates take turns, so a change in machine load hits all of them alike; each alternates between two fresh
    random input sets; a short pause lets the previous candidate's OpenMP threads stop spin-waiting."""
    sets = {name: [make(), make()] for name, (fn, make) in candidates.items()}
    times = {name: [] for name in candidates}
    for i in range(warmup + max(reps, REPS)):
        for name, (fn, _) in candidates.items():
            time.sleep(0.01)
            t0 = time.perf_counter()
            fn(*sets[name][i % 2])
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_ceilings(quick: bool) -> dict:
    """fp32 matmul GFLOP/s (n x n x n) and copy bandwidth in GB/s (bytes read + bytes written)."""
    n, numel = 1024 if quick else 2048, 32 * 2 ** 20  # 128 MB of float32: well beyond the caches
    dst = torch.empty(numel)
    t = measure({"mm": (torch.mm, lambda: (torch.randn(n, n), torch.randn(n, n))),
                 "copy": (dst.copy_, lambda: (torch.randn(numel),))}, 5 if quick else 10)
    return {"matmul_gflops": 2 * n ** 3 / t["mm"] / 1e6, "copy_gbs": 2 * 4 * numel / t["copy"] / 1e6}


# ---------------------------------------------------------------------------------------------------------------
# kernel section: the peers, the float64 check, the table


def band_pairs(N: int, W: int) -> int:
    """Exact number of (query, key) pairs inside the window: sum over i of min(i + 1, W)."""
    w = min(N, W)
    return w * (w + 1) // 2 + (N - w) * W


def sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)


def chunks(N: int, W: int, size: int) -> list:
    """(start, end, key_start) per chunk of `size` queries: the chunk's queries see keys [start - W + 1, end)."""
    return [(s, min(N, s + size), max(0, s - W + 1)) for s in range(0, N, size)]


def chunked_sdpa(N: int, W: int):
    """The chunked-SDPA peer: SDPA on each chunk of CHUNK queries against its key window (masks built once)."""
    parts = [(s, e, ks, swarr.window_mask(e - s, e - ks, W)) for s, e, ks in chunks(N, W, CHUNK)]
    return lambda q, k, v: torch.cat([sdpa(q[:, :, s:e], k[:, :, ks:e], v[:, :, ks:e], attn_mask=m)
                                      for s, e, ks, m in parts], dim=2)


def reference(W: int):
    """swarr.attention_ref per chunk of 512 queries against its key window: the same result as over the whole
    sequence, in O(N * (512 + W)) memory instead of O(N^2)."""
    return lambda q, k, v: torch.cat([swarr.attention_ref(q[:, :, s:e], k[:, :, ks:e], v[:, :, ks:e], W)
                                      for s, e, ks in chunks(q.shape[2], W, 512)], dim=2)


def flex_peer(N: int, W: int, make_args):
    """Compiled FlexAttention with a sliding-window block mask, or the reason it is unavailable (str)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        # Flex examples often write q - kv <= W, which is W + 1 keys; swarr's W counts the query itself.
        block_mask = create_block_mask(lambda b, h, qi, kv: (qi >= kv) & (qi - kv < W), None, None, N, N,
                                       device="cpu")
        fn = flex_peer.compiled = getattr(flex_peer, "compiled", None) or torch.compile(flex_attention)
        with torch.no_grad():
            fn(*make_args(), block_mask=block_mask, enable_gqa=True)  # compile now: failures are caught here
        return lambda q, k, v: fn(q, k, v, block_mask=block_mask, enable_gqa=True)
    except Exception as e:  # noqa: BLE001 -- a peer that does not compile is reported in the table, not raised
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:120]


def fwd_bwd(attn):
    """Forward + backward of attn(q, k, v) against a fixed upstream gradient: returns (dq, dk, dv)."""
    return lambda q, k, v, dout: torch.autograd.grad(attn(q, k, v), (q, k, v), dout)


def check(cands: dict, ref_fn, make, where: str, notes: list) -> dict:
    """{name: max |candidate - reference|} over all outputs on one fresh random input set, the reference computed
    in float64 from the same inputs; for the candidates in SAME_RESULT. A peer off by more than TOL is removed from
    cands with a note; a wrong extension stops the benchmark (its timings would mean nothing)."""
    args = make()
    want = ref_fn(*(a.detach().double().requires_grad_(a.requires_grad) if a.is_floating_point() else a
                    for a in args))
    errs = {}
    for name in [n for n in cands if n in SAME_RESULT]:
        got = cands[name][0](*args)
        errs[name] = max((g.double() - w).abs().max().item() for g, w in
                         zip(*(x if isinstance(x, tuple) else (x,) for x in (got, want))))
        if errs[name] > TOL:
            if name == "ext":
                raise SwarrError(f"the extension's {where} is off by {errs[name]:.1e} from the float64 reference")
            notes.append(f"{name} dropped at {where}: off by {errs[name]:.1e} from the float64 reference")
            del cands[name]
    return errs


def kernel_rows(sizes, decode_sizes, reps: int, decode_calls: int = 200) -> tuple[list, list]:
    """The kernel table's rows: fwd per (N, W) in sizes, fwd+bwd where N <= 8192, decode per (N, W) in decode_sizes."""
    H, Hkv, D, B = 8, 2, 64, 1
    rows, notes = [], []

    def inputs(N, grad=False):
        def make():
            q, k, v = (torch.randn(B, h, N, D, requires_grad=grad) for h in (H, Hkv, Hkv))
            return (q, k, v, torch.randn(B, H, N, D)) if grad else (q, k, v)
        return make

    for N, W in sizes:
        flops, where = 4 * D * H * band_pairs(N, W), f"N={N} W={W}"
        mask = swarr.window_mask(N, N, W) if N <= 8192 else None  # 8192^2 booleans: 64 MB
        ext, chunk_peer = (lambda q, k, v: swarr.attention(q, k, v, W)), chunked_sdpa(N, W)
        cands = {"ext": (ext, inputs(N)), "chunked SDPA": (chunk_peer, inputs(N))}
        with torch.no_grad():
            flex = flex_peer(N, W, inputs(N))
        if isinstance(flex, str):
            notes.append(f"flex n/a at {where}: {flex}")
        else:
            cands["flex"] = (flex, inputs(N))
        cands["SDPA causal"] = (lambda q, k, v: sdpa(q, k, v, is_causal=True), inputs(N))
        if mask is not None:
            cands["SDPA banded"] = (lambda q, k, v: sdpa(q, k, v, attn_mask=mask), inputs(N))
        else:
            notes.append(f"SDPA banded skipped at N={N}: its boolean mask alone is {N * N / 2**30:.0f} GB")
        with torch.no_grad():
            err = check(cands, reference(W), inputs(N), f"fwd {where}", notes)
            rows.append({"op": "fwd", "N": N, "W": W, "gflop": flops / 1e9, "max_err": err, **measure(cands, reps)})
        if N > 8192:
            continue  # forward only at this length
        cands = {"ext": (fwd_bwd(ext), inputs(N, True)), "chunked SDPA": (fwd_bwd(chunk_peer), inputs(N, True)),
                 "SDPA causal": (fwd_bwd(lambda q, k, v: sdpa(q, k, v, is_causal=True)), inputs(N, True))}
        if N <= 2048:  # beyond, the banded peer's N^2 activations cost more memory than the row is worth
            cands["SDPA banded"] = (fwd_bwd(lambda q, k, v: sdpa(q, k, v, attn_mask=mask)), inputs(N, True))
        err = check(cands, fwd_bwd(reference(W)), inputs(N, True), f"fwd+bwd {where}", notes)
        rows.append({"op": "fwd+bwd", "N": N, "W": W, "gflop": 3.5 * flops / 1e9, "max_err": err,
                     **measure(cands, reps)})
        mask = None  # free the N x N mask before the next size
    if any(r["op"] == "fwd+bwd" for r in rows):
        notes.append("flex has no CPU backward; SDPA banded fwd+bwd only up to N=2048 (N^2 activations)")

    # decode: one new token, B=1, one layer, decode_calls calls per timing; the ring buffer holds W slots whatever
    # the context. All contexts of one W are timed in one interleaved group, so their times compare directly.
    def ring(N, W):
        return lambda: (torch.randn(B, H, D), torch.randn(B, Hkv, W, D), torch.randn(B, Hkv, W, D),
                        torch.full((B,), min(N, W), dtype=torch.long))

    def full(N):
        return lambda: (torch.randn(B, H, 1, D), torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D))

    def calls(fn):
        return lambda *a: [fn(*a) for _ in range(decode_calls)]
    for W in dict.fromkeys(w for _, w in decode_sizes):
        ctxs, cands, errs = [n for n, w in decode_sizes if w == W], {}, {}
        with torch.no_grad():
            for N in ctxs:
                one = {"ext": (swarr.decode, None), "SDPA ring": (swarr.decode_ref, None)}
                errs[N] = check(one, swarr.decode_ref, ring(N, W), f"decode N={N} W={W}", notes)
                cands.update({(name, N): (calls(fn), ring(N, W)) for name, (fn, _) in one.items()})
                cands["SDPA full cache", N] = (calls(sdpa), full(N))
            t = measure(cands, reps)
        for N in ctxs:
            rows.append({"op": "decode", "N": N, "W": W, "gbytes": 2 * min(N, W) * D * Hkv * 4 / 1e9,
                         "max_err": errs[N], **{name: ms / decode_calls for (name, n), ms in t.items() if n == N}})
    return rows, notes


def bench_kernel(args) -> dict:
    ceil = machine_ceilings(args.quick)
    if args.quick:
        rows, notes = kernel_rows([(2048, 256)], [(1024, 256), (32768, 256)], REPS, decode_calls=50)
    else:
        rows, notes = kernel_rows([(N, W) for N in (2048, 8192, 32768) for W in (256, 1024)],
                                  [(N, W) for W in (256, 1024) for N in (1024, 32768)], 5)
    conditions = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
                  "backend": ops.backend_name(), "shape": "B=1 H=8 Hkv=2 D=64 float32", "chunk": CHUNK,
                  **{k: round(v, 1) for k, v in ceil.items()}}
    print_kernel_table(rows, notes, conditions)
    return {"conditions": conditions, "rows": rows, "notes": notes}


PEERS, DECODE_PEERS = ("chunked SDPA", "flex", "SDPA causal", "SDPA banded"), ("SDPA ring", "SDPA full cache")


def print_kernel_table(rows, notes, c):
    print(f"# kernel: CPU {c['cpu']}, {c['threads']} threads, torch {c['torch']}, backend {c['backend']}, "
          f"{c['shape']}")
    print(f"# this machine: fp32 matmul {c['matmul_gflops']:.0f} GFLOP/s, copy {c['copy_gbs']:.1f} GB/s "
          f"(read + write); ratio = peer time / ext time; chunked SDPA uses chunks of {c['chunk']}")

    def peer(r, name, ms=True):
        t = r.get(name)
        if t is None:
            return "-"
        return f"{t:.2f} ({t / r['ext']:.1f}x)" if ms else f"{1e3 * t:.0f}us ({t / r['ext']:.1f}x)"

    for decode, (a, b, unit), peers in ((False, ("op", "N", "ext"), PEERS),
                                        (True, ("decode", "ctx", "ext/token"), DECODE_PEERS)):
        head = f"{a:8}{b:>6}{'W':>6} | {unit:>9} {'GB/s' if decode else 'GFLOP/s':>8} | " + " | ".join(
            f"{p:>16}" for p in peers)
        print("\n" + head + "\n" + "-" * len(head))
        for r in (r for r in rows if (r["op"] == "decode") == decode):
            t, rate = (f"{1e3 * r['ext']:>7.1f}us", r["gbytes"]) if decode else (f"{r['ext']:>7.2f}ms", r["gflop"])
            print(f"{r['op']:8}{r['N']:>6}{r['W']:>6} | {t} {rate / r['ext'] * 1e3:>8.1f} | "
                  + " | ".join(f"{peer(r, p, not decode):>16}" for p in peers))
    print(f"times in ms (decode: per token per layer), medians of >= {REPS} repetitions; flex: forward only")
    errs = [e for r in rows for e in r["max_err"].values()]
    if errs:
        print(f"checked against a float64 reference on fresh random inputs: max |error| {max(errs):.1e} "
              f"({', '.join(p for p in SAME_RESULT if any(p in r['max_err'] for r in rows))}; "
              "SDPA causal and SDPA full cache compute full attention)")
    for n in dict.fromkeys(notes):
        print(f"note: {n}")


# ---------------------------------------------------------------------------------------------------------------
# e2e section: the whole model, SA vs SWA, through the real generation path (make_caches, prefill, decode_loop)


_QWEN25 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
           "tie_word_embeddings": True, "hidden_act": "silu", "use_sliding_window": False}
SHAPES = {  # named shapes, built with random weights: published HF config values
    "tiny": lambda: json.loads((Path(__file__).resolve().parent / "data" / "tiny-sa" / "config.json").read_text()),
    "qwen2.5-0.5b": lambda: {**_QWEN25, "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                             "num_key_value_heads": 2, "intermediate_size": 4864},
    "qwen2.5-1.5b": lambda: {**_QWEN25, "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                             "num_key_value_heads": 2, "intermediate_size": 8960},
}
E2E_DEFAULTS = {"model": "tiny", "windows": [512, 2048, 4096], "contexts": [1024, 4096, 8192, 16384, 32768],
                "batches": [1, 16]}
E2E_QUICK = {"windows": [512], "contexts": [1024, 32768], "batches": [16], "steps": 8, "prefill_max": 1024}
SHORT = 3          # tokens of the short decode_loop run whose time is subtracted (see decode_rate)
OVERHEAD_CTX = 16  # context of the "no KV to speak of" run: the per-step cost outside attention / KV reads
PAPER_32K = 6.2    # the paper's SWA/SA decode speed-up at 32k context
RULES = {  # bench's own flag rules, beside support.flags' (one `error: ...` line each)
    "steps": (lambda v: v > SHORT, f"more than {SHORT} (the {SHORT}-step run is subtracted)"),
    "prefill_max": (lambda v: v >= 0, "0 (none) or more"), "threads": (lambda v: v >= 1, "at least 1")}


def weight_read_bytes(cfg, B: int, dtype_bytes: int) -> int:
    """Weight bytes one decode step reads: every parameter once, except that the embedding lookup of an untied
    model reads only B rows (a tied matrix is read whole by the lm_head anyway, and counted once)."""
    n = param_count(cfg)
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.dim - B * cfg.dim
    return n * dtype_bytes


def kv_bytes(cfg, windows, B: int, C: int, dtype_bytes: int) -> int:
    """KV bytes at context C: what a decode step reads, and what caches sized for C positions hold. A full
    layer has C positions, a windowed one min(W, C); each position is a key and a value of Hkv * head_dim.
    windows: one W (or None) for every layer, or a per-layer list."""
    per_pos = 2 * cfg.n_kv_heads * cfg.head_dim * dtype_bytes * B
    ws = list(windows) if isinstance(windows, (list, tuple)) else [windows] * cfg.n_layers
    return sum(per_pos * (C if w is None else min(w, C)) for w in ws)


def step_bytes(cfg, windows, B: int, C: int, dtype_bytes: int) -> int:
    """Bytes one decode step at context C must read: the weights once plus every sequence's KV."""
    return weight_read_bytes(cfg, B, dtype_bytes) + kv_bytes(cfg, windows, B, C, dtype_bytes)


def predicted_ratio(cfg, W: int, B: int, C: int, dtype_bytes: int) -> float:
    """SWA/SA decode speed-up if a step costs only its memory traffic: step_bytes(SA) / step_bytes(SWA)."""
    return step_bytes(cfg, None, B, C, dtype_bytes) / step_bytes(cfg, W, B, C, dtype_bytes)


def build_model(spec: str, dtype, device):
    """(model, name, source): a checkpoint folder (swarr.load) or a named shape with random weights."""
    if os.path.isdir(spec):
        return swarr.load(spec, dtype, device)[0], os.path.basename(os.path.normpath(spec)), "checkpoint"
    key = spec.lower()
    if key not in SHAPES:
        raise SwarrError(f"--model {spec!r} is neither a checkpoint folder nor a named shape ({', '.join(SHAPES)})")
    model = swarr.Transformer.empty(swarr.Config.from_hf(SHAPES[key](), f"--model {key}"), device, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:  # uniform with std 0.02: about twice as fast to draw as normal_
                p.uniform_(-0.02 * 3 ** 0.5, 0.02 * 3 ** 0.5, generator=gen)
    return model.eval(), key, "random weights"


def _timed(fn, device) -> float:
    """Wall time of fn() in seconds; on CUDA the device is synchronised before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _: None)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def decode_rate(model, B: int, C: int, steps: int) -> dict:
    """Steady-state decode rate at context C: caches for C + steps + 1 positions holding random keys/values up to
    pos = C (as if a C-token prompt had been prefilled), then swarr.decode_loop, greedy with no stop token. The
    difference of a SHORT-token and a `steps`-token run is `steps - SHORT` steps (start-up costs cancel); after a
    warm-up, the median of REPS such pairs."""
    p = next(model.parameters())
    caches = swarr.make_caches(model, B, C + steps + 1)
    for c in caches:
        c.k[:, :, :min(C, c.slots)].normal_()
        c.v[:, :, :min(C, c.slots)].normal_()
    logits = torch.randn(B, model.cfg.vocab_size, device=p.device, dtype=p.dtype)

    def run(n):
        for c in caches:
            c.pos.fill_(C)
        return _timed(lambda: swarr.decode_loop(model, caches, logits, n), p.device)

    run(SHORT)  # warm-up
    pairs = [(run(SHORT), run(steps)) for _ in range(REPS)]
    step_s = statistics.median((t - s) / (steps - SHORT) if t > s else t / (steps - 1) for s, t in pairs)
    return {"tok_s": B / step_s, "step_ms": 1e3 * step_s, "kv_bytes": sum(c.nbytes() for c in caches),
            "tok_s_call": B * steps / statistics.median(t for _, t in pairs)}  # the whole call, start-up included


def prefill_ms(model, C: int, seed: int = 0) -> float:
    """Median wall time of swarr.prefill for one random prompt of C tokens on fresh caches, in ms."""
    dev = next(model.parameters()).device
    prompt = torch.randint(model.cfg.vocab_size, (C,), generator=torch.Generator().manual_seed(seed)).tolist()
    times = []
    for _ in range(REPS):
        caches = swarr.make_caches(model, 1, C + 1)
        times.append(1e3 * _timed(lambda: swarr.prefill(model, [prompt], caches), dev))
        caches = None  # freed before the next run allocates its own
    return statistics.median(times)


def if_fits(measure_fn, device) -> dict:
    """{"status": "ok", **measure_fn()}, or {"status": "does not fit (allocation failed)"} when a memory allocation
    fails (the reason goes to stderr)."""
    try:
        return {"status": "ok", **measure_fn()}
    except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError, and so is a failed CPU allocation
        msg = str(e).lower()
        if not (isinstance(e, torch.OutOfMemoryError) or "out of memory" in msg or "allocate" in msg):
            raise
        print(f"does not fit: {str(e).splitlines()[0][:200]}", file=sys.stderr)
        return {"status": "does not fit (allocation failed)"}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def decode_if_fits(model, B: int, C: int, steps: int) -> dict:
    """{"status", "kv_bytes" (computed, so also there when the caches do not fit), and decode_rate's figures}."""
    p = next(model.parameters())
    kv = kv_bytes(model.cfg, model.windows, B, C + steps + 1, p.element_size())
    return {"kv_bytes": kv, **if_fits(lambda: decode_rate(model, B, C, steps), p.device)}


def sa_and_swa(model, window: int, B: int, C: int, steps: int) -> dict:
    """{"SA": ..., "SWA": ...}: decode_if_fits of this model's shape with full attention and with every layer at
    `window`, caches holding C tokens of random keys/values (copies: the model itself is left as it is)."""
    out = {}
    for name, w in (("SA", None), ("SWA", window)):
        m = copy.deepcopy(model).eval()
        m.set_window(w)
        out[name] = decode_if_fits(m, B=B, C=C, steps=steps)
    return out


def run_e2e(model, *, name="model", windows=(512,), contexts=(1024,), batches=(1,), steps=8, prefill_max=None,
            progress=True) -> dict:
    """SA and SWA (every layer at each window) decode throughput, KV bytes and prefill time. Returns
    {"rows": one per (B, context, attention), "overhead": {B: decode_if_fits of SA at OVERHEAD_CTX}}."""
    cfg, p = model.cfg, next(model.parameters())
    db = p.element_size()
    check_flags(SimpleNamespace(steps=steps, prefill_max=prefill_max), RULES)
    for w in windows:
        check_window(w)
    prefill_max = max(contexts) if prefill_max is None else prefill_max
    model.set_window(None)
    with torch.no_grad():  # warm-up: the first call of every kernel pays for its one-time setup
        prefill_ms(model, OVERHEAD_CTX)
    overhead = {B: {"context": OVERHEAD_CTX, **decode_if_fits(model, B, OVERHEAD_CTX, steps)} for B in batches}
    plan = [(B, C, w) for B in batches for C in contexts for w in (None, *windows)]
    prefills, rows = {}, []
    for i, (B, C, w) in enumerate(plan):
        model.set_window(w)
        row = {"model": name, "B": B, "context": C, "attn": "SA" if w is None else "SWA", "window": w,
               "tok_s": None, "tok_s_call": None, "step_ms": None, "gbs": None, "ratio": None,
               "step_bytes": step_bytes(cfg, w, B, C, db), "meas_over_pred": None,
               "predicted": None if w is None else predicted_ratio(cfg, w, B, C, db)}
        row.update(decode_if_fits(model, B, C, steps))
        if row["status"] == "ok":
            row["gbs"] = row["step_bytes"] / (row["step_ms"] / 1e3) / 1e9
        if (C, w) not in prefills:  # once per context and window, at the first batch size
            r = if_fits(lambda: {"ms": prefill_ms(model, C)}, p.device) if C <= prefill_max else {"status": "skipped"}
            prefills[C, w] = r.get("ms"), r["status"]
        row["prefill_ms"], row["prefill_status"] = prefills[C, w]
        sa = next((r for r in rows if r["B"] == B and r["context"] == C and r["attn"] == "SA"), None)
        if w is not None and sa and sa["tok_s"] and row["tok_s"]:
            row["ratio"] = row["tok_s"] / sa["tok_s"]
            row["meas_over_pred"] = row["ratio"] / row["predicted"]
        rows.append(row)
        if progress:
            got = f"{row['tok_s']:,.0f} tok/s" if row["tok_s"] else row["status"]
            print(f"e2e {name} [{i + 1}/{len(plan)}] B={B} C={C} {row['attn']} W={w}: {got}, "
                  f"KV {row['kv_bytes'] / 2**20:,.1f} MiB", file=sys.stderr, flush=True)
    model.set_window(None)
    return {"rows": rows, "overhead": overhead}


def print_e2e_table(res: dict, c: dict):
    def f(x, spec):
        return "-" if x is None else format(x, spec)
    for B in dict.fromkeys(r["B"] for r in res["rows"]):
        print(f"\n### e2e: {c['model']} ({c['source']}, {c['arch']}, {c['params'] / 1e6:.1f}M params, {c['dtype']}, "
              f"{c['device']}), batch {B}, {c['steps']} decode steps\n")
        print("| context | attention | tok/s | ms/step | GB/s | SWA/SA | predicted | meas/pred | paper | KV MiB | "
              "prefill ms |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in (r for r in res["rows"] if r["B"] == B):
            attn = "SA" if r["window"] is None else f"SWA {r['window']}"
            speed = (f"{r['status']} | - | -" if r["tok_s"] is None
                     else f"{r['tok_s']:,.0f} | {r['step_ms']:.2f} | {r['gbs']:.1f}")
            pre = f(r["prefill_ms"], ",.0f") if r["prefill_status"] == "ok" else r["prefill_status"]
            paper = f"{PAPER_32K}x" if r["window"] is not None and r["context"] == 32768 else ""
            print(f"| {r['context']} | {attn} | {speed} | {f(r['ratio'], '.2f')} | {f(r['predicted'], '.2f')} | "
                  f"{f(r['meas_over_pred'], '.2f')} | {paper} | {r['kv_bytes'] / 2**20:,.1f} | {pre} |")
        oh = res["overhead"].get(B, {})
        if oh.get("step_ms"):
            print(f"\noverhead outside attention/KV (SA at C={oh['context']}, batch {B}): {oh['step_ms']:.2f} ms/step "
                  f"= {oh['tok_s']:,.0f} tok/s (Python, kernel launches, MLP and weights)")
    print(f"\ntok/s: steady state of swarr.decode_loop (greedy) with caches holding random K/V up to the context; "
          f"GB/s = step_bytes (weights + KV: what a step must read) / step time; predicted = step_bytes(SA) / "
          f"step_bytes(SWA); KV MiB: the caches as allocated (context + {c['steps'] + 1} slots for SA, min(W, that) "
          f"for SWA); prefill: one prompt of the context length; times: medians of {REPS}; paper: SWA/SA at 32k")
    if c["device"] == "cpu" and c["dtype"] != "float32":
        print("note: on the CPU the decode kernel converts 16-bit caches to float32 every step, so it moves "
              "about 5x the bytes predicted")


# ---------------------------------------------------------------------------------------------------------------
# command line


def e2e_options(args) -> dict:
    """The e2e settings: the flags given, else --quick's (E2E_QUICK), else the defaults, some per device."""
    o = {k: getattr(args, k) for k in ("model", "device", "dtype", "windows", "contexts", "batches", "steps",
                                        "prefill_max")}
    for k, v in {**E2E_DEFAULTS, **(E2E_QUICK if args.quick else {})}.items():
        o[k] = v if o[k] is None else o[k]
    o["device"] = check_device(o["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = o["device"].type == "cuda"
    o["dtype"] = o["dtype"] or ("bfloat16" if cuda else "float32")
    if not os.path.isdir(o["model"]) and o["model"].lower() not in SHAPES:
        raise SwarrError(f"--model {o['model']!r} is neither a checkpoint folder nor a named shape "
                         f"({', '.join(SHAPES)})")
    o["steps"] = (128 if cuda else 32) if o["steps"] is None else o["steps"]
    o["prefill_max"] = (max(o["contexts"]) if cuda else 8192) if o["prefill_max"] is None else o["prefill_max"]
    check_flags(SimpleNamespace(steps=o["steps"], prefill_max=o["prefill_max"]), RULES)
    return o


def bench_e2e(args) -> dict:
    o = e2e_options(args)
    dev = o["device"]
    model, name, source = build_model(o["model"], DTYPES[o["dtype"]], dev)
    res = run_e2e(model, name=name, windows=o["windows"], contexts=o["contexts"], batches=o["batches"],
                  steps=o["steps"], prefill_max=o["prefill_max"])
    c = {"model": name, "source": source, "arch": model.cfg.arch, "params": param_count(model.cfg),
         "dtype": o["dtype"], "device": dev.type, "steps": o["steps"], "prefill_max": o["prefill_max"],
         "torch": torch.__version__, "backend": ops.backend_name(), "threads": torch.get_num_threads(),
         "hardware": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()}
    print_e2e_table(res, c)
    return {name: {"conditions": c, "rows": res["rows"], "overhead": {str(k): v for k, v in res["overhead"].items()}}}


def positive_ints(text: str) -> list:
    """A flag's comma-separated positive integers, e.g. "512,2048"."""
    vals = [int(x) if x.strip().isdigit() else 0 for x in text.split(",")]
    if min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"wants comma-separated positive integers, got {text!r}")
    return vals


SECTIONS = {"kernel": bench_kernel, "e2e": bench_e2e}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error: ...` line and exit 2, like every other bad flag
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """One parser for every section; each section reads the flags it uses (see the module docstring)."""
    p = Parser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", nargs="?", choices=[*SECTIONS, "all"], default="all")
    p.add_argument("--quick", action="store_true", help=f"small sizes, fewer repetitions (never fewer than {REPS})")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    e = p.add_argument_group("e2e", "whole-model SA vs SWA decode/prefill (defaults in brackets; --quick: "
                             + ", ".join(f"{k} {','.join(map(str, v)) if isinstance(v, list) else v}"
                                         for k, v in E2E_QUICK.items()) + ")")
    e.add_argument("--model", help=f"checkpoint folder, or a named shape with random weights: {', '.join(SHAPES)} "
                   "[tiny]")
    e.add_argument("--device", help="cpu or cuda [cuda if available]")
    e.add_argument("--dtype", choices=sorted(DTYPES), help="[bfloat16 on cuda, float32 on cpu]")
    for flag in ("windows", "contexts", "batches"):
        e.add_argument(f"--{flag}", type=positive_ints,
                       help=f"comma-separated [{','.join(map(str, E2E_DEFAULTS[flag]))}]")
    e.add_argument("--steps", type=int, help="decode steps per measurement [128 on cuda, 32 on cpu]")
    e.add_argument("--prefill-max", type=int, dest="prefill_max",
                   help="longest context whose prefill is timed; 0 = none [all on cuda, 8192 on cpu]")
    return p


def run_sections(args) -> dict:
    if args.section in ("e2e", "all"):
        e2e_options(args)  # bad e2e flags fail now, not after the kernel section has run
    if args.threads is not None:
        check_flags(SimpleNamespace(threads=args.threads), RULES)
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return {name: fn(args) for name, fn in SECTIONS.items() if args.section in (name, "all")}


def main(argv=None):
    args = build_parser().parse_args(argv)
    results = run_cli(run_sections, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
