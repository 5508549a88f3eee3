"""Past one device: the training scripts under torchrun, data parallel with DDP or FSDP2, on CPU (gloo) or GPU (nccl).

    torchrun --nproc_per_node=8 train_sft.py --model ... --batch-size 4 --shard fsdp

Every process runs the same script on its share of each step's batch. One rule keeps every mode equal to a single
process that takes the whole batch: each process divides its summed token losses by the *global* token count (known
to all, or all-reduced), and the gradients are *summed* across processes, never averaged. DDP's default hook and
FSDP2's default reduce-scatter average, so both are switched to sums here (which also avoids relying on the
backend's AVG: FSDP2 over gloo has been reported to sum when asked to average, PyTorch issue 162338).

    ddp    each process holds the whole model, its gradients and the optimizer moments; the gradients are all-reduced
           once per step (the backward of the last micro-batch).
    fsdp   FSDP2 (fully_shard): parameters, gradients and optimizer moments are split over the processes, one group
           per block plus the root (embeddings, final norm, head: tied embeddings stay in one group); a block's
           weights are all-gathered just before its forward and backward. On GPU it computes in bf16 and reduces
           the gradients in fp32. Generation and evaluation (rollouts, accuracy, held-out loss) run on an unsharded
           copy of the weights, without collectives: each process takes its share and the counts are summed.

Every process always has work of its own, and all run the same number of forward passes (FSDP2 gathers weights
in each): a global batch is split by `split` (RL: --prompts-per-step must be a multiple of the number of processes;
SFT: a micro-batch of N*B examples, the short one of an epoch left out when it has fewer than N, see even_batches),
and --skip-zero-var, which would leave a different number of rows on each process, runs in one process only.

Without torchrun (WORLD_SIZE unset) every function here is a no-op and the scripts run exactly as one process.
A collective that waits longer than --timeout seconds for another process (one that died or hangs) stops the run.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import sys

import torch
import torch.distributed as dist

from .safe_io import SwarrError
from .safe_io import run_cli as _run_cli

_DEVICE = torch.device("cpu")  # where the all-reduced scalars live (CUDA under nccl)


def add_args(p):
    p.add_argument("--shard", choices=["ddp", "fsdp"], default="ddp",
                   help="under torchrun: ddp (a whole copy per process) or fsdp (FSDP2: weights, gradients and "
                        "optimizer moments split over the processes)")
    p.add_argument("--timeout", type=float, default=900,
                   help="under torchrun: seconds a process waits for the others in a collective before stopping")


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Only rank 0 logs and writes files."""
    return rank() == 0


def setup(args):
    """Join the process group if torchrun started this process (WORLD_SIZE > 1): gloo on CPU, nccl on GPU (one GPU
    per process, cuda:LOCAL_RANK, written back into args.device), with --timeout on every collective."""
    global _DEVICE
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
        _DEVICE = torch.device(args.device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout),
                            device_id=_DEVICE if cuda else None)
    # The first process on each machine builds the attention kernels; the others then load the built library.
    from csrc import ops
    if local == 0:
        ops.load()
    dist.barrier()
    if local != 0:
        ops.load()


def check(args):
    """Refuse, with one line, a run whose work would not split evenly over the processes (see the top)."""
    n, P = world(), getattr(args, "prompts_per_step", None)
    if P is not None and P % n:
        raise SwarrError(f"--prompts-per-step {P} is not a multiple of the number of processes ({n})")
    if n > 1 and getattr(args, "skip_zero_var", False):
        raise SwarrError("--skip-zero-var runs in one process only: the groups it leaves out differ between "
                         "processes, which must all run as many micro-batches")


def split(items):
    """This process's consecutive share of a global batch (a list or range): items[r*n//N : (r+1)*n//N] on rank r
    of N. Every process gets at least one item when there are at least N. Example: 5 items over 2 processes ->
    rank 0 [a, b], rank 1 [c, d, e]; 8 prompt slots over 2 -> range(0, 4) and range(4, 8)."""
    n, N, r = len(items), world(), rank()
    return items[r * n // N:(r + 1) * n // N]


def even_batches(batches: list) -> list:
    """The batches that `split` gives every process a part of: those with at least as many items as processes (in
    one process, every batch). Example on 2 processes: [[a, b, c, d], [e]] -> [[a, b, c, d]]."""
    kept = [b for b in batches if len(b) >= world()]
    if not kept:
        raise SwarrError(f"{sum(map(len, batches))} training examples cannot be split over {world()} processes")
    return kept


# ---- wrapping the model ----------------------------------------------------------------------------------
def _sum_hook(state, bucket):
    """DDP communication hook: all-reduce with a sum (the default hook averages)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


def wrap(model, args):
    """The module to call for training forward passes: the model itself in one process, a DDP wrapper, or the model
    sharded in place by FSDP2 (then create the optimizer after this call: it must see the sharded parameters).
    Activation checkpointing (model.checkpointing) runs inside each block's forward, so each block's FSDP hooks
    gather its weights again when the backward recomputes it."""
    if world() == 1:
        return model
    device = next(model.parameters()).device
    if args.shard == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        ddp.register_comm_hook(None, _sum_hook)
        return ddp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # the root: embed_tokens (= lm_head when tied), norm, lm_head
    for m in model.modules():
        if isinstance(m, FSDPModule):  # sum, do not average (see the top of this file)
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model


@contextlib.contextmanager
def sync(fwd, last: bool):
    """Run one micro-batch's forward and backward inside this: the gradients are summed across processes in the
    last micro-batch's backward only; the others accumulate locally. Every process runs as many micro-batches."""
    if world() > 1 and hasattr(fwd, "no_sync"):  # DDP
        with (contextlib.nullcontext() if last else fwd.no_sync()):
            yield
        return
    if world() > 1 and hasattr(fwd, "set_requires_gradient_sync"):  # FSDP2
        fwd.set_requires_gradient_sync(last)
    yield


# ---- numbers from all processes --------------------------------------------------------------------------
def all_sum(*xs: float) -> list[float]:
    """Each x summed over the processes (float64)."""
    if world() == 1:
        return list(xs)
    t = torch.tensor(xs, dtype=torch.float64, device=_DEVICE)
    dist.all_reduce(t)
    return t.tolist()


def all_cat(t: torch.Tensor) -> torch.Tensor:
    """Every process's t (same shape on each), concatenated along dim 0 in rank order."""
    if world() == 1:
        return t
    parts = [torch.empty_like(t, device=_DEVICE) for _ in range(world())]
    dist.all_gather(parts, t.to(_DEVICE))
    return torch.cat(parts).to(t.device)


# ---- whole weights: generation, saving, resuming ---------------------------------------------------------
def _is_sharded(model) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def _plain_like(model, device):
    """An unsharded model of the model's config and windows (uninitialised, embeddings tied as in the config) on
    `device`. (Under FSDP2 type(model) is FSDP's subclass of the model's class; its constructor builds the plain
    class.)"""
    plain = type(model).empty(model.cfg, device, next(model.parameters()).dtype)
    assert plain.windows == model.windows  # cfg.windows follows set_window
    return plain


@torch.no_grad()
def unsharded(model):
    """The weights to generate with: the model itself, or under FSDP2 a plain copy refreshed from the shards (one
    all-gather, parameter by parameter; every process must call this at the same point)."""
    if not _is_sharded(model):
        return model
    plain = model.__dict__.get("_unsharded")  # (kept out of the module's children: not a part of its state)
    if plain is None:
        plain = model.__dict__["_unsharded"] = _plain_like(model, next(model.parameters()).device)
    for p, q in zip(model.parameters(), plain.parameters()):  # same order, ties counted once in both
        q.copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)  # (a no_grad forward leaves the root gathered)
    return plain.eval()


def full_state(model, optimizer) -> tuple:
    """(a model holding the whole weights, the whole optimizer state) on rank 0, for writing a checkpoint; (None,
    None) on the other ranks. In one process: (model, optimizer.state_dict()). Every process must call this."""
    if world() == 1:
        return model, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None, None
    if not _is_sharded(model):
        return model, optim
    plain = _plain_like(model, "cpu")  # (uninitialised storage, never written: the gathered weights replace it)
    plain.load_state_dict(weights, assign=True)
    if model.cfg.tie_embeddings:  # assign=True gave lm_head a tensor of its own: tie it again
        plain.lm_head.weight = plain.model.embed_tokens.weight
    return plain, optim


def load_full_state(model, optimizer, weights: dict, optim: dict):
    """The inverse of full_state: every process passes the whole weights and optimizer state (read from the files
    that rank 0 wrote, on a filesystem all processes see) and keeps its part."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True))


def run_cli(fn, *args):
    """safe_io.run_cli(fn, *args) (bad input: one `error:` line, exit 2), then leave the process group. Under torchrun a
    collective that fails, because another process died or did not answer within --timeout, is one `error:` line
    and exit 1 (no traceback, no hang). Ctrl-C reaches every process: rank 0 alone prints its line (exit 130)."""
    def quiet_ranks(*a):
        try:
            return fn(*a)
        except KeyboardInterrupt:
            if world() > 1 and not is_main():
                os._exit(130)  # (rank 0 says it, naming the last good checkpoint)
            raise
    try:
        _run_cli(quiet_ranks, *args)
    except SystemExit as e:  # bad input: the error line is out. Leave without tearing the process group down: the
        if world() == 1:     # others stop at the same moment, and a teardown racing theirs can abort (SIGABRT)
            raise
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)  # what sys.exit("message") would have printed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if e.code is None else e.code if isinstance(e.code, int) else 1)
    except RuntimeError as e:  # (dist.DistError is one; gloo's errors inside DDP's hook arrive as plain ones)
        lost = isinstance(e, dist.DistError) or any(w in str(e) for w in ("gloo", "NCCL", "Connection", "imed out"))
        if world() == 1 or not lost:
            raise
        why = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        why = re.sub(r"^.*\.(cc|cpp):\d+\] ", "", why).split(". This is typically")[0]  # gloo's message, no source
        print(f"error: process {rank()} of {world()} lost contact with the others, stopping ({why[:160]})",
              file=sys.stderr)
        os._exit(1)  # skip the process group's teardown, which could wait for the lost process
    if dist.is_initialized():
        dist.barrier()  # all processes done with their collectives before any tears its connections down
        dist.destroy_process_group()

