"""The main job (python demo.py): the finding reproduces in the --quick run, the controls get exactly RL's budget,
RL collapse is detected and reported, the report and plots are written, other data goes through the same stages,
and bad flags give one error line."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

import demo
import swarr
import train_rl
import train_sft
from support import report
from support.flags import check_demo

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
    (["--rate", "1.5"], "--rate"),
    (["--sweep", "--windows", "24,x"], "--windows"),
    (["--sweep", "--windows", "24,0"], "window"),
    (["--rejection-rounds", "0"], "--rejection-rounds"),
    (["--quick", "--rejection-rounds", "21"], "--rejection-rounds"),  # more rounds than --quick's 20 RL steps
    (["--ablations", "--sweep"], "--ablations"),
    (["--control-lr", "0"], "--control-lr"),
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
    report.svg_curve({"reward": [(1, 0.1), (2, 0.5)], "acc": [(0, 0.0), (2, 0.9)]}, {"SA": 0.99}, str(path), "t")
    root = ET.parse(path).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}path")) == 2
    labels = [t.text for t in root.findall(f"{ns}text")]
    assert {"reward", "acc", "SA", "t"} <= set(labels)


def test_wilson_interval():
    lo, hi = report.wilson(0, 10)
    assert lo == 0 and abs(hi - 0.2775) < 1e-3  # the textbook value for 0 of 10
    lo, hi = report.wilson(10, 10)
    assert hi == 1 and abs(lo - 0.7225) < 1e-3
    lo, hi = report.wilson(50, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
    assert report.wilson(200, 800)[1] - report.wilson(200, 800)[0] < report.wilson(50, 200)[1] - report.wilson(50, 200)[0]


def test_checks_follow_the_numbers():
    def res(sa, swa, rl, more, rate=(0.2, 0.9), collapse=None):
        r = lambda name, acc, **kw: dict(row=name, accuracy=acc, sampled=acc, **kw)
        tr = lambda x: {"sampled_traces": {"restate_rate": x}, "greedy_traces": {}}
        return {"rows": [r(demo.SA, sa), r(demo.SWA, swa, **tr(rate[0])), r(demo.SWARR, rl, **tr(rate[1])),
                         r(demo.MORE, more)], "collapse": collapse}
    assert all(demo.checks(res(0.99, 0.10, 0.90, 0.12)).values())
    c = demo.checks(res(0.99, 0.10, 0.40, 0.50, rate=(0.3, 0.2)))
    assert not c["SWARR recovers >= 60% of the gap"] and not c["more SFT recovers < 20%"]
    assert not c["restatement rate rises under RL"]
    assert not demo.checks(res(0.80, 0.70, 0.80, 0.70))["gap >= 25 points, greedy"]
    assert not demo.checks(res(0.99, 0.10, 0.90, 0.12, collapse="reward 0"))["RL did not collapse"]


def test_collapse_detection():
    """A run whose reward fell to 0, or whose groups all stopped differing, is called collapsed; a run that
    solves everything (reward 1, so equal groups too) or is still learning is not."""
    assert train_rl.collapse([0.2, 0.3, 0, 0, 0, 0, 0], [0.5, 0.4, 1, 1, 1, 1, 1]) == \
        "reward 0 for the last 5 steps after 0.300 at step 2"
    assert train_rl.collapse([0.2, 0.3, 0, 0, 0, 0, 0.1], [0.5] * 7) is None
    assert "equal rewards" in train_rl.collapse([0.0] * 5, [1.0] * 5)  # never any signal
    assert "equal rewards" in train_rl.collapse([0.5, 0.5, 0.5, 0.5, 0.5], [1.0] * 5)  # half the groups 1, half 0
    assert train_rl.collapse([0.9, 1.0, 1.0, 1.0, 1.0, 1.0], [0.8, 1, 1, 1, 1, 1]) is None  # solved, not dead
    assert train_rl.collapse([0.0, 0.0, 0.0], [1.0] * 3) is None  # too early to say


def test_rl_reports_a_collapse_in_the_log_and_the_history():
    """Inside train_rl.run: a reward that dies after step 2 is reported once, as a line and as an event."""
    model, tok = swarr.load(demo.DEFAULT_MODEL)
    problems = [{"prompt": tok.chat(f"{i}*2+1*1"), "answer": str(2 * i + 1)} for i in range(1, 9)]
    calls, lines, history = [], [], []

    def reward(text, problem):  # positive on the first two steps' rollouts only
        calls.append(1)
        return float(len(calls) <= 2 * 4 * 2 and len(calls) % 2 == 0)

    a = train_rl.parser().parse_args(["--out", "", "--steps", "8", "--prompts-per-step", "4", "--group-size", "2",
                                      "--max-new-tokens", "4", "--lr", "1e-4", "--eval-every", "0",
                                      "--show-every", "0"])
    train_rl.run(a, model, tok, problems, [], reward, log=lines.append, history=history)
    events = [h for h in history if h.get("event") == "collapse"]
    assert len(events) == 1 and events[0]["step"] == 7 and "reward 0" in events[0]["reason"]
    assert sum("RL COLLAPSED" in ln for ln in lines) == 1
    assert demo.collapse_of(history) == events[0]["reason"]


def test_controls_get_exactly_rls_budget(monkeypatch, tmp_path):
    """Rejection sampling draws as many completions as RL, on the same prompts, at RL's temperature, from the model
    RL starts from; more SFT, rejection sampling and the ceiling each fine-tune on as many sequences as RL samples."""
    rollouts, sft_calls = [], []
    real_rollout, real_sft = train_rl.rollout, train_sft.run

    def spy_rollout(model, tok, problems, group_size, temperature, max_new_tokens, seed):
        out = real_rollout(model, tok, problems, group_size, temperature, max_new_tokens, seed)
        rollouts.append(dict(prompts=[p["prompt"] for p in problems], n=len(out), T=temperature, seed=seed,
                             training=model.training))
        return out

    def spy_sft(args, model, tok, train, *a, **kw):
        sft_calls.append(dict(steps=args.max_steps, batch=args.batch_size, n=len(train), window=args.window,
                              seed=args.seed, lr=args.lr, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio))
        return real_sft(args, model, tok, train, *a, **kw)

    monkeypatch.setattr(train_rl, "rollout", spy_rollout)
    monkeypatch.setattr(train_sft, "run", spy_sft)
    res = demo.run(demo.parser().parse_args(
        ["--n-train", "64", "--n-test", "4", "--samples", "1", "--sft-steps", "2", "--rl-steps", "2",
         "--max-new-tokens", "6", "--context", "256", "--out", str(tmp_path / "out")]))
    P, G = demo.RL["prompts"], demo.RL["group"]
    rl_calls, rs_calls = rollouts[:2], rollouts[2:]
    assert len(rs_calls) == 2 and [c["prompts"] for c in rs_calls] == [c["prompts"] for c in rl_calls]
    assert [c["seed"] for c in rs_calls] == [c["seed"] for c in rl_calls]
    assert all(c["n"] == P * G and c["T"] == demo.RL["temperature"] for c in rollouts)
    assert res["rejection"]["drawn"] == sum(c["n"] for c in rl_calls) == res["budget"]["rl_samples"] == 2 * P * G
    # SA, SWA, then more SFT, rejection sampling (if it kept anything) and the ceiling: RL's optimizer steps of
    # RL's batch, so RL's count of sequences, at a constant rate (RL's schedule), each at its own chosen rate
    controls = sft_calls[2:]
    names = [demo.MORE] + [demo.REJECT] * (res["rejection"]["kept"] > 0) + [demo.CEIL]
    assert len(controls) == len(names)
    for c, name in zip(controls, names):
        assert (c["steps"], c["batch"], c["window"], c["seed"]) == (2, P * G, 40, 1), c
        assert (c["warmup"], c["min_lr_ratio"], c["lr"]) == (0, 1.0, demo.LR[name]), c
    m = res["matched"]
    assert m[demo.SWARR] == dict(steps=2, batch=P * G, sequences=2 * P * G, schedule="constant", lr=demo.LR[demo.SWARR])
    for name in names:
        assert {k: m[name][k] for k in ("steps", "batch", "sequences", "schedule")} == \
            {k: m[demo.SWARR][k] for k in ("steps", "batch", "sequences", "schedule")}, name
    assert set(demo.LR.values()) | set(demo.QUICK_LR.values()) <= set(demo.GRID)
    assert [r["row"] for r in res["rows"]] == [demo.SA, demo.SWA, demo.SWARR, demo.MORE, demo.REJECT, demo.CEIL]


def test_iterated_rejection_sampling_keeps_rls_budget(monkeypatch, tmp_path):
    """--rejection-rounds 2: round 1 samples RL's first step from SWA + SFT, round 2 RL's second step from the model
    round 1 fine-tuned; together they draw RL's samples and fine-tune on RL's count of sequences."""
    events, real_rollout, real_sft = [], train_rl.rollout, train_sft.run

    def spy_rollout(model, tok, problems, group_size, temperature, max_new_tokens, seed):
        out = real_rollout(model, tok, problems, group_size, temperature, max_new_tokens, seed)
        for s in out:
            s["truncated"] = False  # so that every sample can be kept: the test is about who samples what
        events.append(("rollout", model, [p["prompt"] for p in problems], seed))
        return out

    def spy_sft(args, model, tok, train, *a, **kw):
        out = real_sft(args, model, tok, train, *a, **kw)
        events.append(("sft", out, args.max_steps * args.batch_size, len(train), args.seed))
        return out

    monkeypatch.setattr(train_rl, "rollout", spy_rollout)
    monkeypatch.setattr(train_sft, "run", spy_sft)
    monkeypatch.setattr(demo, "reward", lambda completion, problem: 1.0)  # every sample accepted
    res = demo.run(demo.parser().parse_args(
        ["--n-train", "64", "--n-test", "4", "--samples", "1", "--sft-steps", "2", "--rl-steps", "2",
         "--max-new-tokens", "6", "--context", "256", "--rejection-rounds", "2", "--out", str(tmp_path / "out")]))
    P, G = demo.RL["prompts"], demo.RL["group"]
    # order: SA sft, SWA sft, RL's 2 rollouts, more-SFT sft, then round 1 (rollout, sft), round 2 (rollout, sft)
    kinds = [e[0] for e in events]
    assert kinds[:6] == ["sft", "sft", "rollout", "rollout", "sft", "rollout"], kinds
    swa, rl_rollouts = events[1][1], events[2:4]
    r1, s1, r2, s2 = events[5:9]
    assert (r1[0], s1[0], r2[0], s2[0]) == ("rollout", "sft", "rollout", "sft")
    assert [r1[2], r2[2]] == [e[2] for e in rl_rollouts] and [r1[3], r2[3]] == [e[3] for e in rl_rollouts]
    assert r1[1] is swa and r2[1] is s1[1]  # round 1 samples from SWA + SFT, round 2 from what round 1 tuned
    assert s1[3] == s2[3] == P * G  # each round fine-tunes on its own round's kept samples
    assert s1[2] == s2[2] == P * G and s1[2] + s2[2] == res["budget"]["sequences"]  # half of RL's count each
    assert (s1[4], s2[4]) == (1, 2)  # round r fine-tunes with seed + r (seed 0 here)
    rs = res["rejection"]
    assert (rs["drawn"], rs["kept"], rs["rounds"]) == (2 * P * G, 2 * P * G, 2)
    assert rs["kept_lines"] == rs["drawn_lines"]  # everything was kept, so the kept lines are all the lines
    assert "in 2 rounds" in (tmp_path / "out" / "report.md").read_text()


def test_rounds_share_a_budget_exactly():
    for total in (1, 7, 20, 40, 160):
        for rounds in range(1, total + 1):
            parts = [demo.share(r, total, rounds) for r in range(rounds)]
            assert [i for p in parts for i in p] == list(range(total)) and all(len(p) > 0 for p in parts)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_rejection_samples_counts_what_the_filter_selected(monkeypatch):
    """Kept: a correct, finished sample; rejected: a wrong answer and a truncated one. The counts give the
    restating lines of every drawn sample and of the kept ones."""
    model, tok = swarr.load(demo.DEFAULT_MODEL)
    p = demo.synth.problems(1, seed=0, terms=(4, 4))[0]
    problem = {"prompt": tok.chat(p.prompt), "answer": str(p.answer)}
    wrong = demo.synth.solve(p, [True, False, True]).replace(f"{{{p.answer}}}", f"{{{p.answer + 1}}}")
    samples = [(demo.synth.solve(p, [True, True, True]), False),   # kept, restates 3 of 3 lines
               (demo.synth.solve(p, [False, False, False]), False),  # kept, 0 of 3
               (wrong, False),                                       # wrong answer, 2 of 3
               (demo.synth.solve(p, [True, True, False]), True)]     # truncated, 2 of 3
    monkeypatch.setattr(train_rl, "rollout", lambda *a, **kw: [dict(problem=problem, text=t, truncated=tr)
                                                               for t, tr in samples])
    args = demo.parser().parse_args(["--quick"])
    kept, counts = demo.rejection_samples(model, tok, [problem] * 16, args, range(2))
    eot = train_sft.end_of_turn(tok, model.cfg)
    assert kept == [(problem["prompt"], t + eot) for t, _ in samples[:2]] * 2
    assert counts == dict(drawn=8, kept=4, drawn_lines=[2 * 7, 2 * 12], kept_lines=[2 * 3, 2 * 6])
    assert report.selected(counts) == " (their lines restate 0.50 of the time, all 8 drawn 0.58)"


def test_quick_run_reproduces_the_finding(tmp_path):
    """The whole recipe, --quick: SWA+SFT falls far below SA+SFT, RL wins most of it back, more SFT does not, RL
    raises the restatement rate, and RL does not collapse."""
    out = tmp_path / "demo"
    res = demo.run(demo.parser().parse_args(["--quick", "--context", "4096", "--out", str(out)]))
    rows = {r["row"]: r for r in res["rows"]}
    assert all(res["checks"].values()), res["checks"]
    assert rows[demo.SWARR]["greedy_traces"]["restate_rate"] > rows[demo.SWA]["greedy_traces"]["restate_rate"] + 0.3
    assert res["budget"] == dict(rl_samples=20 * 64, sequences=20 * 64, steps=20, batch=64)
    assert all(m["sequences"] == 20 * 64 and m["steps"] == 20 for m in res["matched"].values())
    for p in res["paired"]:  # SWARR against more SFT: a paired per-problem difference whose interval excludes 0
        assert p["sampled_ci"][0] <= p["sampled"] <= p["sampled_ci"][1]
    more = next(p for p in res["paired"] if p["b"] == demo.MORE)
    assert more["greedy_ci"][0] > 0 and more["sampled_ci"][0] > 0
    sa, swa = res["speed"]["SA"], res["speed"]["SWA"]
    assert sa["kv_bytes"] > 4096 / 40 * swa["kv_bytes"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    text = (out / "report.md").read_text()
    assert f"| {demo.SWARR} | {rows[demo.SWARR]['accuracy']:.3f} [" in text and "rl_curve.svg" in text
    assert "T=1 [95% CI, clustered]" in text and f"| {demo.SWARR} minus {demo.MORE} |" in text
    ET.parse(out / "rl_curve.svg")
    for folder in demo.FOLDERS.values():
        assert swarr.load(str(out / "models" / folder))[0].windows == ([None] * 4 if folder == "sa-sft" else [40] * 4)
    swarr.main(["eval", "--model", str(out / "models" / "swarr"), "--data", str(out / "test.jsonl"), "--limit", "40",
                "--max-new-tokens", "200", "--out", str(tmp_path / "eval")])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n"] == 40 and summary["accuracy"] >= 0.5


def test_other_data_runs_the_same_stages(tmp_path):
    """--data: a GSM8K-style file instead of the synthetic task (tiny settings: this checks the wiring only)."""
    data = tmp_path / "gsm.jsonl"
    with open(data, "w") as f:
        for i in range(40):
            f.write(json.dumps({"question": f"{i}*2+1*3", "answer": f"{i}*2=... \n#### {2 * i + 3}"}) + "\n")
    res = demo.run(demo.parser().parse_args(
        ["--data", str(data), "--n-test", "4", "--samples", "1", "--sft-steps", "2", "--rl-steps", "1",
         "--max-new-tokens", "8", "--context", "256", "--out", str(tmp_path / "out")]))
    assert [r["row"] for r in res["rows"]] == [demo.SA, demo.SWA, demo.SWARR, demo.MORE, demo.REJECT]
    assert all(r["n"] == 4 for r in res["rows"]) and "greedy_traces" not in res["rows"][0]
    assert "n/a" in (tmp_path / "out" / "report.md").read_text()


def test_sweep_writes_a_row_per_window(tmp_path):
    """--sweep (tiny settings: wiring only): SA + SFT once, rows 2-6 at each window, the table and the figure."""
    res = demo.run(demo.parser().parse_args(
        ["--sweep", "--windows", "16,32", "--n-train", "64", "--n-test", "4", "--samples", "1", "--sft-steps", "2",
         "--rl-steps", "1", "--max-new-tokens", "6", "--out", str(tmp_path / "out")]))
    assert list(res["windows"]) == [16, 32]
    for w, r in res["windows"].items():
        assert [x["row"] for x in r["rows"]] == [demo.SA, demo.SWA, demo.SWARR, demo.MORE, demo.REJECT, demo.CEIL]
        assert all(x["window"] == w for x in r["rows"][1:])
    root = ET.parse(tmp_path / "out" / "sweep.svg").getroot()
    assert len(root.findall("{http://www.w3.org/2000/svg}path")) == 5
    assert "| 16 |" in (tmp_path / "out" / "report.md").read_text()
    # the figure can be redrawn from results.json, whose window keys come back as strings
    back = json.loads((tmp_path / "out" / "results.json").read_text())
    report.sweep_svg(back, demo.ROWS, str(tmp_path / "again.svg"))
    assert (tmp_path / "again.svg").read_text() == (tmp_path / "out" / "sweep.svg").read_text()


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


def test_out_holding_other_files_needs_overwrite(tmp_path):
    """--out holding files the demo did not write is refused before any work unless --overwrite; a folder of an
    earlier demo run is not (the demo replaces its own files)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    r = cli("--out", str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr and "thesis.tex" in r.stderr, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    check = lambda *argv: check_demo(demo.parser().parse_args(argv), 40, demo.OUT_FILES)  # noqa: E731
    assert check("--out", str(out), "--overwrite") == [40]
    (out / "thesis.tex").unlink()
    for name in ("report.md", "results.json", "models", "log.jsonl.tmp-123"):
        (out / name).write_text("")
    assert check("--out", str(out)) == [40]


def test_ablations_add_the_rows_that_intervene(tmp_path):
    """--ablations (tiny settings: wiring only): forced and banned restating for rows 2, 3 and 5, RL without the
    window and without the baseline at RL's budget, their paired comparisons and accuracy by restatement pattern."""
    res = demo.run(demo.parser().parse_args(
        ["--ablations", "--n-train", "64", "--n-test", "4", "--samples", "2", "--sft-steps", "2", "--rl-steps", "1",
         "--max-new-tokens", "40", "--context", "256", "--out", str(tmp_path / "out")]))
    labels = [r["row"] for r in res["ablations"]]
    for words in ("forced restating", "banned restating"):
        assert [x for x in labels if words in x] == [f"{n}, {words}" for n in (demo.SWA, demo.SWARR, demo.REJECT)]
    assert [x for x in labels if x.startswith("RL without the")] == [demo.NO_WINDOW, demo.NO_BASELINE]
    for r in res["ablations"]:
        if "banned restating" in r["row"]:
            assert r["greedy_traces"]["restate_rate"] == r["sampled_traces"]["restate_rate"] == 0
    assert {k: res["matched"][demo.NO_BASELINE][k] for k in ("steps", "batch", "schedule")} == \
        {k: res["matched"][demo.SWARR][k] for k in ("steps", "batch", "schedule")}
    assert res["ablations"][-2]["window"] is None and res["ablations"][-1]["window"] == 40
    assert {p["row"] for p in res["patterns"]} <= {demo.SWA, demo.SWARR, demo.REJECT}
    assert sum(p["samples"] for p in res["patterns"] if p["row"] == demo.SWA) == 4 * 2
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Ablations" in text and "Accuracy by restatement pattern" in text
    assert f"| {demo.SWARR} minus {demo.NO_BASELINE} |" in text


# ---- statistics: problems are the unit ---------------------------------------------------------------------
def test_design_effect_and_clustered_interval_on_a_constructed_example():
    """Samples of a problem that always agree: the design effect is k, and the clustered interval is sqrt(k) times
    as wide as a Wilson interval that takes the k n samples as independent (as wide as Wilson on n_eff = n)."""
    n, k = 400, 4
    agree = np.repeat(np.arange(n) % 2, k).reshape(n, k)  # half the problems always right, half always wrong
    assert report.design_effect(agree) == pytest.approx(k)
    assert report.design_effect(np.tile([1, 1, 0, 0], (n, 1))) == 0.0  # every problem 2 of 4: no spread at all
    assert report.design_effect(np.random.default_rng(0).integers(0, 2, (20000, k))) == pytest.approx(1, abs=0.05)
    lo, hi = report.clustered(agree, seed=0)
    naive, eff = report.wilson(agree.sum(), n * k), report.wilson(agree.mean() * n, n)
    assert lo < 0.5 < hi and (hi - lo) / (naive[1] - naive[0]) == pytest.approx(2, rel=0.12)
    assert (hi - lo) == pytest.approx(eff[1] - eff[0], rel=0.12)
    assert report.clustered(agree, seed=0) == (lo, hi) and report.clustered(agree, seed=1) != (lo, hi)


def test_paired_difference_and_gap_recovered_intervals():
    n = 200
    swa = np.zeros((n, 4))
    swa[:50] = 1                    # 0.25
    row = swa.copy()
    row[50:100] = 1                 # 0.50: a quarter of the problems more, the same ones always
    sa = np.ones((n, 4))            # 1.00
    d, (lo, hi) = report.paired(row, swa, seed=0)
    assert d == pytest.approx(0.25) and lo < 0.25 < hi and lo > 0.15
    assert report.paired(row, row, seed=0) == (0.0, (0.0, 0.0))  # the same row: exactly no difference
    lo, hi = report.recovered_ci(row, sa, swa, seed=0)  # (0.5 - 0.25) / (1 - 0.25) = 1/3
    assert lo < 1 / 3 < hi and hi - lo < 0.3
    assert report.recovered_ci(row, swa, swa, seed=0) is None  # no gap: no share to speak of


def test_accuracy_by_restatement_pattern():
    rows = [dict(row="A", per_problem=dict(sampled=[[1, 0], [0, 1], [1, 0]]),
                 patterns=["all", "none", "all", "all", "none", "some"])]
    got = {p["pattern"]: (p["samples"], p["accuracy"]) for p in report.by_pattern(rows, ["A"], seed=0)}
    assert got == {"all": (3, 2 / 3), "none": (2, 0.5), "some": (1, 0.0)}
    assert report.by_pattern(rows, ["B"], seed=0) == []

