"""The main job (demo.py, `python demo.py`): the finding reproduces in the --quick run, the report and
plot are written, other data goes through the same stages, and bad flags give one error line."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

import demo
import swarr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("args, words", [
    (["--window", "0"], "window"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--data", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
    (["--sft-steps", "0"], "--sft-steps"),
    (["--rl-steps", "-1"], "--rl-steps"),
])
def test_bad_input_is_one_error_line(args, words, tmp_path):
    r = cli(*args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_bad_input_fails_before_any_training(tmp_path, capsys):
    """Checked up front, not after a stage has trained: a window beyond the model's context, --out naming a file,
    and a CUDA device where there is none."""
    (tmp_path / "file").write_text("x")
    cases = [(["--window", "5000"], "--window 5000"), (["--out", str(tmp_path / "file")], "--out")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda"))
    for args, words in cases:
        with pytest.raises(SystemExit) as e:
            demo.main(args + ([] if "--out" in args else ["--out", str(tmp_path / "out")]))
        assert e.value.code == 2
        out = capsys.readouterr()
        assert out.err.strip().startswith("error: ") and words in out.err, out.err
        assert "SA + SFT" not in out.out  # no stage started


def test_unknown_flag_is_refused():
    r = cli("--no-such-flag")
    assert r.returncode == 2 and "--no-such-flag" in r.stderr


def test_svg_is_well_formed(tmp_path):
    path = tmp_path / "c.svg"
    demo.svg_curve({"reward": [(1, 0.1), (2, 0.5)], "acc": [(0, 0.0), (2, 0.9)]}, {"SA": 0.99}, str(path), "t")
    root = ET.parse(path).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}path")) == 2
    labels = [t.text for t in root.findall(f"{ns}text")]
    assert {"reward", "acc", "SA", "t"} <= set(labels)


def test_checks_follow_the_numbers():
    rows = lambda sa, swa, rl, ctrl: [dict(row=demo.SA, accuracy=sa), dict(row=demo.SWA, accuracy=swa, near_t1=0.1),
                                      dict(row=demo.SWARR, accuracy=rl, near_t1=0.9), dict(row=demo.CONTROL, accuracy=ctrl)]
    assert all(demo.checks({"rows": rows(0.99, 0.02, 0.90, 0.03)}).values())
    c = demo.checks({"rows": rows(0.99, 0.02, 0.40, 0.50)})
    assert not c["SWARR recovers >= 60% of the gap"] and not c["control recovers less than SWARR"]
    assert not demo.checks({"rows": rows(0.80, 0.70, 0.80, 0.70)})["gap >= 25 points"]


def test_quick_run_reproduces_the_finding(tmp_path):
    """The whole recipe, --quick: SWA+SFT falls far below SA+SFT, RL wins most of it back, extra SFT does not, and
    the SWA model moves to the window-friendly trace style."""
    out = tmp_path / "demo"
    res = demo.run(demo.parser().parse_args(["--quick", "--context", "4096", "--out", str(out)]))
    acc = {r["row"]: r["accuracy"] for r in res["rows"]}
    rows = {r["row"]: r for r in res["rows"]}
    assert acc[demo.SA] >= 0.85
    assert acc[demo.SA] - acc[demo.SWA] >= 0.25
    assert (acc[demo.SWARR] - acc[demo.SWA]) / (acc[demo.SA] - acc[demo.SWA]) >= 0.6
    assert acc[demo.CONTROL] < acc[demo.SWARR] - 0.3
    assert rows[demo.SWARR]["near_greedy"] > 0.8 > rows[demo.SWA]["near_greedy"]
    assert all(res["checks"].values()), res["checks"]
    # the control got RL's compute as SFT steps: 20 steps x 64 sequences / batch 16
    assert res["control_steps"] == 80
    # decode: the SWA cache is W slots per layer, the SA cache the whole context
    sa, swa = res["speed"]["SA"], res["speed"]["SWA"]
    assert sa["kv_bytes"] > 4096 / 40 * swa["kv_bytes"]
    assert swa["tok_s"] > sa["tok_s"]
    # the files
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    report = (out / "report.md").read_text()
    assert f"| {demo.SWARR} | {acc[demo.SWARR]:.3f} |" in report and "rl_curve.svg" in report
    ET.parse(out / "rl_curve.svg")
    events = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert sum(e.get("event") == "train" and "reward" in e for e in events) == 20
    # the four models are saved in HF format, with their windows; `swarr.py eval` grades a row again
    for folder, windows in (("sa-sft", [None] * 4), ("swa-sft", [40] * 4), ("swarr", [40] * 4), ("control", [40] * 4)):
        assert swarr.load(str(out / "models" / folder))[0].windows == windows
    swarr.main(["eval", "--model", str(out / "models" / "swarr"), "--data", str(out / "test.jsonl"), "--limit", "40",
                "--max-new-tokens", "200", "--out", str(tmp_path / "eval")])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n"] == 40 and summary["accuracy"] >= 0.6


def test_other_data_runs_the_same_stages(tmp_path):
    """--data: a GSM8K-style file instead of the synthetic task (tiny settings: this checks the wiring only)."""
    data = tmp_path / "gsm.jsonl"
    with open(data, "w") as f:
        for i in range(40):
            f.write(json.dumps({"question": f"{i}*2+1*3", "answer": f"{i}*2=... \n#### {2 * i + 3}"}) + "\n")
    res = demo.run(demo.parser().parse_args(
        ["--data", str(data), "--n-test", "4", "--sft-steps", "2", "--rl-steps", "1", "--max-new-tokens", "8",
         "--context", "256", "--out", str(tmp_path / "out")]))
    assert [r["row"] for r in res["rows"]] == [demo.SA, demo.SWA, demo.SWARR, demo.CONTROL]
    assert all(r["n"] == 4 for r in res["rows"]) and "style" not in res
    assert "n/a" in (tmp_path / "out" / "report.md").read_text()


def test_report_files_are_replaced_whole(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    demo.write(str(path), "old")
    monkeypatch.setattr(demo.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        demo.write(str(path), "new, interrupted")
    assert path.read_text() == "old"
    monkeypatch.undo()
    demo.write(str(path), "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
