"""Stage 2: win back accuracy with on-policy RL -- REINFORCE with a group baseline, reward = verified correctness.

Each step, in the order of the loop in run():
  1. rollouts: sample G completions (--group-size) of each of P problems (--prompts-per-step) from the current
     windowed policy pi = softmax(logits / T), each prompt prefilled once and its KV cache cloned into G rows;
  2. reward: r_ij = reward_fn(completion_ij, problem_i), by default 1 if the final answer is correct, else 0;
  3. advantages: A_ij = r_ij - mean_j r_ij (--std-norm: divided by std_j r_ij + 1e-6). Rewards [1, 0, 0, 1] ->
     [0.5, -0.5, -0.5, 0.5]: completions 1 and 4 become more likely, 2 and 3 less; [1, 1, 1, 1] teaches nothing;
  4. loss = -(1/N) sum_ij A_ij sum_t log pi(y_ijt | x_i, y_ij<t) over the completion tokens (stop token included),
     N = the batch's completion tokens (--norm tokens) or P*G*max_new_tokens (--norm constant), never a sequence's
     own length (that would favour long wrong answers); --kl c adds c/N sum_ijt (e^d - d - 1), d = log pi_ref/pi.
     Its value sits near zero (a group's advantages sum to zero): watch the reward;
  5. one AdamW step. The next step samples afresh from the updated policy: on-policy, so no ratio clipping (PPO and
     GRPO clip pi_theta / pi_old because they take several steps on one batch; here it is 1).

    python train_rl.py --model runs/sft/model --data shared/data/gsm8k/train.jsonl --out runs/rl --steps 200
    step 12/200  reward 0.422  acc 0.422  len 187  trunc 3%  zero-var 31%  |g| 0.213  loss -0.0012  tok/s 2650 ...

As a library (the demo's): `model = run(parser().parse_args([...]), model, tok, problems, held_out, reward_fn,
history=[])`, problems being dicts {"prompt", "answer"}. The shared plumbing is in support/training.py.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import swarr
from support import distributed, grader, training


def parser() -> argparse.ArgumentParser:
    p = training.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), out="runs/rl")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps, each on a fresh batch of rollouts")
    p.add_argument("--prompts-per-step", type=int, default=16, help="in all (under torchrun: N processes' multiple)")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt (at least 2)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature T (> 0)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--std-norm", action="store_true", help="divide advantages by the group's reward std")
    p.add_argument("--no-baseline", action="store_true", help="advantage = raw reward (an ablation: no group mean)")
    p.add_argument("--norm", choices=["tokens", "constant"], default="tokens",
                   help="divide the summed token losses by the batch's completion tokens or by P*G*max_new_tokens")
    p.add_argument("--skip-zero-var", action="store_true", help="leave equal-reward groups out (one process only)")
    p.add_argument("--kl", type=float, default=0.0, help="KL penalty to a frozen copy of the starting policy")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward pass")
    p.add_argument("--eval-every", type=int, default=20, help="greedy held-out accuracy every N steps (0 = at the end)")
    p.add_argument("--eval-n", type=int, default=200, help="held-out problems per eval")
    p.add_argument("--show-every", type=int, default=10, help="print and save a few sampled completions every N steps")
    return p


# Seeds: (--seed, step or epoch, prompt slot j) as mixed-radix numbers, (seed * 100_003 + step) * 1_000_003 + j:
# distinct for every triple while step < 100_003 and j < 1_000_003 (primes above any run's steps and prompts), so no
# two runs, steps or slots share a random stream. % 2**64: torch.Generator's range (a no-op below --seed 1.8e8).
def pick(n: int, P: int, step: int, seed: int) -> list[int]:
    """The P problem indices of `step`: positions step*P .. step*P+P-1 of an endless run of seeded shuffles of
    range(n), one per epoch. A function of (seed, step) only, so --resume needs no data position but the step."""
    return [int(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + pos // n))[pos % n])
            for pos in range(step * P, (step + 1) * P)]


def sample_seeds(seed: int, step: int, slots) -> list[int]:
    """The sampling seed of each prompt slot j of a step: the same on one process or split over several."""
    return [((seed * 100_003 + step) * 1_000_003 + j) % 2**64 for j in slots]


# ---- 1. rollouts ------------------------------------------------------------------------------------------
def rollout(model, tok, problems: list[dict], group_size: int, temperature: float, max_new_tokens: int, seed):
    """group_size samples per problem (rows r*G .. r*G+G-1 of problem r; seed: one, or one per problem), each a dict
    {"problem", "prompt_ids", "ids" (completion tokens, stop token included), "text" (without it), "truncated"}."""
    model.eval()
    prompts = [tok.encode(p["prompt"]) for p in problems]
    g = swarr.generate(model, prompts, max_new_tokens, eos_ids=tok.stop_ids(model.cfg), temperature=temperature,
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
def advantages(rewards: torch.Tensor, std_norm: bool, baseline: bool = True) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages, each group against its own mean (baseline=False: the rewards as they are).
    Example: [[1, 0, 0, 1], [1, 1, 1, 1]] -> [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]]."""
    adv = rewards - rewards.mean(1, keepdim=True) if baseline else rewards
    return adv / (rewards.std(1, keepdim=True) + 1e-6) if std_norm else adv


def collapse(rewards: list[float], zero_var: list[float], patience: int = 5) -> str | None:
    """Why this run has stopped learning, or None, from each step's mean reward and zero-variance share: the reward
    fell to 0 for `patience` steps after having been positive, or every group had equal rewards (no gradient) for
    `patience` steps while below 1. Example: [0.2, 0.3, 0, 0, 0, 0, 0] -> "reward 0 for the last 5 steps after ..."."""
    last = rewards[-patience:]
    if len(rewards) > patience and max(last) == 0 and max(rewards) > 0:
        best = max(range(len(rewards)), key=rewards.__getitem__)
        return f"reward 0 for the last {patience} steps after {rewards[best]:.3f} at step {best + 1}"
    if len(rewards) >= patience and min(zero_var[-patience:]) == 1 and max(last) < 1:
        return f"every group had equal rewards (no gradient) for the last {patience} steps, reward {last[-1]:.3f}"
    return None


# ---- 4. the loss ------------------------------------------------------------------------------------------
def completion_logprobs(model, samples: list[dict], temperature: float = 1.0) -> torch.Tensor:
    """(B, T) log pi(token) at each completion token (zero elsewhere), pi = softmax(logits / temperature), the
    sampler's distribution; one forward over prompt + completion, right-padded. Example: prompt [5, 6], completion
    [7, 2] (2 = stop): inputs [5, 6, 7]; positions 1 and 2 score 7 and 2; position 0 is masked."""
    inputs, targets = training.collate([(s["prompt_ids"] + s["ids"], len(s["prompt_ids"])) for s in samples],
                                       next(model.parameters()).device)
    logits = model(inputs).float() / temperature
    logp = -F.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten(), reduction="none")
    return logp.view_as(targets) * (targets != -100)


def policy_loss(model, samples: list[dict], adv: torch.Tensor, n_norm: float, ref=None, kl_coef: float = 0.0,
                temperature: float = 1.0):
    """-(1/n_norm) sum_i adv_i sum_t log pi(y_it) of one micro-batch (n_norm counts the whole batch's tokens, so
    micro-batches add up to the global loss); with a frozen reference, + kl_coef/n_norm sum_t k3, the non-negative
    KL estimate k3 = e^d - d - 1, d = log pi_ref - log pi. Returns (loss, summed k3 or None)."""
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
def run(args, model=None, tok=None, problems=None, held_out=None, reward_fn=None, log=print, history=None):
    """Train with RL and return the model. problems/held_out: dicts {"prompt", "answer"}, by default from --data and
    --held-out (or --held-out-frac). reward_fn(completion_text, problem) -> float, by default default_reward."""
    reward_fn = reward_fn or default_reward
    rec, data = training.open_run(args, log, history, model, read_data=problems is None)  # checks, data, --out
    model, tok = training.load_model(args, model, tok, swarr.load)
    ref = training.frozen_copy(model, rec) if args.kl else None  # the KL reference: the starting policy
    fwd, optimizer, start = training.prepare(args, model, rec)  # torchrun's wrap, AdamW, --resume
    device = next(model.parameters()).device
    if problems is None:
        problems, held_out = training.from_records(data, lambda r: {
            "prompt": tok.chat(grader.math_prompt(r["question"]), args.system), "answer": r["answer"]}, args)
    held_out = (held_out or [])[:args.eval_n]
    P, G, slots = args.prompts_per_step, args.group_size, distributed.split(range(args.prompts_per_step))
    rec(f"{len(problems)} problems, {len(held_out)} held out; {P} prompts x {G} samples per step; windows "
        f"{model.windows}. The loss printed sits near 0 by construction (advantages sum to 0 in each group): "
        f"watch the reward.")

    def evaluate(step, sampled=None):  # greedy accuracy on the held-out problems, beside the step's sampled one
        if held_out:
            acc = training.accuracy(model, tok, held_out, reward_fn, args.max_new_tokens, batch_size=len(slots) * G)
            also = f" (sampled at T={args.temperature} this step: {sampled:.3f})" if sampled is not None else ""
            rec(f"eval step {step}: greedy accuracy {acc:.3f} on {len(held_out)} held-out problems{also}",
                event="eval", step=step, greedy_accuracy=acc, sampled_accuracy=sampled)

    if start == 0 and args.eval_every:
        evaluate(0)
    t_start, seen, dead = time.time(), [], None
    for step in range(start, args.steps):
        # 1. rollouts: fresh samples from the current policy, for this process's prompt slots (each group whole)
        t0, picked = time.time(), pick(len(problems), P, step, args.seed)
        samples = rollout(distributed.unsharded(model), tok, [problems[picked[j]] for j in slots], G,
                          args.temperature, args.max_new_tokens, seed=sample_seeds(args.seed, step, slots))
        # 2. reward
        rewards = torch.tensor([reward_fn(s["text"], s["problem"]) for s in samples], dtype=torch.float32).view(-1, G)
        # 3. advantages; groups of equal rewards have none (--skip-zero-var leaves them out)
        adv = advantages(rewards, args.std_norm, not args.no_baseline).flatten()
        zero_var = rewards.max(1).values == rewards.min(1).values
        rows = [i for i in range(len(samples)) if not (args.skip_zero_var and zero_var[i // G])]
        # 4. loss and its gradient, micro-batched under one normalisation for the whole (global) batch
        t1 = time.time()
        n_rows, n_tokens = distributed.all_sum(len(rows), sum(len(samples[i]["ids"]) for i in rows))
        n_norm = n_tokens if args.norm == "tokens" else P * G * args.max_new_tokens
        model.train()
        loss, kl, parts = 0.0, 0.0, [rows[b:b + args.micro_batch] for b in range(0, len(rows), args.micro_batch)]
        for k, part in enumerate(parts):  # as many micro-batches on every process
            with distributed.sync(fwd, last=k == len(parts) - 1):  # gradients summed over processes in the last
                with training.autocast(device):
                    l, k3 = policy_loss(fwd, [samples[i] for i in part], adv[part].to(device), n_norm, ref, args.kl,
                                        args.temperature)
                l.backward()
            loss, kl = loss + l.item(), kl + (k3 or 0.0)
        loss, kl = distributed.all_sum(loss, kl)
        training.check_finite(loss, step + 1, args.out)
        # 5. one AdamW step (none when every group was left out: no signal)
        grad_norm = training.optimizer_step(model, optimizer, args.clip, step + 1, args.out) if n_rows else 0.0
        done = step + 1  # the step's metrics over all processes, logged (rec) and returned
        m = training.log_rl_step(rec, done, args.steps, samples, rewards, grad_norm, loss, kl if args.kl else None,
                                 n_tokens, (t_start, start, t0, t1, time.time()))
        training.show_samples(rec, args, samples, rewards, done)  # every --show-every steps
        seen.append(m)
        if dead is None and (dead := collapse([s["reward"] for s in seen], [s["zero_var"] for s in seen])):
            rec(f"RL COLLAPSED at step {done}: {dead}. Training goes on, but the result is not RL working.",  # once
                event="collapse", step=done, reason=dead)
        if args.eval_every and done % args.eval_every == 0 and done < args.steps:
            evaluate(done, m["accuracy"])
        training.save_if_due(args, model, tok, optimizer, done, args.steps, rec)
    evaluate(args.steps, m["accuracy"] if start < args.steps else None)
    return model.eval()


def main(argv=None):
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on CUDA: rollouts run on the fp32 master weights
    distributed.run_cli(run, parser().parse_args(argv))


if __name__ == "__main__":
    main()
