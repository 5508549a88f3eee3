"""The main job: the SWARR finding, end to end, on the embedded default (a CPU, a few minutes).

    python demo.py [--seed 0] [--window 40] [--quick] [--model DIR --data FILE] [--out runs/demo]

From one pretrained self-attention (SA) model (data/tiny-sa, 0.83M parameters, pretrained by data/pretrain.py)
and one synthetic task (data/synth.py: sums of products, whose SFT traces are written "for SA"), it runs
  1. SA + SFT        the full-attention baseline                          (train_sft.run)
  2. SWA + SFT       the conversion: same data, same steps, window W      (train_sft.run --window W)
  3. SWARR           2, then on-policy REINFORCE, reward = correctness    (train_rl.run)
  4. control         2, then as many more SFT sequences as RL trains on   (train_sft.run)
and evaluates every row greedily on held-out problems never seen in training (swarr.evaluate). The training
and evaluation loops are those of train_sft.py, train_rl.py and `swarr.py eval`; this file only wires them up.

Besides accuracy it shows the mechanism: the task has two trace styles, "direct:" (reads every term from the
question, ever further back: fine for SA) and "step by step:" (restates what is left, so each line needs only
the line before it). 80% of the SFT traces are direct. Under a window of 40 tokens the direct style cannot be
followed; RL, which trains on the SWA model's own trajectories, moves it to the window-friendly style.

Writes to --out: report.md (the table), results.json (every number), rl_curve.svg (reward, window-friendly share
and held-out accuracy over the RL steps), log.jsonl (every training event), models/{sa-sft,swa-sft,swarr,control}/
(the four models, HF format) and test.jsonl (the held-out problems), so that for example
    python swarr.py eval --model runs/demo/models/swarr --data runs/demo/test.jsonl
grades a row again.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

import bench
import swarr
import train_rl
import train_sft
import training

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "data"))
import synth  # noqa: E402  (data/synth.py: the embedded task)

SA, SWA, SWARR, CONTROL = "SA + SFT", "SWA + SFT", "SWARR (SWA + SFT + RL)", "control (SWA + SFT + more SFT)"
FOLDERS = {SA: "sa-sft", SWA: "swa-sft", SWARR: "swarr", CONTROL: "control"}  # out/models/<folder>
DEFAULT_MODEL = os.path.join(HERE, "data", "tiny-sa")

# The defaults were found on the embedded model and task (data/README.md has the search and its results).
SFT = dict(steps=300, batch=16, lr=1e-3, warmup=10)
RL = dict(steps=40, prompts=8, group=8, lr=2e-4, temperature=1.0, micro_batch=32)
QUICK_RL = dict(steps=20, lr=3e-4)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="data split, batch order, sampling (default 0)")
    p.add_argument("--window", type=int, default=40, help="the SWA window W, keys per query (default 40)")
    p.add_argument("--quick", action="store_true", help="RL 20 steps at a higher lr, 100 test problems (~1.5 min)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="pretrained SA checkpoint (HF folder; default data/tiny-sa)")
    p.add_argument("--data", default=None, help="GSM8K/MATH/JSONL file instead of the synthetic task "
                                                "(split into train and held-out; style shares are then n/a)")
    p.add_argument("--n-train", type=int, default=4000, help="training problems (SFT and RL prompts)")
    p.add_argument("--n-test", type=int, default=None, help="held-out problems (default 200, --quick 100)")
    p.add_argument("--sft-steps", type=int, default=SFT["steps"])
    p.add_argument("--rl-steps", type=int, default=None, help=f"default {RL['steps']}, --quick {QUICK_RL['steps']}")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--context", type=int, default=32768, help="context of the decode speed / KV memory comparison")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="folder for report.md, results.json, rl_curve.svg")
    return p


# ---- progress over the whole run ---------------------------------------------------------------------------
class Stages:
    """`[2/6] SWA + SFT ...  elapsed 30s  ETA 75s` at the start of each stage. The ETA weighs the stages by
    their cost measured on the 2-core dev CPU and rescales by how fast this run's weighed stages have gone (the
    load stage weighs 0: on a first run it includes compiling csrc/, which says nothing about the rest)."""

    def __init__(self, stages: dict):
        self.cost, self.names, self.t0, self.done, self.busy = stages, list(stages), time.time(), 0.0, 0.0

    def start(self, name: str):
        self.t_start = time.time()
        rate = self.busy / self.done if self.done else 1.0
        eta = rate * (sum(self.cost.values()) - self.done)
        print(f"\n[{self.names.index(name) + 1}/{len(self.names)}] {name}  elapsed {self.t_start - self.t0:.0f}s  "
              f"ETA {eta:.0f}s", flush=True)

    def end(self, name: str):
        if self.cost[name]:
            self.done += self.cost[name]
            self.busy += time.time() - self.t_start


# ---- data --------------------------------------------------------------------------------------------------
def task(args, tok, cfg):
    """(sft_pairs, rl_problems, test_records) for the synthetic task, or for --data (a GSM8K/MATH/JSONL file)."""
    n_test = args.n_test or (100 if args.quick else 200)
    if args.data:
        recs = training.read_records(args.data)
        train, test = training.split_held_out(recs, n_test / len(recs), args.seed)
        train = train[:args.n_train]
        sft = [train_sft.sft_pair(tok, cfg, r) for r in train]
        problems = [{"prompt": swarr.record_prompt(tok, r), "answer": r["answer"], "split": "train"} for r in train]
        tests = [{"prompt": swarr.record_prompt(tok, r), "answer": r["answer"]} for r in test]
        return sft, problems, tests
    train, test = synth.split(args.n_train, n_test, args.seed)
    eot = train_sft.end_of_turn(tok, cfg)
    sft = [(tok.chat(p), r + eot) for p, r in synth.sft_pairs(train, seed=args.seed)]
    problems = [{"prompt": tok.chat(p.prompt), "answer": str(p.answer), "split": "train"} for p in train]
    tests = [{"prompt": tok.chat(p.prompt), "answer": str(p.answer)} for p in test]
    return sft, problems, tests


# ---- the four rows -----------------------------------------------------------------------------------------
def sft(model, tok, pairs, args, window, steps, seed, log):
    """train_sft.run with the demo's settings; returns the fine-tuned model (trained in place)."""
    a = train_sft.parser().parse_args(
        ["--out", "", "--max-steps", str(steps), "--batch-size", str(SFT["batch"]), "--lr", str(SFT["lr"]),
         "--warmup", str(SFT["warmup"]), "--min-lr-ratio", "0.1", "--eval-every", "0", "--log-every", "50",
         "--seed", str(seed), "--device", args.device] + (["--window", str(window)] if window else []))
    return train_sft.run(a, model, tok, pairs, None, log=log, history=log.history)


def rl_steps(args) -> int:
    return args.rl_steps or (QUICK_RL if args.quick else RL)["steps"]


def rl(model, tok, problems, tests, args, log, styles: list):
    """train_rl.run with the demo's settings. `styles` collects the style of every training rollout."""
    steps, lr = rl_steps(args), (QUICK_RL if args.quick else RL)["lr"]
    a = train_rl.parser().parse_args(
        ["--out", "", "--steps", str(steps), "--prompts-per-step", str(RL["prompts"]), "--group-size",
         str(RL["group"]), "--temperature", str(RL["temperature"]), "--lr", str(lr), "--max-new-tokens",
         str(args.max_new_tokens), "--micro-batch", str(RL["micro_batch"]), "--eval-every", "5" if args.quick else "10",
         "--eval-n", str(len(tests)), "--show-every", str(steps), "--seed", str(args.seed), "--device", args.device])

    def reward(completion, problem):  # the default reward (correctness), watching which style each rollout took
        if problem.get("split") == "train":
            styles.append(synth.style_of(completion))
        return train_rl.default_reward(completion, problem)

    return train_rl.run(a, model, tok, problems, tests, reward, log=log, history=log.history)


class Log:
    """Training lines, indented under their stage, and every event dict kept (also in out/log.jsonl)."""

    def __init__(self):
        self.history = []

    def __call__(self, line):
        print(f"  {line}", flush=True)


def measure(model, tok, tests, args, name, window):
    """Greedy accuracy on the held-out problems, plus the mechanism: which style the model picks greedily and
    at T = 1, and how far back its greedy traces reach (synth.lookback, in tokens)."""
    greedy, rows = swarr.evaluate(model, tok, tests, max_new_tokens=args.max_new_tokens, batch_size=50,
                                  seed=args.seed, progress=False)
    out = dict(row=name, window=window, accuracy=greedy["accuracy"], mean_length=greedy["mean_length"],
               truncated=greedy["truncated"], n=greedy["n"])
    if not args.data:
        _, sampled = swarr.evaluate(model, tok, tests, max_new_tokens=args.max_new_tokens, batch_size=50,
                                    temperature=1.0, seed=args.seed + 1, progress=False)
        near = lambda rs: sum(synth.style_of(r["completion"]) == synth.NEAR for r in rs) / len(rs)
        reach = [synth.lookback(tok, t["prompt"] + r["completion"], len(t["prompt"])) for t, r in zip(tests, rows)]
        out.update(near_greedy=near(rows), near_t1=near(sampled), lookback_median=statistics.median(reach))
    print(f"  {name}: greedy accuracy {out['accuracy']:.3f} on {out['n']} held-out problems"
          + (f"; window-friendly style: greedy {out['near_greedy']:.2f}, at T=1 {out['near_t1']:.2f}; "
             f"median lookback {out['lookback_median']:.0f} tokens" if not args.data else ""), flush=True)
    return out


def speed(model, args):
    """Decode tokens/s and KV-cache bytes of this model's shape as SA and as SWA, batch 16, with caches holding
    --context tokens of random keys/values (bench.py e2e's measurement, through swarr.decode_loop, the generation
    path itself). A context that does not fit in memory is reported as such."""
    out = {}
    for name, w in (("SA", None), ("SWA", args.window)):
        m = copy.deepcopy(model).eval()
        m.set_window(w)
        out[name] = bench.decode_if_fits(m, B=16, C=args.context, steps=8)
    return out


# ---- report ------------------------------------------------------------------------------------------------
def checks(res: dict) -> dict:
    """The paper's finding as this project's targets for the default run state it (README.md), each True or False."""
    acc, rows = {r["row"]: r["accuracy"] for r in res["rows"]}, {r["row"]: r for r in res["rows"]}
    gap = acc[SA] - acc[SWA]
    out = {"SA+SFT >= 0.85": acc[SA] >= 0.85, "gap >= 25 points": gap >= 0.25,
           "SWARR recovers >= 60% of the gap": gap > 0 and (acc[SWARR] - acc[SWA]) / gap >= 0.6,
           "control recovers less than SWARR": acc[CONTROL] < acc[SWARR]}
    if "style" in res:  # measured on the held-out problems at T = 1, before (SWA + SFT) and after RL
        out["window-friendly share rises under RL"] = rows[SWARR]["near_t1"] > rows[SWA]["near_t1"]
    return out


def write(path: str, text: str):
    """Write a file whole or not at all (a temporary file, then a rename): an interrupted run never leaves a
    previous run's report half overwritten."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def report(res: dict) -> str:
    rows, a = {r["row"]: r for r in res["rows"]}, res["args"]
    sa, swa, swarr_, ctrl = (rows[k]["accuracy"] for k in (SA, SWA, SWARR, CONTROL))
    gap = sa - swa
    rec = lambda x: (x - swa) / gap if gap > 0 else None
    mech = "style" in res
    lines = [f"# SWARR demo: seed {a['seed']}, window W = {a['window']}, model {os.path.relpath(a['model'])}, "
             f"data {a['data'] or 'synthetic (data/synth.py)'}", "",
             f"Held-out problems: {res['rows'][0]['n']}, greedy decoding, max {a['max_new_tokens']} new tokens. "
             f"Wall time {res['wall_s']:.0f} s on {res['device']} ({torch.get_num_threads()} threads).", "",
             "| row | accuracy | share of the gap recovered | window-friendly style: greedy | at T=1 |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        got = fmt(rec(r["accuracy"]), ".0%") if r["row"] in (SWARR, CONTROL) else "-"
        share = f"{r['near_greedy']:.2f} | {r['near_t1']:.2f}" if mech else "n/a | n/a"
        lines.append(f"| {r['row']} | {r['accuracy']:.3f} | {got} | {share} |")
    s = res["speed"]
    ck = res["checks"]
    lines += ["", f"Gap SWA+SFT vs SA+SFT: {gap * 100:.1f} points. SWARR recovers {fmt(rec(swarr_), '.0%')} of it; "
              f"the SFT control (as many more training sequences as RL's rollouts) recovers {fmt(rec(ctrl), '.0%')}.", ""]
    if mech:
        st = res["style"]
        lines += [f"Mechanism: {st['sft_near_share']:.0%} of the SFT traces are in the window-friendly style. "
                  f"During RL the share of rollouts in that style went {st['rl_first']:.2f} (step 1) -> "
                  f"{st['rl_last']:.2f} (step {st['rl_steps']}). A trace can only be followed by the SWA model if "
                  f"it reuses nothing {a['window']} or more tokens back (lookback < W).", ""]
    lines += ["The finding, checked (the targets of the default run): " + "; ".join(
        f"{k} {'yes' if v else 'NO'}" for k, v in ck.items()) + ".", ""]
    ok = all(s[k]["status"] == "ok" for k in ("SA", "SWA"))
    tps = lambda k: f"{s[k]['tok_s']:.0f}" if s[k]["status"] == "ok" else s[k]["status"]
    ratio = f"{s['SWA']['tok_s'] / s['SA']['tok_s']:.1f}x" if ok else "n/a"
    lines += [f"Decode at {a['context']} tokens of context, batch 16, this model's shape with random keys/values in "
              f"the caches (bench.py e2e's measurement; speeds depend on the machine and its load):", "",
              "| | decode tokens/s | KV-cache bytes |", "|---|---|---|",
              f"| SA | {tps('SA')} | {s['SA']['kv_bytes']:,} |",
              f"| SWA (W = {a['window']}) | {tps('SWA')} | {s['SWA']['kv_bytes']:,} |",
              f"| SWA / SA | {ratio} | {s['SA']['kv_bytes'] / s['SWA']['kv_bytes']:.0f}x less |", "",
              f"(The paper reports about {bench.PAPER_32K}x throughput over SA at 32k context for its models.)", "",
              "![accuracy and reward over RL steps](rl_curve.svg)", ""]
    return "\n".join(lines)


def svg_curve(curve: dict, hlines: dict, path: str, title: str, W: int = 640, H: int = 360):
    """A line chart in plain SVG (no plotting library): curve = {label: [(step, value 0..1)]}, hlines = {label: y}."""
    steps = [x for pts in curve.values() for x, _ in pts] or [1]
    x0, x1, L, R, T, B = 0, max(steps), 60, 200, 30, 40
    px = lambda x: L + (W - L - R) * x / max(1, x1 - x0)
    py = lambda y: T + (H - T - B) * (1 - y)
    colors = ["#1f77b4", "#2ca02c", "#d62728", "#7f7f7f", "#9467bd"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="18" font-size="14">{title}</text>']
    for y in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{L}" y1="{py(y):.1f}" x2="{W - R}" y2="{py(y):.1f}" stroke="#ddd"/>'
                   f'<text x="{L - 8}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    for x in sorted({0, x1 // 2, x1}):
        out.append(f'<text x="{px(x):.1f}" y="{H - B + 16}" text-anchor="middle">{x}</text>')
    out.append(f'<text x="{(L + W - R) / 2:.0f}" y="{H - 8}" text-anchor="middle">RL step</text>')
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
        out.append(f'<line x1="{L}" y1="{py(y):.1f}" x2="{W - R}" y2="{py(y):.1f}" stroke="{c}" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{W - R + 10}" y="{T + 16 * key + 4}" fill="{c}">{label}</text>')
        key += 1
    out.append("</svg>")
    write(path, "\n".join(out) + "\n")


# ---- the run -----------------------------------------------------------------------------------------------
def run(args) -> dict:
    swarr.check_window(args.window)
    for flag, v in (("--sft-steps", args.sft_steps), ("--rl-steps", args.rl_steps), ("--n-train", args.n_train),
                    ("--n-test", args.n_test), ("--max-new-tokens", args.max_new_tokens), ("--context", args.context)):
        if v is not None and v < 1:
            raise swarr.SwarrError(f"{flag} must be at least 1, got {v}")
    if args.data and not os.path.isfile(args.data):
        raise swarr.SwarrError(f"{args.data}: data file not found")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise swarr.SwarrError(f"--out {args.out}: exists and is not a folder")
    bench.check_device(args.device)
    torch.manual_seed(args.seed)
    t0 = time.time()
    rl_cost = 20 if args.quick else 33
    stages = Stages({"load": 0, SA: 24, SWA: 24, SWARR: rl_cost, CONTROL: 12, "decode speed": 10})
    stages.start("load")
    base, tok = swarr.load(args.model, torch.float32, args.device)
    if args.window > base.cfg.max_pos:  # checked now, not after the first stage has trained
        raise swarr.SwarrError(f"--window {args.window} is larger than the model's context ({base.cfg.max_pos})")
    print(f"  {args.model}: {base.cfg.arch}, {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters, "
          f"attention backend {swarr.backend_name()}")
    pairs, problems, tests = task(args, tok, base.cfg)
    print(f"  {len(pairs)} SFT pairs / RL prompts, {len(tests)} held-out problems")
    if os.path.isdir(args.out) and os.listdir(args.out):
        print(f"  note: {args.out}/ exists; this run replaces what is in it")
    os.makedirs(args.out, exist_ok=True)
    write(os.path.join(args.out, "test.jsonl"), "".join(json.dumps(t) + "\n" for t in tests))  # prompts as seen
    stages.end("load")
    log, results, styles = Log(), [], []

    def stage(name, make, window):
        stages.start(name)
        model = make()
        results.append(measure(model, tok, tests, args, name, window))
        swarr.save(model, tok, os.path.join(args.out, "models", FOLDERS[name]))  # atomic; `swarr.py eval` reads it
        stages.end(name)
        return model

    stage(SA, lambda: sft(copy.deepcopy(base), tok, pairs, args, None, args.sft_steps, args.seed, log), None)
    swa = stage(SWA, lambda: sft(copy.deepcopy(base), tok, pairs, args, args.window, args.sft_steps,
                                         args.seed, log), args.window)
    stage(SWARR, lambda: rl(copy.deepcopy(swa), tok, problems, tests, args, log, styles), args.window)
    # The control: as many more SFT sequences as RL trained on (steps x prompts x group).
    extra = rl_steps(args) * RL["prompts"] * RL["group"] // SFT["batch"]
    stage(CONTROL,
          lambda: sft(copy.deepcopy(swa), tok, pairs, args, args.window, extra, args.seed + 1, log), args.window)
    stages.start("decode speed")
    spd = speed(base, args)
    stages.end("decode speed")

    per = RL["prompts"] * RL["group"]
    train_ev = [h for h in log.history if h.get("event") == "train" and "reward" in h]
    evals = [h for h in log.history if h.get("event") == "eval" and "greedy_accuracy" in h]
    res = dict(args=vars(args), device=args.device, rows=results, speed=spd, rl_steps=rl_steps(args), control_steps=extra,
               rl_curve=dict(reward=[(h["step"], h["reward"]) for h in train_ev],
                             greedy_accuracy=[(h["step"], h["greedy_accuracy"]) for h in evals]),
               wall_s=time.time() - t0)
    if not args.data:
        share = [sum(s == synth.NEAR for s in styles[i:i + per]) / per for i in range(0, len(styles), per)]
        res["rl_curve"]["window_friendly_share"] = [(i + 1, x) for i, x in enumerate(share)]
        res["style"] = dict(sft_near_share=synth.NEAR_SHARE, rl_first=share[0], rl_last=share[-1], rl_steps=len(share))
    res["checks"] = checks(res)
    write(os.path.join(args.out, "results.json"), json.dumps(res, indent=2))
    write(os.path.join(args.out, "log.jsonl"), "".join(json.dumps(h) + "\n" for h in log.history))
    curve = {"reward (T=1 rollouts)": res["rl_curve"]["reward"],
             "held-out accuracy (greedy)": res["rl_curve"]["greedy_accuracy"]}
    if "window_friendly_share" in res["rl_curve"]:
        curve["window-friendly share"] = res["rl_curve"]["window_friendly_share"]
    svg_curve(curve, {"SA + SFT accuracy": results[0]["accuracy"], "control accuracy": results[3]["accuracy"]},
              os.path.join(args.out, "rl_curve.svg"), f"SWARR: RL on the SWA + SFT model (W = {args.window})")
    text = report(res)
    write(os.path.join(args.out, "report.md"), text)
    print("\n" + text)
    print(f"wrote {args.out}/: report.md, results.json, rl_curve.svg, log.jsonl, test.jsonl, models/")
    return res


def main(argv=None):
    args = parser().parse_args(argv)
    swarr.run_cli(run, args)


if __name__ == "__main__":
    main()
