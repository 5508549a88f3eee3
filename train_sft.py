"""Stage 1: convert a self-attention model to sliding-window attention (SWA) by supervised fine-tuning.

Set a window W on some or all layers of a pretrained checkpoint, then fine-tune it on (prompt, response)
pairs with the loss on the response tokens only, so the model relearns to work with W keys per query:

    python train_sft.py --model Qwen2.5-0.5B-Instruct --window 256 --data shared/data/gsm8k/train.jsonl \
        --out runs/sft --batch-size 8 --grad-accum 4 --lr 1e-5 --epochs 1

prints one line every --log-every steps, e.g.
    step 40/233  loss 0.4121  lr 9.6e-06  tok/s 5310  elapsed 95s  ETA 460s
and writes into --out:
    model/                  the latest checkpoint, an HF folder (swarr.save: atomic), + train_config.json
    trainer_state-<N>.pt    optimizer moments at step N, so that --resume continues exactly
    log.jsonl               one JSON object per logged event

Every random choice (held-out split, batch order) is a function of (--seed, epoch) and the learning rate is a
function of the step, so the step number is the whole data position and schedule state: resuming needs only the
weights, the optimizer state and the step.

As a library (the demo reuses this loop): `model = run(parser().parse_args([...]), model, tok, train, held_out)`
with train/held_out lists of (prompt_text, response_text); `history=[]` collects the logged dicts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import time

import torch
import torch.nn.functional as F

import grader
import swarr


def common_args(p: argparse.ArgumentParser, out: str) -> argparse.ArgumentParser:
    """The options both stages share (train_rl.py adds these too): model, window, data, output, device, resume."""
    p.add_argument("--model", help="HF model folder to start from (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--out", default=out, help="output folder ('' = write nothing, keep the model in memory)")
    p.add_argument("--window", type=int, default=None, help="sliding window W (keys per query); default: keep the model's")
    p.add_argument("--layers", default=None, help="comma-separated layers to window, e.g. 0,2,5 (default: all)")
    p.add_argument("--data", help="GSM8K / MATH / JSONL file, read by swarr.load_dataset")
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
    return p


def parser() -> argparse.ArgumentParser:
    p = common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), out="runs/sft")
    p.add_argument("--max-len", type=int, default=1024, help="drop examples longer than this many tokens")
    p.add_argument("--loss-on", choices=["response", "all"], default="response", help="'all' = plain LM training")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps (overrides --epochs when > 0)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine decays to lr * this")
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=100, help="held-out loss every N steps (0 = only at the end)")
    p.add_argument("--eval-accuracy", type=int, default=0, help="also greedy accuracy on N held-out problems")
    p.add_argument("--max-new-tokens", type=int, default=512, help="generation budget of the accuracy eval")
    return p


# ---- data: records -> (prompt, response) text -> token ids ------------------------------------------
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


def end_of_turn(tok: swarr.Tokenizer, cfg: swarr.Config) -> str:
    """The token text that closes an assistant turn in the chat format tok.chat() writes."""
    for t in ("<|im_end|>", "<|eot_id|>"):
        if t in tok.special:
            return t
    return tok.decode(tok.stop_ids(cfg)[:1])


def sft_pair(tok: swarr.Tokenizer, cfg: swarr.Config, rec: dict) -> tuple[str, str]:
    """A dataset record (swarr.load_dataset) -> (prompt, response). GSM8K's '#### N' line becomes a \\boxed{N}
    ending and its <<calculator>> notes go; a MATH solution already ends in \\boxed{}; a record without a
    solution answers directly. Example (ChatML):
        {"question": "Tom has 3 apples and buys 15. How many?", "answer": "18", "solution": "3+15=<<3+15=18>>18\\n#### 18"}
     -> ("<|im_start|>user\\nTom has 3 apples ...\\nPlease reason step by step, ...<|im_end|>\\n<|im_start|>assistant\\n",
         "3+15=18\\nThe answer is \\\\boxed{18}.<|im_end|>")"""
    sol = re.sub(r"<<[^<>]*>>", "", rec.get("solution") or "")
    sol, gsm8k = re.subn(r"\s*####.*$", "", sol, flags=re.S)
    if gsm8k or "\\boxed" not in sol:
        sol = f"{sol}\nThe answer is \\boxed{{{rec['answer']}}}.".lstrip()
    return tok.chat(grader.math_prompt(rec["question"])), sol + end_of_turn(tok, cfg)


def split_held_out(items: list, frac: float, seed: int) -> tuple[list, list]:
    """A seeded random `frac` of items becomes the held-out set: (train, held_out)."""
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n = int(len(items) * frac)
    return [items[i] for i in perm[n:]], [items[i] for i in perm[:n]]


def tokenize(tok: swarr.Tokenizer, pairs: list, loss_on: str) -> list[tuple[list[int], int]]:
    """(prompt, response) -> (ids, start): the loss covers the tokens ids[start:]. The two parts are encoded
    separately, so the boundary is exact. Example: prompt [5, 6, 7], response [8, 9] -> ([5, 6, 7, 8, 9], 3)."""
    out = []
    for prompt, response in pairs:
        p, r = tok.encode(prompt), tok.encode(response)
        out.append((p + r, max(len(p), 1) if loss_on == "response" else 1))
    return out


def plan_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch of micro-batches of similar length: shuffle, sort each run of 64 batches' worth of examples by
    length, cut into batches, shuffle the batches. Example: lengths [5, 50, 6, 48], batch_size 2 ->
    [[1, 3], [0, 2]] or [[0, 2], [1, 3]]: long with long and short with short, so little padding."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order, run = torch.randperm(len(lengths), generator=g).tolist(), 64 * batch_size
    batches = []
    for c in range(0, len(order), run):
        part = sorted(order[c:c + run], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


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


# ---- the objective and the schedule --------------------------------------------------------------------
def loss_sum(model: swarr.Transformer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the positions whose target is not -100 (the caller divides by a token count)."""
    logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


def lr_at(step: int, total: int, args) -> float:
    """Linear warmup over args.warmup steps, then a cosine from args.lr down to args.lr * args.min_lr_ratio."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, total - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the fp32 weights stay the optimizer's master copy); plain fp32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def held_out_loss(model, examples: list, batch_size: int, device) -> float:
    """Mean per-token loss over the held-out examples."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    total, n = 0.0, 0
    for b in range(0, len(order), batch_size):
        inputs, targets = collate([examples[i] for i in order[b:b + batch_size]], device)
        with autocast(device):
            total += loss_sum(model, inputs, targets).item()
        n += int((targets != -100).sum())
    model.train()
    return total / max(n, 1)


# ---- plumbing shared with train_rl.py: windows, logging, checkpoints -------------------------------------
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


class Recorder:
    """Where a run's numbers go: `log` gets a line for people; `history` (a list, if given) and out/log.jsonl get
    one dict per event, e.g. {"event": "train", "step": 10, "loss": 0.41, ...}."""

    def __init__(self, out: str, log, history: list | None):
        self.log, self.history = log, history
        self.path = os.path.join(out, "log.jsonl") if out else None
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


def check_finite(loss: float, step: int, out: str):
    """Stop on a NaN/inf loss, before the optimizer step, pointing at the last good checkpoint."""
    if not math.isfinite(loss):
        raise swarr.SwarrError(f"step {step}: loss is {loss}; stopping. The last good checkpoint is "
                               f"{os.path.join(out, 'model') if out else '(none: --out is empty)'}")


def save_checkpoint(out: str, model, tok, optimizer, step: int, args):
    """out/model (swarr.save, atomic; train_config.json records args and step) + out/trainer_state-<step>.pt.
    The state file is written before the model and older ones are deleted after it, so an interruption at any
    moment leaves a model folder whose step has a state file."""
    name = f"trainer_state-{step}.pt"
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, os.path.join(out, name + ".tmp"))
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    config = json.dumps({**vars(args), "step": step, "windows": model.windows}, indent=2)
    swarr.save(model, tok, os.path.join(out, "model"), extra_files={"train_config.json": config})
    for f in os.listdir(out):
        if f.startswith("trainer_state-") and f != name:
            os.remove(os.path.join(out, f))


def make_optimizer(model, args, state: dict | None, rec) -> tuple[torch.optim.Optimizer, int]:
    """AdamW over every parameter (and activation checkpointing as asked); with a saved trainer `state` (--resume),
    its moments and step are restored. Returns (optimizer, the step to start from)."""
    model.checkpointing = args.checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    if not state:
        return optimizer, 0
    optimizer.load_state_dict(state["optimizer"])
    rec(f"resumed from {args.out}/model at step {state['step']}")
    return optimizer, state["step"]


def load_checkpoint(out: str, dtype, device):
    """The model, tokenizer and trainer state that save_checkpoint left in `out` (for --resume)."""
    cfg_path = os.path.join(out or "", "model", "train_config.json")
    if not os.path.isfile(cfg_path):
        raise swarr.SwarrError(f"--resume: {cfg_path} not found; nothing to resume")
    with open(cfg_path) as f:
        step = json.load(f)["step"]
    model, tok = swarr.load(os.path.join(out, "model"), dtype, device)
    state = torch.load(os.path.join(out, f"trainer_state-{step}.pt"), map_location=device, weights_only=True)
    return model, tok, state


# ---- the training loop -----------------------------------------------------------------------------------
def run(args, model=None, tok=None, train=None, held_out=None, log=print, history: list | None = None):
    """Fine-tune and return the model. train/held_out: lists of (prompt, response) text; if train is None they
    come from --data and --held-out (or --held-out-frac); an in-memory `held_out` is used as given (None = none)."""
    if train is None:  # read the data first: a bad path should fail before a large model loads
        records = read_records(args.data)[:args.limit]
        held_records = read_records(args.held_out, "--held-out") if args.held_out else None
    rec = Recorder(args.out, log, history)
    state = None
    if args.resume:
        model, tok, state = load_checkpoint(args.out, args.dtype, args.device)
    elif model is None:
        model, tok = swarr.load(args.model or "", args.dtype, args.device)
    apply_window(model, args)
    device = next(model.parameters()).device
    if train is None:
        train = [sft_pair(tok, model.cfg, r) for r in records]
        if held_records is not None:
            held_out = [sft_pair(tok, model.cfg, r) for r in held_records]
        else:
            train, held_out = split_held_out(train, args.held_out_frac, args.seed)
    examples = [e for e in tokenize(tok, train, args.loss_on) if len(e[0]) <= args.max_len]
    held = [e for e in tokenize(tok, held_out or [], args.loss_on) if len(e[0]) <= args.max_len]
    if not examples:
        raise swarr.SwarrError(f"no training examples of at most --max-len {args.max_len} tokens")
    rec(f"{len(examples)} training examples ({len(train) - len(examples)} longer than {args.max_len} tokens dropped), "
        f"{len(held)} held out; windows {model.windows}")

    # The whole run's micro-batches, epoch after epoch: step s uses stream[s*A : (s+1)*A].
    A, lengths = args.grad_accum, [len(ids) for ids, _ in examples]
    per_epoch = max(1, math.ceil(len(examples) / args.batch_size) // A)
    total = args.max_steps or max(1, round(args.epochs * per_epoch))
    stream, epoch = [], 0
    while len(stream) < total * A:
        stream += plan_batches(lengths, args.batch_size, args.seed, epoch)
        epoch += 1

    model.train()
    optimizer, start = make_optimizer(model, args, state, rec)

    def evaluate(step):
        line, m = f"eval step {step}:", {"event": "eval", "step": step}
        if held:
            m["held_out_loss"] = held_out_loss(model, held, args.batch_size, device)
            line += f" held-out loss {m['held_out_loss']:.4f}"
        if held_out and args.eval_accuracy:
            probs = [{"prompt": p, "answer": grader.extract_answer(r)} for p, r in held_out[:args.eval_accuracy]]
            summary, _ = swarr.evaluate(model, tok, probs, max_new_tokens=args.max_new_tokens,
                                        batch_size=args.batch_size, progress=False)
            m["accuracy"] = summary["accuracy"]
            line += f"  greedy accuracy {m['accuracy']:.3f} on {len(probs)}"
        if len(m) > 2:
            rec(line, **m)

    t0, busy, tokens, losses = time.time(), 0.0, 0, []  # busy: seconds in training steps (not eval, not saving)
    for step in range(start, total):
        t_step = time.time()
        micro = [[examples[i] for i in b] for b in stream[step * A:(step + 1) * A]]
        n_targets = sum(len(ids) - s for mb in micro for ids, s in mb)  # the whole accumulated batch
        lr = lr_at(step, total, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = 0.0
        for mb in micro:
            inputs, targets = collate(mb, device)
            with autocast(device):
                part = loss_sum(model, inputs, targets) / n_targets
            part.backward()
            loss += part.item()
            tokens += sum(len(ids) for ids, _ in mb)
        check_finite(loss, step + 1, args.out)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        busy += time.time() - t_step
        losses.append(loss)
        done = step + 1
        if done % args.log_every == 0 or done == total:
            el = time.time() - t0
            rec(f"step {done}/{total}  loss {sum(losses) / len(losses):.4f}  lr {lr:.1e}  tok/s {tokens / busy:.0f}  "
                f"elapsed {el:.0f}s  ETA {el / (done - start) * (total - done):.0f}s",
                event="train", step=done, loss=sum(losses) / len(losses), lr=lr, grad_norm=grad_norm,
                tokens_per_s=tokens / busy, elapsed_s=el)
            losses = []
        if args.eval_every and done % args.eval_every == 0 and done < total:
            evaluate(done)
        if args.out and ((args.save_every and done % args.save_every == 0) or done == total):
            save_checkpoint(args.out, model, tok, optimizer, done, args)
            rec(f"saved {args.out}/model at step {done}", event="save", step=done)
    evaluate(total)
    return model.eval()


def main(argv=None):
    args = parser().parse_args(argv)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on CUDA (bf16 autocast covers most of them anyway)
    swarr.run_cli(run, args)


if __name__ == "__main__":
    main()
