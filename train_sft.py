"""Stage 1: convert a self-attention model to sliding-window attention (SWA) by supervised fine-tuning.

Set a window W on some or all layers of a pretrained checkpoint, then fine-tune it on (prompt, response) pairs with
the loss on the response tokens only, so that the model relearns to work with W keys per query:

    python train_sft.py --model Qwen2.5-0.5B-Instruct --window 256 --data shared/data/gsm8k/train.jsonl \
        --out runs/sft --batch-size 8 --grad-accum 4 --lr 1e-5 --epochs 1
    step 40/233  loss 0.4121  lr 9.6e-06  tok/s 5310  elapsed 95s  ETA 460s

--out gets model/ (an HF folder + train_config.json), trainer_state-<N>.pt (optimizer moments, for --resume) and
log.jsonl. The batch order is a function of (--seed, epoch) and the learning rate one of the step, so the step is
the whole data position and schedule state. As a library (the demo's): `model = run(parser().parse_args([...]),
model, tok, train, held_out, history=[])`, train/held_out lists of (prompt, response) text. The plumbing shared
with train_rl.py is in support/training.py.
"""
from __future__ import annotations

import argparse
import math
import re
import time

import torch
import torch.nn.functional as F

import swarr
from support import distributed, grader, training


def parser() -> argparse.ArgumentParser:
    p = training.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), out="runs/sft")
    p.add_argument("--max-len", type=int, default=1024, help="drop examples longer than this many tokens")
    p.add_argument("--loss-on", choices=["response", "all"], default="response", help="'all' = plain LM training")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps (overrides --epochs when > 0)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch (per process under torchrun)")
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
def end_of_turn(tok, cfg) -> str:
    """The token text that closes an assistant turn in the chat format tok.chat() writes."""
    for t in ("<|im_end|>", "<|eot_id|>"):
        if t in tok.special:
            return t
    return tok.decode(tok.stop_ids(cfg)[:1])


def sft_pair(tok, cfg, rec: dict, system: str | None = None) -> tuple[str, str]:
    """A dataset record (grader.load_dataset) -> (prompt, response). GSM8K's '#### N' line becomes a \\boxed{N}
    ending and its <<calculator>> notes go; a MATH solution already ends in \\boxed{}; a record without a
    solution answers directly. Example (ChatML):
        {"question": "Tom has 3 apples and buys 15. How many?", "answer": "18", "solution": "3+15=<<3+15=18>>18\\n#### 18"}
     -> ("<|im_start|>user\\nTom has 3 apples ...\\nPlease reason step by step, ...<|im_end|>\\n<|im_start|>assistant\\n",
         "3+15=18\\nThe answer is \\\\boxed{18}.<|im_end|>")"""
    sol = re.sub(r"<<[^<>]*>>", "", rec.get("solution") or "")
    sol, gsm8k = re.subn(r"\s*####.*$", "", sol, flags=re.S)
    if gsm8k or "\\boxed" not in sol:
        sol = f"{sol}\nThe answer is \\boxed{{{rec['answer']}}}.".lstrip()
    return tok.chat(grader.math_prompt(rec["question"]), system), sol + end_of_turn(tok, cfg)


def tokenize(tok, pairs: list, loss_on: str) -> list[tuple[list[int], int]]:
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
    # seed * 100_003 + epoch: a distinct generator seed for every (seed, epoch) while epoch < 100_003 (a prime
    # larger than any epoch count), so two seeds' epochs never share a shuffle
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order, run = torch.randperm(len(lengths), generator=g).tolist(), 64 * batch_size
    batches = []
    for c in range(0, len(order), run):
        part = sorted(order[c:c + run], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


# ---- the objective -------------------------------------------------------------------------------------
def loss_sum(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the positions whose target is not -100 (the caller divides by a token count)."""
    logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


# ---- the training loop -----------------------------------------------------------------------------------
@training.releases_lock
def run(args, model=None, tok=None, train=None, held_out=None, log=print, history: list | None = None):
    """Fine-tune and return the model. train/held_out: lists of (prompt, response) text; if train is None they
    come from --data and --held-out (or --held-out-frac); an in-memory `held_out` is used as given (None = none)."""
    rec, data = training.open_run(args, log, history, model, read_data=train is None)  # checks, data, --out
    model, tok = training.load_model(args, model, tok, swarr.load)
    if train is None:
        train, held_out = training.from_records(data, lambda r: sft_pair(tok, model.cfg, r, args.system), args)
    examples = [e for e in tokenize(tok, train, args.loss_on) if len(e[0]) <= args.max_len]
    held = [e for e in tokenize(tok, held_out or [], args.loss_on) if len(e[0]) <= args.max_len]
    if not examples:
        raise swarr.SwarrError(f"no training examples of at most --max-len {args.max_len} tokens")
    rec(f"{len(examples)} training examples ({len(train) - len(examples)} longer than {args.max_len} tokens dropped), "
        f"{len(held)} held out; windows {model.windows}")

    # The run's micro-batches, epoch after epoch: step s uses stream[s*A : (s+1)*A]. Under torchrun one holds N*B
    # examples (N processes of --batch-size B), split over the processes (see distributed.even_batches).
    A, B, N, lengths = args.grad_accum, args.batch_size, distributed.world(), [len(ids) for ids, _ in examples]
    per_epoch = max(1, math.ceil(len(examples) / (B * N)) // A)
    total = args.max_steps or max(1, round(args.epochs * per_epoch))
    stream, epoch = [], 0
    while len(stream) < total * A:
        stream += distributed.even_batches(plan_batches(lengths, B * N, args.seed, epoch))
        epoch += 1
    fwd, optimizer, start = training.prepare(args, model, rec)  # torchrun's wrap, AdamW, --resume
    device = next(model.parameters()).device
    model.train()

    def evaluate(step):  # held-out loss, and greedy accuracy on --eval-accuracy held-out problems
        line, m = f"eval step {step}:", {"event": "eval", "step": step}
        if held:
            m["held_out_loss"] = training.held_out_loss(model, held, B, loss_sum)
            line += f" held-out loss {m['held_out_loss']:.4f}"
        if held_out and args.eval_accuracy:
            probs = [{"prompt": p, "answer": grader.extract_answer(r)} for p, r in held_out[:args.eval_accuracy]]
            m["accuracy"] = training.accuracy(model, tok, probs, None, args.max_new_tokens, batch_size=B)
            line += f"  greedy accuracy {m['accuracy']:.3f} on {len(probs)}"
        if len(m) > 2:
            rec(line, **m)

    t0, busy, tokens, losses = time.time(), 0.0, 0, []  # busy: seconds in training steps (not eval, not saving)
    for step in range(start, total):
        t_step = time.time()
        micro = [[examples[i] for i in b] for b in stream[step * A:(step + 1) * A]]  # all processes' examples
        n_targets = sum(len(ids) - s for mb in micro for ids, s in mb)  # the whole accumulated (global) batch
        loss, lr = 0.0, training.lr_at(step, total, args, optimizer)  # warmup, then cosine; set on the optimizer
        for k, mb in enumerate(micro):
            with distributed.sync(fwd, last=k == A - 1):  # gradients summed over processes in the last backward
                inputs, targets = training.collate(distributed.split(mb), device)  # this process's examples
                with training.autocast(device):
                    part = loss_sum(fwd, inputs, targets) / n_targets
                part.backward()
            loss += part.item()
            tokens += sum(len(ids) for ids, _ in mb)
        loss = distributed.all_sum(loss)[0]
        training.check_finite(loss, step + 1, args.out)
        grad_norm = training.optimizer_step(model, optimizer, args.clip, step + 1, args.out)
        busy += time.time() - t_step
        losses.append(loss)
        done = step + 1
        if done % args.log_every == 0 or done == total:  # the mean loss of the steps since the last line
            training.log_sft_step(rec, done, total, losses, lr, grad_norm, tokens, busy, t0, start)
        if args.eval_every and done % args.eval_every == 0 and done < total:
            evaluate(done)
        training.save_if_due(args, model, tok, optimizer, done, total, rec)
    evaluate(total)
    return model.eval()


def main(argv=None):
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on CUDA (bf16 autocast covers most of them anyway)
    distributed.run_cli(run, parser().parse_args(argv))


if __name__ == "__main__":
    main()
