"""Runtime: a GGUF model on llama.cpp, through llama-cpp-python's low-level API (CPU).

- The weights stay in the GGUF's own (quantised) format: no dequantisation, no transformers.
- One llama.cpp context per model (``LlamaCppConfig``: threads, KV cells, batch size), with a
  unified KV cache. The tree structure of the pending block becomes sequence ids
  (``mcsd.models.sequences``), so a whole token tree is scored in ONE ``llama_decode``, a draft's
  tree level in one more, and committing the accepted path costs a few metadata calls
  (``llama_memory_seq_cp``, then ``llama_memory_seq_keep`` for one row, ``llama_memory_seq_rm``
  of each branch id for several): the prefix is never decoded again.
- The logits of every new token come back as float32 (``llama_get_logits``, in batch order).
- Rows (``batch_size = B``: the server's ``--max-batch``, a list of prompts, ``mcsd bench
  --batch-size``) share the context and its cell pool: row ``r`` owns a block of sequence ids
  (``r * S`` for its committed tokens, the next ``S - 1`` for its tree's paths;
  ``LlamaCppConfig.row_sequences``), so rows never see each other's cells, every row's tokens go
  into the same ``llama_batch`` (one ``llama_decode`` for the whole batch's trees), a commit
  drops a row's own branch ids (``llama_memory_seq_rm``: ``seq_keep`` would drop every other
  row's too) and ``forward_rows`` runs a subset of the rows without padding the others
  (``computed_rows``: exactly those given). ``CommittedRows`` keeps each row's committed length
  and the pending block's size; each row's ``SequenceMap`` keeps its sequence ids. A
  draft's left-padded tokens (rows with uncached tokens of different lengths) are roots, so
  each takes an id of its row's block. ``raw_*`` (the baselines) use row 0.

``GGUFTokenizer`` is the tokenizer of a GGUF file through llama.cpp's own (``llama_tokenize``,
``llama_detokenize``) with the GGUF's chat template rendered by jinja2 the way transformers
renders it, so a GGUF pair needs no transformers tokenizer. ``load_llamacpp`` builds both.

Nothing else in mcsd touches a llama.cpp object; ``mcsd.models.llamacpp_baselines`` (llama.cpp's
own loops for ``mcsd bench``) uses the ``raw_*`` methods below.
"""

from __future__ import annotations

import ctypes
import json
import logging
import weakref
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mcsd.config import LLAMA_MAX_SEQUENCES, LlamaCppConfig
from mcsd.models.base import CommittedRows, Keep, Rows, chain_mask, check_forward, check_keep
from mcsd.models.sequences import COMMITTED, SequenceMap

GGUF_MAGIC = b"GGUF"
INSTALL_HINT = (
    "the llama.cpp runtime needs llama-cpp-python: pip install 'mcsd[llamacpp]' (it builds "
    "llama.cpp from source; .ci/prepare shows the flags)"
)
_UNUSED = 1 << 1  # llama_token_attr: LLAMA_TOKEN_ATTR_UNUSED (padding rows of the vocabulary)
_CONTROL = 1 << 3  # LLAMA_TOKEN_ATTR_CONTROL (<|im_start|>, <|endoftext|>, ...)
_USER_DEFINED = 1 << 4  # LLAMA_TOKEN_ATTR_USER_DEFINED (added tokens that are not control)


def bindings() -> Any:
    """The ``llama_cpp`` module; ``ValueError`` with the install hint when it is missing."""
    try:
        import llama_cpp
    except ImportError as error:
        raise ValueError(f"{INSTALL_HINT} ({error})") from None
    return llama_cpp


def bindings_available() -> bool:
    """Whether llama-cpp-python imports here (its shared library loads)."""
    try:
        bindings()
    except (ValueError, OSError, RuntimeError):
        return False
    return True


def check_gguf_file(path: str | Path) -> Path:
    """``path`` as a ``Path`` if it is a file that starts like a GGUF; ``ValueError`` otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    with path.open("rb") as handle:
        head = handle.read(4)
    if head != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})")
    return path


class _Model:
    """A loaded ``llama_model`` (weights, or the vocabulary alone), freed with its last user."""

    def __init__(self, path: Path, *, vocab_only: bool, repack: bool, verbose: bool) -> None:
        lib = bindings()
        # llama-cpp-python routes llama.cpp's log through this logger; above CRITICAL silences it
        level = logging.DEBUG if verbose else logging.CRITICAL + 1
        logging.getLogger("llama-cpp-python").setLevel(level)
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        params.vocab_only = vocab_only
        params.use_extra_bufts = repack
        pointer = lib.llama_model_load_from_file(str(path).encode(), params)
        if not pointer:
            raise ValueError(
                f"llama.cpp could not load {path} (a truncated file, or an architecture this "
                f"llama.cpp build does not know); run with LlamaCppConfig(verbose=True) for its log"
            )
        self.lib, self.path, self.pointer = lib, path, pointer
        self.vocab = lib.llama_model_get_vocab(pointer)
        self._finalizer = weakref.finalize(self, lib.llama_model_free, pointer)


class LlamaCppModel(CommittedRows):
    """A GGUF causal LM on one llama.cpp context, behind the runtime protocol
    (``mcsd.models.base``); see the module docstring. ``batch_size`` rows share the context:
    row ``r`` owns the sequence ids ``r * S .. (r + 1) * S - 1`` (``S``: ``row_sequences``,
    by default what llama.cpp's 256 ids allow per row) and ``context + pending_cells`` of the
    KV cells.
    ``weights``: a loaded model to share (``with_rows``) instead of loading ``path``."""

    kind = "llama.cpp"
    resizable = True  # hidden states: not returned (returns_hidden False, forward_hidden refuses)

    def __init__(
        self,
        path: str | Path,
        config: LlamaCppConfig | None = None,
        *,
        batch_size: int = 1,
        weights: _Model | None = None,
    ) -> None:
        config = LlamaCppConfig() if config is None else config
        if not isinstance(config, LlamaCppConfig):
            raise ValueError(f"config must be a LlamaCppConfig, got {type(config).__name__}")
        # activations and logits are float32 (the weights keep the GGUF's own types)
        super().__init__(batch_size, torch.device("cpu"), torch.float32)
        per_row, setting = _row_sequences(config, batch_size)
        path = check_gguf_file(path) if weights is None else weights.path
        self.config = config
        if weights is None:
            weights = _Model(path, vocab_only=False, repack=config.repack, verbose=config.verbose)
        self.model = weights
        lib = self.model.lib
        pointer = self.model.pointer
        if lib.llama_model_is_recurrent(pointer) or lib.llama_model_n_swa(pointer) > 0:
            raise ValueError(
                f"{path.name}: recurrent or sliding-window models are not supported by the "
                "llama.cpp runtime (its trees need a full-attention KV cache)"
            )
        if not lib.llama_model_has_decoder(pointer) or lib.llama_model_has_encoder(pointer):
            raise ValueError(f"{path.name}: the llama.cpp runtime runs decoder-only causal LMs")
        trained = int(lib.llama_model_n_ctx_train(pointer))
        self._max_context = min(config.context, trained) if trained > 0 else config.context
        # the KV cells one row may use: its committed positions and its pending block
        self._row_cells = self._max_context + config.pending_cells
        sequences = batch_size * per_row
        threads, batch_threads = config.thread_counts()
        params = lib.llama_context_default_params()
        params.n_ctx = batch_size * self._row_cells  # one pool, rows' cells interleaved in it
        params.n_batch = params.n_ubatch = config.batch
        params.n_seq_max = sequences
        params.n_threads, params.n_threads_batch = threads, batch_threads
        params.kv_unified = True  # one cell pool: sequences share the prefix's cells
        params.no_perf = True
        params.flash_attn_type = 1 if config.flash_attention else 0  # ENABLED / DISABLED
        params.embeddings = False
        context = lib.llama_init_from_model(pointer, params)
        if not context:
            raise ValueError(
                f"llama.cpp could not create a context of {params.n_ctx} cells "
                f"({batch_size} rows x {self._row_cells}) for {path.name} (out of memory?); "
                "lower batch_size, LlamaCppConfig.context or pending_cells"
            )
        batch = lib.llama_batch_init(config.batch, 0, per_row)
        self._finalizer = weakref.finalize(self, _free_context, lib, context, batch)
        self._lib, self._ctx, self._llama_batch = lib, context, batch
        self._memory = lib.llama_get_memory(context)
        self._vocab = int(lib.llama_vocab_n_tokens(self.model.vocab))
        self._tokens = np.ctypeslib.as_array(batch.token, shape=(config.batch,))
        self._positions = np.ctypeslib.as_array(batch.pos, shape=(config.batch,))
        self._n_seq = np.ctypeslib.as_array(batch.n_seq_id, shape=(config.batch,))
        self._outputs = np.ctypeslib.as_array(batch.logits, shape=(config.batch,))
        self._rows = [
            SequenceMap(per_row, base=row * per_row, setting=setting) for row in range(batch_size)
        ]

    def with_rows(self, batch_size: int) -> LlamaCppModel:
        """The same loaded weights with a new context of ``batch_size`` rows."""
        return LlamaCppModel(self.path, self.config, batch_size=batch_size, weights=self.model)

    # ------------------------------------------------------------------ protocol
    @property
    def name(self) -> str:
        return f"{self.kind}:{self.model.path.stem}"

    @property
    def path(self) -> Path:
        return self.model.path

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def max_context(self) -> int | None:
        return self._max_context

    @property
    def num_layers(self) -> int:
        return int(self._lib.llama_model_n_layer(self.model.pointer))

    @torch.inference_mode()
    def forward(
        self, tokens: Tensor, positions: Tensor, tree_mask: Tensor, *, logits: Rows = "all"
    ) -> Tensor | None:
        check_forward(self, tokens, positions, tree_mask, logits)
        return self._run(list(range(self.batch_size)), tokens, positions, tree_mask, logits)

    @torch.inference_mode()
    def forward_rows(
        self,
        rows: Sequence[int],
        tokens: Tensor,  # [R, n] long, the new tokens of ``rows``
        positions: Tensor,  # [R, n] long
        tree_mask: Tensor,  # [n, P + n] or [R, n, P + n] bool
        *,
        logits: Rows = "all",
    ) -> Tensor | None:
        """A forward of ``rows`` natively: the tokens of ``rows`` alone in the
        llama_batch; every other row's pending block gets ``n`` padding entries (no cell, no
        compute). Returns ``[B, n | 1, V]`` over every row (zeros for the skipped ones)."""
        check_forward(self, tokens, positions, tree_mask, logits, rows=rows)
        return self._run(list(rows), tokens, positions, tree_mask, logits)

    def computed_rows(self, rows: Sequence[int]) -> int:
        """The rows ``forward_rows`` computes: exactly those given."""
        return len(rows)

    def commit(self, keep: Keep = None) -> None:
        rows = check_keep(self, keep)
        if not self.pending_length:
            return
        kept = [s.whole_block() for s in self._rows] if keep is None else rows
        for sequences, path in zip(self._rows, kept, strict=True):
            sequences.check_path(path)  # every row's first: a refused commit changes nothing
        lib, memory = self._lib, self._memory
        for sequences, path in zip(self._rows, kept, strict=True):
            branches = sequences.branches
            copy = sequences.commit(path)
            if copy is not None:
                lib.llama_memory_seq_cp(memory, copy.source, copy.target, -1, copy.end)
            if self.batch_size == 1:  # one pass frees the rejected cells
                lib.llama_memory_seq_keep(memory, sequences.base)
                continue
            for seq in branches:  # seq_keep would drop the other rows' ids too
                lib.llama_memory_seq_rm(memory, seq, -1, -1)
        self._committed_after([list(path) for path in kept])

    def reset(self, row: int | None = None) -> None:
        if self._reset_rows(row):
            self._lib.llama_memory_clear(self._memory, False)
            for sequences in self._rows:
                sequences.reset()
            return
        sequences = self._rows[row]
        for seq in (sequences.base, *sequences.branches):
            self._lib.llama_memory_seq_rm(self._memory, seq, -1, -1)
        sequences.reset()

    # ------------------------------------------------------------------ tokenizer and stops
    def tokenizer(self) -> GGUFTokenizer:
        """The GGUF's own tokenizer (shares this runtime's loaded vocabulary)."""
        return GGUFTokenizer(self.model)

    # ------------------------------------------------------------------ llama.cpp's own loops
    def raw_decode(self, ids: Sequence[int], start: int, *, all_logits: bool) -> np.ndarray:
        """Decode ``ids`` at positions ``start, start + 1, ...`` in sequence 0 (row 0),
        bypassing the protocol's bookkeeping (``mcsd.models.llamacpp_baselines``; ``reset()``
        before and after). Returns a view of the logits, ``[len(ids), V]`` or ``[1, V]`` for
        the last."""
        if start + len(ids) > self._row_cells:
            raise ValueError(f"context overflow: {start + len(ids)} > {self._row_cells} KV cells")
        rows = None
        for first in range(0, len(ids), self.config.batch):
            chunk = list(ids[first : first + self.config.batch])
            positions = range(start + first, start + first + len(chunk))
            last = first + len(chunk) == len(ids)
            outputs = np.full(len(chunk), 1 if all_logits else 0, dtype=np.int8)
            outputs[-1] = 1 if all_logits or last else 0
            self._fill(chunk, positions, [(COMMITTED,)] * len(chunk), outputs)
            self._decode(len(chunk))
            if all_logits or last:
                rows = self._logits(len(chunk) if all_logits else 1)
        assert rows is not None, "raw_decode needs at least one token"
        return rows

    def raw_truncate(self, length: int) -> None:
        """Drop sequence 0's cells at positions >= ``length`` (after ``raw_decode``)."""
        self._lib.llama_memory_seq_rm(self._memory, COMMITTED, length, -1)

    @property
    def raw_context(self) -> Any:
        """The ``llama_context`` pointer (llama.cpp's sampler chains read its logits)."""
        return self._ctx

    # ------------------------------------------------------------------ internals
    def _run(
        self,
        rows: list[int],
        tokens: Tensor,  # [R, n] long
        positions: Tensor,  # [R, n] long
        tree_mask: Tensor,  # [n, P + n] or [R, n, P + n] bool
        logits: Rows,
    ) -> Tensor | None:
        """One forward of ``rows`` (validated): every row's sequence-id plan first (a refused
        forward changes nothing), their copies, then every row's tokens, row after row, in one
        llama_batch (split over decodes of ``LlamaCppConfig.batch`` tokens); the other rows
        get padding entries."""
        n = tokens.shape[1]
        pending = self.pending_length
        for row in rows:
            committed = self._rows[row].committed
            if committed + pending + n > self._row_cells:
                raise ValueError(
                    f"context overflow: row {row}: {committed} committed + {pending} pending + "
                    f"{n} new tokens exceed its {self._row_cells} KV cells in this llama.cpp "
                    f"context ({self._max_context} positions + LlamaCppConfig.pending_cells="
                    f"{self.config.pending_cells})"
                )
        width = n if logits == "all" else 1
        if n == 0:
            return None if logits == "none" else torch.zeros(self.batch_size, 0, self._vocab)
        masks = tree_mask.cpu()
        chain = chain_mask(n, pending)  # [n, P + n]
        plans = []
        for i, row in enumerate(rows):
            sequences = self._rows[row]
            mask = masks if masks.dim() == 2 else masks[i]  # [n, P + n]
            parents = sequences.chain_parents(n) if torch.equal(mask, chain) else None
            if parents is None:
                parents = sequences.parents_from_mask(mask.tolist())
            plans.append(sequences.plan(parents, positions[i].tolist()))
        for plan in plans:
            for copy in plan.copies:
                self._lib.llama_memory_seq_cp(self._memory, copy.source, copy.target, -1, copy.end)
        ids = tokens.reshape(-1).tolist()  # [R * n], row after row
        places = [p for plan in plans for p in plan.positions]
        seqs = [s for plan in plans for s in plan.seqs]
        outputs = np.zeros((len(rows), n), dtype=np.int8)  # [R, n]: which tokens give logits
        if logits == "all":
            outputs[:] = 1
        elif logits == "last":
            outputs[:, -1] = 1
        outputs = outputs.reshape(-1)  # [R * n]
        found = None if logits == "none" else torch.empty(len(rows) * width, self._vocab)
        done = 0  # logit rows read so far
        for start in range(0, len(ids), self.config.batch):
            stop = min(start + self.config.batch, len(ids))
            chunk = outputs[start:stop]
            self._fill(ids[start:stop], places[start:stop], seqs[start:stop], chunk)
            self._decode(stop - start)
            count = int(chunk.sum())
            if found is not None and count:
                found[done : done + count] = torch.from_numpy(self._logits(count))
                done += count
        for plan, row in zip(plans, rows, strict=True):
            self._rows[row].apply(plan)
        skipped = set(range(self.batch_size)) - set(rows)
        for row in skipped:
            self._rows[row].skip(n)
        self._pending += n
        if found is None:
            return None
        found = found.view(len(rows), width, self._vocab)  # [R, n | 1, V]
        if not skipped:
            return found
        out = torch.zeros(self.batch_size, width, self._vocab)  # [B, n | 1, V]
        out[rows] = found
        return out

    def _fill(
        self,
        ids: Sequence[int],
        positions: Sequence[int],
        seqs: Sequence[Sequence[int]],
        outputs: np.ndarray,
    ) -> None:
        """Write one llama_batch: tokens, positions, sequence ids, and which tokens output
        logits (``outputs`` ``[m]``, 1 or 0: llama.cpp skips the head's work for the rest)."""
        m = len(ids)
        batch = self._llama_batch
        batch.n_tokens = m
        self._tokens[:m] = ids
        self._positions[:m] = positions
        self._outputs[:m] = outputs
        for i, token_seqs in enumerate(seqs):
            self._n_seq[i] = len(token_seqs)
            row = batch.seq_id[i]
            for k, seq in enumerate(token_seqs):
                row[k] = seq

    def _decode(self, m: int) -> None:
        status = self._lib.llama_decode(self._ctx, self._llama_batch)
        if status == 1:
            raise ValueError(
                f"context overflow: llama.cpp found no KV cells for {m} more tokens; raise "
                "LlamaCppConfig.context or pending_cells"
            )
        if status != 0:
            raise RuntimeError(
                f"llama_decode failed with status {status} on a batch of {m} tokens (an mcsd "
                "bug: this runtime's bookkeeping no longer matches llama.cpp's cache; reset() "
                "it). LlamaCppConfig(verbose=True) shows llama.cpp's reason."
            )

    def _logits(self, m: int) -> np.ndarray:
        pointer = self._lib.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(pointer, shape=(m, self._vocab))  # [m, V] float32 view


def _row_sequences(config: LlamaCppConfig, batch_size: int) -> tuple[int, str]:
    """The sequence ids each of ``batch_size`` rows owns, and what to change for more;
    ``ValueError`` naming the parameter when llama.cpp cannot hold that many."""
    per_row = config.row_sequences
    if per_row is None:
        per_row = min(
            config.sequences, LLAMA_MAX_SEQUENCES // batch_size, config.batch // batch_size
        )
        if per_row < 2:
            raise ValueError(
                f"batch_size: {batch_size} rows leave {per_row} sequence ids per row (llama.cpp "
                f"holds {LLAMA_MAX_SEQUENCES} in all, LlamaCppConfig.batch={config.batch} covers "
                f"{config.batch}); a row needs 2 at least: lower batch_size"
            )
        if batch_size == 1:
            return per_row, "LlamaCppConfig.sequences"
        return per_row, "LlamaCppConfig.row_sequences or lower batch_size"
    total = batch_size * per_row
    if total > LLAMA_MAX_SEQUENCES:
        raise ValueError(
            f"batch_size: {batch_size} rows x LlamaCppConfig.row_sequences={per_row} = {total} "
            f"sequence ids, more than llama.cpp's {LLAMA_MAX_SEQUENCES}; lower row_sequences "
            f"(at most {LLAMA_MAX_SEQUENCES // batch_size} for {batch_size} rows) or batch_size"
        )
    if config.batch < total:  # llama.cpp asserts it (llama_context::output_reserve)
        raise ValueError(
            f"LlamaCppConfig.batch ({config.batch}) must be >= batch_size x row_sequences "
            f"({batch_size} x {per_row} = {total}): llama.cpp keeps room for one row of logits "
            "per sequence id in every decode"
        )
    return per_row, "LlamaCppConfig.row_sequences"


def _free_context(lib: Any, context: Any, batch: Any) -> None:
    lib.llama_batch_free(batch)
    lib.llama_free(context)


# ---------------------------------------------------------------------------- the tokenizer
class GGUFTokenizer:
    """The tokenizer stored in a GGUF file, run by llama.cpp, with the slice of the
    transformers tokenizer API that mcsd uses (``__call__``, ``encode``, ``decode``,
    ``apply_chat_template``, ``chat_template``, ``get_vocab``, ``len``, special ids)."""

    def __init__(self, model: _Model) -> None:
        self._model = model
        lib, vocab = model.lib, model.vocab
        self._lib, self._vocab = lib, vocab
        self._size = int(lib.llama_vocab_n_tokens(vocab))
        attrs = [int(lib.llama_vocab_get_attr(vocab, i)) for i in range(self._size)]
        used = [i for i, attr in enumerate(attrs) if not attr & _UNUSED]
        self._length = used[-1] + 1 if used else self._size  # padding rows at the end dropped
        self._control = tuple(i for i, attr in enumerate(attrs) if attr & _CONTROL)
        self._added = tuple(i for i, attr in enumerate(attrs) if attr & (_CONTROL | _USER_DEFINED))
        template = lib.llama_model_chat_template(model.pointer, None)
        self.chat_template: str | None = template.decode("utf-8") if template else None
        self._compiled: Any = None
        self._vocabulary: dict[str, int] | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> GGUFTokenizer:
        """The tokenizer alone (llama.cpp loads the vocabulary only, no weights)."""
        return cls(_Model(check_gguf_file(path), vocab_only=True, repack=False, verbose=False))

    # ------------------------------------------------------------------ special tokens
    def _special(self, function: str) -> int | None:
        token = int(getattr(self._lib, function)(self._vocab))
        return token if token >= 0 else None

    @property
    def bos_token_id(self) -> int | None:
        return self._special("llama_vocab_bos")

    @property
    def eos_token_id(self) -> int | None:
        return self._special("llama_vocab_eos")

    @property
    def eot_token_id(self) -> int | None:
        return self._special("llama_vocab_eot")

    @property
    def pad_token_id(self) -> int | None:
        return self._special("llama_vocab_pad")

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.token_text(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self.token_text(self.eos_token_id)

    @property
    def all_special_ids(self) -> list[int]:
        """The control tokens (what transformers skips with ``skip_special_tokens``)."""
        return list(self._control)

    @property
    def added_tokens_decoder(self) -> dict[int, str]:
        """Control and user-defined tokens, id -> text."""
        return {i: self.token_text(i) for i in self._added}

    def token_text(self, token: int) -> str:
        return self._lib.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.get_vocab().get(token)

    def get_vocab(self) -> dict[str, int]:
        """Token text -> id for every id the logits cover (padding rows included)."""
        if self._vocabulary is None:
            self._vocabulary = {self.token_text(i): i for i in range(self._size)}
        return dict(self._vocabulary)

    def __len__(self) -> int:
        """Ids up to the last one in use (a padded vocabulary's unused tail excluded), as
        ``len()`` of the transformers tokenizer of the same model."""
        return self._length

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are parsed, as
        transformers does; ``add_special_tokens`` adds BOS when the GGUF asks for it."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            out = (ctypes.c_int32 * capacity)()
            n = self._lib.llama_tokenize(
                self._vocab, data, len(data), out, capacity, add_special_tokens, True
            )
            if n >= 0:
                return list(out[:n])
            capacity = -n

    def __call__(
        self, text: str | Sequence[str], add_special_tokens: bool = True
    ) -> dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in text]}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (invalid UTF-8, e.g. half a character, becomes U+FFFD)."""
        ids = [int(i) for i in ids]
        if not ids:
            return ""
        tokens = (ctypes.c_int32 * len(ids))(*ids)
        capacity = 16 * len(ids) + 16
        while True:
            out = ctypes.create_string_buffer(capacity)
            n = self._lib.llama_detokenize(
                self._vocab, tokens, len(ids), out, capacity, False, not skip_special_tokens
            )
            if n >= 0:
                return out.raw[:n].decode("utf-8", errors="replace")
            capacity = -n

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> list[int] | str:
        """Render the GGUF's ``tokenizer.chat_template`` as transformers does (a sandboxed
        jinja2 environment with ``trim_blocks`` / ``lstrip_blocks``, its ``tojson``,
        ``raise_exception`` and ``strftime_now``), then tokenise without adding special tokens."""
        if self.chat_template is None:
            raise ValueError("this GGUF has no chat template (tokenizer.chat_template)")
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        text = self._compiled.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _compile_template(template: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, **kw: Any) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kw)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(template)


# ---------------------------------------------------------------------------- loading
def eos_ids(tokenizer: GGUFTokenizer, extra_tokens: Sequence[str] = ()) -> tuple[int, ...]:
    """The GGUF's end-of-sequence id, its end-of-turn id and ``extra_tokens`` (texts)."""
    ids = [i for i in (tokenizer.eos_token_id, tokenizer.eot_token_id) if i is not None]
    for text in extra_tokens:
        token = tokenizer.convert_tokens_to_ids(text)
        if token is None:
            raise ValueError(f"eos token {text!r} is not in the GGUF's vocabulary")
        ids.append(token)
    return tuple(dict.fromkeys(ids))


def load_llamacpp(
    path: str | Path, config: LlamaCppConfig | None = None, extra_eos: Sequence[str] = ()
) -> tuple[LlamaCppModel, GGUFTokenizer, tuple[int, ...]]:
    """The runtime, the GGUF's tokenizer and its EOS ids for one GGUF file."""
    runtime = LlamaCppModel(path, config)
    tokenizer = runtime.tokenizer()
    return runtime, tokenizer, eos_ids(tokenizer, extra_eos)
