"""The decoding loop (DESIGN section 1): propose a token tree, verify it in one target forward,
accept a path losslessly, commit it.

Invariants between steps (``committed`` = prompt + generated tokens): the target's committed
cache holds ``committed[:-1]``; the last token is *pending* (position ``L - 1``). One step:

1. PROPOSE  the proposer builds a tree below the pending token: node tokens, and the q each
            node's children were drawn from (``mcsd.draft``).
2. VERIFY   one target forward over [pending, nodes...] with the tree mask gives p for every
            node; the rule's tree verifier (``mcsd.verify.rules.tree_verifier``: a device
            verifier or the host walk, as the rule's record says) accepts a path and draws the
            correction or bonus token.
3. COMMIT   the target keeps the pending token and the accepted path, the proposer commits the
            step; stop at a stop token or ``max_new_tokens`` without overshooting.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mcsd.config import VERIFIER_CACHE, SamplingConfig, SpecConfig
from mcsd.draft.base import Proposer
from mcsd.models.base import Runtime, chain_mask, to_device
from mcsd.sampling import sample, warp
from mcsd.stats import StepRecord
from mcsd.tree import ROOT, TokenTree
from mcsd.verify.rules import Rule, TreeVerifier, get_rule, tree_verifier


@dataclass(frozen=True)
class Step:
    tokens: tuple[int, ...]  # tokens committed by this step
    record: StepRecord
    finish_reason: str | None  # "stop" (a stop token), "length", or None (not finished)


def speculative_decode(
    target: Runtime,
    proposer: Proposer,
    prompt_ids: list[int],
    spec: SpecConfig,
    *,
    vocab_size: int,
    stop_token_ids: frozenset[int] = frozenset(),
    device_verify: bool | None = None,
    verify_dtype: torch.dtype | None = None,
) -> Iterator[Step]:
    """Yield one ``Step`` per target forward until a stop token or ``max_new_tokens``.

    ``vocab_size`` is the common vocabulary: logits are cut to it, so padding ids beyond the
    tokenizer are never sampled. ``device_verify``: verify every node at once on the device
    with one host transfer when the rule has a device verifier; ``None`` leaves the choice to
    the rule's record (greedy always; the sampled rules on CUDA). ``verify_dtype``: of the device
    verifiers' residual work (default float32 on CUDA, float64 elsewhere)."""
    if not spec.speculative:
        raise ValueError("tree 'none' is plain decoding: run autoregressive_decode")
    rule = get_rule(spec.resolved_rule())
    max_new_tokens = _check_lengths(target, proposer, prompt_ids, spec.max_new_tokens)
    device = target.device
    generator = torch.Generator(device=device)
    generator.manual_seed(spec.seed if spec.seed is not None else int(torch.seed()))
    # per (tree shape, deterministic flags), least recently used first: dynamic and context
    # trees have a new shape most steps
    verifiers: OrderedDict[
        tuple[TokenTree, tuple[bool, ...] | None], tuple[TreeVerifier, torch.Tensor, torch.Tensor]
    ] = OrderedDict()

    clock = StepClock(device)
    started = clock.mark()
    committed = list(prompt_ids)
    _prefill(target, committed[:-1])
    proposer.start(committed)
    prefill_time = clock.host_seconds(started, clock.mark())
    produced = 0
    while True:
        pending = len(committed) - 1  # position of the pending token
        started = clock.mark()
        proposal = proposer.propose(committed, generator)
        drafted = clock.mark()

        tree, deterministic = proposal.tree, proposal.deterministic
        if (tree, deterministic) not in verifiers:
            verifiers[tree, deterministic] = _verifier(
                tree, rule, spec, device, device_verify, verify_dtype, vocab_size, deterministic
            )
            if len(verifiers) > VERIFIER_CACHE:
                verifiers.popitem(last=False)
        verifiers.move_to_end((tree, deterministic))
        verifier, mask, offsets = verifiers[tree, deterministic]
        tokens = torch.cat([to_device([committed[-1]], device), proposal.tokens])[None]  # [1, N+1]
        logits = target.forward(tokens, (pending + offsets)[None], mask)[0, :, :vocab_size]
        launched = verifier.launch(proposal.tokens, logits, proposal.q, generator)
        result, accepted_tokens = verifier.finish(launched)  # the step's host synchronisation

        accepted = list(result.accepted)
        target.commit([[0, *(1 + a for a in accepted)]])
        new_tokens = [*accepted_tokens, result.token]
        proposer.commit(accepted, new_tokens)
        ended = clock.mark()
        draft_time = clock.device_seconds(started, drafted)
        new_tokens, finish_reason = _truncate(new_tokens, max_new_tokens - produced, stop_token_ids)
        if finish_reason is None and produced + len(new_tokens) >= max_new_tokens:
            finish_reason = "length"
        committed += new_tokens
        produced += len(new_tokens)
        record = StepRecord(
            accepted=len(accepted),
            emitted=len(new_tokens),
            attempted=len(accepted) + (0 if result.bonus else 1),
            ranks=result.ranks,
            tree_size=tree.num_nodes,
            accepted_context=sum(deterministic[a] for a in accepted) if deterministic else 0,
            draft_time=draft_time,
            target_time=clock.host_seconds(started, ended) - draft_time,
            prefill_time=prefill_time,
        )
        prefill_time = 0.0
        yield Step(tuple(new_tokens), record, finish_reason)
        if finish_reason is not None:
            return


class StepClock:
    """Times the parts of a step. A mark is the host time and, on CUDA, an event recorded on
    the stream (read after the step's one host synchronisation: no synchronisation of its own).
    The draft's share is its device time on CUDA (its kernels are queued, so a host clock would
    bill them to whatever waits for them next: the target), the host time elsewhere; the
    target's share is the rest of the step's wall time (forward, verification, commit)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> tuple[float, torch.cuda.Event | None]:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return time.perf_counter(), event

    def device_seconds(self, start, end) -> float:
        """Between two marks: device time on CUDA (both behind a synchronisation already)."""
        if self.cuda:
            return start[1].elapsed_time(end[1]) / 1e3
        return end[0] - start[0]

    @staticmethod
    def host_seconds(start, end) -> float:
        return end[0] - start[0]


def _verifier(
    tree: TokenTree,
    rule: Rule,
    spec: SpecConfig,
    device: torch.device,
    device_verify: bool | None,
    verify_dtype: torch.dtype | None,
    vocab_size: int,
    deterministic: tuple[bool, ...] | None,
) -> tuple[TreeVerifier, torch.Tensor, torch.Tensor]:
    """For one tree: its verifier, the target's tree mask ``[N+1, N+1]`` over [pending root,
    nodes] (everyone sees the root, nodes see their ancestors and themselves) and the position
    offsets ``[N+1]`` after the root."""
    if max(len(tree.children(u)) for u in (ROOT, *range(tree.num_nodes))) > vocab_size:
        raise ValueError(
            f"tree {tree.describe()} has more children per node than {vocab_size} tokens"
        )
    n = tree.num_nodes
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool, device=device)
    mask[:, 0] = True
    mask[1:, 1:] = tree.ancestor_mask(device)
    offsets = torch.tensor([0, *tree.depth], device=device)
    verifier = tree_verifier(
        tree, rule, spec.target, device, device_verify, verify_dtype, deterministic
    )
    return verifier, mask, offsets


def autoregressive_decode(
    target: Runtime,
    prompt_ids: list[int],
    sampling: SamplingConfig,
    max_new_tokens: int,
    *,
    vocab_size: int,
    stop_token_ids: frozenset[int] = frozenset(),
    seed: int | None = None,
) -> Iterator[Step]:
    """The target alone, one token per forward (the baseline ``ar`` of ``mcsd bench``), through
    the same runtime, warping and stopping as ``speculative_decode``."""
    budget = _check_lengths(target, None, prompt_ids, max_new_tokens)
    device = target.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.seed()))
    started = time.perf_counter()
    _prefill(target, prompt_ids[:-1])
    prefill_time = time.perf_counter() - started
    pending = prompt_ids[-1]
    one = chain_mask(1, device=device)  # [1, 1]
    for produced in range(1, budget + 1):
        started = time.perf_counter()
        cache = target.cache_lengths()[0]
        tokens = to_device([[pending, cache]], device)  # [1, 2]: the token and its position
        logits = target.forward(tokens[:, :1], tokens[:, 1:], one, logits="last")
        target.commit()
        if sampling.greedy:  # argmax of the one-hot p is the argmax of the logits
            pending = int(logits[0, -1, :vocab_size].argmax())
        else:
            pending = sample(warp(logits[0, -1, :vocab_size], sampling), generator)
        finish = "stop" if pending in stop_token_ids else "length" if produced == budget else None
        elapsed = time.perf_counter() - started
        record = StepRecord(0, 1, 0, (), 0, 0.0, elapsed, prefill_time=prefill_time)
        prefill_time = 0.0
        yield Step((pending,), record, finish)
        if finish is not None:
            return


def _prefill(model: Runtime, tokens: list[int]) -> None:
    model.reset()
    if not tokens:
        return
    device = model.device
    ids = to_device([tokens], device)  # [1, T]
    positions = torch.arange(len(tokens), device=device)[None]  # [1, T]
    model.forward(ids, positions, chain_mask(len(tokens), device=device), logits="none")
    model.commit()


def _truncate(
    tokens: list[int], budget: int, stop_token_ids: frozenset[int]
) -> tuple[list[int], str | None]:
    """Cut ``tokens`` after the first stop token (kept, as Hugging Face does) or at ``budget``."""
    for i, token in enumerate(tokens[:budget]):
        if token in stop_token_ids:
            return tokens[: i + 1], "stop"
    if len(tokens) >= budget:
        return tokens[:budget], "length"
    return tokens, None


def _check_lengths(
    target: Runtime, proposer: Proposer | None, prompt_ids: list[int], max_new_tokens: int
) -> int:
    """Validate the prompt against the context limits; return the usable max_new_tokens."""
    if not prompt_ids:
        raise ValueError("prompt must contain at least one token")
    depth = proposer.max_depth if proposer is not None else 1
    limits = [m.max_context for m in (target, proposer) if m is not None]
    limits = [limit for limit in limits if limit is not None]
    if not limits:
        return max_new_tokens
    context = min(limits)
    if len(prompt_ids) >= context:
        raise ValueError(
            f"prompt has {len(prompt_ids)} tokens, at or beyond the model context of {context}"
        )
    # Each step needs positions up to (committed - 1) + max_depth.
    room = context - len(prompt_ids) - depth
    if room < 1:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens leaves no room for tree depth {depth} "
            f"within the model context of {context}"
        )
    return min(max_new_tokens, room)
