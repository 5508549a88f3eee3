"""The main job: the SWARR finding, end to end, on the embedded default (a CPU, a few minutes).

    python demo.py [--seed 0] [--window 40] [--quick] [--ablations] [--sweep] [--rate R] [--split valid]

From one pretrained self-attention (SA) model (data/tiny-sa, 0.82M parameters, pretrained by data/pretrain.py)
and one synthetic task (data/synth.py: sums of products, whose SFT traces are written "for SA"), it runs
  1. SA + SFT        the full-attention baseline                               (train_sft.run)
  2. SWA + SFT       the conversion: same data, same steps, window W           (train_sft.run --window W)
  3. SWARR           2, then on-policy REINFORCE, reward = correctness         (train_rl.run)
  4. more SFT        2, then more SFT on the same data                         (train_sft.run)
  5. rejection       2's own samples, as many as RL draws, at RL's temperature, on RL's prompts, kept when the
     sampling        same reward accepts them, then fine-tuned on (train_sft.run); with --rejection-rounds R, the
                     same budget in R rounds, each sampling from the last round's model
  6. ceiling         2, then SFT on traces that restate at every line (what a trajectory that always stays near can
                     reach inside the window)
Rows 3-6 are matched: RL's optimizer steps of RL's batch at a constant rate (RL's schedule), each at its own rate
chosen on the validation split from one grid (LR). Every row is evaluated on held-out problems, greedily (Wilson
interval) and at T = 1 (samples clustered by problem: a cluster bootstrap); rows are compared paired, per problem.
The mechanism: each line of a solution may restate the terms still to come; the SFT data restate at a minority rate
(synth.RESTATE_RATE), and a trace that rarely restates reaches back beyond a small window. Every row reports its
restatement rate and lookback (synth.lookback). Nothing in the data, the reward or the selection knows W.

--ablations adds rows that intervene on the mechanism: rows 2, 3 and 5 decoded with restating forced, then banned,
at every line (synth.LineConstraint); the same RL from SA + SFT, without the window; the same RL without the group
baseline; and accuracy by restatement pattern. --sweep runs rows 2-6 for each window of --windows (sweep.svg).

The loops are train_sft.py's, train_rl.py's and eval's; support/report.py renders report.md, results.json and
rl_curve.svg in --out, beside log.jsonl, models/<row>/ and test.jsonl (`swarr.py eval` grades a row again).
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
from support.training import share
from support.checkpoint import param_count
from support.flags import check_demo
from support.report import (Log, Rows, Stages, by_pattern, clustered, collapse_of, design_effect, pair_sum, recovered,
                            rl_curve, row_line, save_report, statistics, wilson, write)
from support.safe_io import SwarrError, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "data"))
import synth  # noqa: E402  (data/synth.py: the embedded task)

ROWS = Rows(sa="SA + SFT", swa="SWA + SFT", swarr="SWARR (SWA + SFT + RL)", more="more SFT",
            reject="rejection sampling", ceiling="ceiling (all lines restate)")
SA, SWA, SWARR, MORE, REJECT, CEIL = ROWS
FOLDERS = {SA: "sa-sft", SWA: "swa-sft", SWARR: "swarr", MORE: "more-sft", REJECT: "rejection", CEIL: "ceiling"}
NO_WINDOW, NO_BASELINE = "RL without the window (SA + SFT + RL)", "RL without the baseline (SWA + SFT + RL)"
DEFAULT_MODEL = os.path.join(HERE, "data", "tiny-sa")
OUT_FILES = {"report.md", "results.json", "rl_curve.svg", "sweep.svg", "log.jsonl", "test.jsonl", "models", ".lock"}

SFT = dict(steps=300, batch=16, lr=1e-3, warmup=10)  # the conversion (rows 1 and 2): warmup, then a cosine
RL = dict(steps=40, prompts=8, group=8, temperature=1.0, micro_batch=32)
QUICK_STEPS = 20
# Rows 3-6 each at its own constant learning rate, chosen on the validation split (--split valid) from GRID, for the
# default run and for --quick; data/README.md has the validation numbers. --rl-lr and --control-lr override them.
GRID = (1e-4, 3e-4, 1e-3, 3e-3)
LR = {SWARR: 3e-4, MORE: 3e-4, REJECT: 1e-3, CEIL: 3e-4}
QUICK_LR = {SWARR: 3e-4, MORE: 3e-4, REJECT: 3e-4, CEIL: 1e-3}
WINDOW = 40
SWEEP = (24, 32, 40, 48, 56, 64)
# What the default run must show (README.md), checked on every run's own numbers (checks)
TARGETS = dict(sa_accuracy=0.85, gap=0.25, swarr_recovers=0.6, more_sft_below=0.2)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="data split, batch order, sampling (default 0)")
    p.add_argument("--window", type=int, default=WINDOW, help=f"the SWA window W, keys per query (default {WINDOW})")
    p.add_argument("--quick", action="store_true", help=f"RL and the controls {QUICK_STEPS} steps, 100 test problems")
    p.add_argument("--ablations", action="store_true", help="add the rows that intervene on the mechanism")
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
    p.add_argument("--rl-steps", type=int, default=None, help=f"default {RL['steps']}, --quick {QUICK_STEPS}")
    p.add_argument("--rl-lr", type=float, default=None, help="RL's learning rate (default: LR, chosen on validation)")
    p.add_argument("--control-lr", type=float, default=None, help="every control's (default: each its own, LR)")
    p.add_argument("--rejection-rounds", type=int, default=1, help="iterated rejection sampling: RL's budget in this "
                   "many rounds, each sampling from the model the last round tuned (default 1: one filter of row 2)")
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
def sft(model, tok, pairs, args, window, seed, log, steps, batch=SFT["batch"], rate=SFT["lr"], matched=False):
    """train_sft.run with the demo's settings; returns the fine-tuned model (trained in place). The conversion
    warms up, then decays (a cosine to a tenth); a matched control (matched=True) runs at RL's constant rate."""
    a = train_sft.parser().parse_args(
        ["--out", "", "--max-steps", str(steps), "--batch-size", str(batch), "--lr", str(rate), "--warmup",
         "0" if matched else str(SFT["warmup"]), "--min-lr-ratio", "1" if matched else "0.1", "--eval-every", "0",
         "--log-every", "100", "--seed", str(seed), "--device", args.device] + ["--window", str(window)] * bool(window))
    log.runs.append(dict(steps=steps, batch=batch, lr=rate, schedule="constant" if matched else "warmup, cosine"))
    return train_sft.run(a, model, tok, pairs, None, log=log, history=log.history)


def rl_steps(args) -> int:
    return args.rl_steps or (QUICK_STEPS if args.quick else RL["steps"])


def lr(args, row: str) -> float:
    """The learning rate of row 3-6 (or of an ablation's RL) in this run."""
    chosen = (QUICK_LR if args.quick else LR)[row if row in LR else SWARR]
    return (args.rl_lr if row not in (MORE, REJECT, CEIL) else args.control_lr) or chosen


def budget(args) -> dict:
    """What every control is matched to, RL's: its optimizer steps, its batch (prompts x group sequences a step),
    so its sampled completions (steps x batch) are the controls' sequences; its schedule is a constant rate."""
    steps, batch = rl_steps(args), RL["prompts"] * RL["group"]
    return dict(rl_samples=steps * batch, sequences=steps * batch, steps=steps, batch=batch)


reward = train_rl.default_reward  # the one reward of RL and rejection sampling: 1 if the answer is right, else 0


def rl(model, tok, problems, args, log, restates: list, row=SWARR):
    """train_rl.run with the demo's settings (NO_BASELINE: without the group baseline). `restates` gets (restated
    lines, lines) of each training rollout."""
    steps, rate = rl_steps(args), lr(args, row)
    a = train_rl.parser().parse_args(
        ["--out", "", "--steps", str(steps), "--prompts-per-step", str(RL["prompts"]), "--group-size",
         str(RL["group"]), "--temperature", str(RL["temperature"]), "--lr", str(rate), "--max-new-tokens",
         str(args.max_new_tokens), "--micro-batch", str(RL["micro_batch"]), "--eval-every", "0", "--eval-n", "0",
         "--show-every", str(steps), "--seed", str(args.seed), "--device", args.device]
        + (["--no-baseline"] if row == NO_BASELINE else []))
    log.runs.append(dict(steps=steps, batch=RL["prompts"] * RL["group"], lr=rate, schedule="constant"))

    def watched(completion, problem):  # the reward, noting how often each rollout restates
        restates.append(synth.restate_counts(completion))
        return reward(completion, problem)

    return train_rl.run(a, model, tok, problems, [], watched, log=log, history=log.history)


def rejection_samples(model, tok, problems, args, steps: range) -> tuple[list, dict]:
    """RL's sampling without its updates: the prompts RL sees at `steps` (train_rl.pick), as many samples per prompt,
    at RL's temperature, with RL's sampling seeds; kept when `reward` accepts them. Returns (the kept (prompt,
    response) pairs, counts), with [restating lines, lines] of all the drawn samples and of the kept ones."""
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
def measure(model, tok, tests, args, name, window, constrain=None) -> dict:
    """Greedy accuracy (95% Wilson interval) and accuracy at T = 1 (--samples per problem; interval clustered by
    problem), each problem's correctness (for paired comparisons); on the synthetic task also the restatement rate,
    lookbacks and restatement pattern of the traces. constrain: "forced" or "banned" restating (synth.LineConstraint)"""
    how = dict(max_new_tokens=args.max_new_tokens, batch_size=50, progress=False, constrain=constrain and (
        lambda prompts, k: synth.LineConstraint.of(tok, model.cfg.vocab_size, constrain, prompts, k)))
    greedy, rows = evaluate.evaluate(model, tok, tests, seed=args.seed, **how)
    k = args.samples
    sampled, srows = evaluate.evaluate(model, tok, tests, samples=k, temperature=1.0, seed=args.seed + 1, **how)
    n, s_acc = greedy["n"], sampled.get("mean_accuracy", sampled["accuracy"])
    per = dict(greedy=[int(r["correct"]) for r in rows],
               sampled=[[int(r["correct"]) for r in srows[i * k:(i + 1) * k]] for i in range(n)])
    out = dict(row=name, window=window, n=n, samples=k, accuracy=greedy["accuracy"],
               ci=wilson(greedy["accuracy"] * n, n), sampled=s_acc, sampled_ci=clustered(per["sampled"], args.seed),
               design_effect=design_effect(per["sampled"]), per_problem=per, mean_length=greedy["mean_length"],
               truncated=greedy["truncated"])
    if not args.data:
        prompts = [t["prompt"] for t in tests]
        out["greedy_traces"] = synth.trace_stats(tok, prompts, [r["completion"] for r in rows])
        out["sampled_traces"] = synth.trace_stats(tok, [prompts[i // k] for i in range(n * k)],
                                            [r["completion"] for r in srows])
        out["patterns"] = [synth.pattern(r["completion"]) for r in srows]
    print(row_line(out), flush=True)
    return out


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
def window_rows(swa_base, tok, data, args, window, log, stages, save_to=None) -> dict:
    """Rows 2-6 at one window: SWA + SFT, SWARR, more SFT, rejection sampling, ceiling. Returns their
    measurements, the run's RL curve, what each method ran (matched), and the models of rows 2, 3 and 5."""
    pairs, problems, tests, ceiling = data
    b, results, restates, matched, models = budget(args), [], [], {}, {}

    def stage(name, make):
        stages.start(f"{name} (W = {window})")
        first = len(log.runs)
        models[name] = make()
        if name != SWA:  # what rows 3-6 ran: RL's steps, batch and schedule
            matched[name] = log.ran(first, lr(args, name))
        results.append(measure(models[name], tok, tests, args, name, window))
        if save_to:
            swarr.save(models[name], tok, os.path.join(save_to, FOLDERS[name]))  # atomic; `swarr.py eval` reads it
        stages.end()
        return models[name]

    def control(model, data, name, seed, steps=b["steps"]):  # RL's steps of RL's batch, at RL's (constant) schedule
        return sft(copy.deepcopy(model), tok, data, args, window, seed, log, steps, b["batch"], lr(args, name), True)

    swa = stage(SWA, lambda: sft(copy.deepcopy(swa_base), tok, pairs, args, window, args.seed, log, args.sft_steps))
    first = len(log.history)
    stage(SWARR, lambda: rl(copy.deepcopy(swa), tok, problems, args, log, restates))
    rl_events = log.history[first:]
    stage(MORE, lambda: control(swa, pairs, MORE, args.seed + 1))
    rs = dict(rounds=args.rejection_rounds)

    def rejection():
        model, R, S, rounds = swa, args.rejection_rounds, b["steps"], []
        for r in range(R):  # round r: RL's steps share(r, S) sampled, then as many SFT steps on what was kept
            kept, counts = rejection_samples(model, tok, problems, args, share(r, S, R))
            rounds.append(counts)
            print(f"  rejection sampling{f' round {r + 1}/{R}' if R > 1 else ''}: {counts['kept']} of "
                  f"{counts['drawn']} samples accepted by the reward", flush=True)
            if kept:  # with nothing kept there is nothing to learn from: the model stays as it was
                model = control(model, kept, REJECT, args.seed + 1 + r, len(share(r, S, R)))
        rs.update({key: sum(c[key] for c in rounds) for key in ("drawn", "kept")},
                  **{key: pair_sum(c[key] for c in rounds) for key in ("drawn_lines", "kept_lines")})
        return copy.deepcopy(model) if model is swa else model

    stage(REJECT, rejection)
    if ceiling:
        stage(CEIL, lambda: control(swa, ceiling, CEIL, args.seed + 1))
    curve = rl_curve(rl_events, restates if ceiling else [], RL["prompts"] * RL["group"])
    return dict(rows=results, rl_curve=curve, rejection=rs, collapse=collapse_of(rl_events), matched=matched,
                models={k: models[k] for k in (SWA, SWARR, REJECT)})


def ablations(sa, models, tok, data, args, log, stages, res: dict):
    """--ablations, each changing one thing: the models of rows 2, 3 and 5 decoded with restating forced, then
    banned, at every line (constrained decoding, the weights and everything else as they were); the same RL from
    SA + SFT, where no window presses (NO_WINDOW); the same RL without the group baseline (NO_BASELINE). Adds the
    rows, what their RL ran, the paired comparisons and accuracy by restatement pattern to `res`."""
    (_, problems, tests, _), window, seed = data, args.window, args.seed
    rows, curves, matched = [], {}, res["matched"]
    for name in (SWA, SWARR, REJECT):
        for mode in ("forced", "banned"):
            stages.start(f"{name}, {mode} restating")
            rows.append(measure(models[name], tok, tests, args, f"{name}, {mode} restating", window, mode))
            stages.end()
    for label, start, w in ((NO_WINDOW, sa, None), (NO_BASELINE, models[SWA], window)):
        stages.start(label)
        restates, first, runs = [], len(log.history), len(log.runs)
        rows.append(measure(rl(copy.deepcopy(start), tok, problems, args, log, restates, label), tok, tests, args,
                            label, w))
        curves[label] = rl_curve(log.history[first:], restates, RL["prompts"] * RL["group"])
        matched[label] = log.ran(runs, lr(args, label))
        stages.end()
    pairs = [(f"{n}, {m} restating", n) for n in (SWA, SWARR, REJECT) for m in ("forced", "banned")]
    res.update(ablations=rows, ablation_curves=curves, patterns=by_pattern(res["rows"], [SWA, SWARR, REJECT], seed),
               ablation_paired=statistics(rows, ROWS, args.seed, pairs + [(SWARR, NO_BASELINE)], base=res["rows"]))


def run(args) -> dict:
    windows = check_demo(args, rl_steps(args), OUT_FILES)  # one error line for a flag that cannot mean anything
    torch.manual_seed(args.seed)
    t0 = time.time()
    rl_cost = 45 if args.quick else 80  # (seconds on the 2-core dev CPU: the ETA's weights)
    stages = Stages([("load", 0), (SA, 30)] + [(SWA, 30), (SWARR, rl_cost), (MORE, 15), (REJECT, rl_cost // 2 + 15),
                                                (CEIL, 15)] * len(windows) + [("decode speed", 10)] * (not args.sweep)
                    + ([("forced / banned", 8)] * 6 + [(NO_WINDOW, rl_cost), (NO_BASELINE, rl_cost)]) * args.ablations)
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
    res = dict(args=vars(args), device=args.device, rl_steps=rl_steps(args), budget=budget(args))
    if ceiling:
        res["sft_traces"] = synth.trace_stats(tok, [p for p, _ in pairs[:400]], [r for _, r in pairs[:400]])
        res["sft_traces"].pop("lookbacks")
    models = None if args.sweep else os.path.join(args.out, "models")

    stages.start(SA)
    sa = sft(copy.deepcopy(base), tok, pairs, args, None, args.seed, log, args.sft_steps)
    sa_row = measure(sa, tok, tests, args, SA, None)
    if models:
        swarr.save(sa, tok, os.path.join(models, FOLDERS[SA]))
    stages.end()

    per = {}
    for w in windows:
        per[w] = window_rows(base, tok, data, args, w, log, stages, models)
        write(os.path.join(args.out, "log.jsonl"), "".join(json.dumps(h) + "\n" for h in log.history))
        if args.sweep:  # the table and figure so far, rewritten after each window
            r = dict(per[w], rows=[sa_row] + per[w]["rows"], models=None)
            statistics(r["rows"], ROWS, args.seed)  # (adds the gap-recovered intervals)
            res.setdefault("windows", {})[w] = dict(r, checks=checks(r))
            res.update(sa=sa_row, wall_s=time.time() - t0)
            text = save_report(args.out, res, ROWS)
    if args.sweep:
        print("\n" + text)
        print(f"wrote {args.out}/: report.md, results.json, sweep.svg, log.jsonl, test.jsonl")
        return res

    one = per[args.window]
    res.update(rows=[sa_row] + one["rows"], rl_curve=one["rl_curve"], rejection=one["rejection"],
               collapse=one["collapse"], matched=one["matched"])
    res["paired"] = statistics(res["rows"], ROWS, args.seed, [(SWARR, k) for k in (MORE, REJECT, CEIL)])
    if args.ablations:
        ablations(sa, one["models"], tok, data, args, log, stages, res)
        write(os.path.join(args.out, "log.jsonl"), "".join(json.dumps(h) + "\n" for h in log.history))
    stages.start("decode speed")
    res["speed"] = bench.sa_and_swa(base, args.window, B=16, C=args.context, steps=8)  # decode tok/s, KV bytes
    stages.end()
    res["wall_s"] = time.time() - t0
    res["checks"] = checks(res)
    text = save_report(args.out, res, ROWS, rl=RL, paper_32k=bench.PAPER_32K)
    print("\n" + text)
    print(f"wrote {args.out}/: report.md, results.json, rl_curve.svg, log.jsonl, test.jsonl, models/")
    return res


def main(argv=None):
    args = parser().parse_args(argv)
    run_cli(run, args)


if __name__ == "__main__":
    main()
