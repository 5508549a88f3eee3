"""Benchmarks, always with the peers measured side by side in the same run and shown as ratios.

    python bench.py kernel [--quick] [--json PATH] [--threads N]   windowed attention kernels vs PyTorch peers
    python bench.py e2e [--quick] [--model M] [--device D] [--dtype T] [--windows W,..] [--contexts C,..]
                        [--batches B,..] [--steps S] [--prefill-max C] [--json PATH] [--threads N]
                                                      whole model: SWA vs SA decode and prefill, KV memory
    python bench.py --quick                           every section (kernel, then e2e), under ~1.5 minutes

One parser takes every flag; each section reads those it uses. Shared: --quick, --json, --threads. kernel: no others.
e2e: --model, --device, --dtype, --windows, --contexts, --batches, --steps, --prefill-max (bad values: one
`error: ...` line, exit 2, checked before any section runs). Examples:
    python bench.py e2e --model tiny --batches 16 --contexts 1024,32768 --windows 512      # the CPU target
    python bench.py e2e --model qwen2.5-1.5b --device cuda --dtype bfloat16                 # the GPU target
    python bench.py e2e --model path/to/checkpoint --contexts 4096 --windows 1024

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

e2e: one table per (model, batch), one row per (context, attention): SA (every layer full attention) and SWA at
each window (model.set_window(W) on every layer). --model is a checkpoint folder (swarr.load) or a named shape
with random weights (tiny = data/tiny-sa/config.json, qwen2.5-0.5b, qwen2.5-1.5b: their published HF configs).
  * decode tok/s through the real generation path: swarr.make_caches(model, B, C + steps + 1) filled with random
    K/V and pos = C (as if a C-token prompt had been prefilled), then swarr.decode_loop, greedy, no stop token.
    A 3-token run is timed and subtracted from the `steps`-token run, so tok/s is the steady state (on CUDA the
    loop's eager warm-up steps and graph capture cancel); tok_s_call in the JSON is B * steps / whole call.
  * predicted SWA/SA = step_bytes(SA) / step_bytes(SWA), the bytes one decode step must read: the weights once
    (tied embeddings once; an untied lookup reads B rows) + per sequence 2 * Hkv * head_dim * bytes for each of
    C positions of a full layer and min(W, C) of a windowed one. measured/predicted < 0.8 gets a note with the
    per-step time at C = 16 (overhead outside attention/KV: Python, kernel launches, MLP and weights).
  * KV bytes: sum(c.nbytes()) of the decode caches as allocated (C + steps + 1 positions, min(W, that) slots).
  * prefill ms: swarr.prefill of one C-token prompt on fresh caches, up to --prefill-max, "skipped" beyond.
  * a run whose caches (+25%) exceed free memory (MemAvailable, or cudaMemGetInfo on CUDA, less 512 MiB) is
    reported as "does not fit", as is an allocation that fails; the paper's 6.2x at 32k is shown beside.
--quick: tiny model, batch 16, contexts 1024 and 32768, window 512, 8 steps, prefill up to 1024 (~15-25 s).
On a 2-core machine that another job is using, --threads 1 avoids stalls of ms per parallel op.
"""
from __future__ import annotations

import argparse
import gc
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


def other_jobs(seconds: float = 0.5) -> float | None:
    """How many CPU cores other processes kept busy during `seconds` of this process sleeping (from /proc/stat;
    None where there is none). Unlike the load average, it does not remember the jobs of the last minute."""
    def ticks():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # all, idle + iowait
    if not os.path.exists("/proc/stat"):
        return None
    a0, i0 = ticks()
    time.sleep(seconds)
    a1, i1 = ticks()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(1, a1 - a0))


BUSY = 0.3  # cores kept busy by other jobs before a run, above which its timings are flagged as unreliable


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
    busy_before = other_jobs()
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
        mask = None  # free the N x N mask before the next size
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
                  "busy_before": busy_before, "load_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
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
    if c["busy_before"] is not None:
        busy = c["busy_before"] > BUSY
        print(f"other jobs kept {c['busy_before']:.1f} cores busy just before the run; load average {c['load_after']:.1f} "
              f"after (this run included)"
              + (": OTHER JOBS WERE RUNNING; peers with many small parallel ops suffer most, ratios are unreliable"
                 if busy else ""))
    for n in dict.fromkeys(notes):
        print(f"note: {n}")


# ---------------------------------------------------------------------------------------------------------------
# e2e section: the whole model, SA vs SWA, through the real generation path (make_caches, prefill, decode_loop)

HERE = os.path.dirname(os.path.abspath(__file__))


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


_QWEN25 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
           "tie_word_embeddings": True, "hidden_act": "silu", "use_sliding_window": False}
SHAPES = {  # named shapes, built with random weights: published HF config values
    "tiny": lambda: _read_json(os.path.join(HERE, "data", "tiny-sa", "config.json")),
    "qwen2.5-0.5b": lambda: {**_QWEN25, "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                             "num_key_value_heads": 2, "intermediate_size": 4864},
    "qwen2.5-1.5b": lambda: {**_QWEN25, "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                             "num_key_value_heads": 2, "intermediate_size": 8960},
}
E2E_DEFAULTS = {"model": "tiny", "windows": "512,2048,4096", "contexts": "1024,4096,8192,16384,32768",
                "batches": "1,16"}
E2E_QUICK = {"model": "tiny", "windows": "512", "contexts": "1024,32768", "batches": "16", "steps": 8,
             "prefill_max": 1024}
SHORT = 3          # tokens of the short decode_loop run whose time is subtracted (see decode_rate)
OVERHEAD_CTX = 16  # context of the "no KV to speak of" run: the per-step cost outside attention / KV reads
SAFETY = 1.25      # an allocation must fit in available memory with 25% to spare
PAPER_32K = 6.2    # the paper's SWA/SA decode speed-up at 32k context
MIN_SECONDS, MAX_PAIRS = 0.3, 5  # decode_rate repeats its (short, long) pair of runs for this long / this often


def _windows_list(cfg, windows) -> list:
    """windows: one W (int) or None for every layer, or a per-layer list."""
    return list(windows) if isinstance(windows, (list, tuple)) else [windows] * cfg.n_layers


def param_count(cfg) -> int:
    """Parameters of a swarr.Transformer with this config, tied embeddings counted once."""
    D, H, Hkv, hd, F_ = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim
    attn = D * H * hd + 2 * D * Hkv * hd + H * hd * D + (H * hd + 2 * Hkv * hd if cfg.qkv_bias else 0) \
        + (2 * hd if cfg.qk_norm else 0)
    layer = attn + 3 * D * F_ + 2 * D
    return cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2) + cfg.n_layers * layer + D


def weight_read_bytes(cfg, B: int, dtype_bytes: int) -> int:
    """Weight bytes one decode step reads: every parameter once, except that the embedding lookup of an untied
    model reads only B rows (a tied matrix is read whole by the lm_head anyway, and counted once)."""
    n = param_count(cfg)
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.dim - B * cfg.dim
    return n * dtype_bytes


def kv_bytes(cfg, windows, B: int, C: int, dtype_bytes: int) -> int:
    """KV bytes at context C: what a decode step reads, and what caches sized for C positions hold. A full
    layer has C positions, a windowed one min(W, C); each position is a key and a value of Hkv * head_dim."""
    per_pos = 2 * cfg.n_kv_heads * cfg.head_dim * dtype_bytes * B
    return sum(per_pos * (C if w is None else min(w, C)) for w in _windows_list(cfg, windows))


def step_bytes(cfg, windows, B: int, C: int, dtype_bytes: int) -> int:
    """Bytes one decode step at context C must read: the weights once plus every sequence's KV."""
    return weight_read_bytes(cfg, B, dtype_bytes) + kv_bytes(cfg, windows, B, C, dtype_bytes)


def predicted_ratio(cfg, W: int, B: int, C: int, dtype_bytes: int) -> float:
    """SWA/SA decode speed-up if a step costs only its memory traffic: step_bytes(SA) / step_bytes(SWA)."""
    return step_bytes(cfg, None, B, C, dtype_bytes) / step_bytes(cfg, W, B, C, dtype_bytes)


def available_bytes(device) -> int:
    """Memory free for new allocations: MemAvailable on the CPU, cudaMemGetInfo's free on a GPU; minus 512 MiB."""
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = None
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        free = int(line.split()[1]) * 1024
        except OSError:
            pass
        if free is None:
            return 1 << 62  # unknown: let the allocation itself decide (its failure is caught)
    return free - (512 << 20)


def decode_need(cfg, windows, B: int, L: int, dtype_bytes: int, device_type: str) -> int:
    """Bytes a decode run with caches of L positions allocates: the caches, the logits, and on the CPU for 16-bit
    caches the float32 copy of one layer's cache that the CPU decode kernel makes."""
    need = kv_bytes(cfg, windows, B, L, dtype_bytes) + 4 * B * cfg.vocab_size * 4
    if device_type == "cpu" and dtype_bytes != 4:
        need += kv_bytes(cfg, windows, B, L, 4) // cfg.n_layers
    return need


def prefill_need(cfg, windows, C: int, dtype_bytes: int, device_type: str) -> int:
    """Bytes a one-prompt prefill of C tokens allocates: its caches plus the activations of one layer."""
    cb = 4 if device_type == "cpu" else dtype_bytes  # the CPU attention kernel computes in float32
    act = C * (4 * cfg.dim + 3 * cfg.hidden_dim + 3 * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim) * cb
    return kv_bytes(cfg, windows, 1, C + 1, dtype_bytes) + act


def build_model(spec: str, dtype, device):
    """(model, name, source): a checkpoint folder (swarr.load) or a named shape with random weights."""
    if os.path.isdir(spec):
        model, _ = swarr.load(spec, dtype, device)
        return model, os.path.basename(os.path.normpath(spec)), "checkpoint"
    key = spec.lower()
    if key not in SHAPES:
        raise swarr.SwarrError(f"--model {spec!r} is neither a checkpoint folder nor a named shape "
                               f"({', '.join(SHAPES)})")
    cfg = swarr.Config.from_hf(SHAPES[key](), f"--model {key}")
    with torch.device("meta"):
        model = swarr.Transformer(cfg).to(dtype)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty() gives every parameter its own storage: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:  # uniform with std 0.02: about twice as fast to draw as normal_ (1.5B values on 2 cores)
                p.uniform_(-0.02 * 3 ** 0.5, 0.02 * 3 ** 0.5, generator=gen)
    return model.eval(), key, "random weights"


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _alloc_failure(e: Exception) -> bool:
    msg = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in msg or "alloc" in msg


def decode_rate(model, B: int, C: int, steps: int) -> dict:
    """Decode throughput of the real generation path at context C: caches from swarr.make_caches(model, B,
    C + steps + 1), filled with random keys/values and pos = C (as if a C-token prompt had been prefilled),
    then swarr.decode_loop with greedy sampling and no stop token, so that it runs exactly `steps` tokens.
    After a warm-up, a SHORT-token run and a `steps`-token run are timed; their difference is the steady state
    of `steps - SHORT` forward steps (the first token of a run is sampled from the given logits, and on CUDA
    the first two steps run eagerly and capture the graph: both runs pay that alike, so it cancels). The pair is
    repeated while under MIN_SECONDS (at most MAX_PAIRS times) and the median per-step time taken."""
    p = next(model.parameters())
    dev = p.device
    caches = swarr.make_caches(model, B, C + steps + 1)
    for c in caches:
        n = min(C, c.slots)
        c.k[:, :, :n].normal_()
        c.v[:, :, :n].normal_()
    logits = torch.randn(B, model.cfg.vocab_size, device=dev, dtype=p.dtype)

    def run(n):
        for c in caches:
            c.pos.fill_(C)
        _sync(dev)
        t0 = time.perf_counter()
        g = swarr.decode_loop(model, caches, logits, n)
        _sync(dev)
        dt = time.perf_counter() - t0
        assert g.tokens.shape == (B, n), g.tokens.shape
        return dt

    run(SHORT)  # warm-up
    per_step, t_long, t0 = [], None, time.perf_counter()
    while not per_step or (len(per_step) < MAX_PAIRS and time.perf_counter() - t0 < MIN_SECONDS):
        t_short, t_long = run(SHORT), run(steps)  # a short run, then a long one: their difference is the steady state
        per_step.append((t_long - t_short) / (steps - SHORT) if t_long > t_short else t_long / (steps - 1))
    step_s = statistics.median(per_step)
    return {"tok_s": B / step_s, "step_ms": 1e3 * step_s, "tok_s_call": B * steps / t_long,
            "kv_bytes": sum(c.nbytes() for c in caches)}


def if_fits(measure, need: int, free: int, device) -> dict:
    """{"status": "ok", **measure()}, or {"status": "does not fit (...)"} when `need` bytes (+25%) exceed `free`
    or the measurement's allocations fail."""
    if need * SAFETY > free:
        return {"status": f"does not fit (needs ~{need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free)"}
    try:
        return {"status": "ok", **measure()}
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _alloc_failure(e):
            raise
        return {"status": f"does not fit (allocation failed: {str(e).splitlines()[0][:80]})"}
    finally:
        _free(device)


def decode_if_fits(model, B: int, C: int, steps: int, budget: int | None = None) -> dict:
    """decode_rate where its caches fit in `budget` bytes (default: what the device has free); kv_bytes always."""
    p = next(model.parameters())
    L, db = C + steps + 1, p.element_size()
    free = available_bytes(p.device) if budget is None else budget
    return {"kv_bytes": kv_bytes(model.cfg, model.windows, B, L, db),
            **if_fits(lambda: decode_rate(model, B, C, steps), decode_need(model.cfg, model.windows, B, L, db,
                                                                           p.device.type), free, p.device)}


def prefill_ms(model, C: int, seed: int = 0) -> float:
    """Wall time of swarr.prefill for one random prompt of C tokens on fresh caches, in ms."""
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(model.cfg.vocab_size, (C,), generator=g).tolist()
    caches = swarr.make_caches(model, 1, C + 1)
    _sync(dev)
    t0 = time.perf_counter()
    swarr.prefill(model, [prompt], caches)
    _sync(dev)
    return 1e3 * (time.perf_counter() - t0)


class _Eta:
    """Progress on stderr, with an ETA from each item's guessed cost (long SA contexts dominate a run)."""

    def __init__(self, label, costs, stream=None):
        self.label, self.costs, self.done, self.t0 = label, costs, 0, time.time()
        self.stream = stream if stream is not None else sys.stderr

    def __call__(self, i, text):
        self.done += self.costs[i]
        el, total = time.time() - self.t0, sum(self.costs)
        eta = el / self.done * (total - self.done) if self.done else float("nan")
        print(f"{self.label} [{i + 1}/{len(self.costs)}] {text}  elapsed {el:.0f}s  ETA {eta:.0f}s",
              file=self.stream, flush=True)


def run_e2e(model, *, name="model", windows=(512,), contexts=(1024,), batches=(1,), steps=8, prefill_max=None,
            mem_budget=None, progress=True) -> dict:
    """Measure SA and SWA (every layer at each window) decode throughput, KV bytes and prefill time.
    mem_budget: bytes the run may allocate (default: what the device has free, see available_bytes).
    Returns {"rows": [...], "overhead": {B: {...}}, "notes": [...]}: one row per (B, context, attention)."""
    cfg, p = model.cfg, next(model.parameters())
    dev, db = p.device, p.element_size()
    if steps <= SHORT:
        raise swarr.SwarrError(f"--steps must be more than {SHORT}, got {steps}")
    for w in windows:
        swarr.check_window(w)
    prefill_max = max(contexts) if prefill_max is None else prefill_max
    budget = (lambda: mem_budget) if mem_budget is not None else (lambda: available_bytes(dev))
    cpu = dev.type == "cpu"
    bw, per_layer, flops = (10e9, 3e-4, 50e9) if cpu else (2e12, 2e-5, 1e14)  # only for the ETA
    attns = [None, *windows]
    plan = [("overhead", B, OVERHEAD_CTX, None) for B in batches]
    plan += [("decode", B, C, w) for B in batches for C in contexts for w in attns]

    def cost(kind, B, C, w):
        t = (2 * SHORT + steps) * (step_bytes(cfg, w, B, C, db) / bw + per_layer * cfg.n_layers)
        if kind == "decode" and B == batches[0] and C <= prefill_max:
            t += (2 * param_count(cfg) * C + 4 * cfg.n_heads * cfg.head_dim * cfg.n_layers
                  * band_pairs(C, w or C)) / flops
        return t
    eta = _Eta(f"e2e {name}", [cost(*it) for it in plan], None if progress else open(os.devnull, "w"))

    with torch.no_grad():  # warm-up: the first call of every kernel pays for its one-time setup
        model.set_window(None)
        prefill_ms(model, OVERHEAD_CTX)
    prefills, overhead, rows = {}, {}, []
    for i, (kind, B, C, w) in enumerate(plan):
        model.set_window(w)
        row = {"model": name, "B": B, "context": C, "attn": "SA" if w is None else "SWA", "window": w,
               "tok_s": None, "tok_s_call": None, "step_ms": None, "gbs": None, "step_bytes": step_bytes(cfg, w, B, C, db),
               "ratio": None, "predicted": None if w is None else predicted_ratio(cfg, w, B, C, db),
               "meas_over_pred": None, "prefill_ms": None, "prefill_status": "skipped"}
        row.update(decode_if_fits(model, B, C, steps, budget()))  # status, kv_bytes, and the rates if it fits
        if row["status"] == "ok":
            row["gbs"] = row["step_bytes"] / (row["step_ms"] / 1e3) / 1e9
        if kind == "overhead":
            overhead[B] = {k: row[k] for k in ("context", "status", "tok_s", "step_ms", "step_bytes")}
            eta(i, f"B={B} C={C} (overhead run): {row['step_ms'] or 0:.2f} ms/step")
            continue
        if (C, w) not in prefills:
            if C > prefill_max:
                prefills[C, w] = (None, "skipped")
            else:
                r = if_fits(lambda: {"ms": prefill_ms(model, C)}, prefill_need(cfg, w, C, db, dev.type), budget(), dev)
                prefills[C, w] = (r.get("ms"), "ok" if "ms" in r else "does not fit")
        row["prefill_ms"], row["prefill_status"] = prefills[C, w]
        sa = next((r for r in rows if r["B"] == B and r["context"] == C and r["attn"] == "SA"), None)
        if w is not None and sa and sa["tok_s"] and row["tok_s"]:
            row["ratio"] = row["tok_s"] / sa["tok_s"]
            row["meas_over_pred"] = row["ratio"] / row["predicted"]
        rows.append(row)
        what = "SA" if w is None else f"SWA W={w}"
        got = f"{row['tok_s']:,.0f} tok/s" if row["tok_s"] else row["status"]
        eta(i, f"B={B} C={C} {what}: {got}, KV {row['kv_bytes'] / 2**20:,.1f} MiB")
    model.set_window(None)
    return {"rows": rows, "overhead": overhead, "notes": e2e_notes(rows, overhead, cfg, db)}


def e2e_notes(rows, overhead, cfg, db) -> list:
    """Why measured/predicted falls short where it does, and the issue's targets, as text lines."""
    notes = []
    for B in dict.fromkeys(r["B"] for r in rows):
        oh = overhead.get(B, {}).get("step_ms")
        mine = [r for r in rows if r["B"] == B]
        low = [r for r in mine if r["meas_over_pred"] is not None and r["meas_over_pred"] < 0.8]
        sas = [r for r in mine if r["attn"] == "SA" and r["step_ms"]]
        if low and oh:
            # a two-term model: step = fixed cost (measured at C=16) + KV bytes / the KV bandwidth achieved by SA
            top = max(sas, key=lambda r: r["context"]) if sas else None
            extra = top and top["step_ms"] - oh
            kv_bw = (kv_bytes(cfg, None, B, top["context"], db) - kv_bytes(cfg, None, B, OVERHEAD_CTX, db)) \
                / (extra / 1e3) if extra and extra > 0 else None
            shares = [100 * min(1.0, oh / r["step_ms"]) for r in low]
            txt = (f"B={B}: measured/predicted < 0.8 at " + ", ".join(
                f"C={r['context']} W={r['window']} ({r['meas_over_pred']:.2f})" for r in low)
                + f". The per-step cost outside attention/KV (Python, kernel launches, MLP and weights: a step at "
                f"C={OVERHEAD_CTX}) is {oh:.2f} ms, {min(shares):.0f}-{max(shares):.0f}% of those SWA steps ("
                + ", ".join(f"{r['step_ms']:.2f}" for r in low) + " ms): the window removes KV reads, not that "
                "fixed cost, which the byte count does not see")
            if kv_bw:
                def model_ratio(r):
                    m = lambda w: oh + 1e3 * kv_bytes(cfg, w, B, r["context"], db) / kv_bw  # noqa: E731
                    return m(None) / m(r["window"])
                txt += (f". Fixed cost + KV at the {kv_bw / 1e9:.1f} GB/s that SA achieves predicts " + ", ".join(
                    f"{model_ratio(r):.1f}x (measured {r['ratio']:.1f}x)" for r in low))
            notes.append(txt)
        for w in dict.fromkeys(r["window"] for r in mine if r["window"] is not None):
            sw = sorted((r for r in mine if r["window"] == w and r["tok_s"]), key=lambda r: r["context"])
            full = [r for r in sw if r["context"] >= w]  # contexts that fill the ring: the same work per step
            if len(full) >= 2:
                lo, hi = full[0], full[-1]
                f = lo["tok_s"] / hi["tok_s"]
                notes.append(f"B={B} SWA W={w}: {hi['tok_s']:,.0f} tok/s at {hi['context']} vs {lo['tok_s']:,.0f} at "
                             f"{lo['context']}: slowdown {f:.2f}x (target: <= 1.2x) -- "
                             + ("met" if f <= 1.2 else "NOT met"))
            at32 = next((r for r in sw if r["context"] == 32768 and r["ratio"]), None)
            if at32:
                notes.append(f"B={B} SWA W={w} at 32k: {at32['ratio']:.1f}x SA (paper: {PAPER_32K}x; target >= "
                             f"{PAPER_32K}x) -- " + ("met" if at32["ratio"] >= PAPER_32K else "NOT met")
                             + f"; measured/predicted {at32['meas_over_pred']:.2f} (target on GPU >= 0.8)")
    return notes


def print_e2e_table(res: dict, c: dict):
    def f(x, spec):
        return "-" if x is None else format(x, spec)
    for B in dict.fromkeys(r["B"] for r in res["rows"]):
        print(f"\n### e2e: {c['model']} ({c['source']}, {c['arch']}, {c['params'] / 1e6:.1f}M params, {c['dtype']}, "
              f"{c['device']}), batch {B}, {c['steps']} decode steps\n")
        oh = res["overhead"].get(B, {})
        print("| context | attention | tok/s | ms/step | GB/s | SWA/SA | predicted | meas/pred | paper | KV MiB | "
              "prefill ms |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in (r for r in res["rows"] if r["B"] == B):
            attn = "SA" if r["window"] is None else f"SWA {r['window']}"
            if r["tok_s"] is None:
                speed = f"{r['status']} | - | -"
            else:
                speed = f"{r['tok_s']:,.0f} | {r['step_ms']:.2f} | {r['gbs']:.1f}"
            pre = f(r["prefill_ms"], ",.0f") if r["prefill_status"] == "ok" else r["prefill_status"]
            paper = f"{PAPER_32K}x" if r["window"] is not None and r["context"] == 32768 else ""
            print(f"| {r['context']} | {attn} | {speed} | {f(r['ratio'], '.2f')} | {f(r['predicted'], '.2f')} | "
                  f"{f(r['meas_over_pred'], '.2f')} | {paper} | {r['kv_bytes'] / 2**20:,.1f} | {pre} |")
        if oh.get("step_ms"):
            print(f"\noverhead outside attention/KV (SA at C={oh['context']}, batch {B}): {oh['step_ms']:.2f} ms/step "
                  f"= {oh['tok_s']:,.0f} tok/s (Python, kernel launches, MLP and weights)")
    print(f"\ntok/s: steady state of swarr.decode_loop (greedy, no stop token) after prefilling the caches with "
          f"random K/V at the context; ms/step = 1000 * batch / tok/s; GB/s = step_bytes / step time (weights + KV, "
          f"what the step must read); predicted = step_bytes(SA) / step_bytes(SWA); KV MiB: the caches as "
          f"allocated (context + {c['steps'] + 1} slots for SA, min(W, that) for SWA); prefill: one prompt of "
          f"the context length; paper: the SWA/SA decode speed-up reported at 32k")
    if c["device"] == "cpu":
        lb, la = c.get("busy_before"), c.get("load_after")
        if lb is not None:
            print(f"other jobs kept {lb:.1f} cores busy just before the run; load average {la:.1f} after (this run "
                  f"included)" + (": OTHER JOBS WERE RUNNING, timings are noisy" if lb > BUSY else "")
                  + (f"; with {c['threads']} threads every parallel op can stall for a descheduled thread (ms each):"
                     " --threads 1 gives steadier numbers on a busy machine" if lb > BUSY and c["threads"] > 1 else ""))
        if c["dtype"] != "float32":
            print("note: on the CPU the decode kernel converts 16-bit caches to float32 every step, so it moves "
                  "about 5x the bytes predicted")
    for n in res["notes"]:
        print(f"note: {n}")


def _ints(flag: str, text, positive=True) -> list:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise swarr.SwarrError(f"{flag} wants comma-separated integers, got {text!r}") from None
    if not vals or (positive and min(vals) <= 0):
        raise swarr.SwarrError(f"{flag} wants positive integers, got {text!r}")
    return vals


def check_device(name: str) -> torch.device:
    """--device: cpu, cuda or cuda:N, and CUDA only where there is a device. SwarrError otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise swarr.SwarrError(f"--device {name!r}: only cpu and cuda (or cuda:N) are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise swarr.SwarrError(f"--device {name}: no CUDA device is available")
    return device


def e2e_options(args) -> dict:
    """The e2e flags with their defaults (--quick: E2E_QUICK) filled in, validated: SwarrError on bad values."""
    d = {**E2E_DEFAULTS, **(E2E_QUICK if args.quick else {})}

    def get(k):
        v = getattr(args, k, None)
        return d.get(k) if v is None else v
    device = check_device(get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = get("dtype") or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype not in swarr.DTYPES:
        raise swarr.SwarrError(f"--dtype {dtype!r} is unknown (one of {', '.join(sorted(swarr.DTYPES))})")
    models = [m for m in str(get("model")).split(",") if m]
    for m in models:
        if not os.path.isdir(m) and m.lower() not in SHAPES:
            raise swarr.SwarrError(f"--model {m!r} is neither a checkpoint folder nor a named shape "
                                   f"({', '.join(SHAPES)})")
    steps = get("steps")
    if steps is None:
        steps = 128 if device.type == "cuda" else 32
    if steps <= SHORT:
        raise swarr.SwarrError(f"--steps must be more than {SHORT}, got {steps}")
    contexts = _ints("--contexts", get("contexts"))
    pmax = get("prefill_max")
    if pmax is None:
        pmax = max(contexts) if device.type == "cuda" else 8192
    if pmax < 0:
        raise swarr.SwarrError(f"--prefill-max must be >= 0, got {pmax}")
    return {"models": models, "device": device, "dtype": dtype, "windows": _ints("--windows", get("windows")),
            "contexts": contexts, "batches": _ints("--batches", get("batches")), "steps": steps,
            "prefill_max": pmax}


def bench_e2e(args) -> dict:
    o = e2e_options(args)
    out = {}
    for spec in o["models"]:
        # the first model: the load before this program started (a kernel section may have run since)
        busy_before = getattr(args, "busy_start", None) if not out else other_jobs()
        t0 = time.time()
        model, name, source = build_model(spec, swarr.DTYPES[o["dtype"]], o["device"])
        print(f"e2e {name}: built in {time.time() - t0:.1f}s ({source})", file=sys.stderr, flush=True)
        res = run_e2e(model, name=name, windows=o["windows"], contexts=o["contexts"], batches=o["batches"],
                      steps=o["steps"], prefill_max=o["prefill_max"])
        dev = o["device"]
        c = {"model": name, "source": source, "arch": model.cfg.arch, "params": param_count(model.cfg),
             "dtype": o["dtype"], "device": dev.type, "steps": o["steps"], "prefill_max": o["prefill_max"],
             "torch": torch.__version__, "backend": swarr.backend_name(), "threads": torch.get_num_threads(),
             "hardware": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model(),
             "busy_before": busy_before,
             "load_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        print_e2e_table(res, c)
        out[name] = {"conditions": c, "rows": res["rows"], "overhead": {str(k): v for k, v in res["overhead"].items()},
                     "notes": res["notes"]}
        del model
        _free(dev)
    return out


# ---------------------------------------------------------------------------------------------------------------
# command line

SECTIONS = {"kernel": bench_kernel, "e2e": bench_e2e}


def build_parser() -> argparse.ArgumentParser:
    """One parser for every section; each section reads the flags it uses (see the module docstring)."""
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", nargs="?", choices=[*SECTIONS, "all"], default="all")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (each section under a minute)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    e = p.add_argument_group("e2e", "whole-model SA vs SWA decode/prefill (defaults in brackets; --quick: "
                             + ", ".join(f"{k} {v}" for k, v in E2E_QUICK.items()) + ")")
    e.add_argument("--model", help="checkpoint folder, or a named shape with random weights: "
                   + ", ".join(SHAPES) + "; comma-separated for several [tiny]")
    e.add_argument("--device", help="cpu or cuda [cuda if available]")
    e.add_argument("--dtype", help=f"{', '.join(sorted(swarr.DTYPES))} [bfloat16 on cuda, float32 on cpu]")
    e.add_argument("--windows", help=f"comma-separated SWA windows W [{E2E_DEFAULTS['windows']}]")
    e.add_argument("--contexts", help=f"comma-separated contexts [{E2E_DEFAULTS['contexts']}]")
    e.add_argument("--batches", help=f"comma-separated batch sizes [{E2E_DEFAULTS['batches']}]")
    e.add_argument("--steps", type=int, help="decode steps per measurement [128 on cuda, 32 on cpu]")
    e.add_argument("--prefill-max", type=int, dest="prefill_max",
                   help="longest context whose prefill is timed; 0 = none [all on cuda, 8192 on cpu]")
    return p


def run_sections(args) -> dict:
    if args.section in ("e2e", "all"):
        e2e_options(args)  # bad e2e flags fail now, not after the other sections have run
    if args.threads is not None:
        if args.threads < 1:
            raise swarr.SwarrError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return {name: fn(args) for name, fn in SECTIONS.items() if args.section in (name, "all")}


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.busy_start = other_jobs()
    results = swarr.run_cli(run_sections, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
