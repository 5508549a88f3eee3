"""train_sft.py and train_rl.py on tiny random checkpoints (CPU): the losses, learning, exact resume, outputs that
swarr and transformers load, and one clear error line for each bad input."""
import json
import os

import pytest
import torch

import swarr
import train_rl
import train_sft
from support import training
from conftest import make_checkpoint, train_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A tiny Qwen2 whose vocabulary is exactly the tokenizer's, so that every sampled id decodes."""
    path = tmp_path_factory.mktemp("train") / "qwen2"
    vocab = swarr.Tokenizer(str(train_tokenizer(path))).vocab_size
    make_checkpoint(path, "Qwen2ForCausalLM", vocab_size=vocab)
    return str(path)


@pytest.fixture(scope="session")
def tok(ckpt):
    return swarr.load(ckpt)[1]


def sft_args(ckpt, out, *extra):
    return train_sft.parser().parse_args(["--model", ckpt, "--out", str(out), *extra])


def rl_args(ckpt, out, *extra):
    return train_rl.parser().parse_args(["--model", ckpt, "--out", str(out), "--eval-every", "0",
                                         "--show-every", "0", *extra])


def toy_pairs(tok, n=6):
    return [(tok.chat(f"what is {a}+{a}?"), f"The answer is {2 * a}.<|im_end|>") for a in range(n)]


def toy_problems(tok, n=8):
    return [{"prompt": tok.chat(f"say something {i}"), "answer": ""} for i in range(n)]


def has_digit(text, record):  # the toy RL task: a random model writes a digit in about a third of its samples
    return 1.0 if any(c.isdigit() for c in text) else 0.0


def weights(path):
    return swarr.load(str(path))[0].state_dict()


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Interrupted(Exception):
    pass


def interrupt_at(prefix):
    """A `log` that kills the run when it prints a line starting with `prefix` (like a preempted job)."""
    def log(line):
        if line.startswith(prefix):
            raise Interrupted(line)
    return log


# ---- SFT ----------------------------------------------------------------------------------------------------
def test_tokenize_collate_and_loss_cover_response_tokens_only(ckpt, tok):
    model, _ = swarr.load(ckpt)
    (ids, start), = train_sft.tokenize(tok, [("ab cd", "ef gh")], "response")
    assert ids == tok.encode("ab cd") + tok.encode("ef gh") and start == len(tok.encode("ab cd"))
    assert train_sft.tokenize(tok, [("ab cd", "ef gh")], "all")[0][1] == 1
    assert [t.tolist() for t in training.collate([([5, 6, 7, 8, 9], 3)], "cpu")] == [[[5, 6, 7, 8]],
                                                                                   [[-100, -100, 8, 9]]]
    a, b = [tok.chat("what is 2+2?"), "4"], [tok.chat("what is 3+3?"), "4"]
    (ia, ta), (ib, tb) = (training.collate(train_sft.tokenize(tok, [p], "response") + [([1, 2], 1)], "cpu")
                          for p in (a, b))
    assert not torch.equal(ia, ib) and torch.equal(ta, tb)  # another prompt: the same targets, all in the response
    n_prompt = len(tok.encode(a[0]))
    assert (ta[0, :n_prompt - 1] == -100).all() and (ta[0, n_prompt - 1:] != -100).sum() == len(tok.encode("4"))
    assert ta[1].tolist() == [2] + [-100] * (ta.shape[1] - 1)  # the padded row: only its own target
    with torch.no_grad():
        logp = model(ia).log_softmax(-1)
        keep = ta != -100
        manual = -logp[keep].gather(-1, ta[keep][:, None]).sum()
        assert torch.allclose(train_sft.loss_sum(model, ia, ta), manual, atol=1e-5)


def test_plan_batches_and_schedule():
    lengths = [5, 50, 6, 48, 7, 49, 8, 47]
    plan = train_sft.plan_batches(lengths, 2, seed=0, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(8))
    assert all(abs(lengths[b[0]] - lengths[b[1]]) <= 2 for b in plan)  # short with short, long with long
    assert plan == train_sft.plan_batches(lengths, 2, seed=0, epoch=0) != train_sft.plan_batches(lengths, 2, 0, 1)
    args = train_sft.parser().parse_args(["--lr", "1", "--warmup", "4", "--min-lr-ratio", "0.1"])
    lrs = [training.lr_at(s, 104, args) for s in range(104)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and abs(lrs[54] - 0.55) < 1e-9 and lrs[-1] > 0.1


def test_sft_fits_a_handful_of_examples(ckpt, tok):
    history = []
    args = sft_args(ckpt, "", "--max-steps", "150", "--lr", "1e-2", "--batch-size", "6", "--warmup", "5",
                    "--min-lr-ratio", "0.5", "--log-every", "25")
    train_sft.run(args, train=toy_pairs(tok), held_out=toy_pairs(tok)[:2], log=lambda s: None, history=history)
    losses = [h["loss"] for h in history if h["event"] == "train"]
    print("SFT loss every 25 steps:", [round(x, 4) for x in losses])
    assert losses[0] > 1.0 and losses[-1] < 0.01
    assert history[-1]["event"] == "eval" and history[-1]["held_out_loss"] < 0.01


def test_sft_resume_equals_an_uninterrupted_run(ckpt, tok, tmp_path):
    extra = ["--max-steps", "6", "--save-every", "3", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3",
             "--warmup", "2", "--log-every", "1", "--window", "8"]
    train_sft.run(sft_args(ckpt, tmp_path / "a", *extra), train=toy_pairs(tok), log=lambda s: None)
    with pytest.raises(Interrupted):
        train_sft.run(sft_args(ckpt, tmp_path / "b", *extra), train=toy_pairs(tok), log=interrupt_at("step 5/"))
    assert json.load(open(tmp_path / "b/model/train_config.json"))["step"] == 3
    train_sft.run(sft_args(ckpt, tmp_path / "b", *extra, "--resume"), train=toy_pairs(tok), log=lambda s: None)
    assert same(weights(tmp_path / "a/model"), weights(tmp_path / "b/model"))
    assert not same(weights(tmp_path / "a/model"), weights(ckpt))
    assert sorted(f for f in os.listdir(tmp_path / "b") if f.startswith("trainer_state")) == ["trainer_state-6.pt"]


def test_sft_from_a_data_file_writes_what_swarr_and_transformers_load(ckpt, tmp_path, capsys):
    import transformers
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a}+{a}?", "answer": f"{a}+{a}=<<{a}+{a}={2 * a}>>"
                                        f"{2 * a}\n#### {2 * a}"}) + "\n" for a in range(6)))
    out = tmp_path / "out"
    train_sft.main(["--model", ckpt, "--data", str(data), "--out", str(out), "--window", "8", "--layers", "0,1",
                    "--max-steps", "3", "--batch-size", "2", "--held-out-frac", "0.34", "--eval-accuracy", "2",
                    "--max-new-tokens", "4", "--log-every", "1"])
    printed = capsys.readouterr().out
    print(printed)
    assert "4 training examples" in printed and "step 3/3  loss" in printed and "greedy accuracy" in printed
    model, _ = swarr.load(str(out / "model"))
    assert model.windows == [8, 8]
    config = json.load(open(out / "model/train_config.json"))
    assert config["step"] == 3 and config["window"] == 8 and config["windows"] == [8, 8]
    events = [json.loads(line)["event"] for line in open(out / "log.jsonl")]
    assert events.count("train") == 3 and events[-1] == "eval"
    hf_cfg = transformers.AutoConfig.from_pretrained(out / "model")
    hf_cfg._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "model", config=hf_cfg).eval()
    idx = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # 20 tokens > W = 8: the window shows in the logits, and HF applies it the same way
        assert (hf(idx).logits - model(idx)).abs().max() < 1e-4


def test_sft_nan_loss_stops_and_keeps_the_last_good_checkpoint(ckpt, tok, tmp_path):
    train_sft.run(sft_args(ckpt, tmp_path, "--max-steps", "1"), train=toy_pairs(tok), log=lambda s: None)
    good = weights(tmp_path / "model")
    # --lr 1e30: the first step leaves finite weights whose logits overflow; they are not saved
    args = sft_args(ckpt, tmp_path, "--max-steps", "5", "--save-every", "1", "--lr", "1e30", "--warmup", "0",
                    "--resume")
    with pytest.raises(swarr.SwarrError, match=r"step 2: the weights are finite but give NaN/inf logits.*not saved"
                                               r".*last good checkpoint: .*model \(step 1\)"):
        train_sft.run(args, train=toy_pairs(tok), log=lambda s: None)
    assert json.load(open(tmp_path / "model/train_config.json"))["step"] == 1
    assert all(torch.equal(good[k], v) for k, v in weights(tmp_path / "model").items())


# ---- RL -----------------------------------------------------------------------------------------------------
def test_advantages_are_centred_per_group():
    r = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1]])
    assert train_rl.advantages(r, False).tolist() == [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]]
    a = train_rl.advantages(r, True)
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (r[0].std() + 1e-6)) and not a[1].any()


def test_no_baseline_loss_is_reinforce_with_a_zero_baseline(ckpt, tok):
    """--no-baseline (the demo's "RL without the baseline"): the advantages are the raw rewards, and the loss equals
    REINFORCE's -(1/N) sum_i (r_i - b) sum_t log pi(y_it) with b = 0, computed here in float64 from one unpadded
    forward per sample, and differs from the group-baseline loss on the same samples."""
    r = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 0]])
    assert torch.equal(train_rl.advantages(r, False, baseline=False), r)
    model, _ = swarr.load(ckpt)
    samples = train_rl.rollout(model, tok, toy_problems(tok)[:2], 4, 1.0, 8, seed=0)
    n = sum(len(s["ids"]) for s in samples)
    loss, _ = train_rl.policy_loss(model, samples, train_rl.advantages(r, False, baseline=False).flatten(), n)
    centred, _ = train_rl.policy_loss(model, samples, train_rl.advantages(r, False).flatten(), n)
    model64 = swarr.load(ckpt)[0].double()
    ref = 0.0
    with torch.no_grad():
        for s, reward in zip(samples, r.flatten().tolist()):
            seq = torch.tensor([s["prompt_ids"] + s["ids"]])
            logp = model64(seq[:, :-1]).log_softmax(-1)[0, len(s["prompt_ids"]) - 1:]
            ref -= (reward - 0.0) * logp.gather(-1, seq[0, len(s["prompt_ids"]):, None]).sum().item()
    assert abs(loss.item() - ref / n) < 1e-5 and abs(centred.item() - loss.item()) > 1e-3
    args = rl_args(ckpt, "", "--no-baseline")
    assert args.no_baseline and not rl_args(ckpt, "").no_baseline


def test_completion_logprobs_equal_unpadded_forwards(ckpt):
    model, _ = swarr.load(ckpt)
    samples = [dict(prompt_ids=[5, 6, 7, 8], ids=[9, 10, 2]), dict(prompt_ids=[11, 12], ids=[13, 2])]
    with torch.no_grad():
        logp = train_rl.completion_logprobs(model, samples)
        for row, s in enumerate(samples):
            seq = torch.tensor([s["prompt_ids"] + s["ids"]])
            ref = model(seq[:, :-1]).log_softmax(-1)[0, len(s["prompt_ids"]) - 1:].gather(-1, seq[0, len(s["prompt_ids"]):, None])
            got = logp[row][logp[row] != 0]
            assert torch.allclose(got, ref[:, 0], atol=1e-5)  # every completion token, the stop token included
    assert (logp != 0).sum(1).tolist() == [3, 2]


def test_rl_raises_the_reward_on_a_toy_task(ckpt, tok):
    history = []
    args = rl_args(ckpt, "", "--steps", "20", "--prompts-per-step", "4", "--group-size", "8", "--max-new-tokens", "8",
                   "--lr", "1e-2")
    train_rl.run(args, problems=toy_problems(tok), reward_fn=has_digit, log=lambda s: None, history=history)
    rewards = [h["reward"] for h in history if h["event"] == "train"]
    print("RL reward per step:", " ".join(f"{r:.2f}" for r in rewards))
    assert sum(rewards[-5:]) / 5 > max(0.8, sum(rewards[:5]) / 5 + 0.3)


def test_one_rl_step_changes_the_policy_and_equal_rewards_give_no_gradient(ckpt, tok):
    start = weights(ckpt)
    small = ["--steps", "1", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "8", "--lr", "1e-3"]
    model = train_rl.run(rl_args(ckpt, "", *small), problems=toy_problems(tok), reward_fn=has_digit, log=lambda s: None)
    assert not same(start, model.state_dict())
    for extra in ([], ["--skip-zero-var"]):
        history = []
        model = train_rl.run(rl_args(ckpt, "", *small, *extra), problems=toy_problems(tok),
                             reward_fn=lambda text, rec: 1.0, log=lambda s: None, history=history)
        assert history[0]["grad_norm"] == 0.0 and history[0]["zero_var"] == 1.0 and same(start, model.state_dict())
    model, _ = swarr.load(ckpt)  # and directly: equal rewards -> zero advantages -> a zero gradient
    samples = train_rl.rollout(model, tok, toy_problems(tok)[:2], 4, 1.0, 8, seed=0)
    adv = train_rl.advantages(torch.full((2, 4), 0.7), std_norm=True).flatten()
    loss, _ = train_rl.policy_loss(model.train(), samples, adv, n_norm=100.0)
    loss.backward()
    assert loss.item() == 0.0 and all(not p.grad.any() for p in model.parameters())


def sampled_logprobs(logits, temperature, tokens):
    """log of the probability with which swarr.sample drew `tokens`: softmax(logits / T), as the sampler computes it."""
    return torch.softmax(logits.float() / temperature, -1).gather(-1, tokens[:, None])[:, 0].log()


def test_loss_scores_the_distribution_the_sampler_drew_from(ckpt, tok, monkeypatch):
    """At T != 1 the loss's per-token log-probs are those of softmax(logits / T), the sampler's own distribution
    (recorded here at every decode step), not those of softmax(logits)."""
    model, _ = swarr.load(ckpt)
    T, drawn, sample = 0.7, [], swarr.sample

    def spy(logits, temperature, top_p, gen):
        tokens = sample(logits, temperature, top_p, gen)
        drawn.append(sampled_logprobs(logits, temperature, tokens))
        return tokens

    monkeypatch.setattr(swarr, "sample", spy)
    problems = [{"prompt": tok.chat(text), "answer": ""} for text in ("hi", "say something a bit longer")]
    samples = train_rl.rollout(model, tok, problems, 3, T, 10, seed=0)  # ragged prompts, 3 samples each
    sampler = torch.stack(drawn, 1)  # (rows, decode steps)
    with torch.no_grad():
        scored, at_one = (train_rl.completion_logprobs(model, samples, t) for t in (T, 1.0))
    worst_t, worst_one = 0.0, 0.0
    for r, s in enumerate(samples):
        first, n = len(s["prompt_ids"]) - 1, len(s["ids"])
        worst_t = max(worst_t, (scored[r, first:first + n] - sampler[r, :n]).abs().max().item())
        worst_one = max(worst_one, (at_one[r, first:first + n] - sampler[r, :n]).abs().max().item())
    print(f"max |log-prob difference| vs the sampler: {worst_t:.2e} at T={T}, {worst_one:.2e} if scored at T=1")
    assert worst_t < 1e-5 and worst_one > 1e-2  # (scoring softmax(logits) would be off-policy)


def test_kl_term_has_the_gradient_of_the_kl_estimate(ckpt, tok):
    """With zero advantages only the KL penalty is left: its gradient is nonzero once the policy differs from the
    reference, and equals autograd of c/N * sum k3, k3 = e^d - d - 1, d = log pi_ref - log pi, computed here from
    one unpadded forward per sample."""
    model, _ = swarr.load(ckpt)
    ref = training.frozen_copy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the policy moves away from the reference, as after a few RL steps
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    samples = train_rl.rollout(model, tok, toy_problems(tok)[:2], 4, 0.8, 8, seed=0)
    c, n_norm, T = 0.5, 37.0, 0.8
    loss, k3_sum = train_rl.policy_loss(model.train(), samples, torch.zeros(len(samples)), n_norm, ref, c, T)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    def logp(m, seq, n):  # log softmax(logits / T) of the completion tokens seq[n:]
        return (m(seq[None, :-1])[0, n - 1:] / T).log_softmax(-1).gather(-1, seq[n:, None])[:, 0]

    k3 = 0.0
    for s in samples:
        seq, n = torch.tensor(s["prompt_ids"] + s["ids"]), len(s["prompt_ids"])
        with torch.no_grad():
            ref_logp = logp(ref, seq, n)
        d = ref_logp - logp(model, seq, n)
        k3 = k3 + (d.exp() - d - 1).sum()
    (c * k3 / n_norm).backward()
    want = [p.grad for p in model.parameters()]
    norm = torch.cat([w.flatten() for w in want]).norm().item()
    print(f"|grad| of the KL term alone: {norm:.3e}; summed k3 {k3.item():.4f} (policy_loss: {k3_sum:.4f})")
    assert norm > 1e-3 and abs(k3_sum - k3.item()) < 1e-4 * max(1.0, k3.item())
    assert all((a - b).abs().max() <= 1e-4 * norm for a, b in zip(got, want))


def test_rl_kl_penalty_to_the_starting_policy(ckpt, tok):
    history, lines = [], []
    args = rl_args(ckpt, "", "--steps", "2", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "8",
                   "--lr", "1e-2", "--kl", "0.1")
    train_rl.run(args, problems=toy_problems(tok), reward_fn=has_digit, log=lines.append, history=history)
    assert history[0]["event"] == "kl_reference" and history[0]["mb"] > 0 and "MB" in lines[0]
    steps = [h for h in history if h["event"] == "train"]
    assert steps[0]["kl"] == 0.0 < steps[1]["kl"]  # identical policies at step 1, apart at step 2
    assert " kl " in [l for l in lines if l.startswith("step 2/")][0]


def test_rl_resume_equals_an_uninterrupted_run(ckpt, tok, tmp_path):
    extra = ["--steps", "4", "--save-every", "2", "--prompts-per-step", "2", "--group-size", "4",
             "--max-new-tokens", "6", "--lr", "1e-3", "--micro-batch", "3"]
    train_rl.run(rl_args(ckpt, tmp_path / "a", *extra), problems=toy_problems(tok), reward_fn=has_digit,
                 log=lambda s: None)
    with pytest.raises(Interrupted):
        train_rl.run(rl_args(ckpt, tmp_path / "b", *extra), problems=toy_problems(tok), reward_fn=has_digit,
                     log=interrupt_at("step 3/"))
    train_rl.run(rl_args(ckpt, tmp_path / "b", *extra, "--resume"), problems=toy_problems(tok), reward_fn=has_digit,
                 log=lambda s: None)
    assert same(weights(tmp_path / "a/model"), weights(tmp_path / "b/model"))
    assert not same(weights(tmp_path / "a/model"), weights(ckpt))


def test_rl_from_a_data_file_with_the_default_reward(ckpt, tmp_path, capsys):
    import transformers
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a}+{a}?", "answer": str(2 * a)}) + "\n"
                            for a in range(8)))
    out = tmp_path / "out"
    train_rl.main(["--model", ckpt, "--data", str(data), "--out", str(out), "--window", "8", "--steps", "2",
                   "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "6", "--held-out-frac", "0.25",
                   "--eval-every", "1", "--show-every", "1"])
    printed = capsys.readouterr().out
    print(printed)
    assert "6 problems, 2 held out" in printed and "near 0 by construction" in printed
    assert "step 2/2  reward" in printed and "eval step 2: greedy accuracy" in printed
    assert len(open(out / "samples.jsonl").readlines()) == 4  # 2 steps x one sample of each of 2 prompts
    assert swarr.load(str(out / "model"))[0].windows == [8, 8]
    assert transformers.AutoConfig.from_pretrained(out / "model").sliding_window == 8
    transformers.AutoModelForCausalLM.from_pretrained(out / "model")


# ---- bad input: one clear line each, exit status 2 ----------------------------------------------------------
@pytest.mark.parametrize("script", [train_sft, train_rl])
def test_bad_inputs_give_one_clear_line(script, ckpt, tmp_path, capsys):
    good, empty = tmp_path / "good.jsonl", tmp_path / "empty.jsonl"
    good.write_text(json.dumps({"question": "What is 1+1?", "answer": "2"}) + "\n")
    empty.write_text("")
    cases = [(["--model", ckpt, "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: data file not found"),
             (["--model", ckpt, "--data", str(empty)], "no records"),
             (["--model", ckpt, "--data", str(good), "--window", "100000"], "larger than the model's context (512"),
             (["--model", str(tmp_path / "no-model"), "--data", str(good)], "no-model: model folder not found"),
             (["--model", ckpt], "--data is required")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            script.main(argv + ["--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
