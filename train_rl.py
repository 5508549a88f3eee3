"""Stage 2: win back accuracy with on-policy RL -- REINFORCE with a group baseline, reward = verified correctness.

Each step, in the order of the code below:
  1. take P problems (--prompts-per-step) and sample G completions of each (--group-size) from the current
     windowed policy pi at temperature T; each prompt is prefilled once and its KV cache cloned into G rows;
  2. score each completion: r_ij = reward_fn(completion_ij, problem_i), by default 1 if grader.grade says its
     final answer is correct, else 0;
  3. advantage A_ij = r_ij - mean_j r_ij (with --std-norm, divided by std_j r_ij + 1e-6);
  4. loss = -(1/N) sum_ij A_ij sum_t log pi(y_ijt | x_i, y_ij<t), over the completion tokens (stop token
     included), where N = the total number of completion tokens in the batch (--norm tokens) or the constant
     P*G*max_new_tokens (--norm constant) -- never each sequence's own length, which would favour long wrong
     answers over short ones; with --kl c, plus c/N * sum_ijt (e^d - d - 1), d = log pi_ref - log pi.
     pi is the distribution the rollouts were sampled from, softmax(logits / T), for the policy and the reference;
  5. one AdamW step. The next step samples afresh from the updated policy.

Why no ratio clipping: PPO and GRPO maximise sum A * rho, rho = pi_theta(y) / pi_old(y), and clip rho because
they take several optimizer steps on one batch, during which pi_theta drifts away from the pi_old that sampled it.
Here each batch serves exactly one step, taken right after sampling: pi_theta = pi_old, so rho = 1, the clip is
never active and grad rho = grad log pi_theta -- the REINFORCE gradient itself.

Why the printed loss sits near zero: the advantages of a group sum to zero, so the loss is a sum of
log-probabilities weighted by numbers of mean zero. Its value does not track progress (its gradient does); the
reward does. Example: a group's rewards [1, 0, 0, 1] -> mean 0.5 -> advantages [0.5, -0.5, -0.5, 0.5]: completions
1 and 4 become more likely, 2 and 3 less. A group [1, 1, 1, 1] (or all 0) has advantages 0 and teaches nothing.

    python train_rl.py --model runs/sft/model --data shared/data/gsm8k/train.jsonl --out runs/rl --steps 200

prints, per step,
    step 12/200  reward 0.422  acc 0.422  len 187  trunc 3%  zero-var 31%  |g| 0.213  loss -0.0012  tok/s 2650
    rollout 7.9s train 1.6s  ETA 1790s
As a library (the demo reuses this loop): `model = run(parser().parse_args([...]), model, tok, problems,
held_out, reward_fn, history=[])`, problems being dicts {"prompt": formatted prompt text, "answer": gold};
`history` collects one dict per step ({"event": "train", "step", "reward", "accuracy", ...}) and per eval.
The plumbing shared with train_sft.py (flags, data files, checkpoints and --resume, the optimizer, logging) is in
training.py.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from support import distributed
from support import grader
import swarr
from support import training


def parser() -> argparse.ArgumentParser:
    p = training.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), out="runs/rl")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps, each on a fresh batch of rollouts")
    p.add_argument("--prompts-per-step", type=int, default=16, help="in all (under torchrun: split over the processes)")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt (at least 2)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature T (> 0)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--std-norm", action="store_true", help="divide advantages by the group's reward std")
    p.add_argument("--norm", choices=["tokens", "constant"], default="tokens",
                   help="divide the summed token losses by the batch's completion tokens or by P*G*max_new_tokens")
    p.add_argument("--skip-zero-var", action="store_true", help="leave groups with equal rewards out of the update")
    p.add_argument("--kl", type=float, default=0.0, help="KL penalty to a frozen copy of the starting policy")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward pass")
    p.add_argument("--eval-every", type=int, default=20, help="greedy held-out accuracy every N steps (0 = at the end)")
    p.add_argument("--eval-n", type=int, default=200, help="held-out problems per eval")
    p.add_argument("--show-every", type=int, default=10, help="print and save a few sampled completions every N steps")
    return p


def pick(n: int, P: int, step: int, seed: int) -> list[int]:
    """The P problem indices of `step`: positions step*P .. step*P+P-1 of an endless run of seeded shuffles of
    range(n), one per epoch. A function of (seed, step) only, so --resume needs no data position but the step."""
    return [int(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + pos // n))[pos % n])
            for pos in range(step * P, (step + 1) * P)]


# ---- 1. rollouts ------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_seeds(seed: int, step: int, slots) -> list[int]:
    """The sampling seed of each prompt slot j of a step: the same on one process or split over several."""
    return [(seed * 100_003 + step) * 1_000_003 + j for j in slots]


def rollout(model, tok, problems: list[dict], group_size: int, temperature: float, max_new_tokens: int,
            seed) -> list[dict]:
    """Sample group_size completions per problem; rows r*G .. r*G+G-1 belong to problem r. seed: one, or one per
    problem (whose samples are then the same in any batch: any split of the prompts over processes). One dict per
    sample: {"problem", "prompt_ids", "ids" (completion tokens, stop token included), "text" (without it),
    "truncated"}."""
    model.eval()
    stop = tok.stop_ids(model.cfg)
    prompts = [tok.encode(p["prompt"]) for p in problems]
    g = swarr.generate(model, prompts, max_new_tokens, eos_ids=stop, temperature=temperature,
                       n_samples=group_size, seed=seed)
    samples = []
    for r in range(len(prompts) * group_size):
        ids, stopped = g.tokens[r, :int(g.lengths[r])].tolist(), bool(g.stopped[r])
        samples.append(dict(problem=problems[r // group_size], prompt_ids=prompts[r // group_size], ids=ids,
                            text=tok.decode(ids[:-1] if stopped else ids), truncated=not stopped))
    return samples


# ---- 2. reward --------------------------------------------------------------------------------------------
def default_reward(completion: str, record: dict) -> float:
    """1.0 if the completion's final answer equals the gold answer (grader.grade), else 0.0."""
    return 1.0 if grader.grade(completion, record["answer"]) else 0.0


# ---- 3. advantages ----------------------------------------------------------------------------------------
def advantages(rewards: torch.Tensor, std_norm: bool) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages, each group against its own mean.
    Example: [[1, 0, 0, 1], [1, 1, 1, 1]] -> [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]]."""
    adv = rewards - rewards.mean(1, keepdim=True)
    return adv / (rewards.std(1, keepdim=True) + 1e-6) if std_norm else adv


def collapse(rewards: list[float], zero_var: list[float], patience: int = 5) -> str | None:
    """Why this run has stopped learning, or None. `rewards` and `zero_var` are the mean reward and the share of
    zero-variance groups of every step so far. Collapsed: the reward fell to 0 for `patience` steps after having
    been positive, or every group had equal rewards (so no gradient) for `patience` steps while the reward was
    below 1. Example: rewards [0.2, 0.3, 0, 0, 0, 0, 0] -> "reward 0 for the last 5 steps after 0.300 at step 2"."""
    last = rewards[-patience:]
    if len(rewards) > patience and max(last) == 0 and max(rewards) > 0:
        best = max(range(len(rewards)), key=rewards.__getitem__)
        return f"reward 0 for the last {patience} steps after {rewards[best]:.3f} at step {best + 1}"
    if len(rewards) >= patience and min(zero_var[-patience:]) == 1 and max(last) < 1:
        return f"every group had equal rewards (no gradient) for the last {patience} steps, reward {last[-1]:.3f}"
    return None


# ---- 4. the loss ------------------------------------------------------------------------------------------
def completion_logprobs(model, samples: list[dict], temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) at each completion token, pi = softmax(logits / temperature): the distribution the sampler
    drew the token from. One forward pass over prompt + completion (right-padded). Returns (B, T), zero outside
    the completions. Example: prompt [5, 6], completion [7, 2] (2 = stop): inputs [5, 6, 7]; position 1 scores
    token 7, position 2 scores the stop token 2; position 0 is masked."""
    inputs, targets = training.collate([(s["prompt_ids"] + s["ids"], len(s["prompt_ids"])) for s in samples],
                                       next(model.parameters()).device)
    mask = targets != -100
    logits = model(inputs).float() / temperature
    logp = -F.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten(), reduction="none")
    return logp.view_as(targets) * mask


def policy_loss(model, samples: list[dict], adv: torch.Tensor, n_norm: float, ref=None, kl_coef: float = 0.0,
                temperature: float = 1.0):
    """-(1/n_norm) sum_i adv_i sum_t log pi(y_it), for one micro-batch (n_norm counts the whole batch's tokens, so
    micro-batches add up to the global loss). With a reference model also + kl_coef/n_norm * sum_t k3, the
    non-negative KL estimate k3 = e^d - d - 1, d = log pi_ref - log pi, whose gradient flows through log pi
    (the reference is frozen). Returns (loss, summed k3 or None)."""
    logp = completion_logprobs(model, samples, temperature)
    loss = -(adv[:, None] * logp).sum() / n_norm
    if ref is None:
        return loss, None
    with torch.no_grad():
        ref_logp = completion_logprobs(ref, samples, temperature)
    d = ref_logp - logp  # zero outside the completions, where k3 and its gradient are then 0 too
    k3 = torch.exp(d) - d - 1
    return loss + kl_coef * k3.sum() / n_norm, float(k3.detach().sum())


# ---- the loop ---------------------------------------------------------------------------------------------
@training.releases_lock
def run(args, model=None, tok=None, problems=None, held_out=None, reward_fn=None, log=print,
        history: list | None = None):
    """Train with RL and return the model. problems/held_out: dicts {"prompt", "answer"}; if problems is None
    they come from --data and --held-out (or --held-out-frac); an in-memory `held_out` is used as given.
    reward_fn(completion_text, problem) -> float, default: default_reward."""
    reward_fn = reward_fn or default_reward
    training.check_args(args)  # every flag, before anything is read or written
    if args.kl and args.resume and model is None and not args.model:
        raise swarr.SwarrError("--kl with --resume needs --model: the KL reference is the starting policy")
    if problems is None:  # read the data first: a bad path should fail before a large model loads
        records = training.read_records(args.data)[:args.limit]
        held_records = training.read_records(args.held_out, "--held-out") if args.held_out else None
    training.open_out(args, log)  # joins the other processes under torchrun; refuses to overwrite; locks --out
    rec, N, rank = training.Recorder(args.out, log, history), distributed.world(), distributed.rank()
    distributed.check(args, args.prompts_per_step, "--prompts-per-step")
    # Load the starting policy, copy the frozen KL reference from it, wrap it for data-parallel training, then
    # restore a resumed run over the policy.
    model, tok = training.load_model(args, model, tok)
    ref = training.frozen_copy(model) if args.kl else None
    if ref is not None:
        mb = sum(p.numel() * p.element_size() for p in ref.parameters()) / 2**20
        rec(f"KL reference: a frozen copy of the starting policy, {mb:.1f} MB", event="kl_reference", mb=mb)
    fwd = distributed.wrap(model, args)  # what the training forward calls: the model, DDP or the FSDP2-sharded model
    optimizer = training.make_optimizer(model, args)
    start = training.restore(args, model, optimizer, rec)  # --resume: the saved weights, moments and step
    device = next(model.parameters()).device
    if problems is None:
        as_problem = lambda r: {"prompt": tok.chat(grader.math_prompt(r["question"]), args.system),
                                "answer": r["answer"]}
        problems = [as_problem(r) for r in records]
        if held_records is not None:
            held_out = [as_problem(r) for r in held_records]
        else:
            problems, held_out = training.split_held_out(problems, args.held_out_frac, args.seed)
    held_out = (held_out or [])[:args.eval_n]
    P, G, Pr = args.prompts_per_step, args.group_size, args.prompts_per_step // N  # Pr prompts per process
    rec(f"{len(problems)} problems, {len(held_out)} held out; {P} prompts x {G} samples per step; windows "
        f"{model.windows}. The loss printed sits near 0 by construction (advantages sum to 0 in each group): "
        f"watch the reward.")

    def evaluate(step, sampled_acc):
        if not held_out:
            return
        mine, gen_model = held_out[rank::N], distributed.unsharded(model)  # each process every N-th problem
        done = [s for b in range(0, len(mine), Pr * G)  # as many rows at a time as a training rollout
                for s in rollout(gen_model, tok, mine[b:b + Pr * G], 1, 0.0, args.max_new_tokens, seed=0)]
        acc = distributed.all_sum(sum(reward_fn(s["text"], s["problem"]) == 1 for s in done))[0] / len(held_out)
        rec(f"eval step {step}: greedy accuracy {acc:.3f} on {len(held_out)} held-out problems"
            + (f" (sampled at T={args.temperature} this step: {sampled_acc:.3f})" if sampled_acc is not None else ""),
            event="eval", step=step, greedy_accuracy=acc, sampled_accuracy=sampled_acc)

    if start == 0 and args.eval_every:
        evaluate(0, None)
    t_start, sampled_acc, seen, dead = time.time(), None, dict(reward=[], zero_var=[]), None
    for step in range(start, args.steps):
        # 1. rollouts: fresh samples from the current policy. Under torchrun process r takes prompts r*Pr .. r*Pr+Pr-1
        # (so each group's baseline stays on one process); each prompt's seed is a function of (seed, step, j).
        t0, mine = time.time(), range(rank * Pr, (rank + 1) * Pr)
        picked = pick(len(problems), P, step, args.seed)
        samples = rollout(distributed.unsharded(model), tok, [problems[picked[j]] for j in mine], G, args.temperature,
                          args.max_new_tokens, seed=sample_seeds(args.seed, step, mine))
        # 2. reward
        rewards = torch.tensor([reward_fn(s["text"], s["problem"]) for s in samples], dtype=torch.float32).view(Pr, G)
        # 3. advantages; groups of equal rewards have none (--skip-zero-var leaves them out)
        adv = advantages(rewards, args.std_norm).flatten()
        zero_var = rewards.max(1).values == rewards.min(1).values
        rows = [i for i in range(Pr * G) if not (args.skip_zero_var and zero_var[i // G])]
        # 4. loss and its gradient, micro-batched under one normalisation for the whole (global) batch
        t1 = time.time()
        n_rows, n_tokens = distributed.all_sum(len(rows), sum(len(samples[i]["ids"]) for i in rows))
        n_norm = n_tokens if args.norm == "tokens" else P * G * args.max_new_tokens
        model.train()
        loss, kl, n_micro = 0.0, 0.0, distributed.all_max(-(-len(rows) // args.micro_batch))
        for b in range(n_micro):  # as many micro-batches in every process; a process without rows weighs its 0
            part = rows[b * args.micro_batch:(b + 1) * args.micro_batch]
            with distributed.sync(fwd, last=b == n_micro - 1):  # gradients summed over processes in the last one
                with training.autocast(device):
                    l, k = policy_loss(fwd, [samples[i] for i in part or [0]], adv[part or [0]].to(device), n_norm,
                                       ref, args.kl, args.temperature)
                (l * bool(part)).backward()
            loss, kl = loss + l.item() * bool(part), kl + (k or 0.0) * bool(part)
        loss, kl = distributed.all_sum(loss, kl)
        training.check_finite(loss, step + 1, args.out)
        # 5. one AdamW step (none when every group was left out: no signal)
        grad_norm = training.optimizer_step(model, optimizer, args.clip, step + 1, args.out) if n_rows else 0.0
        t2, done = time.time(), step + 1

        # the metrics of the whole batch, all processes' samples in prompt order
        lengths = distributed.all_cat(torch.tensor([len(s["ids"]) for s in samples], dtype=torch.float64))
        truncated = distributed.all_cat(torch.tensor([s["truncated"] for s in samples], dtype=torch.float64))
        every = distributed.all_cat(rewards)
        m = dict(event="train", step=done, reward=every.mean().item(), accuracy=(every == 1).float().mean().item(),
                 mean_length=lengths.mean().item(), truncated=truncated.mean().item(),
                 zero_var=(every.max(1).values == every.min(1).values).float().mean().item(), grad_norm=grad_norm,
                 loss=loss, tokens_per_s=lengths.sum().item() / (t2 - t0), rollout_s=t1 - t0, train_s=t2 - t1)
        if ref is not None:
            m["kl"] = kl / max(1, n_tokens)
        el = time.time() - t_start
        rec(f"step {done}/{args.steps}  reward {m['reward']:.3f}  acc {m['accuracy']:.3f}  len {m['mean_length']:.0f}  "
            f"trunc {m['truncated']:.0%}  zero-var {m['zero_var']:.0%}  |g| {grad_norm:.3f}  loss {loss:+.4f}  "
            + (f"kl {m['kl']:.4f}  " if ref is not None else "")
            + f"tok/s {m['tokens_per_s']:.0f}  rollout {t1 - t0:.1f}s train {t2 - t1:.1f}s  "
            f"ETA {el / (done - start) * (args.steps - done):.0f}s", **m)
        if args.show_every and done % args.show_every == 0:
            shown = [dict(step=done, prompt=samples[i]["problem"]["prompt"], completion=samples[i]["text"],
                          reward=rewards.flatten()[i].item()) for i in range(0, min(Pr, 4) * G, G)]  # (rank 0's)
            for s in shown:
                rec(f"  [reward {s['reward']:g}] {s['completion'][:300]!r}")
            if args.out and distributed.is_main():
                with open(os.path.join(args.out, "samples.jsonl"), "a") as f:
                    f.writelines(json.dumps(s) + "\n" for s in shown)
        sampled_acc = m["accuracy"]
        seen["reward"].append(m["reward"])
        seen["zero_var"].append(m["zero_var"])
        if dead is None and (dead := collapse(seen["reward"], seen["zero_var"])):  # said once, loudly, and kept
            rec(f"RL COLLAPSED at step {done}: {dead}. Training goes on, but the result is not RL working.",
                event="collapse", step=done, reason=dead)
        if args.eval_every and done % args.eval_every == 0 and done < args.steps:
            evaluate(done, sampled_acc)
        training.save_if_due(args, model, tok, optimizer, done, args.steps, rec)
    evaluate(args.steps, sampled_acc)
    return model.eval()


def main(argv=None):
    args = parser().parse_args(argv)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on CUDA: rollouts run on the fp32 master weights
    distributed.run_cli(run, args)


if __name__ == "__main__":
    main()
