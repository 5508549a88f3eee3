"""The demo's report: progress lines, summary statistics (95% Wilson intervals for greedy accuracy; a seeded cluster
bootstrap over problems for sampled accuracy, paired differences and gap recovered; restatement and lookback), the
markdown tables of report.md and the SVG figures.

    text = save_report(out, res, names, rl=RL, paper_32k=6.2)  # results.json, rl_curve.svg, report.md
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

import numpy as np
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
        self.history, self.runs = [], []  # runs: the settings of each training run, in order

    def __call__(self, line):
        print(f"  {line}", flush=True)

    def ran(self, first: int, lr: float) -> dict:
        """What the training runs since runs[first] did together: optimizer steps, batch, sequences, schedule."""
        runs = self.runs[first:]
        return dict(steps=sum(r["steps"] for r in runs), batch=runs[0]["batch"] if runs else 0, lr=lr,
                    sequences=sum(r["steps"] * r["batch"] for r in runs), schedule=runs[0]["schedule"] if runs else "-")


# ---- statistics ----------------------------------------------------------------------------------------------
def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n (k may be a float count: mean x n)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


# Samples of one problem are not independent (an easy problem is solved by most of its samples), so intervals on
# sampled accuracy resample problems, not samples: a cluster bootstrap. One seeded set of resamples serves every
# row of a run, so two rows are compared on the same resampled problems (paired).
BOOT = 2000  # bootstrap resamples


def resamples(n: int, seed: int, b: int = BOOT) -> np.ndarray:
    """(b, n) problem indices drawn with replacement, from a generator seeded by `seed` alone."""
    return np.random.default_rng([seed, n]).integers(0, n, size=(b, n))


def per_problem(x) -> np.ndarray:
    """(n,) per-problem correctness, or (n, k) of k samples each -> (n,) per-problem accuracy."""
    x = np.asarray(x, dtype=float)
    return x if x.ndim == 1 else x.mean(1)


def percentile_ci(values) -> tuple[float, float] | None:
    """The 2.5th and 97.5th percentiles of bootstrap values (None when most are undefined, e.g. no gap)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) if len(v) > 0.9 * np.size(values) else None


def clustered(x, seed: int) -> tuple[float, float]:
    """95% interval of the mean accuracy of (n, k) samples, clustered by problem (percentile cluster bootstrap)."""
    p = per_problem(x)
    return percentile_ci(p[resamples(len(p), seed)].mean(1))


def design_effect(x) -> float:
    """How much clustering by problem inflates the variance of mean accuracy over (n, k) samples, against k n
    independent samples: k Var(problem means) / Var(samples) (1 + (k - 1) x the intra-problem correlation).
    k when a problem's samples always agree, 1 when they are independent, 0 when every problem has the same mean."""
    x = np.asarray(x, dtype=float)
    total = x.var()
    return float(x.shape[1] * x.mean(1).var() / total) if total > 0 else float("nan")


def paired(a, b, seed: int) -> tuple[float, tuple[float, float] | None]:
    """Row a minus row b, per problem (greedy (n,) or sampled (n, k) correctness on the same problems): the mean
    difference and its 95% cluster-bootstrap interval."""
    d = per_problem(a) - per_problem(b)
    return float(d.mean()), percentile_ci(d[resamples(len(d), seed)].mean(1))


def recovered_ci(row, sa, swa, seed: int) -> tuple[float, float] | None:
    """95% cluster-bootstrap interval of the share of the SA - SWA gap that `row` wins back (per-problem
    correctness of the three rows on the same problems): (row - swa) / (sa - swa) on each resample."""
    idx = resamples(len(per_problem(row)), seed)
    m = lambda x: per_problem(x)[idx].mean(1)  # noqa: E731
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = m(sa) - m(swa)
        return percentile_ci(np.where(gap > 0, (m(row) - m(swa)) / gap, np.nan))


def statistics(rows: list, names: "Rows", seed: int, pairs=(), base: list | None = None) -> list:
    """Adds each row's gap-recovered intervals (greedy, sampled) against SA and SWA (found in `base` or `rows`) and
    returns the paired differences of `pairs` ((a, b) row labels): [{a, b, greedy, greedy_ci, sampled, sampled_ci}]."""
    by = {r["row"]: r for r in (base or []) + rows}
    pp = lambda name, key: by[name]["per_problem"][key]  # noqa: E731
    if names.sa in by and names.swa in by:
        for r in rows:
            if r["row"] not in (names.sa, names.swa) and "per_problem" in r:
                r["recovered_ci"] = {key: recovered_ci(pp(r["row"], key), pp(names.sa, key), pp(names.swa, key), seed)
                                     for key in ("greedy", "sampled")}
    out = []
    for a, b in pairs:
        if a in by and b in by:
            (g, gci), (s, sci) = (paired(pp(a, k), pp(b, k), seed) for k in ("greedy", "sampled"))
            out.append(dict(a=a, b=b, greedy=g, greedy_ci=gci, sampled=s, sampled_ci=sci))
    return out


def by_pattern(rows: list, names: list, seed: int) -> list:
    """Sampled accuracy by restatement pattern (a sample's lines restate: none, some, all), for the rows `names`:
    [{row, pattern, samples, accuracy, ci}], the interval clustered by problem (problems resampled; each keeps its
    samples of that pattern)."""
    out = []
    for r in rows:
        if r["row"] not in names or "patterns" not in r:
            continue
        correct = np.asarray(r["per_problem"]["sampled"], dtype=float)
        pat = np.asarray(r["patterns"]).reshape(correct.shape)
        idx = resamples(len(correct), seed)
        for p in ("none", "some", "all"):
            hit = (pat == p).astype(float)
            if hit.sum():
                with np.errstate(divide="ignore", invalid="ignore"):
                    boot = (correct * hit).sum(1)[idx].sum(1) / hit.sum(1)[idx].sum(1)
                out.append(dict(row=r["row"], pattern=p, samples=int(hit.sum()),
                                accuracy=float((correct * hit).sum() / hit.sum()), ci=percentile_ci(boot)))
    return out


def pair_sum(pairs) -> list[int]:
    """[sum of the first items, sum of the second items], e.g. of (restating lines, lines) counts."""
    pairs = list(pairs)
    return [sum(a for a, _ in pairs), sum(b for _, b in pairs)]


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


def collapse_of(history: list) -> str | None:
    """The RL collapse train_rl reported in these events, if any."""
    return next((h["reason"] for h in history if h.get("event") == "collapse"), None)


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


def share(x, ci=None) -> str:
    """A share as a percentage, with its interval if known: 98% [95, 100]."""
    return fmt(x, ".0%") + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci and x is not None else "")


def interval(x, ci, scale: float = 1.0, spec: str = ".3f") -> str:
    """x [lo, hi], each times `scale`; [n/a] when the interval is undefined (too few samples)."""
    lo_hi = f"{format(scale * ci[0], spec)}, {format(scale * ci[1], spec)}" if ci else "n/a"
    return f"{format(scale * x, spec)} [{lo_hi}]"


def row_table(rows: list, W: int, names: Rows, base: list | None = None) -> list[str]:
    """The rows as a markdown table: accuracy with intervals, gap recovered, restatement and lookback (gap
    recovered against the SA and SWA rows of `base`, if they are not among `rows`)."""
    by = {r["row"]: r for r in (base or []) + rows}
    lines = ["| row | greedy [95% CI] | T=1 [95% CI, clustered] | gap recovered [95% CI], greedy / T=1 | lines "
             f"restating greedy / T=1 | lookback median (p90), greedy / T=1 | traces with lookback <= {W}, T=1 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = r.get("recovered_ci", {})
        rec = (f"{share(recovered(by, r['row'], names), ci.get('greedy'))} / "
               f"{share(recovered(by, r['row'], names, 'sampled'), ci.get('sampled'))}"
               if r["row"] not in (names.sa, names.swa) and names.sa in by and names.swa in by else "-")
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


INTERVALS = ("95% intervals: Wilson for greedy accuracy (one completion per problem); for T = 1 accuracy, paired "
             f"differences and gap recovered, a seeded cluster bootstrap over problems ({BOOT} resamples, "
             "percentiles), so the samples of one problem count as one unit")


def report(res: dict, names: Rows, rl: dict, paper_32k: float) -> str:
    """report.md of one run. rl: the RL settings the budget sentence quotes (prompts, group, temperature);
    paper_32k: the paper's SWA/SA decode speed-up at 32k context."""
    a, W = res["args"], res["args"]["window"]
    b = res["budget"]
    lines = [f"# SWARR demo: seed {a['seed']}, window W = {W}, SFT restatement rate {a['rate']:g} per line, "
             f"evaluated on the {a['split']} split", "",
             f"Model {os.path.relpath(a['model'])}, data {a['data'] or 'synthetic (data/synth.py)'}. "
             f"{res['rows'][0]['n']} held-out problems; greedy and {a['samples']} samples per problem at T = 1, "
             f"max {a['max_new_tokens']} new tokens. {INTERVALS}. Wall time {res['wall_s']:.0f} s on "
             f"{res['device']} ({torch.get_num_threads()} threads).", ""]
    lines += row_table(res["rows"], W, names)
    rs = res["rejection"]
    source = ("from SWA + SFT" if rs.get("rounds", 1) == 1 else
              f"in {rs['rounds']} rounds, each from the model the round before fine-tuned (the first from SWA + SFT),")
    lines += ["", f"Budgets: RL sampled {b['rl_samples']} completions ({res['rl_steps']} steps x {rl['prompts']} "
              f"prompts x {rl['group']}) and trained on all of them. Rejection sampling drew {rs['drawn']} {source} "
              f"on the same prompts at T = {rl['temperature']:g} and kept {rs['kept']} that the same reward accepts"
              f"{selected(rs) if 'sft_traces' in res else ''}. What each method after the conversion ran (matched: "
              f"optimizer steps, batch, sequences and schedule; tuned: each its own learning rate, chosen on the "
              f"validation split from the same grid):", "",
              "| row | optimizer steps | batch (sequences) | sequences | schedule | learning rate |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {m['steps']} | {m['batch']} | {m['sequences']} | {m['schedule']} | {m['lr']:g} |"
              for k, m in res.get("matched", {}).items()]
    lines += [""] + paired_table(res.get("paired", []))
    if "sft_traces" in res:
        st = res["sft_traces"]
        lines += [f"SFT data: {st['restate_rate']:.2f} of the lines restate; lookback median "
                  f"{st['lookback']['median']} "
                  f"(p10 {st['lookback']['p10']}, p90 {st['lookback']['p90']}) tokens. During RL the rollouts' "
                  f"restatement rate went {res['rl_curve']['restate_rate'][0][1]:.2f} (step 1) -> "
                  f"{res['rl_curve']['restate_rate'][-1][1]:.2f} (step {res['rl_steps']}).", ""]
    if res.get("collapse"):
        lines += [f"**RL COLLAPSED: {res['collapse']}** The SWARR row is not a result of RL working.", ""]
    if res.get("ablations"):
        lines += ablation_section(res, names, W)
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


def paired_table(pairs: list) -> list[str]:
    """The paired comparisons: row a minus row b, per problem, greedy and T = 1, in points."""
    if not pairs:
        return []
    return ["Paired, per problem (a minus b, accuracy points, 95% cluster-bootstrap interval):", "",
            "| a minus b | greedy | T=1 |", "|---|---|---|"] + [
        f"| {p['a']} minus {p['b']} | {interval(p['greedy'], p['greedy_ci'], 100, '+.1f')} | "
        f"{interval(p['sampled'], p['sampled_ci'], 100, '+.1f')} |" for p in pairs] + [""]


def ablation_section(res: dict, names: Rows, W: int) -> list[str]:
    """--ablations: the rows that intervene on the mechanism, the restatement rate of the ablated RL runs'
    rollouts, and accuracy by restatement pattern."""
    lines = ["## Ablations", "", "Decoding with restating forced or banned at every line (constrained decoding on the "
             "line pattern, nothing else changed), and RL changed in one part:", ""]
    lines += row_table(res["ablations"], W, names, base=res["rows"]) + [""]
    for label, curve in res.get("ablation_curves", {}).items():
        r = curve.get("restate_rate") or [(0, float("nan"))]
        lines.append(f"{label}: the rollouts' restatement rate went {r[0][1]:.2f} (step 1) -> {r[-1][1]:.2f} "
                     f"(step {r[-1][0]}).")
    lines += [""] + paired_table(res.get("ablation_paired", []))
    if res.get("patterns"):
        lines += ["Accuracy by restatement pattern, T = 1 samples (a sample's lines restate: none, some, all; "
                  "interval clustered by problem):", "", "| row | pattern | samples | accuracy [95% CI] |",
                  "|---|---|---|---|"]
        lines += [f"| {p['row']} | {p['pattern']} | {p['samples']} | {interval(p['accuracy'], p['ci'])} |"
                  for p in res["patterns"]] + [""]
    return lines


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
    returns report.md's text. quoted: report()'s rl and paper_32k (not needed for a sweep)."""
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
