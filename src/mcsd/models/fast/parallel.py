"""Tensor parallelism of the fast runtime on ``torch.distributed`` (NCCL on CUDA, gloo on a CPU).

Each of the N ranks holds one slice of every large weight (Megatron layout):

- column-parallel packed QKV (its H / N query heads and KV / N key/value heads, biases too) and
  packed gate-up (its I / N rows of each), so each rank's attention and its KV cache cover only
  its own heads;
- row-parallel output (``o_proj``) and down projections, each followed by one all-reduce;
- a vocabulary-parallel embedding (each rank looks up the tokens of its vocabulary rows, zeros
  elsewhere, then one all-reduce) and head (each rank scores its rows; ``ParallelFastModel``
  all-gathers the slices into the full logits the verifier reads). A vocabulary that N does not
  divide is padded with zero rows, whose logits are cut off after the gather.

Norms, rotary tables and q/k norms are replicated. Weights are sharded at load time from the
same checkpoint: each rank reads only its slices of the safetensors files (``load_shard``).

Every rank runs the same engine step with the same seed (the draft replicated, the same
proposer and coins), so the ranks agree on the accepted path without messages of their own;
``check_ranks`` verifies it (``ParallelFastModel``). The captured forward contains only the
all-reduces (no host syncs), which NCCL supports inside CUDA graphs.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mcsd.config import STATIC_MAX_LENGTH, ParallelConfig
from mcsd.models.base import Keep, Rows
from mcsd.models.fast.arch import Architecture, read_architecture
from mcsd.models.fast.model import TransformerLM, _shards, load_state, tie
from mcsd.models.fast.runtime import FastModel


@dataclass(frozen=True)
class Shard:
    """This process's place in the tensor-parallel group."""

    rank: int
    world: int
    group: Any = None  # torch.distributed ProcessGroup; None: the default group

    def span(self, total: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's equal part of ``total`` rows (padded at the end)."""
        part = -(-total // self.world)
        return self.rank * part, (self.rank + 1) * part


def check_tp(arch: Architecture, tp: int, device: torch.device) -> None:
    """A ``ValueError`` naming what ``tp`` does not fit: below 1, not dividing the attention
    heads, KV heads or intermediate size, or more ranks than visible GPUs on CUDA. (A vocabulary
    that ``tp`` does not divide is padded.)"""
    ParallelConfig(size=tp)
    for what, count in (
        ("attention heads", arch.num_heads),
        ("KV heads", arch.num_kv_heads),
        ("intermediate size", arch.intermediate_size),
    ):
        if count % tp:
            raise ValueError(f"tp={tp} must divide the model's {what} ({count})")
    if device.type == "cuda" and tp > torch.cuda.device_count():
        raise ValueError(f"tp={tp} exceeds the visible GPUs ({torch.cuda.device_count()})")


def local_architecture(arch: Architecture, world: int) -> Architecture:
    """The architecture one rank's model has: 1 / ``world`` of the heads, KV heads,
    intermediate size and (padded) vocabulary; the hidden size whole."""
    return replace(
        arch,
        num_heads=arch.num_heads // world,
        num_kv_heads=arch.num_kv_heads // world,
        intermediate_size=arch.intermediate_size // world,
        vocab_size=-(-arch.vocab_size // world),
    )


class RowParallelLinear(nn.Linear):
    """``x @ W_r.T`` over this rank's input columns, summed over the ranks (one all-reduce)."""

    def __init__(self, in_features: int, out_features: int, shard: Shard) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.shard = shard

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.shard.group)
        return out


class VocabParallelEmbedding(nn.Embedding):
    """This rank's vocabulary rows ``[start, start + V / N)``; other tokens look up zeros, and
    one all-reduce sums the ranks' lookups into every token's embedding."""

    def __init__(self, rows: int, dim: int, shard: Shard) -> None:
        super().__init__(rows, dim)
        self.shard = shard
        self.start = shard.rank * rows

    def forward(self, tokens: Tensor) -> Tensor:
        local = tokens - self.start  # [B, n]
        inside = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(torch.where(inside, local, 0), self.weight)  # [B, n, D]
        out = out * inside[..., None].to(out.dtype)
        dist.all_reduce(out, group=self.shard.group)
        return out


def parallel_lm(arch: Architecture, shard: Shard, max_length: int) -> TransformerLM:
    """One rank's ``TransformerLM`` on the current device context, its row-parallel
    projections and vocabulary-parallel embedding in place."""
    local = local_architecture(arch, shard.world)
    lm = TransformerLM(local, max_length)
    d, hd = local.hidden_size, local.head_dim
    lm.embed = VocabParallelEmbedding(local.vocab_size, d, shard)
    for layer in lm.layers:
        layer.attention.wo = RowParallelLinear(local.num_heads * hd, d, shard)
        layer.mlp.w2 = RowParallelLinear(local.intermediate_size, d, shard)
    return lm


# ---------------------------------------------------------------- weights
def _plan(name: str, arch: Architecture, shard: Shard) -> tuple[int, int, int, int] | None:
    """How this rank slices the Hugging Face tensor ``name``: ``(dim, start, stop, total)``
    along ``dim`` (``total``: the unpadded length there), or None when it is replicated."""
    hd = arch.head_dim
    module = name.rsplit(".", 2)[-2]  # "model.layers.0.self_attn.q_proj.weight" -> "q_proj"
    if module in ("embed_tokens", "lm_head"):
        return (0, *shard.span(arch.vocab_size), arch.vocab_size)
    rows = {
        "q_proj": arch.num_heads * hd,
        "k_proj": arch.num_kv_heads * hd,
        "v_proj": arch.num_kv_heads * hd,
        "gate_proj": arch.intermediate_size,
        "up_proj": arch.intermediate_size,
    }
    columns = {"o_proj": arch.num_heads * hd, "down_proj": arch.intermediate_size}
    if module in rows:
        return (0, *shard.span(rows[module]), rows[module])
    if module in columns:
        return (1, *shard.span(columns[module]), columns[module])
    return None


def _take(
    name: str, get: Callable[[int, int, int], Tensor], arch: Architecture, shard: Shard
) -> Tensor:
    """This rank's slice of ``name`` (``get(dim, start, stop)`` reads it), zero-padded past the
    unpadded length (the vocabulary only)."""
    plan = _plan(name, arch, shard)
    if plan is None:
        return get(0, 0, -1)
    dim, start, stop, total = plan
    part = get(dim, min(start, total), min(stop, total))
    if stop > total:
        shape = list(part.shape)
        shape[dim] = stop - max(start, total)
        part = torch.cat([part, part.new_zeros(shape)], dim=dim)
    return part


def shard_state(arch: Architecture, tensors: dict[str, Tensor], shard: Shard) -> dict[str, Tensor]:
    """This rank's slices of Hugging Face-named ``tensors`` (for ``load_state``)."""

    def slicer(name: str) -> Callable[[int, int, int], Tensor]:
        tensor = tensors[name]

        def get(dim: int, start: int, stop: int) -> Tensor:
            return tensor if stop < 0 else tensor.narrow(dim, start, stop - start)

        return get

    return {name: _take(name, slicer(name), arch, shard) for name in tensors}


def read_shard(directory: str | Path, arch: Architecture, shard: Shard) -> dict[str, Tensor]:
    """This rank's slices of a checkpoint's tensors, reading only those slices from disk."""
    from safetensors import safe_open

    out: dict[str, Tensor] = {}
    for path in _shards(Path(directory)):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                view = handle.get_slice(name)

                def get(dim: int, start: int, stop: int, view: Any = view, name: str = name):
                    if stop < 0:
                        return handle.get_tensor(name)
                    return view[start:stop] if dim == 0 else view[:, start:stop]

                out[name] = _take(name, get, arch, shard)
    return out


def build_shard(
    arch: Architecture,
    shard: Shard,
    *,
    dtype: torch.dtype,
    device: torch.device,
    max_length: int | None = None,
    directory: str | Path | None = None,
    state: dict[str, Tensor] | None = None,
    seed: int = 0,
) -> TransformerLM:
    """One rank's model (as ``mcsd.models.fast.runtime.build``): weights from this rank's
    slices of ``directory`` or of Hugging Face-named ``state``, else random (seeded per rank:
    not the weights of another ``tp``)."""
    check_tp(arch, shard.world, device)
    length = max_length or min(arch.max_positions, STATIC_MAX_LENGTH)
    with torch.device("meta"):
        lm = parallel_lm(arch, shard, length)
    lm = lm.to_empty(device=device).to(dtype)
    if arch.tied_embeddings:
        tie(lm)
    if directory is not None:
        load_state(lm, read_shard(directory, arch, shard), str(directory))
    elif state is not None:
        load_state(lm, shard_state(arch, state, shard))
    else:
        lm.init_random(seed + 1000 * shard.rank)
    lm.init_rope()
    return lm


# ---------------------------------------------------------------- runtime
class RankMismatch(RuntimeError):
    """Tensor-parallel ranks fed different tokens or kept different paths (``check_ranks``)."""


class ParallelFastModel(FastModel):
    """``FastModel`` over one rank's shard: the head's vocabulary slices all-gathered into the
    full float32 logits; with ``check_ranks``, every forward's tokens and positions and every
    commit's kept path compared across the ranks (``RankMismatch`` naming the step and ranks)."""

    kind = "fast"

    def __init__(
        self,
        lm: TransformerLM,
        shard: Shard,
        *,
        vocab_size: int,
        check_ranks: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(lm, **options)
        self.shard = shard
        self._vocab = vocab_size
        self.check_ranks = check_ranks
        self.steps = 0  # forwards run: the step a mismatch names

    def restricted(self, head_rows: Tensor) -> FastModel:
        raise ValueError("a reduced-vocabulary head is for the draft, which tp replicates")

    def with_rows(self, batch_size: int) -> ParallelFastModel:
        """The same shard and settings with a cache of ``batch_size`` rows (weights shared)."""
        return ParallelFastModel(
            self.lm,
            self.shard,
            vocab_size=self._vocab,
            check_ranks=self.check_ranks,
            **(self.options | {"batch_size": batch_size}),
        )

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.label}:tp{self.shard.world}"

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def _logits(self, out: Tensor, n: int, rows: Rows) -> Tensor:
        part = super()._logits(out, n, rows).contiguous()  # [B, n | 1, V / N]
        parts = [torch.empty_like(part) for _ in range(self.shard.world)]
        dist.all_gather(parts, part, group=self.shard.group)
        return torch.cat(parts, dim=-1)[..., : self._vocab]  # [B, n | 1, V]

    def _compute(
        self,
        tokens: Tensor,
        positions: Tensor,
        tree_mask: Tensor,
        logits: Rows,
        layers: tuple[int, ...],
    ) -> tuple[Tensor | None, Tensor | None]:
        # every forward, of all rows or of a row bucket (``forward_rows``), hidden states or not
        self.steps += 1
        if self.check_ranks:
            self._agree("tokens", torch.cat([tokens.flatten(), positions.flatten()]).tolist())
        return super()._compute(tokens, positions, tree_mask, logits, layers)

    @torch.inference_mode()
    def commit(self, keep: Keep = None) -> None:
        if self.check_ranks:
            flat = [] if keep is None else [-1 - len(row) for row in keep]
            flat += [i for row in keep or [] for i in row]
            self._agree("kept path", flat)
        super().commit(keep)

    def _agree(self, what: str, values: list[int]) -> None:
        """All-gather ``values`` (lengths first, then padded) and compare with rank 0's."""
        world, group = self.shard.world, self.shard.group
        device = self._kv.device if self._kv is not None else self.device
        length = torch.tensor([len(values)], dtype=torch.long, device=device)
        lengths = [torch.empty_like(length) for _ in range(world)]
        dist.all_gather(lengths, length, group=group)
        width = max(int(x.item()) for x in lengths)
        mine = torch.full((width + 1,), -(2**62), dtype=torch.long, device=device)
        mine[: len(values)] = torch.tensor(values, dtype=torch.long)
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine, group=group)
        rows = [x.tolist() for x in everyone]
        bad = [rank for rank in range(1, world) if rows[rank] != rows[0]]
        if bad:
            raise RankMismatch(
                f"tensor-parallel ranks disagree at step {self.steps} on the {what}: rank 0 "
                f"vs rank(s) {', '.join(map(str, bad))}"
            )


def load_parallel(
    directory: str | Path,
    shard: Shard,
    *,
    dtype: torch.dtype,
    device: torch.device,
    max_length: int | None = None,
    compile: bool = False,
    label: str | None = None,
    check_ranks: bool = False,
) -> ParallelFastModel:
    """``mcsd.models.fast.load_fast`` for one rank: its slices of the checkpoint only."""
    arch = read_architecture(directory)
    check_tp(arch, shard.world, device)
    lm = build_shard(
        arch, shard, dtype=dtype, device=device, max_length=max_length, directory=directory
    )
    return ParallelFastModel(
        lm,
        shard,
        vocab_size=arch.vocab_size,
        check_ranks=check_ranks,
        label=label or Path(directory).name,
        compile=compile,
    )


# ---------------------------------------------------------------- process group
def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def init_group(rank: int, world: int, device: torch.device, *, address: str, port: int) -> Shard:
    """Join the ``world``-rank group (NCCL on CUDA, gloo on a CPU) as ``rank``; NVLink
    multicast off unless the environment already says otherwise. On CUDA the rank's GPU is
    ``cuda:rank``. Returns the ``Shard``."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{address}:{port}",
            rank=rank,
            world_size=world,
        )
    return Shard(rank, world)


def join(parallel: ParallelConfig, device: torch.device) -> Shard:
    """This process's ``Shard`` of a ``parallel.size``-rank group: the group ``launch`` made,
    or one from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` /
    ``MASTER_PORT``); a ``ValueError`` when there is none or its size is not ``parallel.size``."""
    if not dist.is_initialized() and "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        rank = int(os.environ["RANK"])
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        raise ValueError(
            f"tp={parallel.size} needs {parallel.size} processes: use the CLI's --tp, "
            "mcsd.models.fast.parallel.launch, or torchrun --nproc-per-node "
            f"{parallel.size}"
        )
    if dist.get_world_size() != parallel.size:
        raise ValueError(
            f"tp={parallel.size}, but the process group has {dist.get_world_size()} ranks"
        )
    return Shard(dist.get_rank(), dist.get_world_size())


def rank_device(device: torch.device, rank: int) -> torch.device:
    """The device of ``rank``: its own GPU on CUDA, the CPU otherwise."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def _follow(
    rank: int, world: int, port: int, address: str, device: torch.device, run: Callable, args: Any
) -> None:
    """A spawned rank: ``run``, then the group torn down once every rank is done. A rank that
    finished ends with ``os._exit(0)``: the interpreter's finalization of a gloo process can
    abort it (SIGABRT, "terminate called without an active exception") after its work is done,
    which rank 0 would report as a failed rank."""
    init_group(rank, world, rank_device(device, rank), address=address, port=port)
    try:
        run(rank, world, *args)
        dist.barrier()  # every rank's last collective is done before any group is torn down
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(
    run: Callable[..., Any],
    tp: int,
    args: Sequence[Any] = (),
    *,
    device: torch.device,
    address: str = ParallelConfig.address,
) -> Any:
    """Run ``run(rank, world, *args)`` on ``tp`` ranks: this process is rank 0 (its result is
    returned), ranks 1..tp-1 are spawned (``torch.multiprocessing``) and follow the same
    schedule. ``run`` must be a module-level function (spawned processes import it)."""
    ParallelConfig(size=tp)
    if device.type == "cuda" and tp > torch.cuda.device_count():
        raise ValueError(f"tp={tp} exceeds the visible GPUs ({torch.cuda.device_count()})")
    if tp == 1:
        return run(0, 1, *args)
    import torch.multiprocessing as mp

    port = free_port(address)
    context = mp.get_context("spawn")
    followers = [
        context.Process(
            target=_follow, args=(rank, tp, port, address, device, run, tuple(args)), daemon=True
        )
        for rank in range(1, tp)
    ]
    for process in followers:
        process.start()
    init_group(0, tp, rank_device(device, 0), address=address, port=port)
    try:
        result = run(0, tp, *args)
        dist.barrier()  # see _follow: a rank torn down mid-collective aborts its peers
    except BaseException:
        for process in followers:  # they may wait on a collective rank 0 never joins
            process.terminate()
        raise
    finally:
        dist.destroy_process_group()
        for process in followers:
            process.join()
    failed = [p.exitcode for p in followers if p.exitcode]
    if failed:
        raise RuntimeError(f"{len(failed)} tensor-parallel rank(s) failed (exit codes {failed})")
    return result


__all__ = [
    "ParallelFastModel",
    "RankMismatch",
    "Shard",
    "build_shard",
    "check_tp",
    "init_group",
    "join",
    "launch",
    "load_parallel",
    "local_architecture",
]
