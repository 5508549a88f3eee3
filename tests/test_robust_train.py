"""Hostile flags and output folders for train_sft.py and train_rl.py: each refusal is exit status 2 with one
`error:` line naming the culprit, before any work, and the run already in --out stays byte-identical. NaN/inf
weights are never saved; two runs never write one --out; a run never replaces its own input."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import swarr
import train_rl
import train_sft
from support import training
from test_robust import assert_one_error, bad_data, cli

torch.set_num_threads(2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(folder):
    """Every file under `folder` (symlinks followed), name -> bytes."""
    out = {}
    for root, _, files in os.walk(folder, followlinks=True):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def sft_run(ckpts, tmp_path_factory):
    """A finished 2-step SFT run: (checkpoint it started from, data file, its --out)."""
    d = tmp_path_factory.mktemp("sftrun")
    data = d / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus {i} is", "answer": str(2 * i)}) + "\n"
                            for i in range(12)))
    out = d / "run"
    train_sft.main(["--model", str(ckpts["Qwen2ForCausalLM"]), "--data", str(data), "--out", str(out),
                    "--max-steps", "2", "--batch-size", "4", "--save-every", "1", "--log-every", "1",
                    "--eval-every", "0"])
    return str(ckpts["Qwen2ForCausalLM"]), str(data), str(out)


BAD_SFT = [  # (flags, words of the error line)
    (["--batch-size", "0"], ["--batch-size"]), (["--batch-size", "-1"], ["--batch-size"]),
    (["--grad-accum", "0"], ["--grad-accum"]), (["--log-every", "0"], ["--log-every"]),
    (["--epochs", "nan"], ["--epochs"]), (["--epochs", "inf"], ["--epochs"]), (["--epochs", "0"], ["--epochs"]),
    (["--lr", "-1"], ["--lr"]), (["--lr", "0"], ["--lr"]), (["--lr", "nan"], ["--lr"]),
    (["--seed", str(2 ** 70)], ["--seed"]), (["--seed", "-3"], ["--seed"]), (["--device", "bogus"], ["--device"]),
    (["--clip", "-1"], ["--clip"]), (["--clip", "0"], ["--clip"]), (["--max-steps", "-5"], ["--max-steps"]),
    (["--held-out-frac", "-0.5"], ["--held-out-frac"]), (["--held-out-frac", "1"], ["--held-out-frac"]),
    (["--window", "0"], ["window"]), (["--window", "-4"], ["window"]), (["--min-lr-ratio", "2"], ["--min-lr-ratio"]),
    (["--warmup", "-1"], ["--warmup"]), (["--max-len", "0"], ["--max-len"]), (["--limit", "0"], ["--limit"]),
    (["--save-every", "-1"], ["--save-every"]), (["--weight-decay", "nan"], ["--weight-decay"]),
]
BAD_RL = [
    (["--prompts-per-step", "0"], ["--prompts-per-step"]), (["--micro-batch", "0"], ["--micro-batch"]),
    (["--temperature", "nan"], ["--temperature"]), (["--temperature", "0"], ["--temperature"]),
    (["--temperature", "1e-40"], ["--temperature"]),
    (["--steps", "0"], ["--steps"]), (["--steps", "-2"], ["--steps"]), (["--group-size", "1"], ["--group-size"]),
    (["--kl", "-1"], ["--kl"]), (["--max-new-tokens", "0"], ["--max-new-tokens"]), (["--lr", "inf"], ["--lr"]),
    (["--clip", "-1"], ["--clip"]), (["--seed", "-1"], ["--seed"]),
]


@pytest.mark.parametrize("script,flags,words", [("sft", f, w) for f, w in BAD_SFT] + [("rl", f, w) for f, w in BAD_RL],
                         ids=[f"sft {' '.join(f)}" for f, _ in BAD_SFT] + [f"rl {' '.join(f)}" for f, _ in BAD_RL])
def test_bad_flag_is_one_error_line_and_the_run_stays(sft_run, capsys, script, flags, words):
    ckpt, data, out = sft_run
    before = snapshot(out)
    main = train_sft.main if script == "sft" else train_rl.main
    code, err = cli(capsys, ["--model", ckpt, "--data", data, "--out", out, "--resume", *flags], main)
    assert_one_error(code, err, *words)
    assert snapshot(out) == before and not os.path.exists(os.path.join(out, ".lock"))


def out_cases(sft_run, tmp_path):
    ckpt, data, out = sft_run
    (tmp_path / "FILE").write_text("x")
    fresh = tmp_path / "fresh"
    return [  # (argv, words)
        (["--model", ckpt, "--data", data, "--out", out], ["--out", "holds a run already", "--resume", "--overwrite"]),
        (["--model", os.path.join(out, "model"), "--data", data, "--out", out, "--resume"],
         ["--out", "contains the input checkpoint"]),
        (["--model", ckpt, "--data", data, "--out", str(tmp_path / "FILE")], ["--out", "not a folder"]),
        (["--model", ckpt, "--data", data, "--out", str(tmp_path / "FILE" / "x")], ["--out", "not a folder"]),
        (["--model", ckpt, "--data", data, "--out", str(fresh), "--resume"], ["nothing to resume"]),
    ]


@pytest.mark.parametrize("case", range(5))
def test_output_folder_refusals(sft_run, tmp_path, capsys, case):
    ckpt, data, out = sft_run
    before = snapshot(out)
    argv, words = out_cases(sft_run, tmp_path)[case]
    code, err = cli(capsys, argv + ["--max-steps", "1"], train_sft.main)
    assert_one_error(code, err, *words)
    assert snapshot(out) == before


HOLD = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
print("held", flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(training.fcntl is None, reason="flock is POSIX")
def test_lock_of_a_live_run_refuses_and_one_that_ended_is_taken_over(sft_run, tmp_path, capsys):
    """A process holding out/.lock's flock refuses a second run, whose error names it; once it has been killed
    (its lock file left behind), the next run takes the lock over. A lock file naming a live pid that holds no
    flock (a pid reused after a crash) does not block either."""
    ckpt, data, out = sft_run
    run = tmp_path / "run"
    shutil.copytree(out, run, symlinks=True)
    before = snapshot(run)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = cli(capsys, ["--model", ckpt, "--data", data, "--out", str(run), "--resume", "--max-steps", "3"],
                        train_sft.main)
        assert_one_error(code, err, "in use by process", str(holder.pid))
        assert snapshot(run) == {**before, ".lock": f"{holder.pid}\n".encode()}
    finally:
        holder.kill()
        holder.wait()
    assert (run / ".lock").read_text() == f"{holder.pid}\n"  # left behind by the killed run
    code, err = cli(capsys, ["--model", ckpt, "--data", data, "--out", str(run), "--resume", "--max-steps", "3",
                             "--eval-every", "0"], train_sft.main)
    assert code == 0, err
    assert json.load(open(run / "model" / "train_config.json"))["step"] == 3
    assert not (run / ".lock").exists()  # released at the end
    (run / ".lock").write_text(f"{os.getppid()}\n")  # a live pid, but nobody holds the flock
    code, err = cli(capsys, ["--model", ckpt, "--data", data, "--out", str(run), "--resume", "--max-steps", "4",
                             "--eval-every", "0"], train_sft.main)
    assert code == 0, err
    assert json.load(open(run / "model" / "train_config.json"))["step"] == 4


RACER = """import sys
sys.path.insert(0, sys.argv[1])
import swarr
from support import training
print("ready", flush=True)
sys.stdin.readline()  # "go": every racer has imported and waits here
try:
    training.take_lock(sys.argv[2], log=lambda s: None)
    print("got", flush=True)
except swarr.SwarrError:
    print("refused", flush=True)
sys.stdin.read()  # hold on to what it got until the test has every answer
"""


@pytest.mark.skipif(training.fcntl is None, reason="flock is POSIX")
def test_lock_takeover_race_leaves_one_holder(tmp_path):
    """Processes that find the same abandoned lock file at the same moment: exactly one of them gets the lock."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text("999999999\n")  # left by a run that has ended
    procs = [subprocess.Popen([sys.executable, "-c", RACER, ROOT, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        assert all(p.stdout.readline().strip() == "ready" for p in procs)
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = sorted(p.stdout.readline().strip() for p in procs)
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=60)
    assert results == ["got", "refused", "refused", "refused"], results


def test_lock_without_flock_decides_by_pid(tmp_path, monkeypatch):
    """Where fcntl is missing: a live pid's lock refuses, an ended one's is taken over, and release removes it."""
    monkeypatch.setattr(training, "fcntl", None)
    (tmp_path / ".lock").write_text(f"{os.getppid()}\n")
    with pytest.raises(swarr.SwarrError, match=f"in use by process {os.getppid()}"):
        training.take_lock(str(tmp_path), log=lambda s: None)
    (tmp_path / ".lock").write_text("999999999\n")
    said = []
    training.take_lock(str(tmp_path), log=said.append)
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n" and "999999999" in said[0]
    training.release_lock(str(tmp_path))
    assert not (tmp_path / ".lock").exists()


def test_a_lock_that_cannot_be_opened_is_one_line(tmp_path):
    (tmp_path / ".lock").mkdir()  # a folder where the lock file goes
    with pytest.raises(swarr.SwarrError, match="cannot lock"):
        training.take_lock(str(tmp_path), log=lambda s: None)
    assert str(tmp_path) not in {os.path.dirname(k) for k in training._HELD}


@pytest.mark.parametrize("damage", ["missing", "truncated", "config"])
def test_resume_with_a_damaged_trainer_state_is_one_line(sft_run, tmp_path, capsys, damage):
    ckpt, data, out = sft_run
    run = tmp_path / "run"
    shutil.copytree(out, run, symlinks=True)
    state = next(run.glob("trainer_state-*.pt"))
    if damage == "missing":
        state.unlink()
    elif damage == "truncated":
        state.write_bytes(state.read_bytes()[:100])
    else:
        (run / "model" / "train_config.json").write_text("[1]")
    before = snapshot(run)
    code, err = cli(capsys, ["--model", ckpt, "--data", data, "--out", str(run), "--resume", "--max-steps", "3"],
                    train_sft.main)
    assert_one_error(code, err, "--resume")
    assert snapshot(run) == before


@pytest.mark.parametrize("lr", ["1e30", "1e38"])
def test_non_finite_weights_are_never_saved(sft_run, tmp_path, capsys, lr):
    ckpt, data, _ = sft_run
    out = tmp_path / "run"
    code, err = cli(capsys, ["--model", ckpt, "--data", data, "--out", str(out), "--lr", lr, "--warmup", "0",
                             "--max-steps", "4", "--save-every", "1", "--log-every", "1", "--eval-every", "0",
                             "--batch-size", "4"], train_sft.main)
    assert_one_error(code, err, "step")
    if (out / "model").exists():  # whatever was saved is finite, and the error line names it with its step
        model, _ = swarr.load(str(out / "model"))
        assert all(torch.isfinite(p).all() for p in model.parameters())
        step = json.load(open(out / "model" / "train_config.json"))["step"]
        assert f"step {step}" in err.split("last good checkpoint")[1]
    else:
        assert "no checkpoint" in err


def test_overwrite_replaces_a_run_and_its_log(sft_run, tmp_path, capsys):
    ckpt, data, out = sft_run
    run = tmp_path / "run"
    shutil.copytree(out, run, symlinks=True)
    old_log = (run / "log.jsonl").read_text()
    code, err = cli(capsys, ["--model", ckpt, "--data", data, "--out", str(run), "--overwrite", "--max-steps", "1",
                             "--eval-every", "0", "--batch-size", "4"], train_sft.main)
    assert code == 0, err
    log = (run / "log.jsonl").read_text()
    assert log and not log.startswith(old_log)
    assert json.load(open(run / "model" / "train_config.json"))["step"] == 1
    assert [f.name for f in run.glob("trainer_state-*.pt")] == ["trainer_state-1.pt"]


@pytest.mark.parametrize("name,words", [("deep.jsonl", ["deep.jsonl:2", "nested"]),
                                        ("latin1.jsonl", ["latin1.jsonl:2", "UTF-8"]),
                                        ("folder.jsonl", ["folder.jsonl", "not a regular file"]),
                                        ("fifo.jsonl", ["fifo.jsonl", "not a regular file"])])
@pytest.mark.parametrize("script", ["sft", "rl"])
def test_bad_data_file_is_one_error_line(sft_run, tmp_path, capsys, script, name, words):
    ckpt, _, _ = sft_run
    main = train_sft.main if script == "sft" else train_rl.main
    code, err = cli(capsys, ["--model", ckpt, "--data", bad_data(tmp_path, name), "--out", str(tmp_path / "o")], main)
    assert_one_error(code, err, *words)
    assert not (tmp_path / "o").exists()


def test_a_real_process_exits_2_at_once(sft_run, tmp_path):
    """The same refusal as above, from a separate process: status 2, one line, no hang (--batch-size -1 once
    looped forever)."""
    import subprocess
    import sys
    ckpt, data, _ = sft_run
    r = subprocess.run([sys.executable, train_sft.__file__, "--model", ckpt, "--data", data, "--out",
                        str(tmp_path / "o"), "--batch-size", "-1"], capture_output=True, text=True, timeout=120)
    assert_one_error(r.returncode, r.stderr, "--batch-size")
    assert not (tmp_path / "o").exists()
