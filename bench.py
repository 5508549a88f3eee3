"""Benchmarks, always with the peers measured side by side in the same run and shown as ratios.

    python bench.py kernel [--quick] [--json PATH] [--threads N]   windowed attention kernels vs PyTorch peers
    python bench.py --quick                           every section (for now: kernel)

kernel: one row per (op, N, W). The compiled extension (swarr.attention / swarr.decode, backend 'ext') against
  * SDPA banded: scaled_dot_product_attention with a banded boolean mask (computes the full N x N square),
  * SDPA causal: full causal attention (is_causal=True), i.e. what the model did before the SWA conversion,
  * chunked SDPA: queries in chunks of 128, each against only its key window (pure PyTorch, the best eager peer),
  * flex: torch.compile'd FlexAttention with a sliding-window block mask (forward only: no CPU backward),
  * for decode: SDPA over the W-slot ring buffer (the reference backend) and SDPA over a full N-token cache.
Times are medians after a warm-up, on fresh random inputs (two sets, alternated), with the candidates of a row
taking turns so that load from other jobs hits them alike. Ratios are peer / ext (> 1: the extension is faster). Work is counted exactly: the forward does 4 * D * H * (in-band (query, key) pairs) flops and
the backward 2.5x that; decode reads 2 * valid * D * Hkv * bytes per token per layer. Achieved rates are printed
next to this machine's fp32 matmul rate and copy bandwidth, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import swarr

CHUNK = 128  # query chunk of the chunked-SDPA peer (the fastest of 64/128/256/512 on the 2-core dev machine)


# ---------------------------------------------------------------------------------------------------------------
# measuring


def median_ms(fn, make_args, reps: int, warmup: int = 1) -> float:
    """Median wall time of fn(*args) in ms; args alternate between two fresh random input sets."""
    return measure({"fn": (fn, make_args)}, reps, warmup)["fn"]


def measure(candidates: dict, reps: int, warmup: int = 1) -> dict:
    """{name: (fn, make_args)} -> {name: median ms}. The candidates take turns within each repetition, so a
    change in machine load (other jobs on a shared box) hits all of them alike and the ratios stay fair.
    Each candidate alternates between two fresh random input sets. A short pause before each timing lets the
    previous candidate's OpenMP threads stop spin-waiting, so they do not compete with the next one."""
    sets = {name: [make(), make()] for name, (fn, make) in candidates.items()}
    times = {name: [] for name in candidates}
    for i in range(warmup + reps):
        for name, (fn, _) in candidates.items():
            time.sleep(0.01)
            t0 = time.perf_counter()
            fn(*sets[name][i % 2])
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def cpu_model() -> str:
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_ceilings(quick: bool) -> dict:
    """fp32 matmul GFLOP/s (n x n x n) and copy bandwidth in GB/s (bytes read + bytes written)."""
    n = 1024 if quick else 2048
    mm = median_ms(torch.mm, lambda: (torch.randn(n, n), torch.randn(n, n)), reps=5 if quick else 10)
    numel = 32 * 2 ** 20  # 128 MB of float32: well beyond the caches
    dst = torch.empty(numel)
    cp = median_ms(lambda src: dst.copy_(src), lambda: (torch.randn(numel),), reps=5 if quick else 10)
    return {"matmul_gflops": 2 * n ** 3 / mm / 1e6, "copy_gbs": 2 * 4 * numel / cp / 1e6}


# ---------------------------------------------------------------------------------------------------------------
# kernel section: the peers


def band_pairs(N: int, W: int) -> int:
    """Exact number of (query, key) pairs inside the window: sum over i of min(i + 1, W)."""
    w = min(N, W)
    return w * (w + 1) // 2 + (N - w) * W


def sdpa_banded(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def chunk_masks(N: int, W: int) -> list:
    """(start, end, key_start, mask) per query chunk: each chunk attends to keys [start - W + 1, end)."""
    out = []
    for s in range(0, N, CHUNK):
        e, ks = min(N, s + CHUNK), max(0, s - W + 1)
        out.append((s, e, ks, swarr.window_mask(e - s, e - ks, W)))
    return out


def chunked_sdpa(q, k, v, chunks):
    return torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, ks:e], v[:, :, ks:e], attn_mask=m,
                                                     enable_gqa=True) for s, e, ks, m in chunks], dim=2)


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
    except Exception as e:  # noqa: BLE001 -- any compile failure is reported in the table, not raised
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:120]


def fwd_bwd(attn):
    """Forward + backward of attn(q, k, v) against a fixed upstream gradient."""
    def run(q, k, v, dout):
        return torch.autograd.grad(attn(q, k, v), (q, k, v), dout)
    return run


# ---------------------------------------------------------------------------------------------------------------
# kernel section: the table


def bench_kernel(args) -> dict:
    H, Hkv, D, B = 8, 2, 64, 1
    quick = args.quick
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    ceil = machine_ceilings(quick)
    sizes = [(2048, 256)] if quick else [(N, W) for N in (2048, 8192, 32768) for W in (256, 1024)]
    contexts = [(1024, 256), (32768, 256)] if quick else [(N, W) for W in (256, 1024) for N in (1024, 32768)]
    reps = 3 if quick else 5
    rows, notes = [], []

    def inputs(N, grad=False):
        def make():
            q, k, v = (torch.randn(B, h, N, D, requires_grad=grad) for h in (H, Hkv, Hkv))
            return (q, k, v, torch.randn(B, H, N, D)) if grad else (q, k, v)
        return make

    for N, W in sizes:
        flops = 4 * D * H * band_pairs(N, W)
        reps_n = 1 if N >= 32768 else reps
        chunks = chunk_masks(N, W)
        mask = swarr.window_mask(N, N, W) if N <= 8192 else None
        # forward, inference mode (no autograd graph)
        cands = {"ext": (lambda q, k, v: swarr.attention(q, k, v, W), inputs(N)),
                 "chunked SDPA": (lambda q, k, v: chunked_sdpa(q, k, v, chunks), inputs(N))}
        with torch.no_grad():
            flex = flex_peer(N, W, inputs(N))
        if isinstance(flex, str):
            notes.append(f"flex n/a at N={N}, W={W}: {flex}")
        else:
            cands["flex"] = (flex, inputs(N))
        cands["SDPA causal"] = (sdpa_causal, inputs(N))
        if mask is not None:
            cands["SDPA banded"] = (lambda q, k, v: sdpa_banded(q, k, v, mask), inputs(N))
        else:
            notes.append(f"SDPA banded skipped at N={N}: its boolean mask alone is {N * N / 2**30:.0f} GB "
                         "and it computes all N^2 scores")
        with torch.no_grad():
            rows.append({"op": "fwd", "N": N, "W": W, "gflop": flops / 1e9, **measure(cands, reps_n)})
        if N >= 32768:
            continue  # forward only at this length
        # forward + backward (training)
        cands = {"ext": (fwd_bwd(lambda q, k, v: swarr.attention(q, k, v, W)), inputs(N, True)),
                 "chunked SDPA": (fwd_bwd(lambda q, k, v: chunked_sdpa(q, k, v, chunks)), inputs(N, True)),
                 "SDPA causal": (fwd_bwd(sdpa_causal), inputs(N, True))}
        if N <= 2048:
            cands["SDPA banded"] = (fwd_bwd(lambda q, k, v: sdpa_banded(q, k, v, mask)), inputs(N, True))
        rows.append({"op": "fwd+bwd", "N": N, "W": W, "gflop": 3.5 * flops / 1e9, **measure(cands, reps)})
        del mask
    if any(r["op"] == "fwd+bwd" for r in rows):
        notes.append("flex has no CPU backward; SDPA banded fwd+bwd only at N=2048 (N^2 activations)")

    # decode: one new token per step, B=1, per layer; the ring buffer holds W slots whatever the context.
    # All contexts of one W are measured in one interleaved group, so their times compare directly.
    calls = 50 if quick else 200
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731

    def per_call(fn):
        return lambda *a: [fn(*a) for _ in range(calls)]

    def make_ring(N, W):
        return lambda: (torch.randn(B, H, D), torch.randn(B, Hkv, W, D), torch.randn(B, Hkv, W, D),
                        torch.full((B,), min(N, W), dtype=torch.long))

    def make_full(N):
        return lambda: (torch.randn(B, H, 1, D), torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D))
    for W in dict.fromkeys(w for _, w in contexts):
        ctxs = [n for n, w in contexts if w == W]
        cands = {}
        for N in ctxs:
            cands[("ext", N)] = (per_call(swarr.decode), make_ring(N, W))
            cands[("SDPA ring", N)] = (per_call(swarr.decode_ref), make_ring(N, W))
            cands[("SDPA full cache", N)] = (per_call(sdpa), make_full(N))
        with torch.no_grad():
            t = measure(cands, reps)
        for N in ctxs:
            rows.append({"op": "decode", "N": N, "W": W, "gbytes": 2 * min(N, W) * D * Hkv * 4 / 1e9,
                         **{name: ms / calls for (name, n), ms in t.items() if n == N}})

    conditions = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
                  "load_before": load_before, "load_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                  "backend": swarr.backend_name(), "shape": f"B={B} H={H} Hkv={Hkv} D={D} float32",
                  "chunk": CHUNK, **{k: round(v, 1) for k, v in ceil.items()}}
    print_kernel_table(rows, notes, conditions)
    return {"conditions": conditions, "rows": rows, "notes": notes}


def print_kernel_table(rows, notes, c):
    print(f"# kernel: CPU {c['cpu']}, {c['threads']} threads, torch {c['torch']}, backend {c['backend']}, "
          f"{c['shape']}")
    print(f"# this machine: fp32 matmul {c['matmul_gflops']:.0f} GFLOP/s, copy {c['copy_gbs']:.1f} GB/s "
          f"(read + write); ratio = peer time / ext time; chunked SDPA uses chunks of {c['chunk']}")

    def peer(r, name, unit_ms=True):
        t = r.get(name)
        if t is None:
            return "-"
        return f"{t:.2f} ({t / r['ext']:.1f}x)" if unit_ms else f"{1e3 * t:.0f}us ({t / r['ext']:.1f}x)"

    head = f"{'op':8}{'N':>6}{'W':>6} | {'ext':>9} {'GFLOP/s':>8} | " + " | ".join(
        f"{p:>16}" for p in ("chunked SDPA", "flex", "SDPA causal", "SDPA banded"))
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        if r["op"] == "decode":
            continue
        rate = r["gflop"] / r["ext"] * 1e3
        print(f"{r['op']:8}{r['N']:>6}{r['W']:>6} | {r['ext']:>7.2f}ms {rate:>8.1f} | " + " | ".join(
            f"{peer(r, p):>16}" for p in ("chunked SDPA", "flex", "SDPA causal", "SDPA banded")))
    head = f"{'decode':8}{'ctx':>6}{'W':>6} | {'ext/token':>9} {'GB/s':>8} | " + " | ".join(
        f"{p:>16}" for p in ("SDPA ring", "SDPA full cache"))
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        if r["op"] != "decode":
            continue
        print(f"{'decode':8}{r['N']:>6}{r['W']:>6} | {1e3 * r['ext']:>7.1f}us {r['gbytes'] / r['ext'] * 1e3:>8.1f} | "
              + " | ".join(f"{peer(r, p, False):>16}" for p in ("SDPA ring", "SDPA full cache")))
    print("times in ms (decode: per token per layer); flex: forward only")
    if c["load_before"] is not None:
        busy = c["load_before"] > 0.5  # the 1-minute load average before we started: other jobs
        print(f"load average {c['load_before']:.1f} before, {c['load_after']:.1f} after (this run included)"
              + (": OTHER JOBS WERE RUNNING; peers with many small parallel ops suffer most, ratios are unreliable"
                 if busy else ""))
    for n in dict.fromkeys(notes):
        print(f"note: {n}")


# ---------------------------------------------------------------------------------------------------------------
# command line

SECTIONS = {"kernel": bench_kernel}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", nargs="?", choices=[*SECTIONS, "all"], default="all")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (under a minute)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {}
    for name, fn in SECTIONS.items():
        if args.section in (name, "all"):
            results[name] = fn(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
