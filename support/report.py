"""The demo's report: progress lines, summary statistics (95% Wilson intervals, gap recovered, restatement and
lookback), the markdown tables of report.md and the SVG figures.

    text = save_report(out, res, names, sft_batch=16, rl=RL, paper_32k=6.2)  # results.json, rl_curve.svg, report.md
    svg_curve({"reward": [(1, 0.2), (2, 0.5)]}, {"SA": 0.99}, "rl_curve.svg", "title")

Everything here summarises or renders numbers a run has measured. What the rows are, their budgets and the targets
belong to demo.py, which hands in the row labels (Rows) and the settings the text quotes.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import NamedTuple

import torch

from .safe_io import write_text_atomic as write  # reports are replaced whole or not at all


class Rows(NamedTuple):
    """The labels of the experiment's rows, by the part each plays in the report."""
    sa: str       # full attention, fine-tuned: the top of the gap
    swa: str      # the conversion: the bottom of the gap
    swarr: str    # SWA + SFT + RL
    more: str     # control: more SFT
    reject: str   # control: rejection sampling
    ceiling: str  # traces that restate at every line


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


class Log:
    """Training lines, indented under their stage, and every event dict kept (also in out/log.jsonl)."""

    def __init__(self):
        self.history = []

    def __call__(self, line):
        print(f"  {line}", flush=True)


# ---- statistics ----------------------------------------------------------------------------------------------
def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n (k may be a float count: mean x n)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def pair_sum(pairs) -> list[int]:
    """[sum of the first items, sum of the second items], e.g. of (restating lines, lines) counts."""
    pairs = list(pairs)
    return [sum(a for a, _ in pairs), sum(b for _, b in pairs)]


def trace_summary(counts: list, reach: list) -> dict:
    """Traces' per-line restatement rate from their (restating lines, lines) counts, and the distribution of how
    far back they reach (tokens): p10, median, p90, max, and every value sorted (lookbacks)."""
    reach = sorted(reach)
    q = lambda f: reach[min(len(reach) - 1, int(f * len(reach)))]  # noqa: E731
    return dict(restate_rate=sum(c[0] for c in counts) / max(1, sum(c[1] for c in counts)),
                lookback=dict(p10=q(0.1), median=q(0.5), p90=q(0.9), max=reach[-1]), lookbacks=reach)


def rl_curve(events: list, restates: list, per_step: int) -> dict:
    """RL over its steps: the reward of each train event, and, from the rollouts' (restating lines, lines) counts
    (per_step rollouts a step; none: no restate_rate), the share of their lines that restate."""
    steps = [restates[i:i + per_step] for i in range(0, len(restates), per_step)]
    train_ev = [h for h in events if h.get("event") == "train" and "reward" in h]
    curve = dict(reward=[(h["step"], h["reward"]) for h in train_ev])
    if steps:
        curve["restate_rate"] = [(i + 1, sum(c[0] for c in s) / max(1, sum(c[1] for c in s)))
                                 for i, s in enumerate(steps)]
    return curve


def recovered(rows: dict, name: str, names: Rows, key: str = "accuracy") -> float | None:
    """Share of the SA+SFT - SWA+SFT gap that row `name` wins back (greedy, or key="sampled")."""
    gap = rows[names.sa][key] - rows[names.swa][key]
    return (rows[name][key] - rows[names.swa][key]) / gap if gap > 0 and name in rows else None


# ---- report.md ---------------------------------------------------------------------------------------------
def row_line(r: dict) -> str:
    """One row's measurement as a progress line: accuracies with intervals, and the traces' restatement rate and
    lookback where they were counted."""
    line = (f"  {r['row']}: greedy {r['accuracy']:.3f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}], "
            f"T=1 {r['sampled']:.3f} [{r['sampled_ci'][0]:.2f}, {r['sampled_ci'][1]:.2f}] on {r['n']} problems")
    if "greedy_traces" in r:
        g, s = r["greedy_traces"], r["sampled_traces"]
        line += (f"; lines restating: greedy {g['restate_rate']:.2f}, T=1 {s['restate_rate']:.2f}; "
                 f"lookback median {g['lookback']['median']} (T=1 {s['lookback']['median']}) tokens")
    return line


def selected(rs: dict) -> str:
    """What rejection sampling's filter selected on the synthetic task: the restatement rate of the kept samples
    against all drawn ("" when there are no working lines to count)."""
    rate = lambda key: rs[key][0] / max(1, rs[key][1])  # noqa: E731
    return (f" (their lines restate {rate('kept_lines'):.2f} of the time, all {rs['drawn']} drawn "
            f"{rate('drawn_lines'):.2f})") if rs.get("drawn_lines", [0, 0])[1] else ""


def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def row_table(rows: list, W: int, names: Rows) -> list[str]:
    """The rows as a markdown table: accuracy with intervals, gap recovered, restatement and lookback."""
    by = {r["row"]: r for r in rows}
    lines = ["| row | greedy [95% CI] | T=1 [95% CI] | gap recovered greedy / T=1 | lines restating greedy / T=1 "
             f"| lookback median (p90), greedy / T=1 | traces with lookback <= {W}, T=1 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = (f"{fmt(recovered(by, r['row'], names), '.0%')} / "
               f"{fmt(recovered(by, r['row'], names, 'sampled'), '.0%')}"
               if r["row"] not in (names.sa, names.swa) and names.sa in by else "-")
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


def report(res: dict, names: Rows, sft_batch: int, rl: dict, paper_32k: float) -> str:
    """report.md of one run. rl: the RL settings the budget sentence quotes (prompts, group, temperature);
    paper_32k: the paper's SWA/SA decode speed-up at 32k context."""
    a, W = res["args"], res["args"]["window"]
    b = res["budget"]
    lines = [f"# SWARR demo: seed {a['seed']}, window W = {W}, SFT restatement rate {a['rate']:g} per line, "
             f"evaluated on the {a['split']} split", "",
             f"Model {os.path.relpath(a['model'])}, data {a['data'] or 'synthetic (data/synth.py)'}. "
             f"{res['rows'][0]['n']} held-out problems; greedy and {a['samples']} samples per problem at T = 1, "
             f"max {a['max_new_tokens']} new tokens; 95% Wilson intervals. Wall time {res['wall_s']:.0f} s on "
             f"{res['device']} ({torch.get_num_threads()} threads).", ""]
    lines += row_table(res["rows"], W, names)
    rs = res["rejection"]
    source = ("from SWA + SFT" if rs.get("rounds", 1) == 1 else
              f"in {rs['rounds']} rounds, each from the model the round before fine-tuned (the first from SWA + SFT),")
    planned, tuned = b["sequences"], rs.get("sequences", b["sequences"])
    tuned_text = (f"{tuned} sequences ({b['sft_steps']} steps of {sft_batch}); more SFT and the ceiling "
                  f"fine-tuned on as many" if tuned == planned else
                  f"{tuned} sequences, not the {planned} planned (a round that kept nothing does not train); more SFT "
                  f"and the ceiling fine-tuned on {planned}")
    lines += ["", f"Budgets: RL sampled {b['rl_samples']} completions ({res['rl_steps']} steps x {rl['prompts']} "
              f"prompts "
              f"x {rl['group']}) and trained on all of them. Rejection sampling drew {rs['drawn']} {source} on "
              f"the same prompts at T = {rl['temperature']:g}, kept {rs['kept']} that the same reward accepts"
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
                  f"(The paper reports about {paper_32k}x throughput over SA at 32k context for its models.)", ""]
    lines += ["![reward, restatement rate and accuracy over RL steps](rl_curve.svg)", ""]
    return "\n".join(lines)


def sweep_report(res: dict, names: Rows) -> str:
    """report.md of a --sweep run: one line per window, then each window's table."""
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
        lines.append(f"| {w} | {' | '.join(cell(k) for k in names)} | "
                     f"{fmt(recovered(by, names.swarr, names), '.0%')} | {'YES' if r['collapse'] else 'no'} |")
    lines += ["", "![accuracy against the window](sweep.svg)", ""]
    for w, r in res["windows"].items():
        rs = r["rejection"]
        lines += [f"## W = {w}", ""] + row_table(r["rows"], int(w), names) + [
            "", f"Rejection sampling kept {rs['kept']} of {rs['drawn']} samples"
                f"{selected(rs) if 'sft_traces' in res else ''}.", ""]
    return "\n".join(lines)


def save_report(out: str, res: dict, names: Rows, **quoted) -> str:
    """results.json, the figure (rl_curve.svg, or sweep.svg for a --sweep run) and report.md, each replaced whole;
    returns report.md's text. quoted: report()'s sft_batch, rl and paper_32k (not needed for a sweep)."""
    write(os.path.join(out, "results.json"), json.dumps(res, indent=2))
    if "windows" in res:
        sweep_svg(res, names, os.path.join(out, "sweep.svg"))
        text = sweep_report(res, names)
    else:
        rl_svg(res, names, os.path.join(out, "rl_curve.svg"))
        text = report(res, names, **quoted)
    write(os.path.join(out, "report.md"), text)
    return text


# ---- figures -----------------------------------------------------------------------------------------------
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


def rl_svg(res: dict, names: Rows, path: str):
    """rl_curve.svg: the rollouts' reward (and restatement rate) over RL steps, against the rows' greedy accuracy."""
    curve = {"reward (T=1 rollouts)": res["rl_curve"]["reward"]}
    if "restate_rate" in res["rl_curve"]:
        curve["lines restating (rollouts)"] = res["rl_curve"]["restate_rate"]
    rows, a = {r["row"]: r for r in res["rows"]}, res["args"]
    svg_curve(curve, {f"{k} greedy": rows[k]["accuracy"] for k in (names.sa, names.swarr, names.more, names.reject)
                      if k in rows},
              path, f"SWARR: RL on SWA + SFT (W = {a['window']}, seed {a['seed']}; python demo.py)")


def sweep_svg(res: dict, names: Rows, path: str):
    """Greedy accuracy of every row against W (res as demo.run returns it, or as read back from results.json,
    where the window keys are strings)."""
    by_w = {int(w): v for w, v in res["windows"].items()}
    ws = sorted(by_w)
    get = lambda k: [(w, next(x["accuracy"] for x in by_w[w]["rows"] if x["row"] == k)) for w in ws
                     if any(x["row"] == k for x in by_w[w]["rows"])]
    curve = {k: get(k) for k in (names.ceiling, names.swarr, names.reject, names.more, names.swa)}
    a = res["args"]
    svg_curve({k: v for k, v in curve.items() if v}, {"SA + SFT": res["sa"]["accuracy"]}, path,
              f"greedy accuracy vs window W (seed {a['seed']}; python demo.py --sweep)", xlabel="window W (keys)",
              xticks=ws)
