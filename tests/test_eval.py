"""`python swarr.py eval` end to end on a tiny checkpoint and a small JSONL."""
import json
import subprocess
import sys

import torch

from support import grader
import swarr
from support import evaluate


def test_eval_end_to_end(ckpts, tmp_path):
    data = tmp_path / "small.jsonl"
    recs = [{"prompt": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, swarr.__file__, "eval", "--model", str(ckpts["Qwen2ForCausalLM"]),
                        "--data", str(data), "--window", "8", "--max-new-tokens", "6", "--samples", "3",
                        "--temperature", "1.0", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "eval 5/5" in r.stderr and "ETA" in r.stderr  # progress
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert summary["n"] == 5 and summary["samples"] == 3 and len(rows) == 15
    assert summary["window"] == 8 and summary["windows"] == [8] * 2  # the windows the model ran with, per layer
    first = [r for r in rows if r["sample"] == 0]
    assert summary["accuracy"] == sum(r["correct"] for r in first) / 5
    assert summary["mean_accuracy"] == sum(r["correct"] for r in rows) / 15
    assert summary["truncated"] == sum(r["truncated"] for r in rows) / 15
    assert abs(summary["mean_length"] - sum(r["length"] for r in rows) / 15) < 1e-9
    for row in rows:  # every verdict is the grader's verdict on the stored completion
        verdict = grader.grade_detail(row["completion"], row["gold"])
        assert row["extracted"] == verdict.pred and row["correct"] == verdict.correct
        assert row["correct_flexible"] == grader.grade(row["completion"], row["gold"], mode="flexible")
    assert summary["accuracy_flexible"] == sum(r["correct_flexible"] for r in first) / 5
    assert "strict; flexible" in r.stdout


def test_eval_reports_strict_and_flexible(ckpts):
    """A completion that states its answer without a marker counts under flexible only."""
    class Said:  # a "model" whose every completion is fixed text: the grading path alone is under test
        cfg, training, windows = swarr.Config("Qwen2ForCausalLM", 512, 64, 1, 4, 2, 16, 128), False, [None]

        def eval(self):
            return self

        def train(self, mode=True):
            return self

        def generate(self, prompts, n, **kw):
            ids = [tok.encode(t) for t in ("so it is 4", "The answer is \\boxed{6}.")]
            width = max(map(len, ids))
            rows = [ids[i % 2] + [0] * (width - len(ids[i % 2])) for i in range(len(prompts))]
            return swarr.Generation(torch.tensor(rows), torch.tensor([len(ids[i % 2]) for i in range(len(prompts))]),
                                    torch.ones(len(prompts), dtype=torch.bool), [])

    tok = swarr.load(str(ckpts["Qwen2ForCausalLM"]))[1]
    tok.stop_ids = lambda cfg: [-1]
    recs = [{"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6"}]
    summary, rows = evaluate.evaluate(Said(), tok, recs, progress=False, chat=False)
    assert [r["correct"] for r in rows] == [False, True]  # strict: the first states 4 with no marker
    assert [r["correct_flexible"] for r in rows] == [True, True]
    assert summary["accuracy"] == 0.5 and summary["accuracy_flexible"] == 1.0


def test_majority_vote_groups_equivalent_answers():
    assert evaluate.majority(["3", "1/2", "0.5", "\\frac12", "3", None]) == "1/2"  # 3 equivalent beat 2 equal
    assert evaluate.majority(["7", None, "7.0", "8"]) == "7"
    assert evaluate.majority([None, None]) is None


def test_eval_bad_data(ckpts, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{oops\n')
    r = subprocess.run([sys.executable, swarr.__file__, "eval", "--model", str(ckpts["Qwen2ForCausalLM"]),
                        "--data", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "bad.jsonl" in r.stderr and "2" in r.stderr and "Traceback" not in r.stderr


def test_eval_refuses_flags_it_cannot_mean(ckpts, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "answer": "1"}\n')
    base = ["eval", "--model", str(ckpts["Qwen2ForCausalLM"]), "--data", str(data), "--out", str(tmp_path / "o")]
    for flags, name in ((["--samples", "0"], "--samples"), (["--temperature", "-1"], "--temperature"),
                        (["--limit", "0"], "--limit"), (["--max-new-tokens", "0"], "--max-new-tokens")):
        try:
            swarr.main(base + flags)
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(f"{flags} was accepted")
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: " + name) and "\n" not in err
    assert not (tmp_path / "o").exists()
