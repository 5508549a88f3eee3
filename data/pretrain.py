"""Make the embedded default model: a tiny self-attention (SA) LM pretrained from scratch on the synthetic task.

    python data/pretrain.py          # ~7 min on 2 CPU cores (438 s idle, 2500 steps); writes data/tiny-sa/
    python data/pretrain.py --device cuda --out /tmp/tiny-sa      # the same recipe on a GPU

1. writes a tokenizer.json: byte-level BPE whose merges only join a few words of the task (" so", " left",
   "assistant", ...), so digits and symbols stay one token each, plus <|endoftext|>, <|im_start|>, <|im_end|>;
2. builds a Qwen2ForCausalLM config (4 layers, hidden 128, 4 query heads, 2 KV heads, tied embeddings; about
   0.8M parameters) with swarr.Config / swarr.Transformer, all layers full attention;
3. trains it with train_sft.run (--loss-on all: plain language modelling) on data.synth.corpus(): problems
   followed by a solution whose lines restate what is left half the time (synth.CORPUS_RATE), WITHOUT the chat
   format -- so the model can do the arithmetic and the copying either way, and it is SFT that teaches it to
   answer a ChatML question. The documents
   form one <|endoftext|>-separated token stream cut into 512-token texts wherever the cut falls, as LM
   pretraining usually does (texts of whole documents batched by length train far worse: train_sft batches
   similar lengths together, which makes every batch one problem size);
4. writes data/tiny-sa/ with swarr.save: config.json, model.safetensors (float32, 3.3 MB), tokenizer.json,
   pretrain.json (the arguments and the wall time), and prints the accuracy of the result on held-out
   problems given as plain text "<|endoftext|><problem>\n" (greedy; sampled at T = 1, with its restatement rate).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import swarr  # noqa: E402
import synth  # noqa: E402
from support import evaluate, tokenizer  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = [" so", " left", "boxed", "user", "assistant"]  # one token each: the words of every trace and of ChatML


def _bpe(parts: list[str], merges: list[list[str]]) -> list[str]:
    """Apply BPE merges to a list of symbols: repeatedly join the adjacent pair of lowest merge rank."""
    rank = {tuple(m): i for i, m in enumerate(merges)}
    while len(parts) > 1:
        i = min(range(len(parts) - 1), key=lambda i: rank.get((parts[i], parts[i + 1]), len(rank)))
        if (parts[i], parts[i + 1]) not in rank:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def tokenizer_json(words=WORDS) -> dict:
    """A byte-level BPE tokenizer.json: the 256 bytes (ids 0-255), then the merges that make each of `words` one
    token, grown the way BPE training grows them (apply the merges so far, join the first remaining pair), then
    the special tokens. Digits are split one per token (pre-tokenizer Digits(individual_digits))."""
    b2u = tokenizer.bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    merges: list[list[str]] = []
    for w in words:
        while len(parts := _bpe([b2u[b] for b in w.encode()], merges)) > 1:
            merges.append(parts[:2])
            vocab[parts[0] + parts[1]] = len(vocab)
    added = [dict(id=len(vocab) + i, content=s, single_word=False, lstrip=False, rstrip=False, normalized=False,
                  special=True) for i, s in enumerate(SPECIALS)]
    byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=True)
    return dict(version="1.0", truncation=None, padding=None, added_tokens=added, normalizer=None,
                pre_tokenizer=dict(type="Sequence", pretokenizers=[dict(type="Digits", individual_digits=True),
                                                                   byte_level]),
                post_processor=None, decoder=byte_level,
                model=dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix=None,
                           end_of_word_suffix=None, fuse_unk=False, byte_fallback=False, ignore_merges=False,
                           vocab=vocab, merges=merges))


def make_tokenizer(folder: str) -> swarr.Tokenizer:
    path = os.path.join(folder, "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tokenizer_json(), f, ensure_ascii=False, indent=1)
    return swarr.Tokenizer(path)


def hf_config(tok: swarr.Tokenizer, dim=128, layers=4, heads=4, kv_heads=2, hidden=384) -> dict:
    """config.json of the tiny model, as transformers writes a Qwen2 config (all layers full attention)."""
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": tok.vocab_size,
            "hidden_size": dim, "intermediate_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu",
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": layers,
            "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
            "bos_token_id": tok.special["<|endoftext|>"], "eos_token_id": tok.special["<|im_end|>"]}


def init_model(hf: dict, seed: int) -> swarr.Transformer:
    """A fresh swarr.Transformer, initialised as transformers initialises Qwen2 (normal(0, 0.02), zero biases)."""
    torch.manual_seed(seed)
    model = swarr.Transformer(swarr.Config.from_hf(hf))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 2:
                p.normal_(0.0, hf["initializer_range"])
    return model


def pack(tok: swarr.Tokenizer, docs: list[str], length: int) -> list[tuple[str, str]]:
    """The usual pretraining stream: documents joined by <|endoftext|>, cut into texts of `length` tokens wherever
    the cut falls (so some texts start in the middle of a solution, without its question). Returned as ("", text)
    pairs for train_sft.run. Every batch then mixes problems of all sizes and both styles."""
    stream = tok.encode("".join("<|endoftext|>" + d for d in docs))
    return [("", tok.decode(stream[i:i + length])) for i in range(0, len(stream), length)]


def plain_accuracy(model, tok, probs) -> dict:
    """Accuracy of the pretrained (not chat-tuned) model continuing the plain text "<problem>\n": greedy, and the
    mean over 4 samples at T = 1 with the share of their lines that restate (the corpus has half)."""
    recs = [{"prompt": f"<|endoftext|>{p.prompt}\n", "answer": str(p.answer)} for p in probs]
    greedy = evaluate.evaluate(model, tok, recs, max_new_tokens=240, batch_size=100, chat=False, progress=False)[0]
    sampled, rows = evaluate.evaluate(model, tok, recs, max_new_tokens=240, batch_size=100, chat=False, samples=4,
                                   temperature=1.0, progress=False)
    counts = [synth.restate_counts(r["completion"]) for r in rows]
    return {"greedy": greedy["accuracy"], "sampled": sampled["mean_accuracy"],
            "restate_rate": sum(c[0] for c in counts) / max(1, sum(c[1] for c in counts))}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "tiny-sa"), help="where to write the HF folder")
    p.add_argument("--steps", type=int, default=2500, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="packed texts per step")
    p.add_argument("--pack", type=int, default=512, help="tokens per packed text")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--docs", type=int, default=60000, help="documents in the corpus (problems with a solution)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=384, help="MLP intermediate size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval", type=int, default=100, help="held-out problems for the final accuracy check (0 = skip)")
    p.add_argument("--device", default="cpu")
    return p


def main(argv=None, log=print) -> str:
    a = parser().parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer(tmp)
        hf = hf_config(tok, a.dim, a.layers, a.heads, a.kv_heads, a.hidden)
        model = init_model(hf, a.seed)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"tiny SA model: {a.layers} layers, dim {a.dim}, {a.heads} heads / {a.kv_heads} KV heads, "
            f"vocab {tok.vocab_size}: {n_params / 1e6:.2f}M parameters")
        docs = pack(tok, synth.corpus(a.docs, seed=a.seed), a.pack)
        held = pack(tok, synth.corpus(200, seed=a.seed + 10_000), a.pack)
        import train_sft  # the repository's training loop, run as plain LM training (--loss-on all)
        args = train_sft.parser().parse_args([
            "--out", "", "--loss-on", "all", "--max-steps", str(a.steps), "--batch-size", str(a.batch_size),
            "--lr", str(a.lr), "--warmup", str(min(50, a.steps // 10)), "--min-lr-ratio", "0.1",
            "--log-every", str(a.log_every), "--eval-every", "0", "--seed", str(a.seed), "--device", a.device])
        model = train_sft.run(args, model.to(a.device), tok, train=docs, held_out=held, log=log)
        elapsed = time.time() - t0
        if a.eval:
            acc = plain_accuracy(model, tok, synth.problems(a.eval, seed=synth.TEST_SEED))
            log("held-out problems, plain text: " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
        info = {"command": "python data/pretrain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "docs": a.docs, "seed": a.seed,
                "parameters": n_params, "wall_s": round(elapsed), "threads": torch.get_num_threads()}
        swarr.save(model.float(), tok, a.out, extra_files={"pretrain.json": json.dumps(info, indent=2)})
    log(f"wrote {a.out} ({n_params / 1e6:.2f}M parameters) in {elapsed:.0f}s")
    return a.out


if __name__ == "__main__":
    main()
