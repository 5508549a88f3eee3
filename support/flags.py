"""The one flag validator of every command line (swarr.py eval|generate, train_sft.py, train_rl.py, demo.py).

A flag (an attribute of args) is checked by its rule in FLAG_RULES: ok(value) -> bool and what it must be. A command
whose flag means something else passes its own rule in `extra` (eval's --temperature may be 0, RL's may not).
A flag a command does not have, or left at None (its default), is skipped. One error line for the first flag
that cannot mean anything, before anything is read or written.
"""
from __future__ import annotations

import math
import os

import torch

from .safe_io import SwarrError, check_out_folder

# Seeds are combined (seed * 100_003 + step, ...) into torch and random seeds, which must stay below 2**64.
SEED_LIMIT = 2 ** 32

_positive = (lambda v: 0 < v < math.inf, "a positive finite number")
_at_least_1 = (lambda v: v >= 1, "at least 1")
_zero_or_more = (lambda v: v >= 0, "0 (only at the end) or more")

FLAG_RULES = {
    "batch_size": _at_least_1, "grad_accum": _at_least_1, "log_every": _at_least_1, "limit": _at_least_1,
    "samples": _at_least_1, "max_new_tokens": _at_least_1, "steps": _at_least_1, "prompts_per_step": _at_least_1,
    "micro_batch": _at_least_1, "sft_steps": _at_least_1, "rl_steps": _at_least_1, "n_train": _at_least_1,
    "n_test": _at_least_1, "context": _at_least_1,
    "epochs": _positive, "lr": _positive, "rl_lr": _positive, "control_lr": _positive,
    "max_steps": (lambda v: v >= 0, "0 (use --epochs) or more"),
    "max_len": (lambda v: v >= 2, "at least 2 (a prompt token and a response token)"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "rate": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "warmup": (lambda v: v >= 0, "0 or more"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "0 or a positive finite number"),
    "clip": (lambda v: 0 < v < math.inf, "a positive finite number (the largest gradient norm)"),
    "seed": (lambda v: 0 <= v < SEED_LIMIT, "in [0, 2**32)"),
    "held_out_frac": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "save_every": _zero_or_more, "eval_every": _zero_or_more,
    "eval_accuracy": (lambda v: v >= 0, "0 or more"), "eval_n": (lambda v: v >= 0, "0 or more"),
    "show_every": (lambda v: v >= 0, "0 (never) or more"),
    "group_size": (lambda v: v >= 2, "at least 2: the baseline is the group's mean reward"),
    "temperature": (lambda v: 1e-3 <= v < math.inf, "a finite number >= 0.001: the loss scores the sampling "
                    "distribution softmax(logits / T), which overflows as T goes to 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "kl": (lambda v: 0 <= v < math.inf, "0 or a positive finite number"),
}
# eval and generate sample greedily at temperature 0
GREEDY_OK = {"temperature": (lambda v: 0 <= v < math.inf, "0 (greedy) or a finite positive number")}


def check_flags(args, extra: dict | None = None):
    """One SwarrError for the first flag whose value cannot mean anything, then the window and the device."""
    for name, (ok, want) in {**FLAG_RULES, **(extra or {})}.items():
        v = getattr(args, name, None)
        if v is not None and not ok(v):
            raise SwarrError(f"--{name.replace('_', '-')} must be {want}, got {v!r}")
    if getattr(args, "window", None) is not None:
        check_window(args.window)
    if getattr(args, "device", None) is not None:
        check_device(args.device)


def check_demo(args, rl_steps: int, ours: set) -> list[int]:
    """demo.py's flags: the rules above, the windows of --sweep, --rejection-rounds (each round samples at least one
    RL step), --ablations (the synthetic task's line pattern, one window), --data, and an --out that holds only
    files the demo writes (`ours`), unless --overwrite. Returns the windows to run."""
    check_flags(args)
    try:
        windows = [int(w) for w in args.windows.split(",")] if args.sweep else [args.window]
    except ValueError:
        raise SwarrError(f"--windows {args.windows!r}: expected comma-separated integers") from None
    for w in windows:
        check_window(w)
    if not 1 <= args.rejection_rounds <= rl_steps:
        raise SwarrError(f"--rejection-rounds must be between 1 and the RL steps ({rl_steps}), "
                         f"got {args.rejection_rounds}")
    if args.ablations and (args.data or args.sweep):
        raise SwarrError("--ablations needs the synthetic task's lines and one window: not with --data or --sweep")
    if args.data and not os.path.isfile(args.data):
        raise SwarrError(f"{args.data}: data file not found")
    check_out_folder(args.out)  # (a file, or a folder this user cannot write: one line)
    foreign = sorted(f for f in os.listdir(args.out) if f.split(".tmp-")[0] not in ours) \
        if os.path.isdir(args.out) else []
    if foreign and not args.overwrite:
        raise SwarrError(f"--out {args.out} holds files the demo did not write ({', '.join(foreign[:3])}): pass "
                         f"--overwrite to write into it anyway, or choose another --out")
    return windows


def check_window(window) -> int | None:
    """A window is None (full attention) or a positive int: the number of keys a query sees, itself included."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or not 0 < window < 2 ** 31:
        raise SwarrError(f"window must be an integer in [1, 2**31) or None, got {window!r}")
    return window


def check_device(name: str) -> torch.device:
    """--device as a torch.device that exists here: 'cpu', 'cuda', 'cuda:1' (if there are 2 GPUs), 'mps'."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise SwarrError(f"--device {name!r} is not a device (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SwarrError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SwarrError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SwarrError(f"--device {name}: MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise SwarrError(f"--device {name}: only cpu, cuda and mps are supported")
    return dev
