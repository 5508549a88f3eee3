"""Evaluation: batched generation from a model, graded, summarised (the one greedy-accuracy path of every script).

    summary, rows = evaluate(model, tok, records, max_new_tokens=512, samples=1, temperature=0.0)

summary = {"n", "accuracy" (first sample per problem), "mean_accuracy" and "majority_accuracy" (samples > 1),
"mean_length", "truncated", "by_subject", "by_level"}; one row per completion. The model generates through
model.generate (swarr.generate): this module never imports swarr.
"""
from __future__ import annotations

import sys
import time

from . import grader
from .tokenizer import Tokenizer


class Progress:
    """One line per update on stderr: `label done/total  extra  elapsed  ETA`."""

    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total, self.t0, self.stream = label, total, time.time(), stream or sys.stderr

    def __call__(self, done: int, extra: str = ""):
        el = time.time() - self.t0
        eta = el / done * (self.total - done) if done else float("nan")
        print(f"{self.label} {done}/{self.total}  {extra}  elapsed {el:.0f}s  ETA {eta:.0f}s", file=self.stream, flush=True)


def record_prompt(tok: Tokenizer, rec: dict, chat: bool = True, system: str | None = None) -> str:
    """The prompt text for a record: its own "prompt" if it has one, else the math template in the checkpoint's
    chat template (after `system`, if given; many templates insert a default system message otherwise)."""
    if "prompt" in rec:
        return str(rec["prompt"])  # (a JSON number is a prompt too; the loaders have checked it is a scalar)
    text = grader.math_prompt(rec["question"])
    return tok.chat(text, system) if chat else text


def majority(answers: list) -> str | None:
    """The most common answer, counting equivalent answers (is_equiv) as one."""
    groups: list[list[str]] = []
    for a in answers:
        if a is None:
            continue
        for g in groups:
            if grader.is_equiv(g[0], a):
                g.append(a)
                break
        else:
            groups.append([a])
    return max(groups, key=len)[0] if groups else None


def evaluate(model, tok: Tokenizer, records: list[dict], *, max_new_tokens: int = 512,
             batch_size: int = 16, samples: int = 1, temperature: float = 0.0, top_p: float = 1.0,
             chat: bool = True, system: str | None = None, seed: int = 0, progress: bool = True,
             reward_fn=None) -> tuple[dict, list[dict]]:
    """Generate `samples` completions per record, grade each, and summarise.

    Returns (summary, rows): summary = {"n", "accuracy" (first sample per problem, pass@1), "mean_accuracy" and
    "majority_accuracy" (with samples > 1), "mean_length", "truncated", "by_subject", "by_level"}; one row per completion.
    """
    was_training = model.training
    model.eval()
    stop = tok.stop_ids(model.cfg)
    texts = [record_prompt(tok, r, chat, system) for r in records]
    order = sorted(range(len(records)), key=lambda i: len(texts[i]))
    rows: list[dict] = [None] * (len(records) * samples)
    show = Progress("eval", len(records)) if progress else None
    done = 0
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        prompts = [tok.encode(texts[i], add_special_tokens=not chat) for i in idx]  # raw: BOS per tokenizer.json
        g = model.generate(prompts, max_new_tokens, eos_ids=stop, temperature=temperature, top_p=top_p,
                     n_samples=samples, seed=seed + b)
        for r in range(len(idx) * samples):
            rec = records[idx[r // samples]]
            n = int(g.lengths[r])
            text = tok.decode([t for t in g.tokens[r, :n].tolist() if t not in stop])
            verdict = grader.grade_detail(text, rec["answer"])  # the RL reward's verdict, with the answer it read
            correct = verdict.correct if reward_fn is None else reward_fn(text, rec) == 1
            rows[idx[r // samples] * samples + r % samples] = dict(
                id=rec.get("id", idx[r // samples]), sample=r % samples, question=rec.get("question", rec.get("prompt")),
                gold=rec["answer"], completion=text, extracted=verdict.pred, correct=correct,
                length=n, truncated=not bool(g.stopped[r]),
                **{k: rec[k] for k in ("subject", "level") if k in rec})
        done += len(idx)
        if show:
            show(done, f"acc {sum(r['correct'] for r in rows if r and r['sample'] == 0) / done:.3f}")
    model.train(was_training)
    return summarise(rows, samples), rows


def summarise(rows: list[dict], samples: int) -> dict:
    first = [r for r in rows if r["sample"] == 0]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    s = dict(n=len(first), samples=samples, accuracy=mean([r["correct"] for r in first]),
             mean_length=mean([r["length"] for r in rows]), truncated=mean([r["truncated"] for r in rows]))
    if samples > 1:
        s["mean_accuracy"] = mean([r["correct"] for r in rows])
        per = [rows[i:i + samples] for i in range(0, len(rows), samples)]
        s["majority_accuracy"] = mean([grader.is_equiv(p[0]["gold"], majority([r["extracted"] for r in p])) for p in per])
    for key in ("subject", "level"):
        groups: dict = {}
        for r in first:
            if key in r:
                groups.setdefault(str(r[key]), []).append(r["correct"])
        if groups:
            s[f"by_{key}"] = {k: {"n": len(v), "accuracy": mean(v)} for k, v in sorted(groups.items())}
    return s
