"""Table-driven toy language models behind the runtime protocol.

A ``TableLM`` maps a context (the tuple of tokens a position can see) to a next-token
distribution. It keeps its "KV cache" as the list of committed tokens of each row plus the
pending block (``CommittedRows`` keeps their lengths), and rebuilds every new token's context
from the tree mask it is given, so a wrong tree mask, position or commit in the engine or a
proposer changes what the model sees, and the whole-engine losslessness tests catch it. The exact
distribution over output sequences is known by enumeration (``sequence_distribution``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

from mcsd.config import SamplingConfig
from mcsd.models.base import CommittedRows, Keep, Rows, check_forward, check_keep
from mcsd.sampling import warp

NextTokenFn = Callable[[tuple[int, ...]], Tensor]  # context -> [V] probabilities


class TableLM(CommittedRows):
    """A toy LM: next-token distribution ``table(context)``; its logits are log-probabilities.
    A forward of some rows runs the others as padding (``RuntimeBase.forward_rows``)."""

    resizable = True

    def __init__(
        self,
        table: NextTokenFn,
        vocab_size: int,
        max_context: int | None = None,
        *,
        batch_size: int = 1,
    ) -> None:
        super().__init__(batch_size, torch.device("cpu"), torch.float32)
        self.table = table
        self._vocab_size = vocab_size
        self._max_context = max_context
        self._tokens: list[list[int]] = [[] for _ in range(batch_size)]  # committed, per row
        self._block: list[list[int]] = [[] for _ in range(batch_size)]  # pending, per row
        self._memo: dict[tuple[int, ...], Tensor] = {}  # context -> logits [V]
        self.forward_calls = 0  # forwards run (the engine's step counts are checked against it)

    @classmethod
    def random(
        cls,
        vocab_size: int,
        *,
        order: int = 2,
        seed: int = 0,
        sparsity: float = 0.0,
        batch_size: int = 1,
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

        return cls(table, vocab_size, batch_size=batch_size)

    def with_rows(self, batch_size: int) -> TableLM:
        """The same table with ``batch_size`` rows."""
        return TableLM(self.table, self._vocab_size, self._max_context, batch_size=batch_size)

    # ------------------------------------------------------------------ protocol
    @property
    def name(self) -> str:
        return f"table:{self._vocab_size}"

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_context(self) -> int | None:
        return self._max_context

    def forward(
        self, tokens: Tensor, positions: Tensor, tree_mask: Tensor, *, logits: Rows = "all"
    ) -> Tensor | None:
        batch, n = check_forward(self, tokens, positions, tree_mask, logits)
        masks = tree_mask.expand(batch, *tree_mask.shape[-2:]).tolist()  # [B, n, P + n]
        out = torch.empty(batch, n, self._vocab_size)
        blocks = []  # every row's pending tokens after this forward (kept once all are valid)
        for b in range(batch):
            committed, block = self._tokens[b], self._block[b] + tokens[b].tolist()
            pending = len(self._block[b])
            for j, (row, position) in enumerate(zip(masks[b], positions[b].tolist(), strict=True)):
                seen = [i for i, see in enumerate(row) if see]
                if not seen or seen[-1] != pending + j:
                    raise ValueError(f"new token {j} must attend to itself and nothing after it")
                context = (*committed, *(block[i] for i in seen))
                if position != len(context) - 1:
                    raise ValueError(
                        f"new token {j} sees {len(context)} tokens but has position {position}"
                    )
                out[b, j] = self._logits(context)
            blocks.append(block)
        self._block = blocks
        self._pending += n
        self.forward_calls += 1
        return None if logits == "none" else out[:, -1:] if logits == "last" else out

    def _logits(self, context: tuple[int, ...]) -> Tensor:
        if context not in self._memo:
            self._memo[context] = torch.log(self.table(context)).float()
        return self._memo[context]

    def commit(self, keep: Keep = None) -> None:
        rows = check_keep(self, keep)
        for b, kept in enumerate(rows):
            self._tokens[b] = self._tokens[b] + [self._block[b][i] for i in kept]
        self._block = [[] for _ in range(self._batch)]
        self._committed_after(rows)

    def reset(self, row: int | None = None) -> None:
        if self._reset_rows(row):
            self._tokens = [[] for _ in range(self._batch)]
            self._block = [[] for _ in range(self._batch)]
        else:
            self._tokens[row] = []


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
