"""bench.py: the timing loop, the kernel rows (the float64 check of every windowed candidate, the ratios in the
table), the e2e rows through the real generation path, the byte counting, and the command line. Tiny sizes."""
import dataclasses
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import swarr  # noqa: E402
from support.checkpoint import param_count  # noqa: E402

KEYS = {"model", "B", "context", "attn", "window", "status", "tok_s", "tok_s_call", "step_ms", "gbs", "kv_bytes",
        "step_bytes", "ratio", "predicted", "meas_over_pred", "prefill_ms", "prefill_status"}
KERNEL_HEAD = ("op           N     W |       ext  GFLOP/s |     chunked SDPA |             flex |      SDPA causal |"
               "      SDPA banded")
DECODE_HEAD = "decode     ctx     W | ext/token     GB/s |        SDPA ring |  SDPA full cache"
E2E_HEAD = ("| context | attention | tok/s | ms/step | GB/s | SWA/SA | predicted | meas/pred | paper | KV MiB | "
            "prefill ms |")
CONDITIONS = {"cpu": "test", "threads": 1, "torch": "t", "backend": "ext", "shape": "s", "chunk": bench.CHUNK,
              "matmul_gflops": 1.0, "copy_gbs": 1.0}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread


@pytest.fixture(scope="module")
def tiny():
    return bench.build_model("tiny", torch.float32, "cpu")[0]


def no_flex(monkeypatch):
    monkeypatch.setattr(bench, "flex_peer", lambda N, W, make: "not compiled in this test")


# ---- measuring ------------------------------------------------------------------------------------------------


def test_measure_takes_turns_repeats_at_least_reps_and_reports_the_median(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], sleep=lambda s: None))
    calls, made = [], []

    def cand(name, durations):
        it = iter(durations)

        def fn(x):
            calls.append((name, x))
            clock[0] += next(it)
        return fn, lambda: made.append(name) or (len(made),)
    # the first call is the warm-up (100 s) and must not count; asked for 1 repetition, it still runs REPS
    t = bench.measure({"a": cand("a", [100, 0.001, 0.009, 0.004]), "b": cand("b", [100, 0.020, 0.010, 0.030])},
                      reps=1)
    assert t == pytest.approx({"a": 4.0, "b": 20.0})
    assert [n for n, _ in calls] == ["a", "b"] * (1 + bench.REPS)  # turns within each repetition
    assert [x for n, x in calls if n == "a"] == [1, 2, 1, 2]        # two input sets, alternated
    assert made == ["a", "a", "b", "b"]


# ---- kernel section -------------------------------------------------------------------------------------------


def test_band_pairs_by_hand():
    assert bench.band_pairs(256, 32) == 32 * 33 // 2 + (256 - 32) * 32
    assert bench.band_pairs(10, 1) == 10 and bench.band_pairs(5, 100) == 15  # W=1: itself; W >= N: causal


@pytest.mark.parametrize("N,W", [(100, 1), (300, 64), (257, 300), (384, 128)])
def test_chunked_peer_and_reference_are_windowed_attention(N, W):
    q, k, v = torch.randn(1, 4, N, 16, dtype=torch.float64), *torch.randn(2, 1, 2, N, 16, dtype=torch.float64)
    want = swarr.attention_ref(q, k, v, W)
    assert torch.allclose(bench.chunked_sdpa(N, W)(q, k, v), want, atol=1e-12)
    assert torch.allclose(bench.reference(W)(q, k, v), want, atol=1e-12)


def test_kernel_rows_check_every_windowed_candidate_and_print_ratios_of_the_timings(capsys):
    rows, notes = bench.kernel_rows([(256, 32)], [(64, 16), (200, 16)], reps=3, decode_calls=3)
    assert [(r["op"], r["N"], r["W"]) for r in rows] == [("fwd", 256, 32), ("fwd+bwd", 256, 32),
                                                         ("decode", 64, 16), ("decode", 200, 16)]
    fwd, bwd, dec = rows[0], rows[1], rows[2:]
    flex = "flex" in fwd  # compiled FlexAttention is a peer wherever torch.compile works
    assert flex or any(n.startswith("flex n/a") for n in notes)
    assert set(fwd["max_err"]) == {"ext", "chunked SDPA", "SDPA banded"} | ({"flex"} if flex else set())
    assert set(bwd["max_err"]) == {"ext", "chunked SDPA", "SDPA banded"}  # full attention is not compared
    assert set(dec[0]["max_err"]) == {"ext", "SDPA ring"}
    for r in rows:
        assert all(0 <= e < 1e-4 for e in r["max_err"].values()), r["max_err"]
        peers = bench.DECODE_PEERS if r["op"] == "decode" else bench.PEERS[:1] + bench.PEERS[2:]
        assert all(r[p] > 0 for p in ("ext", *peers)), r
    assert fwd["gflop"] == pytest.approx(4 * 64 * 8 * bench.band_pairs(256, 32) / 1e9)
    assert bwd["gflop"] == pytest.approx(3.5 * fwd["gflop"])
    assert dec[0]["gbytes"] == 2 * 16 * 64 * 2 * 4 / 1e9 == dec[1]["gbytes"]  # both contexts fill the W=16 ring

    bench.print_kernel_table(rows, notes, CONDITIONS)
    out = capsys.readouterr().out.splitlines()
    assert KERNEL_HEAD in out and DECODE_HEAD in out
    for r in rows:
        line = next(ln for ln in out if re.match(rf"{re.escape(r['op'])}\s+{r['N']}\s+{r['W']} \|", ln))
        cells = [c.strip() for c in line.split("|")]
        assert len(cells) == (4 if r["op"] == "decode" else 6)
        peers = bench.DECODE_PEERS if r["op"] == "decode" else bench.PEERS
        for cell, p in zip(cells[2:], peers):
            if r.get(p) is None:
                assert cell == "-"
            else:  # the ratio shown is the peer's median time over the extension's
                assert cell.endswith(f"({r[p] / r['ext']:.1f}x)"), (cell, p)
        rate = float(cells[1].split()[1])
        want = (r["gbytes"] if r["op"] == "decode" else r["gflop"]) / r["ext"] * 1e3
        assert rate == pytest.approx(want, abs=0.051)
    assert any(ln.startswith("checked against a float64 reference") for ln in out)


def test_a_peer_that_computes_another_window_is_dropped(monkeypatch):
    no_flex(monkeypatch)
    real = bench.chunked_sdpa
    monkeypatch.setattr(bench, "chunked_sdpa", lambda N, W: real(N, W + 1))  # the classic W vs W + 1 slip
    rows, notes = bench.kernel_rows([(256, 32)], [], reps=3)
    assert all("chunked SDPA" not in r for r in rows)
    assert any(n.startswith("chunked SDPA dropped at fwd N=256 W=32") for n in notes)
    assert any(n.startswith("chunked SDPA dropped at fwd+bwd N=256 W=32") for n in notes)
    assert all(r["ext"] > 0 and r["SDPA banded"] > 0 for r in rows)


def test_a_wrong_extension_stops_the_benchmark(monkeypatch):
    no_flex(monkeypatch)
    real = swarr.attention
    monkeypatch.setattr(swarr, "attention", lambda q, k, v, W: real(q, k, v, W + 1))
    with pytest.raises(swarr.SwarrError, match="extension's fwd N=256 W=32 is off by"):
        bench.kernel_rows([(256, 32)], [], reps=3)
    monkeypatch.setattr(swarr, "attention", real)
    # a decode that ignores how many ring slots are filled (wrong until the ring is full: N < W)
    monkeypatch.setattr(swarr, "decode", lambda q, k, v, valid: swarr.decode_ref(q, k, v, torch.full_like(valid, 16)))
    with pytest.raises(swarr.SwarrError, match="decode N=8 W=16"):
        bench.kernel_rows([], [(8, 16)], reps=3)


# ---- e2e section ----------------------------------------------------------------------------------------------


def test_tiny_shape_builds_from_its_config(tiny):
    hf = json.loads((ROOT / "data" / "tiny-sa" / "config.json").read_text())
    c = tiny.cfg
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads) == (
        hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
        hf["num_key_value_heads"])
    assert tiny.lm_head.weight is tiny.model.embed_tokens.weight  # tied again after to_empty()
    assert all(torch.isfinite(p).all() for p in tiny.parameters())


@pytest.mark.parametrize("name,params", [("qwen2.5-0.5b", 494_032_768), ("qwen2.5-1.5b", 1_543_714_304)])
def test_qwen_shapes_match_published_parameter_counts(name, params):
    cfg = swarr.Config.from_hf(bench.SHAPES[name]())
    assert cfg.tie_embeddings and cfg.qkv_bias and cfg.rope["rope_theta"] == 1e6 and cfg.vocab_size == 151936
    assert param_count(cfg) == params  # the numbers HF reports for Qwen2.5-0.5B / 1.5B


def test_step_bytes_by_hand(tiny):
    cfg = tiny.cfg  # V 280, D 128, 4 layers, 4 heads, 2 kv heads, head_dim 32, hidden 384, qkv bias, tied
    layer = (128 * 128 + 128) + 2 * (128 * 64 + 64) + 128 * 128 + 3 * 128 * 384 + 2 * 128
    assert param_count(cfg) == 280 * 128 + 4 * layer + 128 == 824_448
    assert param_count(cfg) == sum(p.numel() for p in tiny.parameters())
    # B 2, C 100, float32: KV per layer = 2 (K, V) * 2 heads * 32 dims * 4 bytes * 2 rows * positions
    assert bench.kv_bytes(cfg, None, 2, 100, 4) == 4 * 2 * 2 * 32 * 4 * 2 * 100 == 409_600
    assert bench.step_bytes(cfg, None, 2, 100, 4) == 824_448 * 4 + 409_600
    assert bench.step_bytes(cfg, 16, 2, 100, 4) == 824_448 * 4 + 4 * 2 * 2 * 32 * 4 * 2 * 16
    assert bench.step_bytes(cfg, 512, 2, 100, 4) == bench.step_bytes(cfg, None, 2, 100, 4)  # W > C: no saving
    assert bench.kv_bytes(cfg, [None, 16, None, 16], 2, 100, 2) == 2 * 2 * 2 * 32 * 2 * 2 * (100 + 16)
    assert bench.predicted_ratio(cfg, 16, 2, 100, 4) == pytest.approx((3_297_792 + 409_600) / (3_297_792 + 65_536))
    untied = dataclasses.replace(cfg, tie_embeddings=False)  # the lookup reads B rows, the lm_head the whole matrix
    assert param_count(untied) == 824_448 + 280 * 128
    assert bench.weight_read_bytes(untied, 2, 4) == (824_448 + 2 * 128) * 4


def test_e2e_rows_repeat_and_kv_bytes_are_what_the_caches_hold(tiny, monkeypatch, capsys):
    made, loops, prefills = [], [], []
    real_make, real_loop, real_prefill = swarr.make_caches, swarr.decode_loop, swarr.prefill

    def make(model, B, max_len):
        caches = real_make(model, B, max_len)
        made.append((list(model.windows), B, max_len, caches))
        return caches
    monkeypatch.setattr(swarr, "make_caches", make)
    monkeypatch.setattr(swarr, "decode_loop", lambda m, c, lg, n: loops.append(n) or real_loop(m, c, lg, n))
    monkeypatch.setattr(swarr, "prefill", lambda m, p, c: prefills.append(len(p[0])) or real_prefill(m, p, c))
    steps, W = 5, 16
    res = bench.run_e2e(tiny, name="tiny", windows=[W], contexts=[8, 40], batches=[2], steps=steps, prefill_max=8)
    rows = res["rows"]
    assert [(r["context"], r["attn"]) for r in rows] == [(8, "SA"), (8, "SWA"), (40, "SA"), (40, "SWA")]
    # every decode measurement: a warm-up, then REPS (short, long) pairs; every prefill: REPS runs
    assert loops == ([bench.SHORT] + [bench.SHORT, steps] * bench.REPS) * 5  # the overhead run and 4 rows
    assert prefills == [bench.OVERHEAD_CTX] * bench.REPS + [8] * (2 * bench.REPS)  # warm-up, then C=8 SA and SWA
    for r in rows:
        assert set(r) == KEYS and r["status"] == "ok"
        for k in ("tok_s", "tok_s_call", "step_ms", "gbs", "kv_bytes", "step_bytes"):
            assert r[k] > 0, k
        assert r["step_ms"] == pytest.approx(1e3 * 2 / r["tok_s"])
        assert r["gbs"] == pytest.approx(r["step_bytes"] / r["step_ms"] / 1e6)
        assert r["prefill_status"] == ("ok" if r["context"] <= 8 else "skipped")
        assert (r["prefill_ms"] > 0) if r["context"] <= 8 else r["prefill_ms"] is None
        if r["attn"] == "SWA":  # the ratio is computed from the two measured rates
            sa = next(s for s in rows if s["context"] == r["context"] and s["attn"] == "SA")
            assert r["ratio"] == pytest.approx(r["tok_s"] / sa["tok_s"])
            assert r["meas_over_pred"] == pytest.approx(r["ratio"] / r["predicted"])
        held = [sum(c.k.nbytes + c.v.nbytes for c in cs) for ws, B, L, cs in made
                if ws == [r["window"]] * 4 and B == 2 and L == r["context"] + steps + 1]
        assert held == [r["kv_bytes"]] == [bench.kv_bytes(tiny.cfg, r["window"], 2, r["context"] + steps + 1, 4)]
        # step_bytes = weights + the KV a step at this context reads
        assert r["step_bytes"] - bench.weight_read_bytes(tiny.cfg, 2, 4) == bench.kv_bytes(
            tiny.cfg, r["window"], 2, r["context"], 4)
    assert rows[3]["kv_bytes"] == bench.kv_bytes(tiny.cfg, W, 2, 40, 4) < rows[2]["kv_bytes"]  # a full ring of W
    assert res["overhead"][2]["step_ms"] > 0 and res["overhead"][2]["context"] == bench.OVERHEAD_CTX
    assert tiny.windows == [None] * 4  # left as SA
    json.dumps(res)
    progress = capsys.readouterr().err
    assert "e2e tiny [4/4] B=2 C=40 SWA W=16: " in progress


def test_e2e_reports_what_does_not_fit(tiny, capsys):
    # SA caches for 2^44 positions cannot be allocated anywhere; the windowed run holds W slots and runs
    res = bench.run_e2e(tiny, windows=[16], contexts=[1 << 44], batches=[1], steps=4, prefill_max=0, progress=False)
    sa, swa = res["rows"]
    assert sa["status"] == "does not fit (allocation failed)" and sa["tok_s"] is None
    assert sa["kv_bytes"] == bench.kv_bytes(tiny.cfg, None, 1, (1 << 44) + 5, 4)  # still reported
    assert swa["status"] == "ok" and swa["tok_s"] > 0 and swa["ratio"] is None
    assert swa["prefill_status"] == "skipped"
    assert "does not fit:" in capsys.readouterr().err
    bench.print_e2e_table(res, {"model": "tiny", "source": "x", "arch": "a", "params": 1e6, "dtype": "float32",
                                "device": "cpu", "steps": 4})
    out = capsys.readouterr().out.splitlines()
    assert E2E_HEAD in out
    row = next(ln for ln in out if ln.startswith(f"| {1 << 44} | SA |"))
    assert row.count("|") == E2E_HEAD.count("|") and "does not fit (allocation failed) | - | -" in row


def test_e2e_other_errors_are_not_taken_for_memory(tiny, monkeypatch):
    def broken(*a):
        raise RuntimeError("shape mismatch in the decode kernel")
    monkeypatch.setattr(bench, "decode_rate", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench.run_e2e(tiny, windows=[16], contexts=[32], batches=[1], steps=4, progress=False)


# ---- command line ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["e2e", "--model", "no-such-model"], ["e2e", "--windows", "0"], ["e2e", "--windows", "a"],
    ["e2e", "--contexts", "-5"], ["e2e", "--batches", "1,,2"], ["e2e", "--dtype", "float8"],
    ["e2e", "--steps", "3"], ["e2e", "--steps", "x"], ["e2e", "--prefill-max", "-1"], ["e2e", "--threads", "0"],
    ["all", "--device", "tpu"], ["e2e", "--device", "cuda:x"], ["nope"], ["kernel", "--no-such-flag"]])
def test_bad_flags_exit_2_with_one_error_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err


def test_build_model_refuses_an_unknown_name():
    with pytest.raises(swarr.SwarrError, match="no-such-model"):
        bench.build_model("no-such-model", torch.float32, "cpu")


def test_kernel_section_reads_only_its_flags(monkeypatch):
    a = bench.build_parser().parse_args(["kernel", "--quick", "--threads", "2", "--json", "x.json"])
    assert (a.section, a.quick, a.threads, a.json) == ("kernel", True, 2, "x.json")
    seen = []
    monkeypatch.setattr(bench, "SECTIONS", {"kernel": lambda args: seen.append(args.section) or {},
                                            "e2e": bench.SECTIONS["e2e"]})
    bench.main(["kernel", "--quick", "--model", "ignored-by-kernel"])  # e2e settings are only checked for e2e/all
    assert seen == ["kernel"]


def test_quick_settings_and_explicit_flags():
    o = bench.e2e_options(bench.build_parser().parse_args(["e2e", "--quick", "--device", "cpu"]))
    assert (o["model"], o["windows"], o["contexts"], o["batches"], o["steps"], o["prefill_max"], o["dtype"]) == (
        "tiny", [512], [1024, 32768], [16], 8, 1024, "float32")
    o = bench.e2e_options(bench.build_parser().parse_args(
        ["e2e", "--quick", "--device", "cpu", "--windows", "64,128", "--steps", "6", "--prefill-max", "0"]))
    assert (o["windows"], o["steps"], o["prefill_max"], o["contexts"]) == ([64, 128], 6, 0, [1024, 32768])


def test_main_e2e_writes_json(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    bench.main(["e2e", "--model", "tiny", "--contexts", "8,40", "--windows", "16", "--batches", "2", "--steps", "5",
                "--prefill-max", "8", "--threads", "1", "--json", str(out)])
    res = json.loads(out.read_text())["e2e"]["tiny"]
    assert [r["attn"] for r in res["rows"]] == ["SA", "SWA", "SA", "SWA"]
    assert res["conditions"]["device"] == "cpu" and res["conditions"]["dtype"] == "float32"
    assert res["overhead"]["2"]["status"] == "ok"
    printed = capsys.readouterr().out.splitlines()
    assert E2E_HEAD in printed
    table = [ln for ln in printed if re.match(r"\| \d+ \| S", ln)]
    assert len(table) == 4 and all(ln.count("|") == E2E_HEAD.count("|") for ln in table)
