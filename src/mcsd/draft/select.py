"""The proposer a ``SpecConfig`` asks for (``SpecConfig.proposer``): the draft model's tree,
the context's (no draft model at all) or both in one tree."""

from __future__ import annotations

import torch

from mcsd.config import SpecConfig
from mcsd.draft.base import Proposer
from mcsd.draft.context import ContextProposer, RequestStore
from mcsd.draft.mixed import MixedProposer
from mcsd.draft.model import ModelProposer
from mcsd.models.base import Runtime


def make_proposer(
    spec: SpecConfig,
    draft: Runtime | None,
    vocab_size: int,
    device: torch.device | str,
    store: RequestStore | None = None,
) -> Proposer:
    """``draft`` may be None for ``proposer="context"``; ``device`` is the target's (context
    candidates go there); ``store``: earlier requests the context may copy from."""
    if spec.proposer == "context":
        return ContextProposer(spec.context, device, store)
    if draft is None:
        raise ValueError(f"proposer {spec.proposer!r} needs a draft model; got none")
    if spec.proposer == "mixed" and spec.dynamic is not None:
        raise ValueError(
            f"proposer 'mixed' merges the context's tree into a static draft tree; tree "
            f"{spec.describe_tree()} is grown per step: use a k-config (e.g. 4,2,2) or proposer "
            "'model'"
        )
    model = ModelProposer.for_spec(draft, spec, vocab_size)
    if spec.proposer == "model":
        return model
    return MixedProposer(model, ContextProposer(spec.context, device, store))
