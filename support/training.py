"""The plumbing both training stages share, so that train_sft.py and train_rl.py read as their algorithms.

    flags         common_args          the options of both scripts (model, window, data, output, device, resume)
    set-up        open_run, prepare    every check before any work (flags: support.flags), the data, --out (refuse
                                       to overwrite, lock); then wrap the model, make the optimizer, --resume
    data          read_records, from_records, split_held_out, collate
    model         load_model, apply_window, frozen_copy
    the step      autocast, lr_at, check_finite, optimizer_step (NaN/inf stop the run)
    evaluation    accuracy, held_out_loss (each process its share under torchrun, the counts summed)
    records       Recorder, rl_record, show_samples   lines for people, one JSON dict per event (out/log.jsonl)
    checkpoints   save_checkpoint, save_if_due, restore

A run's set-up is two calls in both scripts: open_run (checks, data, --out) before the model loads, prepare (wrap,
optimizer, restore a saved run: a no-op without --resume) after. Every random choice of a run is a function of
(--seed, step), so weights, optimizer moments and the step are the whole state that --resume needs. Loading and
saving go through the model's own class (type(model).load, model.save) or the `load` the script passes in: this
module never imports swarr.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import time

import torch

try:
    import fcntl  # POSIX: an advisory lock the kernel releases when its process ends, however it ends
except ImportError:  # Windows: the pid written in the lock file decides alone
    fcntl = None

from . import distributed, grader
from .checkpoint import DTYPES, export_config
from .evaluate import evaluate
from .flags import check_flags
from .safe_io import (SwarrError, WriteError, append_text, check_out_folder, interrupted, io_failure, pid_alive,
                      read_json, recover)


# ---- flags -----------------------------------------------------------------------------------------------
def common_args(p: argparse.ArgumentParser, out: str) -> argparse.ArgumentParser:
    """The options both stages share: model, window, data, output, device, saving, resume."""
    p.add_argument("--model", help="HF model folder to start from (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--out", default=out, help="output folder ('' = write nothing, keep the model in memory)")
    p.add_argument("--window", type=int, default=None,
                   help="sliding window W (keys per query); default: keep the model's")
    p.add_argument("--layers", default=None, help="comma-separated layers to window, e.g. 0,2,5 (default: all); "
                   "a subset runs here but is refused for export (docs/REAL_CHECKPOINTS.md: Exports)")
    p.add_argument("--system", default=None, help="system message for the chat template (default: the template's own)")
    p.add_argument("--data", help="GSM8K / MATH / JSONL file, read by grader.load_dataset")
    p.add_argument("--held-out", default=None, help="held-out data file (default: split --held-out-frac off --data)")
    p.add_argument("--held-out-frac", type=float, default=0.02)
    p.add_argument("--limit", type=int, default=None, help="use only the first N records of --data")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (less memory, ~30%% slower)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights (bf16 autocast on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0 = only at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out, or write into the folder of the input checkpoint")
    distributed.add_args(p)  # --shard, --timeout (under torchrun)
    return p


# ---- set-up: checks, data and the output folder before the work; then the model's training state ------------
def open_run(args, log, history: list | None, model=None, read_data: bool = True) -> tuple["Recorder", tuple | None]:
    """Everything a run checks before it loads a model, in order: every flag (support.flags.check_flags); the data
    files, read now (a bad path fails before a large model loads); --out (joined with the other processes under
    torchrun, refused if it holds another run, locked: open_out). Returns the run's Recorder and (records,
    held-out records or None), or None when the data comes in memory (read_data False)."""
    check_flags(args)
    if getattr(args, "kl", 0) and args.resume and model is None and not args.model:
        raise SwarrError("--kl with --resume needs --model: the KL reference is the starting policy")
    data = None
    if read_data:
        data = (read_records(args.data)[:args.limit],
                read_records(args.held_out, "--held-out") if args.held_out else None)
    open_out(args, log)
    return Recorder(args.out, log, history), data


def prepare(args, model, rec: "Recorder") -> tuple:
    """The training state of a loaded model: the module the training forward calls (the model, DDP, or the model
    sharded by FSDP2: distributed.wrap), its AdamW (after the wrap: it must see the sharded parameters), and the
    step to start from, with a resumed run's weights and moments restored over both (restore)."""
    fwd = distributed.wrap(model, args)
    model.checkpointing = args.checkpointing  # activation checkpointing, if asked
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    return fwd, optimizer, restore(args, model, optimizer, rec)


RUN_FILES = ("model", "log.jsonl", "samples.jsonl")  # what a run leaves in --out (plus trainer_state-*.pt)


def open_out(args, log=print):
    """Take --out for this run, or refuse with one line before writing anything: a path that is a file or cannot
    be written; a folder holding another run (unless --resume continues it or --overwrite replaces it); a folder
    that contains the input checkpoint --model (training would replace its own input; --overwrite allows it); a
    folder another live process is writing (out/.lock; the lock of a run that has ended is taken over).
    Then an interrupted save is finished or cleaned up (safe_io.recover). Under torchrun the processes first join
    each other (distributed.setup) and refuse a run that does not split over them (distributed.check); rank 0
    takes --out and tells the others whether it could."""
    distributed.setup(args)
    distributed.check(args)
    why = ""
    if distributed.is_main():
        try:
            _take_out(args, log)
        except SwarrError as e:
            why = str(e)
    if distributed.all_sum(float(bool(why)))[0]:
        raise SwarrError(why or f"--out {args.out}: refused by rank 0 (its error line says why)")


def _take_out(args, log):
    out = args.out
    if not out:
        return
    check_out_folder(out)
    real_out = os.path.realpath(out)
    if args.model and not args.overwrite:
        real_in = os.path.realpath(args.model)
        if real_in == real_out or real_in.startswith(real_out + os.sep):
            raise SwarrError(f"--out {out} contains the input checkpoint --model {args.model}: training would "
                                   f"replace it. Choose another --out (or pass --overwrite)")
    found = sorted(f for f in (os.listdir(out) if os.path.isdir(out) else [])
                   if f in RUN_FILES or f.startswith("trainer_state-"))
    if args.resume:
        resumed_step(out)  # one line if there is nothing to resume
    elif found and not args.overwrite:
        raise SwarrError(f"--out {out} holds a run already ({', '.join(found)}): pass --resume to continue "
                               f"it, --overwrite to replace it, or choose another --out")
    os.makedirs(out, exist_ok=True)
    take_lock(out, log)
    recover(os.path.join(out, "model"))
    if found and not args.resume:  # --overwrite: the new run's log must not continue the old one's; the old
        for f in found:             # model stays until the new run's first save replaces it
            if f != "model":
                os.remove(os.path.join(out, f))


_HELD: dict[str, int] = {}  # lock path -> this process's open descriptor holding its flock


def take_lock(out: str, log=print):
    """Hold out/.lock for this run, or refuse with the holder's pid. The lock is an exclusive flock on the file,
    which the kernel drops when the holding process ends, however it ends: a lock file nobody holds was left by a
    run that has ended and is taken over, and a reused pid cannot keep it. The file names the holder's pid for
    the error line. Without fcntl the pid alone decides (_take_pid_lock)."""
    lock = os.path.join(out, ".lock")
    if lock in _HELD:
        return
    if fcntl is None:
        return _take_pid_lock(lock, out, log)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a folder named .lock, a lock file this user may not write
            raise SwarrError(f"--out {out}: cannot lock {lock}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SwarrError(f"--out {out} is in use by process {holder} (lock {lock})") from None
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if not current:  # the holder released (removed) the file between our open and our flock: start again
            os.close(fd)
            continue
        try:
            old = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:  # a full disk: let the lock go rather than hold it unnamed
            os.close(fd)
            raise SwarrError(f"--out {out}: cannot write {lock}: {e.strerror}") from None
        if old:
            log(f"taking over the lock of process {old}, which has ended ({lock})")
        _HELD[lock] = fd
        return


def _take_pid_lock(lock: str, out: str, log):
    """take_lock where there is no flock, as best it can: create the file exclusively with this pid; refuse while
    that pid is alive; take over the lock of a pid that has ended. Two runs taking over the same abandoned lock at
    the same instant can both win here, which the flock above rules out."""
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(lock) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid == os.getpid():
                return
            if pid_alive(pid):
                raise SwarrError(f"--out {out} is in use by process {pid} (lock {lock}; delete it if that "
                                       f"process is not training)") from None
            log(f"taking over the lock of process {pid}, which has ended ({lock})")
            try:
                os.remove(lock)
            except FileNotFoundError:  # another process took it over first: try again
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return


def release_lock(out: str):
    """Remove out/.lock if this process holds it (the file is removed before its flock is dropped, so no other
    run can take a file that is about to vanish)."""
    lock = os.path.join(out or "", ".lock")
    if lock in _HELD:
        fd = _HELD.pop(lock)
        try:
            os.remove(lock)
        except OSError:
            pass
        os.close(fd)
        return
    if fcntl is not None:  # a process that holds no flock holds no lock, whatever pid the file names
        return
    try:
        with open(lock) as f:
            if f.read().strip() == str(os.getpid()):
                os.remove(lock)
    except OSError:
        pass


def releases_lock(run):
    """Decorates a script's run(args, ...): the --out lock that open_out takes is released however run ends, and
    Ctrl-C (KeyboardInterrupt) carries the last good checkpoint in --out, which safe_io.run_cli's error line names."""
    @functools.wraps(run)
    def wrapped(args, *a, **kw):
        try:
            return run(args, *a, **kw)
        except BaseException as e:
            if not interrupted(e) or not args.out or isinstance(e, KeyboardInterrupt) and str(e):
                raise
            if os.path.join(args.out, ".lock") in _HELD:  # this run writes --out: finish what Ctrl-C cut short
                recover(os.path.join(args.out, "model"))  # (a save's temporaries, the version it replaced)
                keep_state(args.out, saved_step(args.out))
            raise KeyboardInterrupt(f"the last good checkpoint: {last_good(args.out)}") from None
        finally:
            if args.out:
                release_lock(args.out)
    return wrapped


def share(r: int, total: int, rounds: int) -> range:
    """Round r's part of range(total) split into `rounds` consecutive parts: r*total//rounds .. (r+1)*total//rounds.
    The parts cover range(total) exactly once, and none is empty when rounds <= total."""
    return range(r * total // rounds, (r + 1) * total // rounds)


# ---- data ------------------------------------------------------------------------------------------------
def read_records(path: str | None, flag: str = "--data") -> list[dict]:
    """Records from a GSM8K / MATH / JSONL file, with one clear error for each way that can fail."""
    if not path:
        raise SwarrError(f"{flag} is required when no data is passed in")
    if not os.path.exists(path):  # (a folder or FIFO is refused by grader, with one line)
        raise SwarrError(f"{path}: data file not found")
    try:
        records = grader.load_dataset(path)
    except ValueError as e:
        raise SwarrError(str(e)) from None
    if not records:
        raise SwarrError(f"{path}: the dataset is empty")
    return records


def from_records(data: tuple, convert, args) -> tuple[list, list]:
    """(train, held_out) from open_run's (records, held-out records or None), each record passed through convert;
    without --held-out, a seeded --held-out-frac of the records is held out (split_held_out)."""
    records, held_records = data
    items = [convert(r) for r in records]
    if held_records is not None:
        return items, [convert(r) for r in held_records]
    return split_held_out(items, args.held_out_frac, args.seed)


def split_held_out(items: list, frac: float, seed: int) -> tuple[list, list]:
    """A seeded random `frac` of items becomes the held-out set: (train, held_out)."""
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n = int(len(items) * frac)
    return [items[i] for i in perm[n:]], [items[i] for i in perm[:n]]


def collate(examples: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[(ids, start)] -> inputs, targets (B, T), right-padded. targets[t] = ids[t+1] where the loss is taken and
    -100 elsewhere (prompt, padding). Causal attention never lets a real token see the padding to its right.
    Example: ([5, 6, 7, 8, 9], 3) -> inputs [5, 6, 7, 8], targets [-100, -100, 8, 9]."""
    T = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.zeros(len(examples), T, dtype=torch.long)
    targets = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, (ids, start) in enumerate(examples):
        x = torch.tensor(ids)
        inputs[b, :len(ids) - 1] = x[:-1]
        targets[b, start - 1:len(ids) - 1] = x[start:]
    return inputs.to(device), targets.to(device)


# ---- the model -------------------------------------------------------------------------------------------
def apply_window(model, args):
    """--window W [--layers 0,2,5], checked against the model's context and the HF export format up front."""
    if args.window is None:
        if args.layers:
            raise SwarrError("--layers needs --window")
        return model
    if args.window > model.cfg.max_pos:
        raise SwarrError(f"--window {args.window} is larger than the model's context "
                               f"({model.cfg.max_pos} positions): it would not window anything")
    layers = None
    if args.layers:
        try:
            layers = [int(i) for i in args.layers.split(",")]
        except ValueError:
            raise SwarrError(f"--layers {args.layers!r}: expected comma-separated integers") from None
    model.set_window(args.window, layers)
    export_config(model.cfg, model.windows, torch.float32)  # fails now, not at the first save, if HF cannot express it
    return model


def load_model(args, model, tok, load) -> tuple:
    """The model a run starts from, windowed as the flags say: the one passed in, else --model read by
    load(path, dtype, device) (swarr.load). Under --resume without --model, the run's own checkpoint (restore()
    then sets the same weights again). Under torchrun every process loads the whole model (prepare wraps it)."""
    if model is None:
        path = args.model or ""
        if args.resume and not args.model:
            resumed_step(args.out)  # one clear error if there is nothing to resume
            path = os.path.join(args.out, "model")
        model, tok = load(path, args.dtype, args.device)
    return apply_window(model, args), tok


def frozen_copy(model, rec=None):
    """A copy of the model that no optimizer step changes (e.g. the reference of a KL penalty), said in `rec`."""
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    if rec is not None:
        mb = sum(p.numel() * p.element_size() for p in ref.parameters()) / 2**20
        rec(f"KL reference: a frozen copy of the starting policy, {mb:.1f} MB", event="kl_reference", mb=mb)
    return ref


# ---- the optimizer step ----------------------------------------------------------------------------------
def autocast(device: torch.device):
    """bf16 autocast on CUDA (the fp32 weights stay the optimizer's master copy); plain fp32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def lr_at(step: int, total: int, args, optimizer=None) -> float:
    """Linear warmup over args.warmup steps, then a cosine from args.lr down to args.lr * args.min_lr_ratio (set on
    every parameter group of `optimizer`, if given)."""
    if step < args.warmup:
        lr = args.lr * (step + 1) / args.warmup
    else:
        t = (step - args.warmup) / max(1, total - args.warmup)
        lr = args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    for group in optimizer.param_groups if optimizer is not None else []:
        group["lr"] = lr
    return lr


def saved_step(out: str):
    """The step of the checkpoint in out/model (its train_config.json), or None if there is none."""
    try:
        return read_json(os.path.join(out, "model", "train_config.json"))["step"]
    except (SwarrError, KeyError):
        return None


def last_good(out: str) -> str:
    """The newest checkpoint in --out, as an error line names it. Every saved checkpoint is finite: save_checkpoint
    checks the weights first."""
    if not out:
        return "none (--out is empty: nothing is saved)"
    step = saved_step(out)
    if step is None:
        return f"none: no checkpoint was saved in {out} yet"
    return f"{os.path.join(out, 'model')} (step {step}), left as it is"


def check_finite(loss: float, step: int, out: str):
    """Stop on a NaN/inf loss, before the optimizer step, pointing at the last good checkpoint."""
    if not math.isfinite(loss):
        raise SwarrError(f"step {step}: loss is {loss}; stopping. The last good checkpoint: {last_good(out)}")


def _cause(model) -> str:
    """The likely cause of NaN/inf weights, for the error line."""
    if next(model.parameters()).dtype == torch.float16:
        return "float16 weights overflow in AdamW: use --dtype float32 or bfloat16"
    return "--lr too large?"


PROBE = "Question: what is 12 * 7? Answer: 12 * 7 = 84, so the answer is 84."


def unsound(model, tok) -> str | None:
    """Why these weights must not be saved, or None: NaN/inf weights, or finite weights so large that the logits
    of a short probe text overflow (e.g. after a step with --lr 1e30)."""
    if not bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all()):
        return "the weights are NaN/inf"
    ids = torch.tensor([tok.encode(PROBE)], device=next(model.parameters()).device)
    with torch.no_grad():
        if not bool(model(ids).isfinite().all()):
            return "the weights are finite but give NaN/inf logits"
    return None


def optimizer_step(model, optimizer: torch.optim.Optimizer, clip: float, step: int = 0,
                   out: str = "") -> float:
    """Clip the accumulated gradient's norm to `clip`, take the step, clear the gradient. Returns the norm
    before clipping. A NaN/inf gradient or an optimizer that overflows (e.g. --lr 1e38) stops the run with one
    line naming the last good checkpoint (`step` and `out` are for that line); NaN/inf weights are caught by
    the next step's loss and before every save."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)  # of the whole gradient, also under FSDP2
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    stop = f"stopping. The last good checkpoint: {last_good(out)}"
    if not math.isfinite(grad_norm):
        raise SwarrError(f"step {step}: the gradient norm is {grad_norm} ({_cause(model)}); {stop}")
    try:
        optimizer.step()
    except RuntimeError as e:  # AdamW's float arithmetic overflows for a huge learning rate
        raise SwarrError(f"step {step}: the optimizer step failed ({str(e).splitlines()[0]}; "
                               f"{_cause(model)}); {stop}") from None
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ---- records ---------------------------------------------------------------------------------------------
class Recorder:
    """Where a run's numbers go: `log` gets a line for people; `history` (a list, if given) and out/log.jsonl get
    one dict per event, e.g. {"event": "train", "step": 10, "loss": 0.41, ...}. Under torchrun only rank 0 logs
    and writes (every rank's `history` gets the dicts)."""

    def __init__(self, out: str, log, history: list | None):
        self.log, self.history, self.out = (log if distributed.is_main() else lambda line: None), history, out
        self.path = os.path.join(out, "log.jsonl") if out and distributed.is_main() else None
        if self.path:
            os.makedirs(out, exist_ok=True)

    def __call__(self, line: str | None, **metrics):
        if line:
            self.log(line)
        if metrics:
            if self.history is not None:
                self.history.append(metrics)
            if self.path:
                append_line(self.out, "log.jsonl", json.dumps(metrics) + "\n")


def append_line(out: str, name: str, text: str):
    """Append to out/NAME whole or not at all (safe_io.append_text); a write the system refuses (a full disk)
    stops the run with one line naming the last good checkpoint."""
    try:
        append_text(os.path.join(out, name), text)
    except WriteError as e:
        raise SwarrError(f"{e}; stopping. The last good checkpoint: {last_good(out)}") from None


# ---- evaluation: under torchrun each process takes its share, and the counts are summed -------------------
def accuracy(model, tok, records: list[dict], reward_fn=None, max_new_tokens: int = 512, batch_size: int = 16) -> float:
    """Greedy accuracy on records {"prompt", "answer"}, through support.evaluate.evaluate (the one greedy-accuracy
    path): a completion is correct when reward_fn(completion, record) == 1 (default: the grader's verdict). Under
    torchrun each process generates its share of the records
    (distributed.split) with the unsharded weights, and the counts of correct answers are summed."""
    gen, mine = distributed.unsharded(model), distributed.split(records)
    rows = evaluate(gen, tok, mine, max_new_tokens=max_new_tokens, batch_size=batch_size, reward_fn=reward_fn,
                    progress=False)[1] if mine else []
    return distributed.all_sum(sum(r["correct"] for r in rows))[0] / len(records)


@torch.no_grad()
def held_out_loss(model, examples: list, batch_size: int, loss_sum) -> float:
    """Mean per-token loss over held-out (ids, start) examples, in batches of similar length; loss_sum(model,
    inputs, targets) is the summed loss of a batch. Under torchrun each process takes its share of the batches
    (distributed.split) with the unsharded weights, and the sums are summed."""
    gen = distributed.unsharded(model)
    was_training, device = gen.training, next(gen.parameters()).device
    gen.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    total, n = 0.0, 0
    for b in distributed.split(range(0, len(order), batch_size)):
        inputs, targets = collate([examples[i] for i in order[b:b + batch_size]], device)
        with autocast(device):
            total += loss_sum(gen, inputs, targets).item()
        n += int((targets != -100).sum())
    gen.train(was_training)
    total, n = distributed.all_sum(total, n)
    return total / max(n, 1)


# ---- what a step logs --------------------------------------------------------------------------------------
def log_sft_step(rec: Recorder, step: int, total: int, losses: list, lr: float, grad_norm: float, tokens: int,
                 busy: float, t0: float, start: int):
    """Log (rec) the SFT steps since the last line: their mean loss (then `losses` is emptied), the learning rate,
    the last grad norm, tokens/s over the seconds spent in training steps (`busy`), elapsed time and ETA."""
    el, loss = time.time() - t0, sum(losses) / len(losses)
    rec(f"step {step}/{total}  loss {loss:.4f}  lr {lr:.1e}  tok/s {tokens / busy:.0f}  elapsed {el:.0f}s  "
        f"ETA {el / (step - start) * (total - step):.0f}s", event="train", step=step, loss=loss, lr=lr,
        grad_norm=grad_norm, tokens_per_s=tokens / busy, elapsed_s=el)
    losses.clear()


def log_rl_step(rec: Recorder, step: int, steps: int, samples: list[dict], rewards: torch.Tensor, grad_norm: float,
                loss: float, kl: float | None, n_tokens: float, times: tuple) -> dict:
    """Log (rec) the line and the record of one RL step, over every process's samples (in prompt order): mean reward,
    accuracy (share of reward 1), mean completion length, share truncated, share of zero-variance groups, grad
    norm, loss (near 0 by construction: the advantages of a group sum to 0), with --kl the KL estimate per token,
    tokens/s, rollout vs training seconds, ETA. times: (run began, its first step, rollout began, training began,
    step done), in time.time() seconds."""
    t_start, start, t0, t1, t2 = times
    lengths = distributed.all_cat(torch.tensor([len(s["ids"]) for s in samples], dtype=torch.float64))
    truncated = distributed.all_cat(torch.tensor([s["truncated"] for s in samples], dtype=torch.float64))
    every = distributed.all_cat(rewards)
    m = dict(event="train", step=step, reward=every.mean().item(), accuracy=(every == 1).float().mean().item(),
             mean_length=lengths.mean().item(), truncated=truncated.mean().item(),
             zero_var=(every.max(1).values == every.min(1).values).float().mean().item(), grad_norm=grad_norm,
             loss=loss, tokens_per_s=lengths.sum().item() / (t2 - t0), rollout_s=t1 - t0, train_s=t2 - t1)
    if kl is not None:
        m["kl"] = kl / max(1, n_tokens)
    el = time.time() - t_start
    line = (f"step {step}/{steps}  reward {m['reward']:.3f}  acc {m['accuracy']:.3f}  len {m['mean_length']:.0f}  "
            f"trunc {m['truncated']:.0%}  zero-var {m['zero_var']:.0%}  |g| {grad_norm:.3f}  loss {loss:+.4f}  "
            + (f"kl {m['kl']:.4f}  " if kl is not None else "")
            + f"tok/s {m['tokens_per_s']:.0f}  rollout {t1 - t0:.1f}s train {t2 - t1:.1f}s  "
            f"ETA {el / (step - start) * (steps - step):.0f}s")
    rec(line, **m)
    return m


def show_samples(rec: Recorder, args, samples: list[dict], rewards: torch.Tensor, step: int):
    """Every --show-every steps, print the first sample of (at most) the first 4 groups of this process, and append
    them to out/samples.jsonl (rank 0's)."""
    if not (args.show_every and step % args.show_every == 0):
        return
    G, out = rewards.shape[1], args.out
    shown = [dict(step=step, prompt=samples[i]["problem"]["prompt"], completion=samples[i]["text"],
                  reward=rewards.flatten()[i].item()) for i in range(0, min(rewards.shape[0], 4) * G, G)]
    for s in shown:
        rec(f"  [reward {s['reward']:g}] {s['completion'][:300]!r}")
    if out and distributed.is_main():
        append_line(out, "samples.jsonl", "".join(json.dumps(s) + "\n" for s in shown))


# ---- checkpoints -----------------------------------------------------------------------------------------
def save_checkpoint(out: str, model, tok, optimizer, step: int, args):
    """out/model (model.save, atomic; train_config.json records args and step) + out/trainer_state-<step>.pt.
    The state file is written before the model and older ones are deleted after it, so an interruption at any
    moment leaves a model folder whose step has a state file. A save that fails (a full disk, a file-size limit)
    or is interrupted (Ctrl-C) leaves --out as it was: its temporaries and the new state file go (keep_state),
    and a failed write stops the run with one line naming the last good checkpoint. Under torchrun every process
    takes part (the shards are gathered) and rank 0 checks and writes the same files."""
    model, optim = distributed.full_state(model, optimizer)
    why = unsound(model, tok) if distributed.is_main() else None  # never save what cannot be a good checkpoint
    if distributed.all_sum(float(bool(why)))[0]:
        raise SwarrError(f"step {step}: {why or 'the weights are unsound'} "
                               f"({_cause(model) if why else 'found by rank 0'}); not saved, stopping. "
                               f"The last good checkpoint: {last_good(out)}")
    if not distributed.is_main():
        return
    state = os.path.join(out, f"trainer_state-{step}.pt")
    config = json.dumps({**vars(args), "step": step, "windows": model.windows, "world_size": distributed.world()},
                        indent=2)
    try:
        with open(state + ".tmp", "wb") as f:  # (a file object: a refused write is an OSError, not torch's words)
            torch.save({"step": step, "optimizer": optim}, f)
        os.replace(state + ".tmp", state)
        model.save(tok, os.path.join(out, "model"), extra_files={"train_config.json": config})
    except BaseException as e:
        keep_state(out, saved_step(out))  # the checkpoint out/model still holds keeps its state; the rest goes
        if interrupted(e):  # (torch.save's writer may have turned the Ctrl-C into an error of its own)
            raise KeyboardInterrupt from None
        why = io_failure(e) if isinstance(e, Exception) else None
        if why is None or isinstance(e, SwarrError) and not isinstance(e, WriteError):
            raise
        if not isinstance(e, WriteError):
            why = f"{state}: {why}"
        raise SwarrError(f"step {step}: the checkpoint could not be written ({why}); stopping. The last good "
                         f"checkpoint: {last_good(out)}") from None
    keep_state(out, step)


def keep_state(out: str, step):
    """Delete every trainer_state-* file in `out` (temporaries included) but the one of `step`."""
    for f in os.listdir(out):
        if f.startswith("trainer_state-") and f != f"trainer_state-{step}.pt":
            os.remove(os.path.join(out, f))


def save_if_due(args, model, tok, optimizer, done: int, total: int, rec: Recorder):
    """Checkpoint after step `done` every --save-every steps and at the end (never when --out is '')."""
    if args.out and ((args.save_every and done % args.save_every == 0) or done == total):
        save_checkpoint(args.out, model, tok, optimizer, done, args)
        rec(f"saved {args.out}/model at step {done}", event="save", step=done)


def resumed_step(out: str) -> int:
    """The step of the checkpoint that save_checkpoint left in `out` (which must have been written by as many
    processes as this run has: a step's batch depends on it)."""
    cfg_path = os.path.join(out or "", "model", "train_config.json")
    if not os.path.lexists(cfg_path):
        raise SwarrError(f"--resume: {cfg_path} not found; nothing to resume")
    try:
        saved = read_json(cfg_path)
    except SwarrError as e:
        raise SwarrError(f"--resume: {e}") from None
    step = saved.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise SwarrError(f"--resume: {cfg_path}: 'step' must be an integer >= 0, got {step!r}")
    if saved.get("world_size", 1) != distributed.world():
        raise SwarrError(f"--resume: {out} was trained by {saved.get('world_size', 1)} process(es); resume it "
                               f"with as many (this run has {distributed.world()})")
    return step


def restore(args, model, optimizer: torch.optim.Optimizer, rec: Recorder) -> int:
    """With --resume: the weights and optimizer moments saved in --out replace the model's and optimizer's.
    Returns the step to start from (0 without --resume)."""
    if not args.resume:
        return 0
    step = resumed_step(args.out)
    weights = type(model).load(os.path.join(args.out, "model"), args.dtype, "cpu")[0].state_dict()
    if {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in model.state_dict().items()}:
        raise SwarrError(f"--resume: {args.out}/model is not a checkpoint of this model (--model)")
    path = os.path.join(args.out, f"trainer_state-{step}.pt")
    if not os.path.isfile(path):
        raise SwarrError(f"--resume: {path} (the optimizer state of step {step}) is missing")
    try:
        optim = torch.load(path, map_location="cpu", weights_only=True)["optimizer"]
        if distributed.world() == 1:
            model.load_state_dict(weights)
            optimizer.load_state_dict(optim)
        else:  # every process reads the whole state and keeps its part
            distributed.load_full_state(model, optimizer, weights, optim)
    except Exception as e:  # truncated, not a torch file, or moments of another model
        raise SwarrError(f"--resume: {path}: not a trainer state of this run "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"[:400]) from None
    rec(f"resumed from {args.out}/model at step {step}")
    return step
