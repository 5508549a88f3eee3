"""bench.py: the e2e section (SA vs SWA through the real generation path) on tiny sizes, its byte counting, and the
command line of both sections. Fast: tiny model, a handful of decode steps."""
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import swarr  # noqa: E402

KEYS = {"model", "B", "context", "attn", "window", "status", "tok_s", "tok_s_call", "step_ms", "gbs", "kv_bytes",
        "step_bytes", "ratio", "predicted", "meas_over_pred", "prefill_ms", "prefill_status"}


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest, and immune to other jobs on the machine
    model, name, source = bench.build_model("tiny", torch.float32, "cpu")
    yield model
    torch.set_num_threads(threads)


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
    assert bench.param_count(cfg) == params  # the numbers HF reports for Qwen2.5-0.5B / 1.5B


def test_step_bytes_by_hand(tiny):
    cfg = tiny.cfg  # V 290, D 128, 4 layers, 4 heads, 2 kv heads, head_dim 32, hidden 384, qkv bias, tied
    layer = (128 * 128 + 128) + 2 * (128 * 64 + 64) + 128 * 128 + 3 * 128 * 384 + 2 * 128
    assert bench.param_count(cfg) == 290 * 128 + 4 * layer + 128 == 825_728
    assert bench.param_count(cfg) == sum(p.numel() for p in tiny.parameters())
    # B 2, C 100, float32: KV per layer = 2 (K, V) * 2 heads * 32 dims * 4 bytes * 2 rows * positions
    assert bench.kv_bytes(cfg, None, 2, 100, 4) == 4 * 2 * 2 * 32 * 4 * 2 * 100 == 409_600
    assert bench.step_bytes(cfg, None, 2, 100, 4) == 825_728 * 4 + 409_600
    assert bench.step_bytes(cfg, 16, 2, 100, 4) == 825_728 * 4 + 4 * 2 * 2 * 32 * 4 * 2 * 16
    assert bench.step_bytes(cfg, 512, 2, 100, 4) == bench.step_bytes(cfg, None, 2, 100, 4)  # W > C: no saving
    assert bench.kv_bytes(cfg, [None, 16, None, 16], 2, 100, 2) == 2 * 2 * 2 * 32 * 2 * 2 * (100 + 16)
    assert bench.predicted_ratio(cfg, 16, 2, 100, 4) == pytest.approx((3_302_912 + 409_600) / (3_302_912 + 65_536))
    untied = dataclasses.replace(cfg, tie_embeddings=False)  # the lookup reads B rows, the lm_head the whole matrix
    assert bench.param_count(untied) == 825_728 + 290 * 128
    assert bench.weight_read_bytes(untied, 2, 4) == (825_728 + 2 * 128) * 4


def test_e2e_rows_well_formed_and_kv_bytes_are_what_the_caches_hold(tiny, monkeypatch):
    made = []
    real = swarr.make_caches

    def spy(model, B, max_len):
        caches = real(model, B, max_len)
        made.append((list(model.windows), B, max_len, caches))
        return caches
    monkeypatch.setattr(swarr, "make_caches", spy)
    steps, W = 5, 16
    res = bench.run_e2e(tiny, name="tiny", windows=[W], contexts=[8, 40], batches=[2], steps=steps, prefill_max=8,
                        progress=False)
    rows = res["rows"]
    assert [(r["context"], r["attn"]) for r in rows] == [(8, "SA"), (8, "SWA"), (40, "SA"), (40, "SWA")]
    for r in rows:
        assert set(r) == KEYS and r["status"] == "ok"
        for k in ("tok_s", "tok_s_call", "step_ms", "gbs", "kv_bytes", "step_bytes"):
            assert r[k] > 0, k
        assert r["prefill_status"] == ("ok" if r["context"] <= 8 else "skipped")
        assert (r["prefill_ms"] > 0) if r["context"] <= 8 else r["prefill_ms"] is None
        if r["attn"] == "SWA":
            assert r["ratio"] > 0 and r["predicted"] > 0 and r["meas_over_pred"] > 0
        # the bytes the decode caches hold, summed here from the tensors themselves
        w = r["window"]
        held = [sum(c.k.nbytes + c.v.nbytes for c in cs) for ws, B, L, cs in made
                if ws == [w] * 4 and B == 2 and L == r["context"] + steps + 1]
        assert held == [r["kv_bytes"]]
        assert r["kv_bytes"] == bench.kv_bytes(tiny.cfg, w, 2, r["context"] + steps + 1, 4)
    sa40, swa40 = rows[2], rows[3]
    assert swa40["kv_bytes"] < sa40["kv_bytes"]
    assert swa40["kv_bytes"] == bench.kv_bytes(tiny.cfg, W, 2, 40, 4)  # a full ring of W slots per layer
    for r in rows:  # step_bytes = weights + the KV term; at C > W the SWA caches hold exactly what a step reads
        assert r["step_bytes"] - bench.weight_read_bytes(tiny.cfg, 2, 4) == bench.kv_bytes(tiny.cfg, r["window"], 2,
                                                                                            r["context"], 4)
    assert swa40["kv_bytes"] == swa40["step_bytes"] - bench.weight_read_bytes(tiny.cfg, 2, 4)
    assert res["overhead"][2]["step_ms"] > 0 and res["overhead"][2]["context"] == bench.OVERHEAD_CTX
    assert tiny.windows == [None] * 4  # left as SA
    json.dumps(res)  # JSON-serialisable (ints as keys become strings)


def test_e2e_reports_what_does_not_fit(tiny, monkeypatch):
    # SA at 1M positions needs 2 GiB of cache; a 64 MiB budget takes only the windowed run
    res = bench.run_e2e(tiny, windows=[16], contexts=[1 << 20], batches=[1], steps=4, prefill_max=0,
                        mem_budget=64 << 20, progress=False)
    sa, swa = res["rows"]
    assert sa["status"].startswith("does not fit") and sa["tok_s"] is None and sa["kv_bytes"] > 64 << 20
    assert swa["status"] == "ok" and swa["tok_s"] > 0 and swa["ratio"] is None
    assert swa["prefill_status"] == "skipped"

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(bench, "decode_rate", oom)
    res = bench.run_e2e(tiny, windows=[16], contexts=[32], batches=[1], steps=4, prefill_max=32, progress=False)
    assert all(r["status"].startswith("does not fit (allocation failed") for r in res["rows"])
    assert all(r["prefill_status"] == "ok" for r in res["rows"])
    bench.print_e2e_table(res, {"model": "tiny", "source": "x", "arch": "a", "params": 1e6, "dtype": "float32",
                                "device": "cpu", "steps": 4})  # prints rows without numbers


def test_low_measured_over_predicted_gets_an_overhead_note(tiny):
    cfg = tiny.cfg
    row = dict.fromkeys(KEYS)
    sa = {**row, "B": 16, "context": 32768, "attn": "SA", "window": None, "tok_s": 100.0, "step_ms": 160.0}
    swa = {**row, "B": 16, "context": 32768, "attn": "SWA", "window": 512, "tok_s": 1000.0, "step_ms": 16.0,
           "ratio": 10.0, "predicted": 50.0, "meas_over_pred": 0.2}
    notes = bench.e2e_notes([sa, swa], {16: {"step_ms": 15.0}}, cfg, 4)
    assert any("outside attention/KV" in n and "15.00 ms" in n and "94%" in n for n in notes)
    assert any("paper: 6.2x" in n and "met" in n for n in notes)


def test_bad_flags_exit_2_with_one_line(capsys):
    for argv in (["e2e", "--model", "no-such-model"], ["e2e", "--windows", "0"], ["e2e", "--windows", "a"],
                 ["e2e", "--dtype", "float8"], ["e2e", "--steps", "2"], ["e2e", "--steps", "0"],
                 ["all", "--contexts", "-5"], ["e2e", "--threads", "0"], ["e2e", "--device", "tpu"]):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), argv
    with pytest.raises(swarr.SwarrError, match="no-such-model"):
        bench.build_model("no-such-model", torch.float32, "cpu")


def test_kernel_section_still_parses(monkeypatch):
    a = bench.build_parser().parse_args(["kernel", "--quick", "--threads", "2", "--json", "x.json"])
    assert (a.section, a.quick, a.threads, a.json) == ("kernel", True, 2, "x.json")
    seen = []
    monkeypatch.setattr(bench, "SECTIONS", {"kernel": lambda args: seen.append(args.section) or {},
                                            "e2e": bench.SECTIONS["e2e"]})
    bench.main(["kernel", "--quick", "--model", "ignored-by-kernel"])  # e2e flags are only checked for e2e/all
    assert seen == ["kernel"]


def test_main_e2e_writes_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "e2e.json"
    try:
        bench.main(["e2e", "--model", "tiny", "--contexts", "8,40", "--windows", "16", "--batches", "2",
                    "--steps", "5", "--prefill-max", "8", "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())["e2e"]["tiny"]
    assert [r["attn"] for r in res["rows"]] == ["SA", "SWA", "SA", "SWA"]
    assert res["conditions"]["device"] == "cpu" and res["conditions"]["dtype"] == "float32"
    printed = capsys.readouterr()
    assert "| context | attention | tok/s" in printed.out and "e2e tiny [5/5]" in printed.err


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat")
def test_other_jobs_sees_a_busy_core():
    """The 'other jobs were running' warning measures the CPU now, not the load average of the last minute."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = bench.other_jobs(0.5)
    finally:
        spin.kill()
        spin.wait()
    assert 0.6 <= busy <= (os.cpu_count() or 1)
