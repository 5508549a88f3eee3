"""The main job: the SWARR finding, end to end, on the embedded default (a CPU, a few minutes).

    python demo.py [--seed 0] [--window 40] [--quick] [--sweep] [--rate R] [--split valid] [--out runs/demo]

From one pretrained self-attention (SA) model (data/tiny-sa, 0.82M parameters, pretrained by data/pretrain.py)
and one synthetic task (data/synth.py: sums of products, whose SFT traces are written "for SA"), it runs
  1. SA + SFT        the full-attention baseline                               (train_sft.run)
  2. SWA + SFT       the conversion: same data, same steps, window W           (train_sft.run --window W)
  3. SWARR           2, then on-policy REINFORCE, reward = correctness         (train_rl.run)
  4. more SFT        2, then as many more SFT sequences as RL samples          (train_sft.run)
  5. rejection       2's own samples, as many as RL draws, at RL's temperature, on RL's prompts, kept when the
     sampling        same reward accepts them, then fine-tuned on for as many sequences as RL samples (train_sft.run);
                     with --rejection-rounds R, the same budget in R rounds, each sampling from the last round's model
  6. ceiling         2, then as many SFT sequences of traces that restate at every line (what a trajectory that
                     always stays near can reach inside the window)
and evaluates every row on held-out problems never seen in training (support.evaluate): greedy, and at T = 1
(several samples per problem), each with a 95% Wilson interval. The training and evaluation loops are those of
train_sft.py, train_rl.py and `swarr.py eval`; this file only wires them up (support/report.py renders the report).

Besides accuracy it measures the mechanism: every line of a solution may restate the terms still to come, or
not. The SFT data restate at a minority rate per line (synth.RESTATE_RATE), independently; a trace that restates
rarely reaches back to the question, beyond a small window. For the SFT data and every row it reports the
per-line restatement rate and how far back the traces reach (synth.lookback). Nothing that makes the data, the
reward or the selection knows W; only the model's attention does.

--sweep runs rows 2-6 for each window of --windows (SA + SFT once) and draws them against W (sweep.svg).

Writes to --out: report.md, results.json (every number), rl_curve.svg, log.jsonl (every training event),
models/<row>/ (HF format) and test.jsonl (the held-out problems), so that for example
    python swarr.py eval --model runs/demo/models/swarr --data runs/demo/test.jsonl
grades a row again.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

import bench
import swarr
import train_rl
import train_sft
from csrc import ops
from support import evaluate, training
from support.checkpoint import param_count
from support.flags import check_flags, check_window
from support.report import (Log, Rows, Stages, pair_sum, recovered, rl_curve, row_line, save_report, trace_summary,
                            wilson, write)
from support.safe_io import SwarrError, check_out_folder, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "data"))
import synth  # noqa: E402  (data/synth.py: the embedded task)

ROWS = Rows(sa="SA + SFT", swa="SWA + SFT", swarr="SWARR (SWA + SFT + RL)", more="more SFT",
            reject="rejection sampling", ceiling="ceiling (all lines restate)")
SA, SWA, SWARR, MORE, REJECT, CEIL = ROWS
FOLDERS = {SA: "sa-sft", SWA: "swa-sft", SWARR: "swarr", MORE: "more-sft", REJECT: "rejection", CEIL: "ceiling"}
DEFAULT_MODEL = os.path.join(HERE, "data", "tiny-sa")
OUT_FILES = {"report.md", "results.json", "rl_curve.svg", "sweep.svg", "log.jsonl", "test.jsonl", "models", ".lock"}

# The defaults were chosen on the validation split (--split valid); data/README.md has the search.
SFT = dict(steps=300, batch=16, lr=1e-3, warmup=10)
RL = dict(steps=40, prompts=8, group=8, lr=2e-4, temperature=1.0, micro_batch=32)
QUICK_RL = dict(steps=20, lr=3e-4)
WINDOW = 40
SWEEP = (24, 32, 40, 48, 56, 64)
# What the default run must show (README.md), checked on every run's own numbers (checks)
TARGETS = dict(sa_accuracy=0.85, gap=0.25, swarr_recovers=0.6, more_sft_below=0.2)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="data split, batch order, sampling (default 0)")
    p.add_argument("--window", type=int, default=WINDOW, help=f"the SWA window W, keys per query (default {WINDOW})")
    p.add_argument("--quick", action="store_true",
                   help=f"RL {QUICK_RL['steps']} steps at lr {QUICK_RL['lr']:g} (controls matched), 100 test problems")
    p.add_argument("--sweep", action="store_true", help="rows 2-6 for every window of --windows, and sweep.svg")
    p.add_argument("--windows", default=",".join(map(str, SWEEP)), help="the windows of --sweep")
    p.add_argument("--rate", type=float, default=synth.RESTATE_RATE,
                   help=f"per-line restatement rate of the SFT data (default {synth.RESTATE_RATE})")
    p.add_argument("--split", choices=["test", "valid"], default="test",
                   help="evaluate on the test problems or on the validation problems (for choosing settings)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="pretrained SA checkpoint (HF folder; default data/tiny-sa)")
    p.add_argument("--data", default=None, help="GSM8K/MATH/JSONL file instead of the synthetic task "
                                                "(split into train and held-out; restatement columns then n/a)")
    p.add_argument("--n-train", type=int, default=4000, help="training problems (SFT and RL prompts)")
    p.add_argument("--n-test", type=int, default=None, help="held-out problems (default 200, --quick 100)")
    p.add_argument("--samples", type=int, default=4, help="samples per held-out problem at T = 1 (default 4)")
    p.add_argument("--sft-steps", type=int, default=SFT["steps"])
    p.add_argument("--rl-steps", type=int, default=None, help=f"default {RL['steps']}, --quick {QUICK_RL['steps']}")
    p.add_argument("--rl-lr", type=float, default=None, help=f"default {RL['lr']:g}, --quick {QUICK_RL['lr']:g}")
    p.add_argument("--rejection-rounds", type=int, default=1,
                   help="iterated rejection sampling: RL's samples and sequences split over this many rounds, each "
                        "sampling from the model the last round fine-tuned (default 1: one filter of SWA + SFT)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--context", type=int, default=32768, help="context of the decode speed / KV memory comparison")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="folder for report.md, results.json, ...")
    p.add_argument("--overwrite", action="store_true", help="write into an --out holding files the demo did not")
    return p


# ---- data --------------------------------------------------------------------------------------------------
def task(args, tok, cfg):
    """(sft_pairs, rl_problems, held_out_records, ceiling_pairs) for the synthetic task, or for --data (then the
    ceiling is None). Held-out records are the test problems, or with --split valid the validation problems."""
    n_test = args.n_test or (100 if args.quick else 200)
    eot = train_sft.end_of_turn(tok, cfg)
    if args.data:
        recs = training.read_records(args.data)
        train, test = training.split_held_out(recs, n_test / len(recs), args.seed)
        train = train[:args.n_train]
        sft = [train_sft.sft_pair(tok, cfg, r) for r in train]
        problems = [{"prompt": evaluate.record_prompt(tok, r), "answer": r["answer"]} for r in train]
        tests = [{"prompt": evaluate.record_prompt(tok, r), "answer": r["answer"]} for r in test]
        return sft, problems, tests, None
    train, test, valid = synth.split(args.n_train, n_test, args.seed, n_valid=n_test)
    held = valid if args.split == "valid" else test
    sft = [(tok.chat(p), r + eot) for p, r in synth.sft_pairs(train, args.rate, seed=args.seed)]
    ceiling = [(tok.chat(p), r + eot) for p, r in synth.sft_pairs(train, 1.0, seed=args.seed)]
    problems = [{"prompt": tok.chat(p.prompt), "answer": str(p.answer)} for p in train]
    tests = [{"prompt": tok.chat(p.prompt), "answer": str(p.answer)} for p in held]
    return sft, problems, tests, ceiling


# ---- the rows ----------------------------------------------------------------------------------------------
def sft(model, tok, pairs, args, window, steps, seed, log):
    """train_sft.run with the demo's settings; returns the fine-tuned model (trained in place). The warmup is
    at most a quarter of the steps, so that a short run (a round of iterated rejection sampling) still trains at
    the full learning rate for most of its steps."""
    a = train_sft.parser().parse_args(
        ["--out", "", "--max-steps", str(steps), "--batch-size", str(SFT["batch"]), "--lr", str(SFT["lr"]),
         "--warmup", str(min(SFT["warmup"], steps // 4)), "--min-lr-ratio", "0.1", "--eval-every", "0",
         "--log-every", "100", "--seed", str(seed), "--device", args.device] + (["--window", str(window)] if window else []))
    return train_sft.run(a, model, tok, pairs, None, log=log, history=log.history)


def share(r: int, total: int, rounds: int) -> range:
    """Round r's part of range(total) split into `rounds` consecutive parts: r*total//rounds .. (r+1)*total//rounds.
    The parts cover range(total) exactly once, and none is empty when rounds <= total."""
    return range(r * total // rounds, (r + 1) * total // rounds)


def rl_settings(args) -> tuple[int, float]:
    """(RL steps, RL learning rate) of this run."""
    base = QUICK_RL if args.quick else RL
    return args.rl_steps or base["steps"], args.rl_lr or base["lr"]


def budget(args) -> dict:
    """What every control is matched to: RL's sampled completions (steps x prompts x group); the SFT controls
    fine-tune on as many sequences, i.e. that many / batch steps."""
    steps, _ = rl_settings(args)
    samples = steps * RL["prompts"] * RL["group"]
    return dict(rl_samples=samples, sequences=samples, sft_steps=samples // SFT["batch"])


def reward(completion: str, problem: dict) -> float:
    """The one reward of RL and of rejection sampling: 1 if the final answer is correct (support.grader.grade),
    else 0."""
    return train_rl.default_reward(completion, problem)


def rl(model, tok, problems, tests, args, log, restates: list):
    """train_rl.run with the demo's settings. `restates` gets (restated lines, lines) of each training rollout."""
    steps, lr = rl_settings(args)
    a = train_rl.parser().parse_args(
        ["--out", "", "--steps", str(steps), "--prompts-per-step", str(RL["prompts"]), "--group-size",
         str(RL["group"]), "--temperature", str(RL["temperature"]), "--lr", str(lr), "--max-new-tokens",
         str(args.max_new_tokens), "--micro-batch", str(RL["micro_batch"]), "--eval-every", "0",
         "--eval-n", "0", "--show-every", str(steps), "--seed", str(args.seed), "--device", args.device])

    def watched(completion, problem):  # the reward, noting how often each rollout restates
        restates.append(synth.restate_counts(completion))
        return reward(completion, problem)

    return train_rl.run(a, model, tok, problems, [], watched, log=log, history=log.history)


def rejection_samples(model, tok, problems, args, steps: range) -> tuple[list, dict]:
    """RL's sampling without its updates: the prompts RL sees at `steps` (train_rl.pick), as many samples per
    prompt, at RL's temperature, with RL's sampling seeds; kept when `reward` accepts them.
    Returns (the kept (prompt, response) pairs, counts); the counts include [restating lines, lines] of all the
    drawn samples and of the kept ones (synth.restate_counts), so the report can say what the filter selected."""
    P, G = RL["prompts"], RL["group"]
    eot = train_sft.end_of_turn(tok, model.cfg)
    kept, drawn_lines, kept_lines = [], [], []
    for step in steps:
        batch = [problems[i] for i in train_rl.pick(len(problems), P, step, args.seed)]
        for s in train_rl.rollout(model, tok, batch, G, RL["temperature"], args.max_new_tokens,
                                  seed=train_rl.sample_seeds(args.seed, step, range(P))):
            drawn_lines.append(synth.restate_counts(s["text"]))
            if reward(s["text"], s["problem"]) == 1 and not s["truncated"]:
                kept.append((s["problem"]["prompt"], s["text"] + eot))
                kept_lines.append(drawn_lines[-1])
    return kept, dict(drawn=len(drawn_lines), kept=len(kept), drawn_lines=pair_sum(drawn_lines),
                      kept_lines=pair_sum(kept_lines))


# ---- measuring a row ---------------------------------------------------------------------------------------
def trace_stats(tok, prompts: list[str], completions: list[str]) -> dict:
    """Per-line restatement rate and the lookback distribution (synth.lookback, tokens) of some traces."""
    return trace_summary([synth.restate_counts(c) for c in completions],
                         [synth.lookback(tok, p + c, len(p)) for p, c in zip(prompts, completions)])


def measure(model, tok, tests, args, name, window) -> dict:
    """Greedy accuracy and accuracy at T = 1 (--samples per problem) on the held-out problems, each with a 95%
    Wilson interval; for the synthetic task also the restatement rate and lookbacks of those traces."""
    greedy, rows = evaluate.evaluate(model, tok, tests, max_new_tokens=args.max_new_tokens, batch_size=50,
                                  seed=args.seed, progress=False)
    k = args.samples
    sampled, srows = evaluate.evaluate(model, tok, tests, max_new_tokens=args.max_new_tokens, batch_size=50,
                                    samples=k, temperature=1.0, seed=args.seed + 1, progress=False)
    n, s_acc = greedy["n"], sampled.get("mean_accuracy", sampled["accuracy"])
    out = dict(row=name, window=window, n=n, samples=k, accuracy=greedy["accuracy"],
               ci=wilson(greedy["accuracy"] * n, n), sampled=s_acc, sampled_ci=wilson(s_acc * n * k, n * k),
               mean_length=greedy["mean_length"], truncated=greedy["truncated"])
    if not args.data:
        prompts = [t["prompt"] for t in tests]
        out["greedy_traces"] = trace_stats(tok, prompts, [r["completion"] for r in rows])
        out["sampled_traces"] = trace_stats(tok, [prompts[i // k] for i in range(n * k)],
                                            [r["completion"] for r in srows])
    print(row_line(out), flush=True)
    return out


def collapse_of(history: list) -> str | None:
    """The RL collapse train_rl reported in this run's events, if any."""
    return next((h["reason"] for h in history if h.get("event") == "collapse"), None)


def checks(res: dict) -> dict:
    """The TARGETS, each True or False, from the numbers of this run."""
    rows, t = {r["row"]: r for r in res["rows"]}, TARGETS
    rec = lambda name: recovered(rows, name, ROWS)  # noqa: E731
    gap = lambda key: rows[SA][key] - rows[SWA][key]  # noqa: E731
    points = round(100 * t["gap"])
    out = {f"SA+SFT >= {t['sa_accuracy']:g}": rows[SA]["accuracy"] >= t["sa_accuracy"],
           f"gap >= {points} points, greedy": gap("accuracy") >= t["gap"],
           f"gap >= {points} points, T=1": gap("sampled") >= t["gap"],
           f"SWARR recovers >= {t['swarr_recovers']:.0%} of the gap": (rec(SWARR) or 0) >= t["swarr_recovers"],
           f"more SFT recovers < {t['more_sft_below']:.0%}": rec(MORE) is not None and rec(MORE) < t["more_sft_below"]}
    if "greedy_traces" in rows[SWA]:
        out["restatement rate rises under RL"] = (rows[SWARR]["sampled_traces"]["restate_rate"]
                                                  > rows[SWA]["sampled_traces"]["restate_rate"])
    out["RL did not collapse"] = res.get("collapse") is None
    return out


# ---- the run -----------------------------------------------------------------------------------------------
def check_args(args) -> list[int]:
    """Everything a command line cannot mean, before anything trains; returns the windows to run."""
    check_flags(args)
    try:
        windows = [int(w) for w in args.windows.split(",")] if args.sweep else [args.window]
    except ValueError:
        raise SwarrError(f"--windows {args.windows!r}: expected comma-separated integers") from None
    for w in windows:
        check_window(w)
    steps = rl_settings(args)[0]  # every round samples at least one RL step (and fine-tunes 4 x as many)
    if not 1 <= args.rejection_rounds <= steps:
        raise SwarrError(f"--rejection-rounds must be between 1 and the RL steps ({steps}), "
                         f"got {args.rejection_rounds}")
    if args.data and not os.path.isfile(args.data):
        raise SwarrError(f"{args.data}: data file not found")
    check_out_folder(args.out)  # (a file, or a folder this user cannot write: one line)
    foreign = sorted(f for f in os.listdir(args.out) if f.split(".tmp-")[0] not in OUT_FILES) \
        if os.path.isdir(args.out) else []
    if foreign and not args.overwrite:
        raise SwarrError(f"--out {args.out} holds files the demo did not write ({', '.join(foreign[:3])}): pass "
                         f"--overwrite to write into it anyway, or choose another --out")
    return windows


def window_rows(swa_base, tok, data, args, window, log, stages, save_to=None) -> dict:
    """Rows 2-6 at one window: SWA + SFT, SWARR, more SFT, rejection sampling, ceiling. Returns their
    measurements and the run's RL curve, budgets and collapse report."""
    pairs, problems, tests, ceiling = data
    b, results, restates = budget(args), [], []

    def stage(name, make):
        stages.start(f"{name} (W = {window})")
        model = make()
        results.append(measure(model, tok, tests, args, name, window))
        if save_to:
            swarr.save(model, tok, os.path.join(save_to, FOLDERS[name]))  # atomic; `swarr.py eval` reads it
        stages.end()
        return model

    swa = stage(SWA, lambda: sft(copy.deepcopy(swa_base), tok, pairs, args, window, args.sft_steps, args.seed, log))
    first = len(log.history)
    stage(SWARR, lambda: rl(copy.deepcopy(swa), tok, problems, tests, args, log, restates))
    rl_events = log.history[first:]
    stage(MORE, lambda: sft(copy.deepcopy(swa), tok, pairs, args, window, b["sft_steps"], args.seed + 1, log))
    rs = dict(rounds=args.rejection_rounds, sequences=0)

    def rejection():
        model, R, S, n_sft = swa, args.rejection_rounds, rl_settings(args)[0], b["sft_steps"]
        rounds = []
        for r in range(R):  # round r: RL's steps share(r, S) sampled, then share(r, n_sft) SFT steps on what was kept
            kept, counts = rejection_samples(model, tok, problems, args, share(r, S, R))
            rounds.append(counts)
            print(f"  rejection sampling{f' round {r + 1}/{R}' if R > 1 else ''}: {counts['kept']} of "
                  f"{counts['drawn']} samples accepted by the reward", flush=True)
            if kept:  # with nothing kept there is nothing to learn from: the model stays as it was
                steps = len(share(r, n_sft, R))
                model = sft(copy.deepcopy(model), tok, kept, args, window, steps, args.seed + 1 + r, log)
                rs["sequences"] += steps * SFT["batch"]
        rs.update({key: sum(c[key] for c in rounds) for key in ("drawn", "kept")},
                  **{key: pair_sum(c[key] for c in rounds) for key in ("drawn_lines", "kept_lines")})
        return copy.deepcopy(model) if model is swa else model

    stage(REJECT, rejection)
    if ceiling:
        stage(CEIL, lambda: sft(copy.deepcopy(swa), tok, ceiling, args, window, b["sft_steps"], args.seed + 1, log))
    curve = rl_curve(rl_events, restates if ceiling else [], RL["prompts"] * RL["group"])
    return dict(rows=results, rl_curve=curve, rejection=rs, collapse=collapse_of(rl_events))


def run(args) -> dict:
    windows = check_args(args)
    torch.manual_seed(args.seed)
    t0 = time.time()
    rl_cost = 45 if args.quick else 80
    per_window = [(SWA, 30), (SWARR, rl_cost), (MORE, 15), (REJECT, rl_cost // 2 + 15), (CEIL, 15)]
    stages = Stages([("load", 0), (SA, 30)] + per_window * len(windows)
                    + ([] if args.sweep else [("decode speed", 10)]))
    stages.start("load")
    base, tok = swarr.load(args.model, torch.float32, args.device)
    if max(windows) > base.cfg.max_pos:  # checked now, not after the first stage has trained
        raise SwarrError(f"--window {max(windows)} is larger than the model's context ({base.cfg.max_pos})")
    print(f"  {args.model}: {base.cfg.arch}, {param_count(base.cfg) / 1e6:.2f}M parameters, "
          f"attention backend {ops.backend_name()}")
    data = task(args, tok, base.cfg)
    pairs, problems, tests, ceiling = data
    print(f"  {len(pairs)} SFT pairs / RL prompts, {len(tests)} held-out problems ({args.split} split)")
    if os.path.isdir(args.out) and os.listdir(args.out):
        print(f"  note: {args.out}/ exists; this run replaces what is in it")
    os.makedirs(args.out, exist_ok=True)
    write(os.path.join(args.out, "test.jsonl"), "".join(json.dumps(t) + "\n" for t in tests))  # prompts as seen
    stages.end()
    log = Log()
    res = dict(args=vars(args), device=args.device, rl_steps=rl_settings(args)[0], budget=budget(args))
    if ceiling:
        res["sft_traces"] = trace_stats(tok, [p for p, _ in pairs[:400]], [r for _, r in pairs[:400]])
        res["sft_traces"].pop("lookbacks")
    models = None if args.sweep else os.path.join(args.out, "models")

    stages.start(SA)
    sa = sft(copy.deepcopy(base), tok, pairs, args, None, args.sft_steps, args.seed, log)
    sa_row = measure(sa, tok, tests, args, SA, None)
    if models:
        swarr.save(sa, tok, os.path.join(models, FOLDERS[SA]))
    stages.end()
    del sa

    per = {}
    for w in windows:
        per[w] = window_rows(base, tok, data, args, w, log, stages, models)
        write(os.path.join(args.out, "log.jsonl"), "".join(json.dumps(h) + "\n" for h in log.history))
        if args.sweep:  # the table and figure so far, rewritten after each window
            r = dict(per[w], rows=[sa_row] + per[w]["rows"])
            res.setdefault("windows", {})[w] = dict(r, checks=checks(r))
            res.update(sa=sa_row, wall_s=time.time() - t0)
            text = save_report(args.out, res, ROWS)
    if args.sweep:
        print("\n" + text)
        print(f"wrote {args.out}/: report.md, results.json, sweep.svg, log.jsonl, test.jsonl")
        return res

    one = per[args.window]
    res.update(rows=[sa_row] + one["rows"], rl_curve=one["rl_curve"], rejection=one["rejection"],
               collapse=one["collapse"])
    stages.start("decode speed")
    res["speed"] = bench.sa_and_swa(base, args.window, B=16, C=args.context, steps=8)  # decode tok/s, KV bytes
    stages.end()
    res["wall_s"] = time.time() - t0
    res["checks"] = checks(res)
    text = save_report(args.out, res, ROWS, sft_batch=SFT["batch"], rl=RL, paper_32k=bench.PAPER_32K)
    print("\n" + text)
    print(f"wrote {args.out}/: report.md, results.json, rl_curve.svg, log.jsonl, test.jsonl, models/")
    return res


def main(argv=None):
    args = parser().parse_args(argv)
    run_cli(run, args)


if __name__ == "__main__":
    main()
