"""Table-driven toy language models behind the ``SpecModel`` protocol.

A ``TableLM`` maps a context (the tuple of tokens a position can see) to a next-token
distribution. It keeps its "KV cache" as the list of cached tokens and rebuilds every new token's
context from the attention mask it is given, so a wrong tree mask, position or cache compaction
in the engine changes what the model sees, and the whole-engine losslessness tests catch it.
The exact distribution over output sequences is known by enumeration (``sequence_distribution``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

from mcsd.config import SamplingConfig
from mcsd.sampling import warp

NextTokenFn = Callable[[tuple[int, ...]], Tensor]  # context -> [V] probabilities


class TableLM:
    """A toy LM: next-token distribution ``table(context)``; its logits are log-probabilities."""

    def __init__(self, table: NextTokenFn, vocab_size: int, max_context: int | None = None) -> None:
        self.table = table
        self._vocab_size = vocab_size
        self._max_context = max_context
        self._tokens: list[int] = []  # cached tokens (batch of one row)
        self._memo: dict[tuple[int, ...], Tensor] = {}  # context -> logits [V]
        self.forward_calls = 0  # forwards run (the engine's step counts are checked against it)

    @classmethod
    def random(
        cls, vocab_size: int, *, order: int = 2, seed: int = 0, sparsity: float = 0.0
    ) -> TableLM:
        """A random Markov table over the last ``order`` tokens (Dirichlet rows, some zeros)."""
        generator = torch.Generator().manual_seed(seed)
        shape = (vocab_size + 1,) * order + (vocab_size,)  # index vocab_size = "no token yet"
        alpha = torch.ones(shape, dtype=torch.float64)
        probs = torch._standard_gamma(alpha, generator=generator)
        if sparsity > 0.0:
            zero = torch.rand(shape, generator=generator, dtype=torch.float64) < sparsity
            zero[..., 0] = False  # keep every row non-empty
            probs = probs.masked_fill(zero, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)

        def table(context: tuple[int, ...]) -> Tensor:
            padded = (vocab_size,) * max(0, order - len(context)) + tuple(context[-order:])
            return probs[padded]

        return cls(table, vocab_size)

    # ------------------------------------------------------------------ protocol
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_context(self) -> int | None:
        return self._max_context

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def cache_length(self) -> int:
        return len(self._tokens)

    def forward(self, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        batch, n = tokens.shape
        if batch != 1:
            raise ValueError("TableLM runs one sequence at a time (batch size 1)")
        cache = len(self._tokens)
        if tuple(mask.shape) != (1, n, cache + n):
            raise ValueError(f"mask must have shape [1, {n}, {cache + n}], got {list(mask.shape)}")
        row_tokens = self._tokens + tokens[0].tolist()
        logits = torch.empty(1, n, self._vocab_size)
        for j, (row, position) in enumerate(
            zip(mask[0].tolist(), positions[0].tolist(), strict=True)
        ):
            visible = [i for i, seen in enumerate(row) if seen]
            if not visible or visible[-1] != cache + j:
                raise ValueError(f"new token {j} must attend to itself and nothing after it")
            if position != len(visible) - 1:
                raise ValueError(
                    f"new token {j} sees {len(visible)} tokens but has position {position}"
                )
            logits[0, j] = self._logits(tuple(row_tokens[i] for i in visible))
        self._tokens = row_tokens
        self.forward_calls += 1
        return logits

    def _logits(self, context: tuple[int, ...]) -> Tensor:
        if context not in self._memo:
            self._memo[context] = torch.log(self.table(context)).float()
        return self._memo[context]

    def compact(self, start: int, keep: Tensor) -> None:
        self._tokens = self._tokens[:start] + [self._tokens[i] for i in keep[0].tolist()]

    def trim(self, length: int) -> None:
        self._tokens = self._tokens[:length]

    def reset(self) -> None:
        self._tokens = []


def sequence_distribution(
    model: TableLM, prompt: tuple[int, ...], length: int, sampling: SamplingConfig
) -> dict[tuple[int, ...], float]:
    """Exact probability of every continuation of ``prompt`` with ``length`` tokens under
    ``model`` warped by ``sampling`` (enumeration; keep vocab ** length small)."""
    result: dict[tuple[int, ...], float] = {}
    for continuation in itertools.product(range(model.vocab_size), repeat=length):
        prob = 1.0
        context = tuple(prompt)
        for token in continuation:
            p = warp(torch.log(model.table(context))[None], sampling)[0].double()
            prob *= float(p[token])
            if prob == 0.0:
                break
            context += (token,)
        if prob > 0.0:
            result[continuation] = prob
    return result
