"""The decoding loop (DESIGN section 1): draft a token tree, verify it in one target forward,
accept a path losslessly, commit it to both KV caches.

Invariants between steps (``committed`` = prompt + generated tokens):
- the target's cache holds ``committed[:-1]``; the last token is *pending* (position ``L``);
- the draft's cache holds a prefix of ``committed``; ``draft_uncached`` is the rest (it always
  ends with the pending token, and sometimes starts with an accepted leaf the draft never ran).

One step:
1. DRAFT   one draft forward per tree level: level 0 runs ``draft_uncached`` and gives q at the
           root; level d runs every depth-d node that has children, with the tree mask. Children
           are sampled from q (or taken as the draft's top-k for deterministic rules).
2. VERIFY  one target forward over [pending, nodes...] with the tree mask; p for every node.
3. ACCEPT  ``verify_tree`` walks the tree with the rule: accepted path + correction/bonus token.
4. COMMIT  both caches keep the prefix and the accepted path; stop at EOS / max_new_tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from mcsd.config import RULES_WITH_Q, RULES_WITHOUT_REPLACEMENT, SamplingConfig, SpecConfig
from mcsd.models.base import SpecModel, causal_mask
from mcsd.sampling import draw_children, sample, warp
from mcsd.stats import StepRecord
from mcsd.tree import ROOT, TokenTree
from mcsd.verify import verify_tree
from mcsd.verify_batched import SAMPLED_RULES, GreedyTreeVerifier, SampledTreeVerifier

DETERMINISTIC_RULES = ("topk", "greedy")  # children are the draft's top-k, not samples


@dataclass(frozen=True)
class Step:
    tokens: tuple[int, ...]  # tokens committed by this step
    record: StepRecord
    finish_reason: str | None  # "stop" (a stop token), "length", or None (not finished)


def speculative_decode(
    target: SpecModel,
    draft: SpecModel,
    prompt_ids: list[int],
    spec: SpecConfig,
    *,
    vocab_size: int,
    stop_token_ids: frozenset[int] = frozenset(),
    device_verify: bool | None = None,
) -> Iterator[Step]:
    """Yield one ``Step`` per target forward until a stop token or ``max_new_tokens``.

    ``vocab_size`` is the common vocabulary: logits of both models are cut to it, so padding
    ids beyond the tokenizer are never sampled. ``device_verify``: verify the sampled rules sps,
    mcss and mcss-wor for every node at once on the device with one host transfer
    (``SampledTreeVerifier``) instead of walking the tree node by node; default: on CUDA devices,
    where each host round trip stalls the GPU (on a CPU the walk, which visits only the accepted
    path, does less work). Greedy verification always runs on the device.
    """
    tree: TokenTree = spec.token_tree()
    rule = spec.resolved_rule()
    max_new_tokens = _check_lengths(target, draft, prompt_ids, spec, tree)
    if max(len(tree.children(u)) for u in (ROOT, *range(tree.num_nodes))) > vocab_size:
        raise ValueError(
            f"tree {tree.describe()} has more children per node than {vocab_size} tokens"
        )
    device = target.device
    generator = torch.Generator(device=device)
    generator.manual_seed(spec.seed if spec.seed is not None else int(torch.seed()))
    drafter = _Drafter(draft, tree, spec.draft_sampling, rule, vocab_size, generator)
    verify_mask = _tree_mask(tree, device)  # [N+1, N+1]
    # Greedy verification runs on the device: one host transfer per step (mcsd.verify_batched).
    greedy = GreedyTreeVerifier(tree, device) if rule == "greedy" else None
    if device_verify is None:
        device_verify = device.type == "cuda"
    sampled = None
    if device_verify and rule in SAMPLED_RULES and not drafter.deterministic:
        sampled = SampledTreeVerifier(tree, rule, device)
    offsets = torch.tensor([0, *tree.depth], device=device)  # [N+1] positions after the root

    committed = list(prompt_ids)
    target.reset()
    draft.reset()
    _prefill(target, committed[:-1])
    _prefill(draft, committed[:-1])
    draft_uncached = committed[-1:]
    produced = 0
    while True:
        cache = len(committed) - 1  # the pending token sits at position `cache`
        started = time.perf_counter()
        node_tokens, q = drafter.draft(draft_uncached, cache)  # [N], [N+1, V] or None
        drafted = time.perf_counter()

        tokens = torch.cat([to_device([committed[-1]], device), node_tokens])[None]  # [1, N+1]
        mask = torch.cat(
            [torch.ones(tree.num_nodes + 1, cache, dtype=torch.bool, device=device), verify_mask], 1
        )[None]  # [1, N+1, cache + N+1]
        logits = target.forward(tokens, (cache + offsets)[None], mask)[0, :, :vocab_size]
        if greedy is not None:  # p is one-hot at the argmax: skip building it
            fetched = greedy.device_result(node_tokens, logits.argmax(dim=-1)).tolist()
            result, accepted_tokens = greedy.result(fetched)
        elif sampled is not None:
            p = warp(logits, spec.target)  # [N+1, V]
            assert q is not None  # sampled drafts always return q
            outcome = sampled.device_result(node_tokens, p, q, generator)  # [2, N+1]
            fetched = torch.cat([outcome.flatten(), node_tokens]).tolist()  # the one transfer
            rows = tree.num_nodes + 1
            result = sampled.result([fetched[:rows], fetched[rows : 2 * rows]])
            node_list = fetched[2 * rows :]
            accepted_tokens = [node_list[a] for a in result.accepted]
        else:
            p = warp(logits, spec.target)  # [N+1, V]
            result = verify_tree(
                tree, node_tokens, p, q if rule in RULES_WITH_Q else None, rule, generator
            )
            node_list = node_tokens.tolist()
            accepted_tokens = [node_list[a] for a in result.accepted]
        verified = time.perf_counter()

        accepted = list(result.accepted)
        target.compact(cache + 1, to_device([[cache + 1 + a for a in accepted]], device))
        draft_uncached = [*drafter.commit(cache, accepted, accepted_tokens), result.token]
        new_tokens = [*accepted_tokens, result.token]
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
            draft_time=drafted - started,
            target_time=verified - drafted,
        )
        yield Step(tuple(new_tokens), record, finish_reason)
        if finish_reason is not None:
            return


def autoregressive_decode(
    target: SpecModel,
    prompt_ids: list[int],
    sampling: SamplingConfig,
    max_new_tokens: int,
    *,
    vocab_size: int,
    stop_token_ids: frozenset[int] = frozenset(),
    seed: int | None = None,
) -> Iterator[Step]:
    """The target alone, one token per forward (the baseline ``ar`` of ``mcsd bench``), through
    the same model adapter, warping and stopping as ``speculative_decode``."""
    spec = SpecConfig(tree=(1,), target=sampling, max_new_tokens=max_new_tokens, seed=seed)
    budget = _check_lengths(target, target, prompt_ids, spec, spec.token_tree())
    device = target.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.seed()))
    target.reset()
    _prefill(target, prompt_ids[:-1])
    pending = prompt_ids[-1]
    for produced in range(1, budget + 1):
        started = time.perf_counter()
        cache = target.cache_length
        tokens = to_device([[pending, cache]], device)  # [1, 2]: the token and its position
        logits = target.forward(tokens[:, :1], tokens[:, 1:], causal_mask(1, cache, 1, device))
        if sampling.greedy:  # argmax of the one-hot p is the argmax of the logits
            pending = int(logits[0, -1, :vocab_size].argmax())
        else:
            pending = sample(warp(logits[0, -1, :vocab_size], sampling), generator)
        finish = "stop" if pending in stop_token_ids else "length" if produced == budget else None
        record = StepRecord(0, 1, 0, (), 0, 0.0, time.perf_counter() - started)
        yield Step((pending,), record, finish)
        if finish is not None:
            return


@dataclass(frozen=True)
class _Level:
    """What the drafter does at one tree depth; static for a given tree."""

    picks: tuple[tuple[Tensor, Tensor], ...]  # parents with k children: (rows [P], children [P, k])
    run: tuple[int, ...]  # nodes of this depth that have children: run through the draft
    run_index: Tensor  # [len(run)] long, the same nodes as a device tensor
    tree_mask: Tensor  # [len(run), slots before + len(run)] bool, over the tree part of the cache
    offsets: Tensor  # [len(run)] long, position of each run node relative to the root


class _Drafter:
    """Grows the token tree with the draft model, one forward per level. The draft's cache
    holds, after the committed tokens, every node that has children, in BFS order (its slot).
    Index tensors are built once, so a level issues no host synchronisation."""

    def __init__(
        self,
        model: SpecModel,
        tree: TokenTree,
        sampling: SamplingConfig,
        rule: str,
        vocab_size: int,
        generator: torch.Generator,
    ) -> None:
        self.model = model
        self.tree = tree
        self.sampling = sampling
        self.rule = rule
        self.deterministic = rule in DETERMINISTIC_RULES or sampling.greedy
        self.replacement = rule not in RULES_WITHOUT_REPLACEMENT
        self.vocab_size = vocab_size
        self.generator = generator
        device = model.device
        ancestors = tree.ancestor_mask(device)  # [N, N]
        inner = [u for u in range(tree.num_nodes) if tree.children(u)]
        self.slot = {u: i for i, u in enumerate(inner)}  # node -> index after the committed
        self.levels: list[_Level] = []
        for level in tree.levels:
            parents = list(dict.fromkeys(tree.parents[u] for u in level))
            run = tuple(u for u in level if tree.children(u))
            before = [u for u in inner if u < level.start]
            mask = torch.cat(
                [
                    ancestors[list(run)][:, before],
                    torch.eye(len(run), dtype=torch.bool, device=device),
                ],
                dim=1,
            )
            offsets = torch.tensor([tree.depth[u] for u in run], device=device)
            by_k: dict[int, list[int]] = {}
            for parent in parents:
                by_k.setdefault(len(tree.children(parent)), []).append(parent)
            picks = tuple(
                (
                    torch.tensor([parent + 1 for parent in same], device=device),
                    torch.tensor([tree.children(parent) for parent in same], device=device),
                )
                for same in by_k.values()
            )
            run_index = torch.tensor(run, dtype=torch.long, device=device)
            self.levels.append(_Level(picks, run, run_index, mask, offsets))

    def draft(self, uncached: list[int], cache: int) -> tuple[Tensor, Tensor | None]:
        """Returns the node tokens ``[N]`` and q ``[N+1, V]`` (row 0 the root, row u+1 node u;
        rows of nodes without children stay zero), or None for q when neither the picking nor
        the rule reads it (deterministic drafts under greedy / top-k verification)."""
        tree, device, n = self.tree, self.model.device, len(uncached)
        need_q = not self.deterministic or self.rule in RULES_WITH_Q
        start = self.model.cache_length
        assert start + n == cache + 1, "draft cache out of step with the committed tokens"
        ids = to_device([[*uncached, *range(start, start + n)]], device)  # [1, 2n]
        logits = self.model.forward(ids[:, :n], ids[:, n:], causal_mask(1, start, n, device))
        row_logits = torch.zeros(tree.num_nodes + 1, self.vocab_size, device=device)  # [N+1, V]
        row_logits[0] = logits[0, -1, : self.vocab_size]
        q = torch.zeros_like(row_logits) if need_q else None  # [N+1, V]
        if q is not None:
            q[0] = warp(row_logits[0], self.sampling)
        node_tokens = torch.zeros(tree.num_nodes, dtype=torch.long, device=device)  # [N]
        for level in self.levels:
            for rows, children in level.picks:  # every parent of the level at once
                k = children.shape[1]
                if self.deterministic:
                    node_tokens[children] = torch.topk(row_logits[rows], k, dim=-1).indices
                else:
                    assert q is not None
                    node_tokens[children] = draw_children(
                        q[rows], k, replacement=self.replacement, generator=self.generator
                    )  # [P, k]
            if not level.run:
                continue
            base = self.model.cache_length
            committed = torch.ones(len(level.run), cache + 1, dtype=torch.bool, device=device)
            mask = torch.cat([committed, level.tree_mask], dim=1)[None]  # [1, r, base + r]
            rows = level.run_index + 1
            out = self.model.forward(
                node_tokens[level.run_index][None], (cache + level.offsets)[None], mask
            )
            row_logits[rows] = out[0, :, : self.vocab_size]
            if q is not None:
                q[rows] = warp(row_logits[rows], self.sampling)
            assert self.model.cache_length == base + len(level.run)
        return node_tokens, q

    def commit(self, cache: int, accepted: list[int], accepted_tokens: list[int]) -> list[int]:
        """Keep the accepted nodes the draft ran; return the accepted tokens it has not run."""
        kept = [a for a in accepted if a in self.slot]
        assert kept == accepted[: len(kept)], "only the accepted leaf can be missing"
        index = [[cache + 1 + self.slot[a] for a in kept]]
        self.model.compact(cache + 1, to_device(index, self.model.device))
        return accepted_tokens[len(kept) :]


def to_device(values: list, device: torch.device) -> Tensor:
    """A long tensor from nested Python ints on ``device``. On CUDA it goes through pinned
    memory without blocking: a plain ``torch.tensor(..., device="cuda")`` waits for every queued
    kernel, which would stall the host once per call."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long).pin_memory().to(device, non_blocking=True)


def _tree_mask(tree: TokenTree, device: torch.device) -> Tensor:
    """Boolean ``[N+1, N+1]`` mask over [pending root, nodes]: everyone sees the root, nodes see
    their ancestors and themselves."""
    n = tree.num_nodes
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool, device=device)
    mask[:, 0] = True
    mask[1:, 1:] = tree.ancestor_mask(device)
    return mask


def _prefill(model: SpecModel, tokens: list[int]) -> None:
    if not tokens:
        return
    device = model.device
    ids = to_device([tokens], device)  # [1, T]
    positions = torch.arange(len(tokens), device=device)[None]  # [1, T]
    model.forward(ids, positions, causal_mask(1, 0, len(tokens), device))


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
    target: SpecModel, draft: SpecModel, prompt_ids: list[int], spec: SpecConfig, tree: TokenTree
) -> int:
    """Validate the prompt against the context limits; return the usable max_new_tokens."""
    if not prompt_ids:
        raise ValueError("prompt must contain at least one token")
    limits = [m.max_context for m in (target, draft) if m.max_context is not None]
    if not limits:
        return spec.max_new_tokens
    context = min(limits)
    if len(prompt_ids) >= context:
        raise ValueError(
            f"prompt has {len(prompt_ids)} tokens, at or beyond the model context of {context}"
        )
    # Each step needs positions up to (committed - 1) + max_depth.
    room = context - len(prompt_ids) - tree.max_depth
    if room < 1:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens leaves no room for tree depth {tree.max_depth} "
            f"within the model context of {context}"
        )
    return min(spec.max_new_tokens, room)
