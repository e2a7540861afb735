"""The acceptance ratio and residual updates of the sequential rules, once each, on
``[..., V]`` tensors.

Every caller (one node on the host, every node of a tree at once on the device, the traversal
walk, the acceptance estimates of ``mcsd check --compare``) uses these, so the math that makes a
rejection lossless is written in one place:

- ``accept_ratio(p, q, c)``: min(1, p(c) / q(c)), the chance candidate c drawn from q is kept;
- ``residual(p, q)``: norm(max(0, p - q)), the target left after a candidate drawn from q was
  rejected (SpS, MCSS, and MCSS without replacement against qbar);
- ``remove_token(q, c)``: q with token c set to 0 and renormalised, the distribution of the next
  draw without replacement (qbar);
- ``wor_reject(p, qbar, c)``: both, the paper's update after rejecting c under MCSS without
  replacement;
- ``one_hot_reject(p, c)``: p with c set to 0 and renormalised, after a deterministic candidate
  (q one-hot at c) was rejected.

A mass at or below ``EMPTY_MASS`` cannot be renormalised: it is only reached through float
rounding of a residual that is zero in exact arithmetic (p = q), and then ``residual`` keeps p
unchanged, while ``remove_token`` leaves the zeros (the draft's support is exhausted, later
candidates have q = 0 and are rejected).
"""

from __future__ import annotations

from torch import Tensor

from mcsd.sampling import EMPTY_MASS


def renormalize(weights: Tensor, fallback: Tensor) -> Tensor:
    """``weights`` ``[..., V]`` divided by their mass over the last dimension; ``fallback`` in
    rows whose mass is at most ``EMPTY_MASS``."""
    mass = weights.sum(dim=-1, keepdim=True)  # [..., 1]
    return (weights / mass.clamp(min=EMPTY_MASS)).where(mass > EMPTY_MASS, fallback)


def residual(p: Tensor, q: Tensor) -> Tensor:
    """norm(max(0, p - q)) over the last dimension (p where that mass is empty)."""
    return renormalize((p - q).clamp(min=0.0), p)


def remove_token(q: Tensor, c: Tensor) -> Tensor:
    """``q`` ``[..., V]`` without token ``c`` ``[..., 1]`` (long), renormalised."""
    removed = q.scatter(-1, c, 0.0)
    return renormalize(removed, removed)


def wor_reject(p: Tensor, qbar: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """MCSS without replacement after candidate ``c`` ``[..., 1]`` (drawn from ``qbar``) was
    rejected: the new residual target and the distribution of the next draw."""
    return residual(p, qbar), remove_token(qbar, c)


def one_hot_reject(p: Tensor, c: Tensor) -> Tensor:
    """A deterministic candidate ``c`` ``[..., 1]`` (q one-hot at c) was rejected: p with c set
    to 0, renormalised (p unchanged where nothing is left)."""
    return renormalize(p.scatter(-1, c, 0.0), p)


def accept_ratio(p: Tensor, q: Tensor, c: Tensor) -> Tensor:
    """min(1, p(c) / q(c)) for candidates ``c`` ``[..., 1]``: ``[...]``. A candidate with
    q(c) = 0 cannot have been drawn from q: it is rejected (0) rather than divided by zero."""
    pc, qc = p.gather(-1, c)[..., 0], q.gather(-1, c)[..., 0]
    return (pc / qc.clamp(min=1e-300)).clamp(max=1.0).where(qc > 0, 0.0)
