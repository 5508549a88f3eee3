"""Faults: a full disk or a file-size limit during any save, Ctrl-C in any command, an output that cannot be written,
data that cannot be read. Each is one `error:` line and no traceback, and what was on disk stays: no temporaries,
no half-written folders, no trainer state without its checkpoint.

A file-size limit is set in a child process (resource.RLIMIT_FSIZE, SIGXFSZ ignored: a write past it fails with
EFBIG); a full disk is simulated in-process (a write that puts half its bytes down, then raises ENOSPC)."""
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import swarr
import train_sft
from support import grader, safe_io, training
from test_robust import assert_one_error, cli
from test_robust_train import sft_run, snapshot  # noqa: F401  (sft_run: a finished 2-step run, as a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_USER = os.geteuid() == 0  # root may write and read anything: permission bits do not bite
TRAIN = ["--max-steps", "4", "--save-every", "1", "--log-every", "1", "--eval-every", "0", "--batch-size", "4"]


def limited(argv, limit, timeout=300):
    """Run `python argv...` in ROOT with files capped at `limit` bytes: (exit status, stdout, stderr)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    r = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, preexec_fn=cap, capture_output=True, text=True,
                       timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def copy_run(sft_run, tmp_path):
    """A copy of the finished 2-step run, to resume (ckpt, data, run folder)."""
    ckpt, data, out = sft_run
    run = tmp_path / "run"
    shutil.copytree(out, run, symlinks=True)
    return ckpt, data, run


def assert_run_as_before(run, before, names):
    """The run folder holds what it held (log.jsonl may have grown by whole lines), and nothing else: no
    temporaries, no lock, no half folder, no trainer state of a step whose checkpoint was not written."""
    assert sorted(os.listdir(run)) == names
    after = snapshot(run)
    assert after.keys() == before.keys()
    for k in before:
        if k == "log.jsonl":
            assert after[k].startswith(before[k]) and after[k].endswith(b"\n")
            [json.loads(line) for line in after[k].decode().splitlines()]
        else:
            assert after[k] == before[k], k


# ---- a full disk or a file-size limit during a save ----------------------------------------------------------
def test_trainer_state_past_a_file_size_limit(sft_run, tmp_path):
    ckpt, data, run = copy_run(sft_run, tmp_path)
    before, names = snapshot(run), sorted(os.listdir(run))
    limit = os.path.getsize(run / "model" / "model.safetensors") // 2  # larger than log.jsonl, smaller than a save
    assert limit > 4 * os.path.getsize(run / "log.jsonl")
    code, _, err = limited(["train_sft.py", "--model", ckpt, "--data", data, "--out", run, "--resume", *TRAIN], limit)
    assert_one_error(code, err, "step 3", "could not be written", "File too large", "last good checkpoint",
                     f"{run}/model (step 2)")
    assert_run_as_before(run, before, names)


def half_then_enospc(tensors, path, *a, **kw):
    """A stand-in for safetensors' save_file on a disk that fills up: some bytes, then ENOSPC."""
    with open(path, "wb") as f:
        f.write(b"\0" * 1000)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_model_save_on_a_full_disk(sft_run, tmp_path, capsys, monkeypatch):
    """The trainer state of step 3 is written, then the model's folder fails: both go, step 2 stays."""
    ckpt, data, run = copy_run(sft_run, tmp_path)
    before, names = snapshot(run), sorted(os.listdir(run))
    monkeypatch.setattr(swarr, "save_file", half_then_enospc)
    code, err = cli(capsys, ["--model", ckpt, "--data", data, "--out", str(run), "--resume", *TRAIN], train_sft.main)
    assert_one_error(code, err, "step 3", "No space left on device", f"{run}/model (step 2)")
    assert_run_as_before(run, before, names)
    assert not training._HELD


def test_log_line_past_a_file_size_limit(sft_run, tmp_path):
    """The run's log cannot grow: the line is not half-written, and the run stops naming step 2."""
    ckpt, data, run = copy_run(sft_run, tmp_path)
    before, names = snapshot(run), sorted(os.listdir(run))
    limit = os.path.getsize(run / "log.jsonl") + 20  # room for part of the next line only
    code, _, err = limited(["train_sft.py", "--model", ckpt, "--data", data, "--out", run, "--resume", *TRAIN], limit)
    assert_one_error(code, err, "log.jsonl", "File too large", f"{run}/model (step 2)")
    assert_run_as_before(run, before, names)
    assert snapshot(run) == before


def test_eval_results_past_a_file_size_limit(ckpts, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "summary.json").write_text('{"old": 1}')
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus {i} is", "answer": str(2 * i)}) + "\n" for i in range(6)))
    code, _, err = limited(["swarr.py", "eval", "--model", ckpts["Qwen2ForCausalLM"], "--data", data, "--out", out,
                            "--max-new-tokens", "24", "--batch-size", "6"], 600)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and "File too large" in lines[-1], err
    assert "Traceback" not in err
    assert sorted(os.listdir(out)) == ["summary.json"] and (out / "summary.json").read_text() == '{"old": 1}'


def test_grader_out_past_a_file_size_limit(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"gold": str(i), "prediction": str(i)}) + "\n" for i in range(200)))
    keep = tmp_path / "out.jsonl"
    keep.write_text("old\n")
    code, _, err = limited(["-m", "support.grader", f, "--out", keep], 2000)
    assert_one_error(code, err, str(keep), "File too large")
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"] and keep.read_text() == "old\n"


def enospc_after(n):
    """An os.write that fails with ENOSPC once `n` bytes are down (a disk that fills up)."""
    real, left = os.write, [n]

    def write(fd, data):
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        k = real(fd, bytes(data[:left[0]]))
        left[0] -= k
        return k
    return write


def test_append_text_on_a_full_disk_leaves_no_half_line(tmp_path, monkeypatch):
    p = tmp_path / "log.jsonl"
    p.write_text('{"a": 1}\n')
    monkeypatch.setattr(safe_io.os, "write", enospc_after(5))
    with pytest.raises(safe_io.WriteError, match="log.jsonl: cannot write .No space left on device"):
        safe_io.append_text(str(p), '{"b": 2, "c": 3}\n')
    monkeypatch.undo()
    assert p.read_text() == '{"a": 1}\n'
    safe_io.append_text(str(p), '{"b": 2}\n')
    assert p.read_text() == '{"a": 1}\n{"b": 2}\n'


class FillingFile:
    """A text file whose disk fills up after `n` characters."""

    def __init__(self, f, n):
        self.f, self.n = f, n

    def write(self, text):
        self.f.write(text[:self.n])
        self.f.flush()
        if len(text) > self.n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_write_texts_atomic_switches_in_all_or_none(tmp_path, monkeypatch):
    a, b = tmp_path / "samples.jsonl", tmp_path / "summary.json"
    a.write_text("old a")
    b.write_text("old b")
    real = open
    monkeypatch.setattr(safe_io, "open", lambda p, *x, **k: FillingFile(real(p, *x, **k), 10 if "summary" in str(p)
                                                                         else 10 ** 6), raising=False)
    with pytest.raises(safe_io.WriteError, match="summary.json: cannot write"):
        safe_io.write_texts_atomic({str(a): "new a " * 100, str(b): "new b " * 100})
    assert sorted(os.listdir(tmp_path)) == ["samples.jsonl", "summary.json"]
    assert a.read_text() == "old a" and b.read_text() == "old b"


def test_write_folder_on_a_full_disk_leaves_the_old_folder(tmp_path):
    path = tmp_path / "model"
    safe_io.write_folder(str(path), lambda d: open(os.path.join(d, "config.json"), "w").write("1"))
    names = sorted(os.listdir(tmp_path))

    def fill(d):
        open(os.path.join(d, "config.json"), "w").write("2")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(safe_io.WriteError, match="No space left on device"):
        safe_io.write_folder(str(path), fill)
    assert sorted(os.listdir(tmp_path)) == names and (path / "config.json").read_text() == "1"


@pytest.mark.parametrize("plain", [False, True])
def test_write_folder_interrupted_at_the_switch_undoes_it(tmp_path, monkeypatch, plain):
    """Ctrl-C (or any exception) between the complete new folder and the switch: the new folder goes, and a
    plain folder that was moved aside comes back."""
    path = tmp_path / "model"
    if plain:
        path.mkdir()
        (path / "config.json").write_text("1")
    else:
        safe_io.write_folder(str(path), lambda d: open(os.path.join(d, "config.json"), "w").write("1"))
    names = sorted(os.listdir(tmp_path))

    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(safe_io, "link", interrupted)
    with pytest.raises(KeyboardInterrupt):
        safe_io.write_folder(str(path), lambda d: open(os.path.join(d, "config.json"), "w").write("2"))
    assert sorted(os.listdir(tmp_path)) == names and (path / "config.json").read_text() == "1"
    assert path.is_symlink() != plain


# ---- Ctrl-C --------------------------------------------------------------------------------------------------
def interrupt(argv, started, delay, timeout=300):
    """Start `python argv...`, wait until `started(line)` holds for a line of its stdout (or stderr, if started
    is given as ('stderr', fn)), wait `delay` seconds, send SIGINT: (exit status, stderr)."""
    stream, started = started if isinstance(started, tuple) else ("stdout", started)
    p = subprocess.Popen([sys.executable, "-u", *map(str, argv)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        pipe, seen = getattr(p, stream), []
        t0 = time.time()
        while time.time() - t0 < timeout:
            line = pipe.readline()
            seen.append(line)
            assert line, f"ended before it started: {''.join(seen)} {p.stderr.read() if stream == 'stdout' else ''}"
            if started(line):
                break
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, ("".join(seen) if stream == "stderr" else "") + err


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.6])
def test_ctrl_c_in_training_names_the_last_good_checkpoint(sft_run, tmp_path, delay):
    """SIGINT at some moment of a run that saves every step (often in the middle of a save): exit status 130,
    one line naming the checkpoint out/model holds, which loads, with its trainer state and nothing else."""
    ckpt, data, run = copy_run(sft_run, tmp_path)
    code, err = interrupt(["train_sft.py", "--model", ckpt, "--data", data, "--out", run, "--resume", "--max-steps",
                           "100000", "--save-every", "1", "--log-every", "1", "--eval-every", "0", "--batch-size", "4"],
                          lambda line: line.startswith("step 3/"), delay)
    step = json.load(open(run / "model" / "train_config.json"))["step"]
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("note: ")]  # (no chat template: ChatML)
    assert code == 130 and len(lines) == 1 and "Traceback" not in err, (code, err)
    assert lines[0] == f"error: interrupted; the last good checkpoint: {run}/model (step {step}), left as it is"
    assert step >= 2
    names = sorted(os.listdir(run))
    version = os.readlink(run / "model")
    assert names == sorted(["model", version, "log.jsonl", f"trainer_state-{step}.pt"]), names
    swarr.load(str(run / "model"))


def test_ctrl_c_in_eval_is_one_line(ckpts, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus {i} is", "answer": str(2 * i)}) + "\n"
                            for i in range(400)))
    out = tmp_path / "eval"
    code, err = interrupt(["swarr.py", "eval", "--model", ckpts["Qwen2ForCausalLM"], "--data", data, "--out", out,
                           "--batch-size", "1", "--max-new-tokens", "64"], ("stderr", lambda line: "/400" in line), 0.1)
    assert code == 130 and err.strip().splitlines()[-1] == "error: interrupted", err
    assert "Traceback" not in err
    assert not out.exists() or os.listdir(out) == []


def test_run_cli_turns_ctrl_c_into_one_line(capsys):
    def stopped(*words):
        raise KeyboardInterrupt(*words)
    for words, line in [((), "error: interrupted"), (("the last good checkpoint: x",),
                                                     "error: interrupted; the last good checkpoint: x")]:
        with pytest.raises(SystemExit) as e:
            safe_io.run_cli(stopped, *words)
        assert e.value.code == 130 and capsys.readouterr().err == line + "\n"


def test_run_cli_sees_ctrl_c_behind_a_library_error(capsys):
    """torch.save's zip writer, closing the file after Ctrl-C cut a write short, raises an error of its own."""
    def stopped_in_a_writer():
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 471232 vs 471120")
    with pytest.raises(SystemExit) as e:
        safe_io.run_cli(stopped_in_a_writer)
    assert e.value.code == 130 and capsys.readouterr().err == "error: interrupted\n"
    with pytest.raises(RuntimeError):  # the same error with no Ctrl-C behind it stays itself
        safe_io.run_cli(lambda: (_ for _ in ()).throw(RuntimeError("unexpected pos")))


def test_ctrl_c_inside_torch_save_names_the_last_good_checkpoint(sft_run, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the trainer state is written, turned by the writer into a RuntimeError: exit 130, one line
    naming step 2, and --out as it was."""
    ckpt, data, run = copy_run(sft_run, tmp_path)
    before, names = snapshot(run), sorted(os.listdir(run))
    real_save = training.torch.save

    def save_cut_short(obj, f, *a, **kw):
        f.write(b"\0" * 100)
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("unexpected pos 100 vs 0")
    monkeypatch.setattr(training.torch, "save", save_cut_short)
    code, err = cli(capsys, ["--model", ckpt, "--data", data, "--out", str(run), "--resume", *TRAIN], train_sft.main)
    monkeypatch.setattr(training.torch, "save", real_save)
    assert code == 130 and "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: interrupted; the last good checkpoint: {run}/model (step 2)")
    assert_run_as_before(run, before, names)
    assert not training._HELD


def test_ctrl_c_in_the_grader_cli(tmp_path, capsys, monkeypatch):
    f = tmp_path / "in.jsonl"
    f.write_text('{"gold": "1", "prediction": "1"}\n')

    def stopped(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(grader, "grade_file", stopped)
    with pytest.raises(SystemExit) as e:
        grader.main([str(f), "--out", str(tmp_path / "o.jsonl")])
    assert e.value.code == 130 and capsys.readouterr().err == "error: interrupted\n"
    assert os.listdir(tmp_path) == ["in.jsonl"]


# ---- an output that cannot be written, data that cannot be read: one line before the work ---------------------
def no_permission(*a, **kw):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def test_read_only_out_is_refused_before_the_work(sft_run, tmp_path, capsys, monkeypatch):
    """Where nothing can be created in --out's folder (here: the probe that creates something fails, as it does
    on a read-only file system), training, eval and the grader refuse before they load anything."""
    ckpt, data, _ = sft_run
    monkeypatch.setattr(tempfile, "mkdtemp", no_permission)
    monkeypatch.setattr(swarr, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    code, err = cli(capsys, ["--model", ckpt, "--data", data, "--out", str(tmp_path / "o"), *TRAIN], train_sft.main)
    assert_one_error(code, err, "--out", "cannot write", "Permission denied")
    code, err = cli(capsys, ["eval", "--model", ckpt, "--data", data, "--out", str(tmp_path / "e")])
    assert_one_error(code, err, "--out", "cannot write", "Permission denied")
    monkeypatch.setattr(grader, "grade_file", lambda *a: pytest.fail("graded"))
    with pytest.raises(SystemExit) as e:
        grader.main([data, "--out", str(tmp_path / "g.jsonl")])
    assert_one_error(e.value.code, capsys.readouterr().err, "--out", "cannot write", "Permission denied")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(ROOT_USER, reason="root writes into a read-only folder: the permission bits do not bite")
def test_read_only_out_folder_for_real(sft_run, tmp_path, capsys):
    ckpt, data, _ = sft_run
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, err = cli(capsys, ["--model", ckpt, "--data", data, "--out", str(ro / "o"), *TRAIN], train_sft.main)
        assert_one_error(code, err, "--out", "cannot write")
        with pytest.raises(SystemExit) as e:
            grader.main([data, "--out", str(ro / "g.jsonl")])
        assert_one_error(e.value.code, capsys.readouterr().err, "--out", "cannot write")
    finally:
        ro.chmod(0o755)
    assert os.listdir(ro) == []


@pytest.mark.parametrize("flag", ["--data", "--held-out"])
def test_unreadable_data_is_one_line_before_the_work(sft_run, tmp_path, capsys, monkeypatch, flag):
    ckpt, data, _ = sft_run
    monkeypatch.setattr(grader, "open", no_permission, raising=False)
    monkeypatch.setattr(swarr, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["--model", ckpt, "--data", data, "--out", str(tmp_path / "o"), *TRAIN]
    if flag == "--held-out":
        monkeypatch.setattr(grader, "open", lambda p, *a: (no_permission if "held" in str(p) else open)(p, *a),
                            raising=False)
        held = tmp_path / "held.jsonl"
        shutil.copy(data, held)
        argv += ["--held-out", str(held)]
    code, err = cli(capsys, argv, train_sft.main)
    assert_one_error(code, err, "cannot read", "Permission denied")
    assert not (tmp_path / "o").exists()
    if flag == "--data":
        code, err = cli(capsys, ["eval", "--model", ckpt, "--data", data, "--out", str(tmp_path / "e")])
        assert_one_error(code, err, data, "cannot read", "Permission denied")


@pytest.mark.skipif(ROOT_USER, reason="root reads a file whatever its permission bits")
def test_unreadable_data_for_real(sft_run, tmp_path, capsys):
    ckpt, data, _ = sft_run
    locked = tmp_path / "locked.jsonl"
    shutil.copy(data, locked)
    locked.chmod(0)
    code, err = cli(capsys, ["--model", ckpt, "--data", str(locked), "--out", str(tmp_path / "o"), *TRAIN],
                    train_sft.main)
    assert_one_error(code, err, "locked.jsonl", "cannot read")


def test_ctrl_c_under_torchrun_is_said_by_rank_0_alone(capsys, monkeypatch):
    from support import distributed

    def stopped(*a):
        raise KeyboardInterrupt("the last good checkpoint: x")

    def exit_now(code):
        raise SystemExit(code)
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed.os, "_exit", exit_now)
    for rank, err in [(1, ""), (0, "error: interrupted; the last good checkpoint: x\n")]:
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        with pytest.raises(SystemExit) as e:
            distributed.run_cli(stopped)
        assert e.value.code == 130 and capsys.readouterr().err == err
