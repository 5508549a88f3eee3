"""csrc/gpu_check.py, the one-call GPU check, exercised on the CPU: everything in it that does not need a GPU
(command line, the error metric and its verdicts, the report file, the stages at toy sizes, the summary) runs here,
so a run on a GPU meets only its GPU-specific code for the first time."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import swarr  # noqa: E402
from csrc import ops  # noqa: E402

_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "csrc" / "gpu_check.py")
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)


@pytest.fixture(scope="module")
def lib():
    """torch.ops.swarr, built and loaded."""
    lib = ops.load()
    assert lib is not None, f"the extension did not build: {ops.status['why']}"
    return lib


def test_help_documents_the_one_call():
    r = subprocess.run([sys.executable, str(ROOT / "csrc" / "gpu_check.py"), "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for needle in ("python3 csrc/gpu_check.py", "4 minutes", "timeout_s=450", "--budget", "--skip"):
        assert needle in r.stdout, needle


def test_parse_args(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    a = gc.parse_args([])
    assert a.out == str(tmp_path) and a.budget == 420 and a.skip == set() and not a.flex_worker
    a = gc.parse_args(["--out", "x", "--budget", "100", "--skip", "flex,pytest"])
    assert a.out == "x" and a.budget == 100 and a.skip == {"flex", "pytest"}
    for bad in (["--skip", "flex,speeed"], ["--skip", "build"], ["--budget", "0"], ["--budget", "nan"]):
        with pytest.raises(swarr.SwarrError):
            gc.parse_args(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_without_a_gpu_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "csrc" / "gpu_check.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: no CUDA device"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_row_err_is_per_row_and_relative():
    ref = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.03, 0.04, 0.0, 0.0]])  # row RMS 2.5 and 0.025
    x = ref.clone()
    x[1, 0] += 0.01  # a small absolute error in the small row is a large error for that row
    assert gc.row_err(x, ref, floor_frac=1e-3) == pytest.approx(0.01 / 0.025)
    # a global max-|ref| scale would call it 0.01 / 4: the per-row metric does not let big rows hide small ones
    assert gc.row_err(x, ref, floor_frac=1e-3) > 100 * 0.01 / 4
    # the floor: rows far below the median RMS are measured against floor_frac x the median
    z = torch.zeros(3, 4)
    z[0], z[1] = 1.0, 1.0  # RMS 1, 1, 0 -> median 1
    x = z.clone()
    x[2, 0] = 0.01
    assert gc.row_err(x, z, floor_frac=0.25) == pytest.approx(0.01 / 0.25)
    x[0, 0] = float("nan")
    assert gc.row_err(x, z) == math.inf and gc.abs_err(x, z) == math.inf
    assert gc.abs_err(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0])) == 0.5


def test_window_pairs():
    for N, W in ((1, 1), (10, 3), (10, 10), (10, 50), (100, 7)):
        assert gc.window_pairs(N, W) == int(swarr.window_mask(N, N, W).sum())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager: fine for a check
def test_flex_mask_means_our_window():
    """The FlexAttention mask of the speed stage lets through exactly W keys per query (itself included): eager
    flex_attention on the CPU equals the reference; the often-seen q - kv <= W does not."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    N, W = 70, 9
    q, k, v = (torch.randn(1, 2, N, 16) for _ in range(3))
    bm = create_block_mask(gc.sliding_window_mask_mod(W), None, None, N, N, device="cpu")
    out = flex_attention(q, k, v, block_mask=bm)
    assert gc.row_err(out, swarr.attention_ref(q, k, v, W)) < 1e-4
    plus_one = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j <= W), None, None, N, N, device="cpu")
    assert gc.row_err(flex_attention(q, k, v, block_mask=plus_one), swarr.attention_ref(q, k, v, W)) > 1e-2


def _off_by_one(delta):
    """A kernel with the window edge off by `delta` keys (W + delta keys per query), lse included."""
    def impl(q, k, v, W):
        return gc.ext_impl(q, k, v, W + delta)
    return impl


def test_correctness_stage_on_cpu(lib):
    """At toy sizes on the CPU: the extension passes every case in bf16, outputs poisoned; a window off by one
    either way fails every case whose length exceeds the window, and passes where it cannot matter (N <= W)."""
    res = gc.stage_correct("cpu", full=False, dtypes=(torch.bfloat16,))
    assert res["ok"] and res["passed"] == res["total"] == len(gc.correctness_cases(False))
    assert 0 < res["worst_err_over_bound"] <= 1
    assert all(c["outside_nonzero"] == 0 for c in res["cases"])
    cases = [c for c in gc.correctness_cases(False) if c[4] == 16]  # the first head dim: edges and middle block
    for delta in (1, -1):
        for case in cases:
            r = gc.check_case(case, torch.bfloat16, "cpu", _off_by_one(delta))
            B, Hq, Hkv, N, D, W, rows = case
            matters = N > W - (delta < 0)  # W - 1 keys differ from W keys once N >= W
            assert r["ok"] != matters, (delta, case, r)
            if matters:
                assert r["out"]["ext"] > 3 * r["out"]["bound"] and r["lse"]["ext"] > 10 * r["lse"]["bound"]


class _LeakGrad(torch.autograd.Function):
    """Identity on out; its backward also sends a gradient of 1 to the first key row of k."""

    @staticmethod
    def forward(ctx, out, k):
        ctx.k_shape = k.shape
        return out.clone()

    @staticmethod
    def backward(ctx, g):
        dk = g.new_zeros(ctx.k_shape)
        dk[:, :, 0] = 1
        return g, dk


def test_correctness_catches_unwritten_and_stray_gradients(lib):
    case = gc.correctness_cases(False)[-1]  # the middle block: no checked query sees key 0
    lo = case[6][0]

    def stray(q, k, v, W):  # a kernel whose dk leaks into a key outside every checked window
        out, lse = gc.ext_impl(q, k, v, W)
        return _LeakGrad.apply(out, k), lse
    r = gc.check_case(case, torch.bfloat16, "cpu", stray)
    assert not r["ok"] and r["outside_nonzero"] == case[0] * case[2] * case[4]

    def unwritten(q, k, v, W):  # one output element never written (left NaN, as poisoning shows it)
        out, lse = gc.ext_impl(q, k, v, W)
        out = out.clone()
        out[0, 0, lo, 0] = float("nan")
        return out, lse
    r = gc.check_case(case, torch.bfloat16, "cpu", unwritten)
    assert not r["ok"] and r["out"]["ext"] == math.inf


def test_speed_decode_and_summary_on_cpu(lib, tmp_path):
    """The speed and decode stages at toy sizes on the CPU (host clock instead of CUDA events and graphs), then a
    report and its summary: one line per target."""
    speed = gc.stage_speed("cpu", full=False)
    assert len(speed["rows"]) == len(gc.speed_grid(False))
    for r in speed["rows"]:
        for key in ("ext_fwd_ms", "ext_bwd_ms", "ref_fwd_ms", "ref_bwd_ms", "fwd_x_ref", "bwd_x_ref"):
            assert r[key] > 0, key
    dec = gc.stage_decode("cpu", full=False)
    assert {r["kind"] for r in dec["kernel"]} == {"ring W", "full context"}
    assert len(dec["model"]) == 4 and all(r["ms_per_token"] > 0 for r in dec["model"])

    (tmp_path / "file").write_text("")
    with pytest.raises(swarr.SwarrError, match="--out"):
        gc.Report(str(tmp_path / "file" / "out"), budget=100)
    rep = gc.Report(str(tmp_path / "out"), budget=100)
    rep.set("speed", speed)
    rep.set("decode", dec)
    rep.set("odd", {"x": float("inf"), "y": float("nan"), "t": (1, 2)})
    data = json.loads(rep.path.read_text())  # strict JSON: no NaN/Infinity literals
    assert data["odd"] == {"x": "inf", "y": "nan", "t": [1, 2]} and "elapsed_s" in data
    assert not list(rep.dir.glob("*.tmp")) and 0 < rep.left() <= 100
    lines = gc.summary(rep.data)
    heads = [ln.split()[0] for ln in lines[1:]]
    assert heads == ["build", "correct", "fwd", "flex", "decode", "per-op", "pytest"], lines
    assert "NOT RUN" in lines[2] and "NOT RUN" in lines[3]  # no correctness run, no target-size row


def test_summary_verdicts():
    """Synthetic figures: the target lines say PASS or FAIL from the numbers, and the per-op line names the ops
    whose reference path was faster at every size."""
    def row(N, W, D, ext_f, ext_b, ref_f, ref_b, fl_f, fl_b):
        return dict(N=N, W=W, D=D, ext_fwd_ms=ext_f, ext_bwd_ms=ext_b, ref_fwd_ms=ref_f, ref_bwd_ms=ref_b,
                    flash_fwd_ms=fl_f, flash_bwd_ms=fl_b, fwd_x_flash=fl_f / ext_f,
                    fwdbwd_x_flash=(fl_f + fl_b) / (ext_f + ext_b))
    res = {"env": {"device": "GPU", "capability": "9.0", "copy_GBps": 3000.0, "matmul_bf16_TFLOPs": 600.0},
           "build": {"cuda": True, "build_s": 80, "name": "swarr_ext_x_sm90_cu128"},
           "correct": {"ok": True, "passed": 20, "total": 20, "worst_err_over_bound": 0.6},
           "speed": {"rows": [row(32768, 4096, 64, 1.0, 30.0, 50.0, 20.0, 4.0, 10.0),
                              row(8192, 512, 64, 0.2, 5.0, 3.0, 2.0, 0.5, 1.5)]},
           "decode": {"kernel": [{"slots": 4096, "ext_us": 10.0, "ref_us": 40.0}],
                      "model": [{"window": 4096, "context": 8192, "ms_per_token": 1.0},
                                {"window": 4096, "context": 32768, "ms_per_token": 1.05},
                                {"window": None, "context": 8192, "ms_per_token": 1.5},
                                {"window": None, "context": 32768, "ms_per_token": 4.0}]},
           "flex": {"small_check_err": 1e-6,
                    "rows": [{"N": 32768, "W": 4096, "D": 64, "flex_fwd_ms": 2.0, "flex_bwd_ms": 6.0}]},
           "pytest": {"ok": True, "exit": 0, "result": "60 passed"}}
    text = "\n".join(gc.summary(res))
    assert "correct  PASS" in text and "fwd 3x   PASS" in text and "D=64 4.00x" in text
    assert "decode   PASS" in text and "1.05x" in text and "full attention 2.67x" in text
    assert "fwd: ext faster" in text and "bwd: ref faster" in text and "SWARR_CUDA_REF_OPS=bwd" in text
    assert "flex     info" in text and "2.00x/0.20x" in text and "pytest   PASS" in text
    res["speed"]["rows"][0]["fwd_x_flash"] = 2.5
    res["decode"]["model"][1]["ms_per_token"] = 1.5
    res["flex"]["small_check_err"] = 0.1  # FlexAttention's mask does not mean our W: its timings mean nothing
    text = "\n".join(gc.summary(res))
    assert "fwd 3x   FAIL" in text and "decode   FAIL" in text and "flex     FAIL (mask check)" in text


def test_run_bounded_kills_the_process_group(tmp_path):
    rc, secs, tail = gc.run_bounded([sys.executable, "-c", "print('hello')"], 60, tmp_path / "a.log")
    assert rc == 0 and "hello" in tail
    t = time.time()
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
             "print('started', flush=True); time.sleep(60)"
    rc, secs, tail = gc.run_bounded([sys.executable, "-c", script], 3, tmp_path / "b.log")
    assert rc is None and time.time() - t < 30 and "started" in tail
    assert os.path.exists(tmp_path / "b.log")
