"""One-shot GPU check of the CUDA kernels: build, test, then time the windowed forward against SDPA.

    python3 csrc/gpu_check.py [--out DIR]

1. builds the extension with CUDA (swarr.load_extension) and reports the build time;
2. runs tests/test_kernels.py (CUDA tests included) with pytest;
3. checks the tensor-core forward at the target size against the reference on a slice of queries, then times it
   (B=1, H=Hkv=16, N=32768, W=4096, D=64, bf16) against SDPA's causal flash path and against its own W=N run;
4. times decode over a W=4096 ring buffer against SDPA decode over a full 32k cache.
Prints a short table last; writes gpu_check.json (and the pytest log) to --out.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import swarr  # noqa: E402


def cuda_ms(fn, sets, reps=20, warmup=3):
    """Median time of fn(*args) in ms with CUDA events, alternating between input sets."""
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(*sets[i % len(sets)])
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(res, flush=True)

    t0 = time.time()
    ops = swarr.load_extension()
    res["build_s"] = round(time.time() - t0, 1)
    res["built_with_cuda"] = bool(swarr._EXT.get("cuda"))
    print(f"build {res['build_s']} s, cuda={res['built_with_cuda']}, why={swarr._EXT.get('why')!r}", flush=True)
    assert ops is not None and res["built_with_cuda"], "extension without CUDA"

    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        str(ROOT / "tests" / "test_kernels.py")], capture_output=True, text=True, cwd=ROOT)
    Path(args.out, "pytest.log").write_text(r.stdout + r.stderr)
    res["pytest"] = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    res["pytest_s"] = round(time.time() - t0, 1)
    fails = [ln for ln in r.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    print(r.stdout[-3000:] if fails else res["pytest"], flush=True)

    # target size
    B, H, N, D, W, dt = 1, 16, 32768, 64, 4096, torch.bfloat16
    scale = D ** -0.5
    sets = [[torch.randn(B, H, N, D, device="cuda", dtype=dt) for _ in range(3)] for _ in range(2)]
    q, k, v = sets[0]
    with torch.no_grad():
        out = swarr.attention(q, k, v, W)
        for lo in (0, N - 512):  # first and last 512 queries against the reference (float32, their key window)
            ks = max(0, lo - W + 1)
            ref = swarr.attention_ref(q[:, :, lo:lo + 512].float(), k[:, :, ks:lo + 512].float(),
                                      v[:, :, ks:lo + 512].float(), W)
            err = ((out[:, :, lo:lo + 512].float() - ref).abs().max() / ref.abs().max()).item()
            res[f"target_rel_err_rows_{lo}"] = err
            assert err < 3e-2, f"rows {lo}: rel err {err}"
        win = lambda q, k, v: swarr.attention(q, k, v, W)  # noqa: E731
        full = lambda q, k, v: swarr.attention(q, k, v, None)  # noqa: E731
        causal = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        t_win, t_full = cuda_ms(win, sets), cuda_ms(full, sets, reps=5)
        t_sdpa = cuda_ms(causal, sets, reps=10)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                t_flash = cuda_ms(causal, sets, reps=10)
        except RuntimeError as e:
            t_flash = None
            res["flash_error"] = str(e)[:200]
    pairs = W * (W + 1) // 2 + (N - W) * W
    res.update(shape=f"B={B} H=Hkv={H} N={N} W={W} D={D} bf16", ext_window_ms=t_win, ext_full_causal_ms=t_full,
               sdpa_causal_ms=t_sdpa, sdpa_flash_causal_ms=t_flash,
               ext_window_tflops=4 * pairs * D * H / t_win / 1e9,
               ext_full_tflops=2 * N * (N + 1) * D * H / t_full / 1e9,
               sdpa_causal_tflops=2 * N * (N + 1) * D * H / t_sdpa / 1e9)
    del sets, q, k, v, out

    # decode, one token: a ring buffer of W slots vs a full N-token cache (same heads as above)
    dsets = [[torch.randn(1, H, D, device="cuda", dtype=dt), torch.randn(1, H, W, D, device="cuda", dtype=dt),
              torch.randn(1, H, W, D, device="cuda", dtype=dt), torch.full((1,), W, device="cuda")] for _ in range(2)]
    fsets = [[torch.randn(1, H, 1, D, device="cuda", dtype=dt), torch.randn(1, H, N, D, device="cuda", dtype=dt),
              torch.randn(1, H, N, D, device="cuda", dtype=dt)] for _ in range(2)]
    with torch.no_grad():
        res["decode_ring_us"] = 1e3 * cuda_ms(swarr.decode, dsets, reps=50)
        res["decode_sdpa_full_us"] = 1e3 * cuda_ms(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), fsets,
                                                   reps=50)
    Path(args.out, "gpu_check.json").write_text(json.dumps(res, indent=1))

    print("\n== GPU check:", res["device"], "torch", res["torch"], "|", res["shape"])
    print(f"build {res['build_s']} s | pytest: {res['pytest']} ({res['pytest_s']} s)")
    print(f"target check rel err: rows 0..511 {res['target_rel_err_rows_0']:.2e}, "
          f"last 512 {res[f'target_rel_err_rows_{N - 512}']:.2e}")
    print(f"ext windowed fwd   {t_win:8.3f} ms  {res['ext_window_tflops']:6.1f} TFLOP/s")
    print(f"ext full causal    {t_full:8.3f} ms  {res['ext_full_tflops']:6.1f} TFLOP/s")
    print(f"SDPA causal (auto) {t_sdpa:8.3f} ms  {res['sdpa_causal_tflops']:6.1f} TFLOP/s  -> windowed is "
          f"{t_sdpa / t_win:.2f}x faster")
    if t_flash:
        print(f"SDPA causal flash  {t_flash:8.3f} ms  -> windowed is {t_flash / t_win:.2f}x faster")
    print(f"decode: ring W={W} {res['decode_ring_us']:.1f} us vs SDPA full {N} cache {res['decode_sdpa_full_us']:.1f} us")


if __name__ == "__main__":
    main()
