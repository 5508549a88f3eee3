"""The plumbing both training stages share, so that train_sft.py and train_rl.py read as their algorithms.

    flags         common_args          the options of both scripts (model, window, data, output, device, resume)
    data          read_records, split_held_out, collate
    model         load_model, apply_window, frozen_copy
    the step      autocast, make_optimizer, lr_at, check_finite, optimizer_step
    records       Recorder             lines for people, one JSON dict per event for programs (out/log.jsonl)
    checkpoints   save_checkpoint, save_if_due, restore

A run's set-up is straight-line in both scripts: load the model (load_model), make the optimizer, then restore a
saved run over both (restore: a no-op without --resume). Every random choice of a run is a function of
(--seed, step), so weights, optimizer moments and the step are the whole state that --resume needs.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os

import torch

import distributed
import grader
import swarr


# ---- flags -----------------------------------------------------------------------------------------------
def common_args(p: argparse.ArgumentParser, out: str) -> argparse.ArgumentParser:
    """The options both stages share: model, window, data, output, device, saving, resume."""
    p.add_argument("--model", help="HF model folder to start from (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--out", default=out, help="output folder ('' = write nothing, keep the model in memory)")
    p.add_argument("--window", type=int, default=None,
                   help="sliding window W (keys per query); default: keep the model's")
    p.add_argument("--layers", default=None, help="comma-separated layers to window, e.g. 0,2,5 (default: all)")
    p.add_argument("--data", help="GSM8K / MATH / JSONL file, read by grader.load_dataset")
    p.add_argument("--held-out", default=None, help="held-out data file (default: split --held-out-frac off --data)")
    p.add_argument("--held-out-frac", type=float, default=0.02)
    p.add_argument("--limit", type=int, default=None, help="use only the first N records of --data")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (less memory, ~30%% slower)")
    p.add_argument("--dtype", default="float32", choices=sorted(swarr.DTYPES), help="weights (bf16 autocast on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0 = only at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    distributed.add_args(p)  # --shard, --timeout (under torchrun)
    return p


# ---- data ------------------------------------------------------------------------------------------------
def read_records(path: str | None, flag: str = "--data") -> list[dict]:
    """Records from a GSM8K / MATH / JSONL file, with one clear error for each way that can fail."""
    if not path:
        raise swarr.SwarrError(f"{flag} is required when no data is passed in")
    if not os.path.isfile(path):
        raise swarr.SwarrError(f"{path}: data file not found")
    try:
        records = grader.load_dataset(path)
    except ValueError as e:
        raise swarr.SwarrError(str(e)) from None
    if not records:
        raise swarr.SwarrError(f"{path}: the dataset is empty")
    return records


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
def apply_window(model: swarr.Transformer, args) -> swarr.Transformer:
    """--window W [--layers 0,2,5], checked against the model's context and the HF export format up front."""
    if args.window is None:
        if args.layers:
            raise swarr.SwarrError("--layers needs --window")
        return model
    if args.window > model.cfg.max_pos:
        raise swarr.SwarrError(f"--window {args.window} is larger than the model's context "
                               f"({model.cfg.max_pos} positions): it would not window anything")
    layers = None
    if args.layers:
        try:
            layers = [int(i) for i in args.layers.split(",")]
        except ValueError:
            raise swarr.SwarrError(f"--layers {args.layers!r}: expected comma-separated integers") from None
    model.set_window(args.window, layers)
    swarr.export_config(model, torch.float32)  # fails now, not at the first save, if HF cannot express it
    return model


def load_model(args, model=None, tok=None) -> tuple[swarr.Transformer, swarr.Tokenizer]:
    """The model a run starts from, windowed as the flags say: the one passed in, else --model. Under --resume
    without --model, the run's own checkpoint (restore() then sets the same weights again). Under torchrun the
    process first joins the others (distributed.setup) and loads the whole model (wrap it next)."""
    distributed.setup(args)
    if model is None:
        path = args.model or ""
        if args.resume and not args.model:
            resumed_step(args.out)  # one clear error if there is nothing to resume
            path = os.path.join(args.out, "model")
        model, tok = swarr.load(path, args.dtype, args.device)
    return apply_window(model, args), tok


def frozen_copy(model: swarr.Transformer) -> swarr.Transformer:
    """A copy of the model that no optimizer step changes (e.g. the reference of a KL penalty)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


# ---- the optimizer step ----------------------------------------------------------------------------------
def autocast(device: torch.device):
    """bf16 autocast on CUDA (the fp32 weights stay the optimizer's master copy); plain fp32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def make_optimizer(model: swarr.Transformer, args) -> torch.optim.Optimizer:
    """AdamW over every parameter at args.lr (activation checkpointing switched on if asked)."""
    model.checkpointing = args.checkpointing
    return torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)


def lr_at(step: int, total: int, args) -> float:
    """Linear warmup over args.warmup steps, then a cosine from args.lr down to args.lr * args.min_lr_ratio."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, total - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def check_finite(loss: float, step: int, out: str):
    """Stop on a NaN/inf loss, before the optimizer step, pointing at the last good checkpoint."""
    if not math.isfinite(loss):
        raise swarr.SwarrError(f"step {step}: loss is {loss}; stopping. The last good checkpoint is "
                               f"{os.path.join(out, 'model') if out else '(none: --out is empty)'}")


def optimizer_step(model: swarr.Transformer, optimizer: torch.optim.Optimizer, clip: float) -> float:
    """Clip the accumulated gradient's norm to `clip`, take the step, clear the gradient. Returns the norm
    before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)  # of the whole gradient, also under FSDP2
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ---- records ---------------------------------------------------------------------------------------------
class Recorder:
    """Where a run's numbers go: `log` gets a line for people; `history` (a list, if given) and out/log.jsonl get
    one dict per event, e.g. {"event": "train", "step": 10, "loss": 0.41, ...}. Under torchrun only rank 0 logs
    and writes (every rank's `history` gets the dicts)."""

    def __init__(self, out: str, log, history: list | None):
        self.log, self.history = (log if distributed.is_main() else lambda line: None), history
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
                with open(self.path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")


# ---- checkpoints -----------------------------------------------------------------------------------------
def save_checkpoint(out: str, model, tok, optimizer, step: int, args):
    """out/model (swarr.save, atomic; train_config.json records args and step) + out/trainer_state-<step>.pt.
    The state file is written before the model and older ones are deleted after it, so an interruption at any
    moment leaves a model folder whose step has a state file. Under torchrun every process takes part (the
    shards are gathered) and rank 0 writes the same files."""
    model, optim = distributed.full_state(model, optimizer)
    if not distributed.is_main():
        return
    name = f"trainer_state-{step}.pt"
    torch.save({"step": step, "optimizer": optim}, os.path.join(out, name + ".tmp"))
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    config = json.dumps({**vars(args), "step": step, "windows": model.windows, "world_size": distributed.world()},
                        indent=2)
    swarr.save(model, tok, os.path.join(out, "model"), extra_files={"train_config.json": config})
    for f in os.listdir(out):
        if f.startswith("trainer_state-") and f != name:
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
    if not os.path.isfile(cfg_path):
        raise swarr.SwarrError(f"--resume: {cfg_path} not found; nothing to resume")
    with open(cfg_path) as f:
        saved = json.load(f)
    if saved.get("world_size", 1) != distributed.world():
        raise swarr.SwarrError(f"--resume: {out} was trained by {saved.get('world_size', 1)} process(es); resume it "
                               f"with as many (this run has {distributed.world()})")
    return saved["step"]


def restore(args, model: swarr.Transformer, optimizer: torch.optim.Optimizer, rec: Recorder) -> int:
    """With --resume: the weights and optimizer moments saved in --out replace the model's and optimizer's.
    Returns the step to start from (0 without --resume)."""
    if not args.resume:
        return 0
    step = resumed_step(args.out)
    weights = swarr.load(os.path.join(args.out, "model"), args.dtype, "cpu")[0].state_dict()
    if {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in model.state_dict().items()}:
        raise swarr.SwarrError(f"--resume: {args.out}/model is not a checkpoint of this model (--model)")
    state_file = os.path.join(args.out, f"trainer_state-{step}.pt")
    optim = torch.load(state_file, map_location="cpu", weights_only=True)["optimizer"]
    if distributed.world() == 1:
        model.load_state_dict(weights)
        optimizer.load_state_dict(optim)
    else:
        distributed.load_full_state(model, optimizer, weights, optim)
    rec(f"resumed from {args.out}/model at step {step}")
    return step
