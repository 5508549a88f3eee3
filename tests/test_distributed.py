"""train_sft.py and train_rl.py on 2 processes (gloo, CPU), DDP and FSDP2, against one process on the same global
batch: equal weights, gradient norms and metrics; exact resume; a killed process stops the other one cleanly.

The processes are started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment), by
running this file as a script: `python tests/test_distributed.py SPEC.json` runs one process of one training run.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pytest  # noqa: E402
import torch  # noqa: E402

import swarr  # noqa: E402

RUN_S = 240  # a subprocess that takes longer than this has hung


# ---- one process of a run (this file as a script) ------------------------------------------------------------
class Interrupted(Exception):
    pass


class StopAt(list):
    """A `history` that stops the run in every process when the record of train step `step` arrives (all processes
    append the same records), like a preempted job."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def append(self, m):
        super().append(m)
        if m.get("event") == "train" and m.get("step") == self.step:
            raise Interrupted


def worker(spec: dict):
    from support import distributed
    import train_rl
    import train_sft
    torch.set_num_threads(1)
    model, tok = swarr.load(spec["ckpt"], torch.float64 if spec.get("float64") else torch.float32)
    if spec.get("bug") == "mean":  # the reduction averages instead of summing (what the equality tests must catch)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.distributed.fsdp import FSDPModule
        distributed._sum_hook = allreduce_hook
        divide = FSDPModule.set_gradient_divide_factor
        FSDPModule.set_gradient_divide_factor = lambda self, f: divide(self, float(distributed.world()))
    history = StopAt(spec["stop_at"]) if spec.get("stop_at") else []
    argv = ["--model", spec["ckpt"], "--out", spec["out"], "--timeout", "60", *spec["args"]]

    def train():
        try:
            if spec["script"] == "sft":
                pairs = [(tok.chat(f"what is {a}+{a}?"), f"The answer is {2 * a}.<|im_end|>") for a in range(6)]
                train_sft.run(train_sft.parser().parse_args(argv), model, tok, pairs, pairs[:3], history=history)
            else:
                problems = [{"prompt": tok.chat(f"say something {i}"), "answer": ""} for i in range(8)]
                reward = lambda text, record: 1.0 if any(c.isdigit() for c in text) else 0.0  # noqa: E731
                train_rl.run(train_rl.parser().parse_args(["--eval-every", "0", "--show-every", "0", *argv]),
                             model, tok, problems, problems[:3], reward, history=history)
        except Interrupted:
            pass
        with open(f"{spec['out']}.history-{distributed.rank()}.json", "w") as f:
            json.dump(list(history), f)

    distributed.run_cli(train)  # as the scripts' main(): one error line for bad input or a lost process


# ---- launching runs ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(spec: dict, tmp: Path, nproc: int) -> list:
    path = tmp / f"spec-{os.path.basename(spec['out'])}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = []
    for r in range(nproc):
        e = env if nproc == 1 else {**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                                    "LOCAL_WORLD_SIZE": str(nproc)}
        procs.append(subprocess.Popen([sys.executable, __file__, str(path)], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def run(script: str, ckpt: str, out: Path, args: list, nproc: int = 1, **kw) -> list[dict]:
    """Run to the end; returns rank 0's history (the weights are in out/model)."""
    procs = start(dict(script=script, ckpt=ckpt, out=str(out), args=args, **kw), out.parent, nproc)
    for p in procs:
        _, err = p.communicate(timeout=RUN_S)
        assert p.returncode == 0, err[-3000:]
    return json.load(open(f"{out}.history-0.json"))


def weights(path) -> dict:
    return swarr.load(str(path), torch.float64)[0].state_dict()


def rel_diff(a: dict, b: dict) -> float:
    """The largest |a - b| / |b| over the tensors (Frobenius norms)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in a)


def trained(history, *keys):
    return [[h[k] for k in keys] for h in history if h["event"] == "train"]


def close(xs, ys, tol=1e-6):
    """Equal within tol relative to max(|y|, 1): the logged losses are sums of float32 terms that nearly cancel."""
    return len(xs) == len(ys) and all(abs(x - y) <= tol * max(abs(y), 1.0)
                                      for a, b in zip(xs, ys) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from conftest import make_checkpoint, train_tokenizer
    path = tmp_path_factory.mktemp("dist") / "qwen2"
    vocab = swarr.Tokenizer(str(train_tokenizer(path))).vocab_size
    make_checkpoint(path, "Qwen2ForCausalLM", vocab_size=vocab, tie_word_embeddings=True)  # ties: one FSDP group
    return str(path)


# SFT: 6 examples in global micro-batches of 4 (2 processes x 2): every other step the batch holds 2 examples, one on
# each process. Four steps at lr 1e-2 move the weights by percents; the comparison allows 1e-6.
SFT = ["--max-steps", "4", "--grad-accum", "2", "--lr", "1e-2", "--warmup", "1", "--window", "8", "--log-every", "1",
       "--eval-every", "2", "--save-every", "2", "--held-out-frac", "0"]


@pytest.fixture(scope="module")
def sft_one(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "sft"
    return run("sft", ckpt, out, [*SFT, "--batch-size", "4"], float64=True), weights(out / "model")


@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
def test_sft_on_two_processes_equals_one_process(shard, ckpt, sft_one, tmp_path):
    history, one = sft_one
    extra = ["--checkpointing"] if shard == "fsdp" else []  # activation checkpointing inside FSDP2's blocks
    h2 = run("sft", ckpt, tmp_path / "sft", [*SFT, "--batch-size", "2", "--shard", shard, *extra], nproc=2,
             float64=True)
    two = weights(tmp_path / "sft/model")
    moved, diff = rel_diff(one, weights(ckpt)), rel_diff(two, one)
    print(f"{shard}: weights moved {moved:.3g} (relative), 2 processes vs 1: {diff:.2g}")
    assert moved > 1e-2 and diff < 1e-6
    assert close(trained(h2, "loss", "grad_norm"), trained(history, "loss", "grad_norm"))
    assert close([[h["held_out_loss"]] for h in h2 if h["event"] == "eval"],
                 [[h["held_out_loss"]] for h in history if h["event"] == "eval"])
    assert json.load(open(tmp_path / "sft/model/train_config.json"))["world_size"] == 2


@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
def test_the_comparison_catches_averaged_gradients(shard, ckpt, sft_one, tmp_path):
    history, _ = sft_one
    h2 = run("sft", ckpt, tmp_path / "bug", [*SFT, "--batch-size", "2", "--shard", shard], nproc=2, bug="mean",
             float64=True)
    norms2, norms1 = trained(h2, "grad_norm"), trained(history, "grad_norm")
    assert close(trained(h2, "loss")[:1], trained(history, "loss")[:1])  # the first step's loss does not see it
    assert not close(norms2, norms1) and abs(norms2[0][0] / norms1[0][0] - 0.5) < 1e-4


def test_batches_split_so_that_every_process_has_work(monkeypatch):
    """split gives each of N processes a consecutive, non-empty share of any batch of at least N items; a batch of
    fewer (an epoch's short last SFT micro-batch) is left out, and a run whose work cannot split is one line."""
    from support import distributed
    from support.safe_io import SwarrError
    assert distributed.split(list("abcde")) == list("abcde")  # one process: everything, every batch
    assert distributed.even_batches([[1], [2, 3]]) == [[1], [2, 3]]
    monkeypatch.setattr(distributed, "world", lambda: 2)
    shares = {}
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares[r] = (distributed.split(list("abcde")), distributed.split(range(8)), distributed.split(list("ab")))
    assert shares[0] == (list("ab"), range(0, 4), ["a"]) and shares[1] == (list("cde"), range(4, 8), ["b"])
    assert distributed.even_batches([[1, 2, 3, 4], [5], [6, 7]]) == [[1, 2, 3, 4], [6, 7]]
    with pytest.raises(SwarrError, match="1 training examples cannot be split over 2 processes"):
        distributed.even_batches([[1]])
    import train_rl
    for argv, words in ((["--prompts-per-step", "3"], "--prompts-per-step 3 is not a multiple of the number of "
                                                       "processes \\(2\\)"),
                        (["--skip-zero-var"], "--skip-zero-var runs in one process only")):
        with pytest.raises(SwarrError, match=words):
            distributed.check(train_rl.parser().parse_args(["--prompts-per-step", "4", *argv]))
    distributed.check(train_rl.parser().parse_args(["--prompts-per-step", "4"]))


# RL: 4 prompts x 3 samples per step, split 2 + 2 over the processes; uneven micro-batches of 5 sequences.
RL = ["--steps", "2", "--prompts-per-step", "4", "--group-size", "3", "--max-new-tokens", "6", "--lr", "1e-2",
      "--micro-batch", "5", "--kl", "0.05", "--save-every", "0"]


@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
def test_rl_on_two_processes_equals_one_process(shard, ckpt, tmp_path):
    h1 = run("rl", ckpt, tmp_path / "one", RL, float64=True)
    h2 = run("rl", ckpt, tmp_path / "two", [*RL, "--shard", shard], nproc=2, float64=True)
    keys = ("reward", "mean_length", "truncated", "zero_var", "loss", "kl", "grad_norm")
    print(shard, trained(h2, *keys), trained(h1, *keys))
    assert close(trained(h2, *keys), trained(h1, *keys))
    assert rel_diff(weights(tmp_path / "two/model"), weights(tmp_path / "one/model")) < 1e-6
    assert rel_diff(weights(tmp_path / "one/model"), weights(ckpt)) > 1e-3


@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
def test_resume_on_two_processes_equals_an_uninterrupted_run(shard, ckpt, tmp_path):
    args = [*SFT, "--batch-size", "2", "--shard", shard]
    run("sft", ckpt, tmp_path / "a", args, nproc=2)
    run("sft", ckpt, tmp_path / "b", args, nproc=2, stop_at=3)  # saved at step 2, stopped during step 3's record
    assert json.load(open(tmp_path / "b/model/train_config.json"))["step"] == 2
    run("sft", ckpt, tmp_path / "b", [*args, "--resume"], nproc=2)
    a, b = weights(tmp_path / "a/model"), weights(tmp_path / "b/model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    optim_a, optim_b = (torch.load(tmp_path / f"{x}/trainer_state-4.pt", weights_only=True) for x in "ab")
    moments_a, moments_b = optim_a["optimizer"]["state"], optim_b["optimizer"]["state"]  # {name: {"exp_avg": ...}}
    assert moments_a.keys() == moments_b.keys() == {k for k in a if k != "lm_head.weight"}  # tied: one entry
    assert all(torch.equal(moments_a[k][m], moments_b[k][m]) for k in moments_a for m in moments_a[k])


def test_resume_with_another_number_of_processes_is_one_error_line(ckpt, tmp_path):
    run("sft", ckpt, tmp_path / "a", [*SFT, "--batch-size", "4", "--max-steps", "2"])
    procs = start(dict(script="sft", ckpt=ckpt, out=str(tmp_path / "a"), args=[*SFT, "--batch-size", "2",
                                                                              "--resume"]), tmp_path, 2)
    for r, p in enumerate(procs):  # rank 0 says why; rank 1 stops with it
        _, err = p.communicate(timeout=RUN_S)
        assert p.returncode == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: "), \
            (p.returncode, err[-2000:])
        assert "--resume:" in err and "trained by 1 process(es)" in err if r == 0 else "rank 0" in err, err[-2000:]


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])  # a process that dies; one that hangs (--timeout 15)
def test_a_lost_process_stops_the_other_with_one_line(sig, ckpt, tmp_path):
    spec = dict(script="sft", ckpt=ckpt, out=str(tmp_path / "k"),
                args=["--max-steps", "100000", "--batch-size", "2", "--lr", "1e-3", "--log-every", "1",
                      "--save-every", "0", "--eval-every", "0", "--held-out-frac", "0", "--timeout", "15"])
    procs = start(spec, tmp_path, 2)
    t0 = time.time()
    while not (tmp_path / "k" / "log.jsonl").exists():  # rank 0 logs once both are training
        assert time.time() - t0 < RUN_S and all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
        time.sleep(0.2)
    procs[1].send_signal(getattr(signal, sig))
    t_lost = time.time()
    try:
        _, err = procs[0].communicate(timeout=90)
    finally:
        procs[1].kill()
        procs[1].communicate()
    print(f"{sig}: rank 0 stopped {time.time() - t_lost:.1f}s after rank 1: {err.strip().splitlines()[-1]}")
    assert procs[0].returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: process 0 of 2 lost contact with the others")


if __name__ == "__main__":
    worker(json.load(open(sys.argv[1])))
