"""Evaluation: batched generation from a model, graded, summarised (the one greedy-accuracy path of every script),
and the command line `python swarr.py generate|eval`.

    summary, rows = evaluate(model, tok, records, max_new_tokens=512, samples=1, temperature=0.0)

summary = {"n", "accuracy" (first sample per problem), "mean_accuracy" and "majority_accuracy" (samples > 1),
"mean_length", "truncated", "by_subject", "by_level"}; one row per completion. The model generates through
model.generate (swarr.generate), and the command line loads through the `load` swarr.main hands it: this module
never imports swarr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import grader
from .checkpoint import DTYPES, check_context, check_logits
from .flags import GREEDY_OK, check_flags
from .safe_io import SwarrError, check_out_folder, run_cli, write_texts_atomic
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
             reward_fn=None, constrain=None) -> tuple[dict, list[dict]]:
    """Generate `samples` completions per record, grade each, and summarise. constrain(prompt texts, samples), if
    given, makes each batch's constrained decoder (swarr.generate's `constrain`; e.g. synth.LineConstraint.of).

    Returns (summary, rows): summary = {"n", "accuracy" (first sample per problem, pass@1, strict: the answer must
    be marked, as the RL reward wants), "accuracy_flexible" (the grader's flexible mode: else the last number or
    expression), "mean_accuracy" and "majority_accuracy" (with samples > 1), "mean_length", "truncated",
    "by_subject", "by_level"}; one row per completion.
    """
    was_training = model.training
    model.eval()
    stop = tok.stop_ids(model.cfg)
    texts = [record_prompt(tok, r, chat, system) for r in records]
    ids = [tok.encode(t, add_special_tokens=not chat) for t in texts]  # raw: BOS per tokenizer.json
    # the longest prompt + max_new_tokens must fit the context: refused now, not after the shorter ones have run
    check_context(model.cfg, model.windows, max(map(len, ids), default=0), max_new_tokens)
    order = sorted(range(len(records)), key=lambda i: len(texts[i]))
    rows: list[dict] = [None] * (len(records) * samples)
    show = Progress("eval", len(records)) if progress else None
    done = 0
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        prompts = [ids[i] for i in idx]
        g = model.generate(prompts, max_new_tokens, eos_ids=stop, temperature=temperature, top_p=top_p,
                           n_samples=samples, seed=seed + b,
                           constrain=constrain([texts[i] for i in idx], samples) if constrain else None)
        for r in range(len(idx) * samples):
            rec = records[idx[r // samples]]
            n = int(g.lengths[r])
            text = tok.decode([t for t in g.tokens[r, :n].tolist() if t not in stop])
            verdict = grader.grade_detail(text, rec["answer"])  # the RL reward's verdict, with the answer it read
            correct = verdict.correct if reward_fn is None else reward_fn(text, rec) == 1
            rows[idx[r // samples] * samples + r % samples] = dict(
                id=rec.get("id", idx[r // samples]), sample=r % samples, question=rec.get("question", rec.get("prompt")),
                gold=rec["answer"], completion=text, extracted=verdict.pred, correct=correct,
                correct_flexible=grader.grade(text, rec["answer"], mode="flexible"),  # lm-eval's flexible-extract
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
             accuracy_flexible=mean([r["correct_flexible"] for r in first]),
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


# ---- the command line: python swarr.py generate|eval ----------------------------------------------------
def model_from_flags(a, load):
    """Check the flags, then load --model (in --dtype, on --device), apply --window to every layer, and check
    that the model's logits on a probe are finite."""
    check_flags(a, extra=GREEDY_OK)
    model, tok = load(a.model, a.dtype, a.device)
    if a.window is not None:
        model.set_window(a.window)
    check_logits(model, a.model)
    return model, tok


def cmd_eval(a, load):
    check_flags(a, extra=GREEDY_OK)
    out = a.out or os.path.join("runs", "eval-" + os.path.basename(a.model.rstrip("/")))
    check_out_folder(out)
    for name in ("summary.json", "samples.jsonl"):
        if os.path.isdir(os.path.join(out, name)):
            raise SwarrError(f"--out {out}: {name} there is a folder")
    try:
        records = grader.load_dataset(a.data)[:a.limit]
    except (ValueError, OSError) as e:  # malformed line (file:line in the message) or unreadable file
        raise SwarrError(str(e)) from None
    if not records:
        raise SwarrError(f"{a.data}: no records to evaluate")
    model, tok = model_from_flags(a, load)
    summary, rows = evaluate(model, tok, records, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                             samples=a.samples, temperature=a.temperature, chat=not a.raw, system=a.system,
                             seed=a.seed)
    summary.update(model=a.model, data=a.data, window=a.window, windows=model.windows)  # windows: as run, per layer
    os.makedirs(out, exist_ok=True)
    write_texts_atomic({os.path.join(out, "samples.jsonl"): "".join(json.dumps(r) + "\n" for r in rows),
                        os.path.join(out, "summary.json"): json.dumps(summary, indent=2)})  # both, or neither
    line = (f"accuracy {summary['accuracy']:.4f} (strict; flexible {summary['accuracy_flexible']:.4f}) "
            f"on {summary['n']} problems")
    if a.samples > 1:
        line += f" (mean of {a.samples} samples {summary['mean_accuracy']:.4f}, majority {summary['majority_accuracy']:.4f})"
    print(f"{line}; mean length {summary['mean_length']:.1f} tokens; truncated {summary['truncated']:.1%}; "
          f"wrote {out}/summary.json and {out}/samples.jsonl")


def cmd_generate(a, load):
    model, tok = model_from_flags(a, load)
    ids = tok.encode(a.prompt, add_special_tokens=True) if a.raw else tok.encode(tok.chat(a.prompt, a.system))
    g = model.generate([ids], a.max_new_tokens, eos_ids=tok.stop_ids(model.cfg),
                       temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    print(tok.decode(g.tokens[0, :int(g.lengths[0])].tolist()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarr.py", description="SWARR: convert a pretrained transformer to "
                                "sliding-window attention, then win back its accuracy with RL.",
                                epilog="The whole recipe on the embedded tiny model and task: python demo.py",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def common(sp):
        sp.add_argument("--model", required=True, help="local HF model folder (config.json, *.safetensors, tokenizer.json)")
        sp.add_argument("--window", type=int, default=None, help="sliding window W for every layer (keys per query)")
        sp.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
        sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--system", default=None, help="system message for the chat template (default: its own)")

    g = sub.add_parser("generate", help="sample a completion for one prompt")
    common(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat format")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="generate and grade completions for a math dataset (GSM8K, MATH, JSONL)")
    common(e)
    e.add_argument("--data", required=True, help="JSONL: GSM8K (question/answer), MATH (problem/solution), or prompt/answer")
    e.add_argument("--limit", type=int, default=None, help="first N problems only")
    e.add_argument("--samples", type=int, default=1, help="completions per problem (mean and majority accuracy)")
    e.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    e.add_argument("--max-new-tokens", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--raw", action="store_true", help="do not wrap prompts in the model's chat format")
    e.add_argument("--out", default=None, help="folder for summary.json and samples.jsonl (default runs/eval-MODEL)")
    e.set_defaults(func=cmd_eval)

    return p


def main(argv, load):
    """`python swarr.py generate|eval ...` (swarr.main), loading checkpoints with `load` (swarr.load)."""
    args = build_parser().parse_args(argv)
    run_cli(args.func, args, load)
