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
and evaluates every row on held-out problems never seen in training (swarr.evaluate): greedy, and at T = 1
(several samples per problem), each with a 95% Wilson interval. The training and evaluation loops are those of
train_sft.py, train_rl.py and `swarr.py eval`; this file only wires them up.

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
import math
import os
import sys
import time

import torch

import bench
import swarr
import train_rl
import train_sft
from support import evaluate, training

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "data"))
import synth  # noqa: E402  (data/synth.py: the embedded task)

SA, SWA, SWARR, MORE, REJECT, CEIL = ("SA + SFT", "SWA + SFT", "SWARR (SWA + SFT + RL)", "more SFT",
                                      "rejection sampling", "ceiling (all lines restate)")
FOLDERS = {SA: "sa-sft", SWA: "swa-sft", SWARR: "swarr", MORE: "more-sft", REJECT: "rejection", CEIL: "ceiling"}
DEFAULT_MODEL = os.path.join(HERE, "data", "tiny-sa")

# The defaults were chosen on the validation split (--split valid); data/README.md has the search.
SFT = dict(steps=300, batch=16, lr=1e-3, warmup=10)
RL = dict(steps=40, prompts=8, group=8, lr=2e-4, temperature=1.0, micro_batch=32)
QUICK_RL = dict(steps=20, lr=3e-4)
WINDOW = 40
SWEEP = (24, 32, 40, 48, 56, 64)


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
    return p


# ---- progress over the whole run ---------------------------------------------------------------------------
class Stages:
    """`[2/7] SWA + SFT ...  elapsed 30s  ETA 75s` at the start of each stage. The ETA weighs the stages by
    their cost measured on the 2-core dev CPU and rescales by how fast this run's weighed stages have gone (the
    load stage weighs 0: on a first run it includes compiling csrc/, which says nothing about the rest)."""

    def __init__(self, stages: list):
        self.stages, self.t0, self.done, self.busy, self.i = stages, time.time(), 0.0, 0.0, 0

    def start(self, name: str):
        self.t_start, self.name = time.time(), name
        rate = self.busy / self.done if self.done else 1.0
        eta = rate * (sum(c for _, c in self.stages) - self.done)
        self.i += 1
        print(f"\n[{self.i}/{len(self.stages)}] {name}  elapsed {self.t_start - self.t0:.0f}s  ETA {eta:.0f}s",
              flush=True)

    def end(self):
        cost = self.stages[self.i - 1][1]
        if cost:
            self.done += cost
            self.busy += time.time() - self.t_start


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
    """The one reward of RL and of rejection sampling: 1 if the final answer is correct (swarr.grade), else 0."""
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


def pair_sum(pairs) -> list[int]:
    """[sum of the first items, sum of the second items], e.g. of (restating lines, lines) counts."""
    pairs = list(pairs)
    return [sum(a for a, _ in pairs), sum(b for _, b in pairs)]


class Log:
    """Training lines, indented under their stage, and every event dict kept (also in out/log.jsonl)."""

    def __init__(self):
        self.history = []

    def __call__(self, line):
        print(f"  {line}", flush=True)


# ---- measuring a row ---------------------------------------------------------------------------------------
def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n (k may be a float count: mean x n)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def trace_stats(tok, prompts: list[str], completions: list[str]) -> dict:
    """Per-line restatement rate and the lookback distribution (synth.lookback, tokens) of some traces."""
    counts = [synth.restate_counts(c) for c in completions]
    reach = sorted(synth.lookback(tok, p + c, len(p)) for p, c in zip(prompts, completions))
    q = lambda f: reach[min(len(reach) - 1, int(f * len(reach)))]
    return dict(restate_rate=sum(c[0] for c in counts) / max(1, sum(c[1] for c in counts)),
                lookback=dict(p10=q(0.1), median=q(0.5), p90=q(0.9), max=reach[-1]), lookbacks=reach)


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
    line = (f"  {name}: greedy {out['accuracy']:.3f} [{out['ci'][0]:.2f}, {out['ci'][1]:.2f}], "
            f"T=1 {s_acc:.3f} [{out['sampled_ci'][0]:.2f}, {out['sampled_ci'][1]:.2f}] on {n} problems")
    if not args.data:
        prompts = [t["prompt"] for t in tests]
        out["greedy_traces"] = trace_stats(tok, prompts, [r["completion"] for r in rows])
        out["sampled_traces"] = trace_stats(tok, [prompts[i // k] for i in range(n * k)],
                                            [r["completion"] for r in srows])
        g, s = out["greedy_traces"], out["sampled_traces"]
        line += (f"; lines restating: greedy {g['restate_rate']:.2f}, T=1 {s['restate_rate']:.2f}; "
                 f"lookback median {g['lookback']['median']} (T=1 {s['lookback']['median']}) tokens")
    print(line, flush=True)
    return out


def speed(model, args):
    """Decode tokens/s and KV-cache bytes of this model's shape as SA and as SWA, batch 16, with caches holding
    --context tokens of random keys/values (bench.py e2e's measurement, through the generation path itself)."""
    out = {}
    for name, w in (("SA", None), ("SWA", args.window)):
        m = copy.deepcopy(model).eval()
        m.set_window(w)
        out[name] = bench.decode_if_fits(m, B=16, C=args.context, steps=8)
    return out


def collapse_of(history: list) -> str | None:
    """The RL collapse train_rl reported in this run's events, if any."""
    return next((h["reason"] for h in history if h.get("event") == "collapse"), None)


# ---- report ------------------------------------------------------------------------------------------------
def recovered(rows: dict, name: str, key: str = "accuracy") -> float | None:
    """Share of the SA+SFT - SWA+SFT gap that row `name` wins back (greedy, or key="sampled")."""
    gap = rows[SA][key] - rows[SWA][key]
    return (rows[name][key] - rows[SWA][key]) / gap if gap > 0 and name in rows else None


def checks(res: dict) -> dict:
    """The targets of the default run (README.md), each True or False, from the numbers of this run."""
    rows = {r["row"]: r for r in res["rows"]}
    rec = lambda name: recovered(rows, name)
    out = {"SA+SFT >= 0.85": rows[SA]["accuracy"] >= 0.85,
           "gap >= 25 points, greedy": rows[SA]["accuracy"] - rows[SWA]["accuracy"] >= 0.25,
           "gap >= 25 points, T=1": rows[SA]["sampled"] - rows[SWA]["sampled"] >= 0.25,
           "SWARR recovers >= 60% of the gap": (rec(SWARR) or 0) >= 0.6,
           "more SFT recovers < 20%": rec(MORE) is not None and rec(MORE) < 0.2}
    if "greedy_traces" in rows[SWA]:
        out["restatement rate rises under RL"] = (rows[SWARR]["sampled_traces"]["restate_rate"]
                                                  > rows[SWA]["sampled_traces"]["restate_rate"])
    out["RL did not collapse"] = res.get("collapse") is None
    return out


write = swarr.write_text_atomic  # reports are replaced whole or not at all


def selected(rs: dict) -> str:
    """What rejection sampling's filter selected on the synthetic task: the restatement rate of the kept samples
    against all drawn ("" when there are no working lines to count)."""
    rate = lambda key: rs[key][0] / max(1, rs[key][1])  # noqa: E731
    return (f" (their lines restate {rate('kept_lines'):.2f} of the time, all {rs['drawn']} drawn "
            f"{rate('drawn_lines'):.2f})") if rs.get("drawn_lines", [0, 0])[1] else ""


def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def row_table(rows: list, W: int) -> list[str]:
    """The rows as a markdown table: accuracy with intervals, gap recovered, restatement and lookback."""
    by = {r["row"]: r for r in rows}
    lines = ["| row | greedy [95% CI] | T=1 [95% CI] | gap recovered greedy / T=1 | lines restating greedy / T=1 "
             f"| lookback median (p90), greedy / T=1 | traces with lookback <= {W}, T=1 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = (f"{fmt(recovered(by, r['row']), '.0%')} / {fmt(recovered(by, r['row'], 'sampled'), '.0%')}"
               if r["row"] not in (SA, SWA) and SA in by else "-")
        if "greedy_traces" in r:
            g, s = r["greedy_traces"], r["sampled_traces"]
            rate = f"{g['restate_rate']:.2f} / {s['restate_rate']:.2f}"
            lb = (f"{g['lookback']['median']} ({g['lookback']['p90']}) / "
                  f"{s['lookback']['median']} ({s['lookback']['p90']})")
            fit = f"{sum(x <= W for x in s['lookbacks']) / len(s['lookbacks']):.2f}"
        else:
            rate, lb, fit = "n/a", "n/a", "n/a"
        lines.append(f"| {r['row']} | {r['accuracy']:.3f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | "
                     f"{r['sampled']:.3f} [{r['sampled_ci'][0]:.2f}, {r['sampled_ci'][1]:.2f}] | {rec} | {rate} | "
                     f"{lb} | {fit} |")
    return lines


def report(res: dict) -> str:
    a, W = res["args"], res["args"]["window"]
    b = res["budget"]
    lines = [f"# SWARR demo: seed {a['seed']}, window W = {W}, SFT restatement rate {a['rate']:g} per line, "
             f"evaluated on the {a['split']} split", "",
             f"Model {os.path.relpath(a['model'])}, data {a['data'] or 'synthetic (data/synth.py)'}. "
             f"{res['rows'][0]['n']} held-out problems; greedy and {a['samples']} samples per problem at T = 1, "
             f"max {a['max_new_tokens']} new tokens; 95% Wilson intervals. Wall time {res['wall_s']:.0f} s on "
             f"{res['device']} ({torch.get_num_threads()} threads).", ""]
    lines += row_table(res["rows"], W)
    rs = res["rejection"]
    source = ("from SWA + SFT" if rs.get("rounds", 1) == 1 else
              f"in {rs['rounds']} rounds, each from the model the round before fine-tuned (the first from SWA + SFT),")
    planned, tuned = b["sequences"], rs.get("sequences", b["sequences"])
    tuned_text = (f"{tuned} sequences ({b['sft_steps']} steps of {SFT['batch']}); more SFT and the ceiling "
                  f"fine-tuned on as many" if tuned == planned else
                  f"{tuned} sequences, not the {planned} planned (a round that kept nothing does not train); more SFT "
                  f"and the ceiling fine-tuned on {planned}")
    lines += ["", f"Budgets: RL sampled {b['rl_samples']} completions ({res['rl_steps']} steps x {RL['prompts']} "
              f"prompts "
              f"x {RL['group']}) and trained on all of them. Rejection sampling drew {rs['drawn']} {source} on "
              f"the same prompts at T = {RL['temperature']:g}, kept {rs['kept']} that the same reward accepts"
              f"{selected(rs) if 'sft_traces' in res else ''}, and fine-tuned on {tuned_text} sequences of their "
              f"data.", ""]
    if "sft_traces" in res:
        st = res["sft_traces"]
        lines += [f"SFT data: {st['restate_rate']:.2f} of the lines restate; lookback median "
                  f"{st['lookback']['median']} "
                  f"(p10 {st['lookback']['p10']}, p90 {st['lookback']['p90']}) tokens. During RL the rollouts' "
                  f"restatement rate went {res['rl_curve']['restate_rate'][0][1]:.2f} (step 1) -> "
                  f"{res['rl_curve']['restate_rate'][-1][1]:.2f} (step {res['rl_steps']}).", ""]
    if res.get("collapse"):
        lines += [f"**RL COLLAPSED: {res['collapse']}** The SWARR row is not a result of RL working.", ""]
    lines += ["Targets: " + "; ".join(f"{k} {'yes' if v else 'NO'}" for k, v in res["checks"].items()) + ".", ""]
    s = res.get("speed")
    if s:
        ok = all(s[k]["status"] == "ok" for k in ("SA", "SWA"))
        tps = lambda k: f"{s[k]['tok_s']:.0f}" if s[k]["status"] == "ok" else s[k]["status"]
        ratio = f"{s['SWA']['tok_s'] / s['SA']['tok_s']:.1f}x" if ok else "n/a"
        lines += [f"Decode at {a['context']} tokens of context, batch 16, this model's shape with random keys/values "
                  f"in the caches (bench.py e2e's measurement; speeds depend on the machine and its load):", "",
                  "| | decode tokens/s | KV-cache bytes |", "|---|---|---|",
                  f"| SA | {tps('SA')} | {s['SA']['kv_bytes']:,} |",
                  f"| SWA (W = {W}) | {tps('SWA')} | {s['SWA']['kv_bytes']:,} |",
                  f"| SWA / SA | {ratio} | {s['SA']['kv_bytes'] / s['SWA']['kv_bytes']:.0f}x less |", "",
                  f"(The paper reports about {bench.PAPER_32K}x throughput over SA at 32k context for its models.)", ""]
    lines += ["![reward, restatement rate and accuracy over RL steps](rl_curve.svg)", ""]
    return "\n".join(lines)


def svg_curve(curve: dict, hlines: dict, path: str, title: str, xlabel: str = "RL step", xticks=None,
              W: int = 640, H: int = 360):
    """A line chart in plain SVG (no plotting library): curve = {label: [(x, value 0..1)]}, hlines = {label: y}."""
    xs = [x for pts in curve.values() for x, _ in pts] or [1]
    x0, x1, L, R, T, B = min(0, min(xs)) if xticks is None else min(xs), max(xs), 60, 230, 30, 40
    px = lambda x: L + (W - L - R) * (x - x0) / max(1, x1 - x0)
    py = lambda y: T + (H - T - B) * (1 - y)
    colors = ["#1f77b4", "#2ca02c", "#d62728", "#7f7f7f", "#9467bd", "#ff7f0e", "#8c564b"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="18" font-size="13">{title}</text>']
    for y in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{L}" y1="{py(y):.1f}" x2="{W - R}" y2="{py(y):.1f}" stroke="#ddd"/>'
                   f'<text x="{L - 8}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    for x in (xticks if xticks is not None else sorted({x0, (x0 + x1) // 2, x1})):
        out.append(f'<text x="{px(x):.1f}" y="{H - B + 16}" text-anchor="middle">{x}</text>')
    out.append(f'<text x="{(L + W - R) / 2:.0f}" y="{H - 8}" text-anchor="middle">{xlabel}</text>')
    key = 0
    for i, (label, pts) in enumerate(curve.items()):
        c = colors[i % len(colors)]
        path_d = " ".join(f"{'M' if j == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for j, (x, y) in enumerate(pts))
        out.append(f'<path d="{path_d}" fill="none" stroke="{c}" stroke-width="2"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{c}"/>' for x, y in pts]
        out.append(f'<text x="{W - R + 10}" y="{T + 16 * key + 4}" fill="{c}">{label}</text>')
        key += 1
    for j, (label, y) in enumerate(hlines.items()):
        c = colors[(len(curve) + j) % len(colors)]
        out.append(f'<line x1="{L}" y1="{py(y):.1f}" x2="{W - R}" y2="{py(y):.1f}" stroke="{c}" '
                   f'stroke-dasharray="5,4"/>')
        out.append(f'<text x="{W - R + 10}" y="{T + 16 * key + 4}" fill="{c}">{label}</text>')
        key += 1
    out.append("</svg>")
    write(path, "\n".join(out) + "\n")


# ---- the run -----------------------------------------------------------------------------------------------
def check_args(args) -> list[int]:
    """Everything a command line cannot mean, before anything trains; returns the windows to run."""
    try:
        windows = [int(w) for w in args.windows.split(",")] if args.sweep else [args.window]
    except ValueError:
        raise swarr.SwarrError(f"--windows {args.windows!r}: expected comma-separated integers") from None
    for w in windows:
        swarr.check_window(w)
    for flag, v in (("--sft-steps", args.sft_steps), ("--rl-steps", args.rl_steps), ("--n-train", args.n_train),
                    ("--n-test", args.n_test), ("--samples", args.samples), ("--max-new-tokens", args.max_new_tokens),
                    ("--context", args.context)):
        if v is not None and v < 1:
            raise swarr.SwarrError(f"{flag} must be at least 1, got {v}")
    if not 0 <= args.rate <= 1:
        raise swarr.SwarrError(f"--rate must be between 0 and 1, got {args.rate}")
    steps = rl_settings(args)[0]  # every round samples at least one RL step (and fine-tunes 4 x as many)
    if not 1 <= args.rejection_rounds <= steps:
        raise swarr.SwarrError(f"--rejection-rounds must be between 1 and the RL steps ({steps}), "
                               f"got {args.rejection_rounds}")
    if args.rl_lr is not None and not args.rl_lr > 0:
        raise swarr.SwarrError(f"--rl-lr must be positive, got {args.rl_lr}")
    if args.data and not os.path.isfile(args.data):
        raise swarr.SwarrError(f"{args.data}: data file not found")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise swarr.SwarrError(f"--out {args.out}: exists and is not a folder")
    swarr.check_device(args.device)
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
    per = RL["prompts"] * RL["group"]
    steps = [restates[i:i + per] for i in range(0, len(restates), per)]
    train_ev = [h for h in rl_events if h.get("event") == "train" and "reward" in h]
    curve = dict(reward=[(h["step"], h["reward"]) for h in train_ev])
    if steps and ceiling:
        curve["restate_rate"] = [(i + 1, sum(c[0] for c in s) / max(1, sum(c[1] for c in s)))
                                 for i, s in enumerate(steps)]
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
        raise swarr.SwarrError(f"--window {max(windows)} is larger than the model's context ({base.cfg.max_pos})")
    print(f"  {args.model}: {base.cfg.arch}, {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters, "
          f"attention backend {swarr.backend_name()}")
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
            write(os.path.join(args.out, "results.json"), json.dumps(res, indent=2))
            sweep_svg(res, os.path.join(args.out, "sweep.svg"))
            write(os.path.join(args.out, "report.md"), sweep_report(res))
    if args.sweep:
        print("\n" + sweep_report(res))
        print(f"wrote {args.out}/: report.md, results.json, sweep.svg, log.jsonl, test.jsonl")
        return res

    one = per[args.window]
    res.update(rows=[sa_row] + one["rows"], rl_curve=one["rl_curve"], rejection=one["rejection"],
               collapse=one["collapse"])
    stages.start("decode speed")
    res["speed"] = speed(base, args)
    stages.end()
    res["wall_s"] = time.time() - t0
    res["checks"] = checks(res)
    write(os.path.join(args.out, "results.json"), json.dumps(res, indent=2))
    curve = {"reward (T=1 rollouts)": res["rl_curve"]["reward"]}
    if "restate_rate" in res["rl_curve"]:
        curve["lines restating (rollouts)"] = res["rl_curve"]["restate_rate"]
    rows = {r["row"]: r for r in res["rows"]}
    svg_curve(curve, {f"{k} greedy": rows[k]["accuracy"] for k in (SA, SWARR, MORE, REJECT) if k in rows},
              os.path.join(args.out, "rl_curve.svg"), f"SWARR: RL on SWA + SFT (W = {args.window}, seed {args.seed}; "
              f"python demo.py)")
    text = report(res)
    write(os.path.join(args.out, "report.md"), text)
    print("\n" + text)
    print(f"wrote {args.out}/: report.md, results.json, rl_curve.svg, log.jsonl, test.jsonl, models/")
    return res


# ---- the window sweep --------------------------------------------------------------------------------------
def sweep_report(res: dict) -> str:
    a = res["args"]
    lines = [f"# SWARR demo, window sweep: seed {a['seed']}, SFT restatement rate {a['rate']:g} per line, "
             f"{a['split']} split", "",
             f"{res['sa']['n']} held-out problems; greedy / T = 1 ({a['samples']} samples per problem). "
             + (f"Rejection sampling in {a['rejection_rounds']} rounds. " if a.get("rejection_rounds", 1) > 1 else "")
             + f"Wall time {res['wall_s']:.0f} s on {res['device']} ({torch.get_num_threads()} threads).", "",
             "| W | SA + SFT | SWA + SFT | SWARR | more SFT | rejection sampling | ceiling | SWARR recovers | "
             "RL collapsed |", "|---|---|---|---|---|---|---|---|---|"]
    for w, r in res["windows"].items():
        by = {x["row"]: x for x in r["rows"]}
        cell = lambda k: f"{by[k]['accuracy']:.2f} / {by[k]['sampled']:.2f}" if k in by else "n/a"
        lines.append(f"| {w} | {cell(SA)} | {cell(SWA)} | {cell(SWARR)} | {cell(MORE)} | {cell(REJECT)} | "
                     f"{cell(CEIL)} | {fmt(recovered(by, SWARR), '.0%')} | {'YES' if r['collapse'] else 'no'} |")
    lines += ["", "![accuracy against the window](sweep.svg)", ""]
    for w, r in res["windows"].items():
        rs = r["rejection"]
        lines += [f"## W = {w}", ""] + row_table(r["rows"], int(w)) + [
            "", f"Rejection sampling kept {rs['kept']} of {rs['drawn']} samples"
                f"{selected(rs) if 'sft_traces' in res else ''}.", ""]
    return "\n".join(lines)


def sweep_svg(res: dict, path: str):
    """Greedy accuracy of every row against W (res as run() returns it, or as read back from results.json,
    where the window keys are strings)."""
    by_w = {int(w): v for w, v in res["windows"].items()}
    ws = sorted(by_w)
    get = lambda k: [(w, next(x["accuracy"] for x in by_w[w]["rows"] if x["row"] == k)) for w in ws
                     if any(x["row"] == k for x in by_w[w]["rows"])]
    curve = {k: get(k) for k in (CEIL, SWARR, REJECT, MORE, SWA)}
    a = res["args"]
    svg_curve({k: v for k, v in curve.items() if v}, {"SA + SFT": res["sa"]["accuracy"]}, path,
              f"greedy accuracy vs window W (seed {a['seed']}; python demo.py --sweep)", xlabel="window W (keys)",
              xticks=ws)


def main(argv=None):
    args = parser().parse_args(argv)
    swarr.run_cli(run, args)


if __name__ == "__main__":
    main()
