"""Optimal transport for multi-candidate verification: the bound alpha*, K-SEQ's rho and the
optimal selection plan of the ``optimal`` rule.

One tree node: target p, draft q over V tokens, k candidates. A lossless rule couples the
candidate set S with the emitted token Y ~ p; its acceptance is P(Y in S). The best possible is

    alpha* = 1 - max over token sets H of [ P(S inside H) - p(H) ]          (max-flow/min-cut)

(Sun et al. 2023, SpecTr; Hu et al. 2025). The maximising H is always a prefix of the tokens
sorted by p/q ascending (for iid candidates: a concave function of q(H) minus a linear one, so an
exchange argument shows every optimal H is a p/q sub-level set; for candidates drawn without
replacement we use the same scan, which the tests confirm against brute force over all 2^V sets).

- iid candidates: P(S inside H) = q(H)^k, so alpha* is a scan over the sorted tokens, O(V log V).
- without replacement: P(S inside H) = P(the first k arrivals of the exponential race all come
  from H) = int_0^inf c e^{-ct} P(N_H(t) >= k) dt with c = q(not H) and N_H(t) the number of
  tokens of H that arrived by time t (independent Exp(q_z) clocks). The integrand is analytic in
  s = log t and decays at both ends, so the trapezoidal rule in s converges geometrically; with
  the grid below it agrees with the exact closed forms (k <= 3) to ~1e-13.

The ``optimal`` rule (iid candidates; ``TransportPlan``). Write F(A) = P(S meets A) =
1 - (1 - q(A))^k, the coverage function of k iid draws: a polymatroid. Any selection rule (pick
one candidate, possibly at random) has a selection marginal r in the base polytope B(F), and
"select, then single-draft speculative sampling of p against r" (Khisti et al. 2025's canonical
two-step form) accepts sum_z min(p_z, r_z). The lexicographically optimal base of B(F) with
respect to p (Fujishige) maximises sum_z p_z phi(r_z / p_z) for every concave phi, in particular
for phi(x) = min(1, x), so it reaches alpha*. For F = concave(q(A)) it is computed from the
greatest convex minorant of the points (p(prefix), F(prefix)) over the tokens sorted by p/q
descending: on each face of the minorant with slope lam, r = lam * p.

Realising r: map each candidate to a point v in [0, 1] and select the candidate with the largest
v. If token z owns a measurable set A_z of [0, 1] (the sets partition [0, 1], |A_z| = q_z) and a
candidate of token z draws v uniformly from A_z, every candidate's v is uniform on [0, 1] and
independent of the others, so P(selected token = z) = G(A_z) with G(dv) = k v^(k-1) dv, the law
of the maximum of k uniforms. Finding sets with |A_z| = q_z and G(A_z) = r_z is a martingale
transport between the ratios r_z / q_z (weights q_z) and the law of k V^(k-1); it exists exactly
when r is in B(F) (convex order = the Lorenz condition = the polymatroid inequalities), and the
left-curtain construction (Beiglboeck & Juillet 2016) builds it: tokens in increasing order of
r_z / q_z each take the window of the still-free part of [0, 1], contiguous in free measure,
with the right G-mass. Each A_z is a union of a few intervals.

Whatever sets are built, the rule uses the selection marginal r_z = G(A_z) computed from them,
so it is exactly lossless even where floating point makes the sets slightly off; only the
optimality depends on the construction. Beyond ``MAX_ATOMS`` candidate tokens, the light ones
are pooled by similar p/q and a pool shares one set, split in proportion to q (exact, slightly
suboptimal: ``TransportPlan.accepted_mass`` against ``alpha_star`` says by how much; ~1e-5
relative on real distributions).

Cost per node: O(V) tensor work (a top-k, a few bincounts) and O(A log A) Python work for
A = min(support, MAX_ATOMS) atoms: ~3 ms at A = 128 on one CPU core, plus the O(V) part.

It never sees a model, a cache or a tokenizer.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Atoms of the plan: up to this many candidate tokens each is its own atom (exactly optimal);
# beyond, half are the heaviest tokens and half pools of light tokens of similar p/q. On the
# pairs captured from the Qwen pair (1024 tokens) the loss against alpha* is ~1e-5 (relative,
# mean; max ~1e-4) at 128 atoms, ~5e-5 at 64, ~2e-6 at 256 for twice the time.
MAX_ATOMS = 128
SCHEMES_FOR_ALPHA = ("iid", "wor")
ROUNDING = 1e-14  # float64 sums over a vocabulary: what "zero" means for a slack
# Trapezoid grid in s = log t for the without-replacement containment integral: the integrand
# decays like t^(k+1) at 0 and like exp(-c t) at infinity and is analytic in s, so the rule is
# exact to ~1e-12 already at this step (the grid's upper end adapts to the smallest c).
_LOG_T_MIN, _LOG_T_STEP = -20.0, 0.1


@functools.cache
def _gauss_legendre(n: int) -> list[tuple[float, float]]:
    """n-point Gauss-Legendre rule on [0, 1] (exact for polynomials of degree 2n - 1)."""
    nodes = []
    for i in range(1, n + 1):
        x = math.cos(math.pi * (i - 0.25) / (n + 0.5))  # Newton on P_n from the Chebyshev guess
        for _ in range(100):
            p0, p1 = 1.0, x
            for m in range(2, n + 1):
                p0, p1 = p1, ((2 * m - 1) * x * p1 - (m - 1) * p0) / m
            derivative = n * (x * p1 - p0) / (x * x - 1.0) if n > 1 else 1.0
            step = p1 / derivative
            x -= step
            if abs(step) < 1e-16:
                break
        p0, p1 = 1.0, x
        for m in range(2, n + 1):
            p0, p1 = p1, ((2 * m - 1) * x * p1 - (m - 1) * p0) / m
        derivative = n * (x * p1 - p0) / (x * x - 1.0) if n > 1 else 1.0
        weight = 2.0 / ((1.0 - x * x) * derivative * derivative) if n > 1 else 2.0
        nodes.append((0.5 * (1.0 + x), 0.5 * weight))
    return nodes


def coverage(x: float | Tensor, k: int) -> float | Tensor:
    """F for k iid draws: probability that at least one of k draws lands in a set of q-mass x."""
    return 1.0 - (1.0 - x) ** k


# ---------------------------------------------------------------- alpha*
def ratio_order(p: Tensor, q: Tensor, *, descending: bool) -> Tensor:
    """Indices of the tokens with q > 0, sorted by p/q (ties broken by index, stable)."""
    support = torch.nonzero(q > 0).flatten()
    ratio = p[support] / q[support]
    order = torch.sort(ratio, descending=descending, stable=True).indices
    return support[order]


def containment(p: Tensor, q: Tensor, k: int, scheme: str) -> tuple[Tensor, Tensor]:
    """For H_j = the j tokens of smallest p/q (j = 0..n, n = support of q): ``P(S inside H_j)``
    and ``p(H_j)``, both float64 ``[n + 1]``."""
    p, q = p.double().cpu(), q.double().cpu()
    p, q = p / p.sum(), q / q.sum()
    order = ratio_order(p, q, descending=False)
    q_sorted, p_sorted = q[order], p[order]
    zero = torch.zeros(1, dtype=torch.float64)
    mass = torch.cat([zero, torch.cumsum(q_sorted, 0)]).clamp(max=1.0)  # [n + 1] q(H_j)
    p_mass = torch.cat([zero, torch.cumsum(p_sorted, 0)])  # [n + 1] p(H_j)
    if scheme == "iid":
        return mass**k, p_mass
    if scheme != "wor":
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES_FOR_ALPHA)}; got {scheme!r}")
    return _containment_without_replacement(q_sorted, k), p_mass


def _containment_without_replacement(q_sorted: Tensor, k: int) -> Tensor:
    """P(first k draws without replacement all lie in the first j tokens), j = 0..n."""
    n = len(q_sorted)
    total = float(q_sorted.sum())
    # c_j = q-mass outside H_j as a suffix sum (no cancellation), as a fraction of the total
    outside = (torch.flip(torch.cumsum(torch.flip(q_sorted, [0]), 0), [0]) / total).tolist()
    outside.append(0.0)
    smallest = min((c for c in outside[k:] if c > 0.0), default=1.0)
    # The integrand of H_j peaks near t = 1/c_j; the grid reaches well past the largest.
    s = torch.arange(_LOG_T_MIN, math.log(60.0 / smallest) + 1.0, _LOG_T_STEP, dtype=torch.float64)
    t = torch.exp(s)  # [T]
    rates = (q_sorted / total).tolist()
    # counts[m] = P(exactly m of the first j tokens arrived by time t), m < k, updated token by
    # token; the containment of H_j integrates c_j e^{-c_j t} P(N_j(t) >= k) dt.
    counts = torch.zeros(k, len(t), dtype=torch.float64)
    counts[0] = 1.0
    result = torch.zeros(n + 1, dtype=torch.float64)
    for j in range(n + 1):
        if j > 0:
            stay = torch.exp(-rates[j - 1] * t)  # [T] the token has not arrived by t
            arrived = -torch.expm1(-rates[j - 1] * t)
            shifted = torch.cat([torch.zeros(1, len(t), dtype=torch.float64), counts[:-1]])
            counts = counts * stay + shifted * arrived
        if j < k:
            continue  # fewer than k tokens in H_j: S cannot fit inside
        c = outside[j]
        if c <= 0.0:
            result[j] = 1.0
            continue
        at_least_k = (1.0 - counts.sum(0)).clamp(min=0.0)  # [T]
        integrand = c * t * torch.exp(-c * t) * at_least_k  # dt = t ds
        result[j] = float(integrand.sum()) * _LOG_T_STEP
    return result.clamp(max=1.0)


def alpha_star(p: Tensor, q: Tensor, k: int, scheme: str = "iid") -> float:
    """The optimal acceptance probability of any lossless rule with k candidates from q."""
    inside, p_mass = containment(p, q, k, scheme)
    # H = the empty set gives 0; the scan over sub-level sets of p/q finds the maximum.
    return 1.0 - max(0.0, float((inside - p_mass).max()))


# ---------------------------------------------------------------- K-SEQ
def kseq_rho(p: Tensor, q: Tensor, k: int) -> float:
    """SpecTr's K-SEQ parameter: the smallest rho >= 1 with 1 - (1 - beta)^k <= rho * beta,
    beta = sum_x min(q(x), p(x) / rho). Accepting each candidate with min(1, p / (rho q)) then
    accepts token x with total probability min(q, p / rho) (1 - (1 - beta)^k) / beta <= p(x),
    so the residual is non-negative; a smaller rho accepts more, hence the smallest one.

    h(rho) = S(rho) - 1 + (1 - S(rho) / rho)^k with S(rho) = sum min(rho q, p) is increasing,
    h(1) <= 0 <= h(k). Newton steps on h (S and S' = sum of q over p/q > rho: one pass over the
    vocabulary each), kept inside a bisection bracket, stop at 1e-12 of rho; a rho with
    h >= 0 is returned, so the residual is non-negative up to rounding."""
    if k == 1:
        return 1.0
    p, q = p.double(), q.double()
    p, q = p / p.sum(), q / q.sum()

    def h_and_slope(rho: float) -> tuple[float, float]:
        scaled = rho * q
        s = float(torch.minimum(scaled, p).sum())  # S(rho)
        ds = float(q[scaled < p].sum())  # S'(rho)
        left = max(0.0, 1.0 - s / rho)
        h = s - 1.0 + left**k
        slope = ds + k * left ** (k - 1) * (s / rho**2 - ds / rho)
        return h, slope

    low, high = 1.0, float(k)
    value, slope = h_and_slope(low)
    if value >= -ROUNDING:  # e.g. p = q: h(1) = 0 up to rounding, and rho = 1 is exact
        return low
    rho = low
    for _ in range(200):
        step = rho - value / slope if slope > 0.0 else 0.5 * (low + high)
        if not low < step < high:
            step = 0.5 * (low + high)
        converged = abs(step - rho) <= 1e-13 * step
        rho = step
        value, slope = h_and_slope(rho)
        if value >= 0.0:
            high = rho
        else:
            low = rho
        if converged or high - low <= 1e-12 * high:  # 1e-12 of rho: no visible acceptance loss
            break
    for scale in (1e-14, 1e-13, 1e-12, 1e-11):  # stopped just below the root: step over it
        if value >= 0.0 or rho >= high:
            break
        rho = min(high, rho * (1.0 + scale))
        value, _ = h_and_slope(rho)
    return rho if value >= 0.0 else high


# ---------------------------------------------------------------- the optimal plan
@dataclass(frozen=True, kw_only=True)
class TransportPlan:
    """The ``optimal`` rule's selection at one node (iid candidates). Candidate token z belongs
    to atom ``atom_of[z]``; atom a owns the intervals ``sets[a]`` of [0, 1]; a candidate draws a
    point uniformly from its atom's set and the largest point wins."""

    k: int
    atom_of: Tensor  # [V] long, -1 for tokens with q = 0 (never candidates)
    selection: Tensor  # [V] float64, r_z = P(the selected candidate has token z)
    sets: tuple[tuple[tuple[float, float], ...], ...]  # per atom: disjoint intervals (lo, hi)

    def accepted_mass(self, p: Tensor) -> float:
        """sum_z min(p_z, r_z): the rule's acceptance probability at this node."""
        p64 = p.double().cpu()
        return float(torch.minimum(p64 / p64.sum(), self.selection).sum())

    def select(self, tokens: list[int], generator: torch.Generator | None) -> int | None:
        """Index of the selected candidate, or None when no candidate has q > 0."""
        atoms = self.atom_of[tokens].tolist()
        best, best_v = None, -1.0
        device = generator.device if generator is not None else "cpu"
        draws = torch.rand(len(tokens), dtype=torch.float64, generator=generator, device=device)
        draws = draws.tolist()
        for i, (atom, u) in enumerate(zip(atoms, draws, strict=True)):
            if atom < 0 or not self.sets[atom]:
                continue  # q(c) = 0: c cannot have been drawn from q (or r(c) = 0 by rounding)
            v = _point(self.sets[atom], u)
            if v > best_v:
                best, best_v = i, v
        return best

    def selection_probabilities(self, tokens: list[int]) -> list[float]:
        """Exact P(candidate i is selected) for fixed candidate tokens: the integral of candidate
        i's density times the other candidates' CDFs (piecewise polynomial, Gauss-Legendre)."""
        atoms = self.atom_of[tokens].tolist()
        valid = [i for i, a in enumerate(atoms) if a >= 0 and self.sets[a]]
        probs = [0.0] * len(tokens)
        if not valid:
            return probs
        if len(valid) == 1:
            probs[valid[0]] = 1.0
            return probs
        used = sorted({atoms[i] for i in valid})
        cuts = sorted({x for a in used for interval in self.sets[a] for x in interval})
        rule = _gauss_legendre(len(valid))
        lengths = {a: sum(hi - lo for lo, hi in self.sets[a]) for a in used}
        for lo, hi in itertools.pairwise(cuts):
            if hi <= lo:
                continue
            width = hi - lo
            middle = lo + 0.5 * width
            inside = {a: _covers(self.sets[a], middle) for a in used}
            below = {a: _length_below(self.sets[a], lo) for a in used}
            for x, w in rule:
                offset = x * width  # v - lo, formed directly: v itself may round away
                cdf = {a: (below[a] + (offset if inside[a] else 0.0)) / lengths[a] for a in used}
                for i in valid:
                    if not inside[atoms[i]]:
                        continue
                    term = width * w / lengths[atoms[i]]
                    for j in valid:
                        if j != i:
                            term *= cdf[atoms[j]]
                    probs[i] += term
        return probs


def _point(intervals: tuple[tuple[float, float], ...], u: float) -> float:
    """The point at fraction u of the total length of ``intervals`` (inverse CDF)."""
    total = sum(hi - lo for lo, hi in intervals)
    target = u * total
    for lo, hi in intervals:
        if target <= hi - lo:
            return lo + target
        target -= hi - lo
    return intervals[-1][1]


def _covers(intervals: tuple[tuple[float, float], ...], v: float) -> bool:
    return any(lo <= v <= hi for lo, hi in intervals)


def _length_below(intervals: tuple[tuple[float, float], ...], v: float) -> float:
    return sum(max(0.0, min(hi, v) - lo) for lo, hi in intervals)


def transport_plan(p: Tensor, q: Tensor, k: int, max_atoms: int = MAX_ATOMS) -> TransportPlan:
    """The ``optimal`` rule's plan for target p ``[V]``, draft q ``[V]`` and k iid candidates."""
    # float64 on the input's device (the O(V) work stays there); q renormalised exactly, since
    # the candidates are drawn from q / sum(q) and the sets below tile [0, 1] by q-mass
    p64, q64 = p.double(), q.double()
    p64, q64 = p64 / p64.sum(), q64 / q64.sum()
    atom_of, n_atoms = _atoms(p64, q64, max_atoms)  # [V] long, -1 off the support of q
    # per-atom masses; tokens off the support go to an extra bin that is dropped
    index = torch.where(atom_of >= 0, atom_of, n_atoms)
    atom_p = torch.bincount(index, weights=p64, minlength=n_atoms + 1)[:n_atoms]
    atom_q = torch.bincount(index, weights=q64, minlength=n_atoms + 1)[:n_atoms]
    # Atoms in p/q-descending order (the order of the convex minorant), p = 0 atoms last.
    order = torch.sort(atom_p / atom_q, descending=True, stable=True).indices.cpu()
    atom_p_sorted = atom_p.cpu()[order].tolist()
    atom_q_sorted = atom_q.cpu()[order].tolist()
    target = _lexicographic_base(atom_p_sorted, atom_q_sorted, k)
    sets_sorted = _left_curtain(atom_q_sorted, target, k)
    sets: list[tuple[tuple[float, float], ...]] = [()] * n_atoms
    for position, atom in enumerate(order.tolist()):
        sets[atom] = sets_sorted[position]
    realised = torch.tensor(
        [sum(hi**k - lo**k for lo, hi in s) for s in sets] + [0.0], dtype=torch.float64
    ).to(p64.device)  # [A + 1] G(A_a): the exact selection probability of each atom
    share = q64 / torch.cat([atom_q, torch.ones(1, dtype=torch.float64, device=q64.device)])[index]
    selection = realised[index] * share  # [V] r_z = G(A_atom) q_z / q_atom; 0 off the support
    return TransportPlan(k=k, atom_of=atom_of.cpu(), selection=selection.cpu(), sets=tuple(sets))


def _atoms(p: Tensor, q: Tensor, max_atoms: int) -> tuple[Tensor, int]:
    """Atom index ``[V]`` of every token with q > 0 (-1 elsewhere) and the number of atoms.
    With at most ``max_atoms`` such tokens each is its own atom (the plan is then exactly
    optimal). Otherwise the ``max_atoms // 2`` heaviest (by p + q) stay alone and the others are
    pooled by log p/q on an even grid of ``max_atoms // 2`` cells over their range (tokens with
    p = 0: one more pool)."""
    support = q > 0
    n = int(support.sum())
    if n <= max_atoms:
        atom_of = torch.cumsum(support.long(), 0) - 1
        return torch.where(support, atom_of, -1), n
    heavy_count = max_atoms // 2
    cells = max_atoms - heavy_count
    weight = torch.where(support, p + q, -1.0)
    heavy = torch.topk(weight, heavy_count).indices  # [M]
    light = support & (p > 0)
    light[heavy] = False
    log_ratio = torch.log(torch.where(light, p, 1.0) / torch.where(light, q, 1.0))  # 0 elsewhere
    low = float(torch.where(light, log_ratio, math.inf).min())
    high = float(torch.where(light, log_ratio, -math.inf).max())
    width = max(high - low, 1e-12) / cells
    grid = ((log_ratio - low) / width).long().clamp(0, cells - 1) + 1  # pools 1..cells
    pools = cells + 1  # pool 0: p = 0
    raw = torch.where(p > 0, grid, 0)  # [V] pool of each token
    raw[heavy] = pools + torch.arange(heavy_count, device=q.device)
    raw = torch.where(support, raw, pools + heavy_count)  # off the support: a dropped bin
    used = torch.bincount(raw, minlength=pools + heavy_count + 1)[:-1] > 0
    renumber = torch.cumsum(used.long(), 0) - 1  # only the pools that hold a token
    atom_of = torch.where(support, renumber[raw.clamp(max=pools + heavy_count - 1)], -1)
    return atom_of, int(used.sum())


def _lexicographic_base(atom_p: list[float], atom_q: list[float], k: int) -> list[float]:
    """The lexicographically optimal base of B(F) with respect to p, per atom (atoms in p/q
    descending order): the greatest convex minorant of (P_j, F(Q_j)) by pool-adjacent-violators;
    a face of slope lam gives r = lam * p. Atoms with p = 0 (the last) take what is left, in
    proportion to q."""
    n = len(atom_p)
    positive = n
    while positive > 0 and atom_p[positive - 1] <= 0.0:
        positive -= 1
    # Blocks of the minorant: [start, end), dp, dF; merge while slopes decrease.
    blocks: list[list[float]] = []
    q_done = 0.0
    for j in range(positive):
        f_gain = coverage(q_done + atom_q[j], k) - coverage(q_done, k)
        q_done += atom_q[j]
        blocks.append([j, j + 1, atom_p[j], f_gain])
        while len(blocks) > 1 and blocks[-2][3] * blocks[-1][2] >= blocks[-1][3] * blocks[-2][2]:
            last = blocks.pop()  # slope(prev) = dF/dp >= slope(last): merge
            blocks[-1][1] = last[1]
            blocks[-1][2] += last[2]
            blocks[-1][3] += last[3]
    target = [0.0] * n
    for start, end, dp, df in blocks:
        for j in range(int(start), int(end)):
            target[j] = df * atom_p[j] / dp
    rest = 1.0 - coverage(q_done, k)
    q_rest = sum(atom_q[positive:])
    for j in range(positive, n):
        target[j] = rest * atom_q[j] / q_rest
    return target


def _left_curtain(
    atom_q: list[float], target: list[float], k: int
) -> list[tuple[tuple[float, float], ...]]:
    """Sets A_a of [0, 1] with |A_a| = atom_q[a] and G(A_a) = target[a] (G(dv) = k v^(k-1) dv),
    built atom by atom in increasing target / q: each takes the window of the free part of [0, 1]
    that is contiguous in free length and has the right G-mass."""
    n = len(atom_q)
    order = sorted(range(n), key=lambda a: (target[a] / atom_q[a], a))
    gaps: list[tuple[float, float]] = [(0.0, 1.0)]  # free intervals, sorted
    sets: list[tuple[tuple[float, float], ...]] = [()] * n
    for rank, a in enumerate(order):
        if rank == n - 1 or not gaps:  # the last atom takes what is left (rounding: maybe none)
            sets[a] = tuple(gaps)
            gaps = []
            continue
        window, gaps = _take_window(gaps, atom_q[a], target[a], k)
        sets[a] = window
    return sets


def _take_window(
    gaps: list[tuple[float, float]], length: float, mass: float, k: int
) -> tuple[tuple[tuple[float, float], ...], list[tuple[float, float]]]:
    """Remove from ``gaps`` the part between free positions alpha and alpha + length whose
    G-mass is ``mass`` (clamped to the feasible range); return it and the remaining gaps.

    W(alpha), the G-mass of the window, is continuous and increasing. Between breakpoints
    (alpha or alpha + length at a gap boundary) both ends stay in fixed gaps and W is a
    polynomial: bisection over the gap of alpha, then over the gap of alpha + length, then
    Newton inside the piece."""
    starts = [0.0, *itertools.accumulate(hi - lo for lo, hi in gaps)]  # free length before gap
    g_before = [0.0, *itertools.accumulate(hi**k - lo**k for lo, hi in gaps)]  # free G before
    free = starts[-1]
    length = min(length, free)
    last = len(gaps) - 1

    def gap_of(s: float) -> int:
        return min(max(bisect.bisect_right(starts, s) - 1, 0), last)

    def window_mass(alpha: float, i: int, j: int) -> float:
        v_start = min(gaps[i][0] + (alpha - starts[i]), gaps[i][1])
        v_end = min(gaps[j][0] + (alpha + length - starts[j]), gaps[j][1])
        return (g_before[j] + v_end**k - gaps[j][0] ** k) - (
            g_before[i] + v_start**k - gaps[i][0] ** k
        )

    def mass_at(alpha: float) -> float:
        return window_mass(alpha, gap_of(alpha), gap_of(alpha + length))

    def last_below(cuts: list[float]) -> int:
        """The last index with mass_at(cuts[index]) < mass (cuts[0] qualifies)."""
        low, high = 0, len(cuts)
        while high - low > 1:
            middle = (low + high) // 2
            if mass_at(cuts[middle]) < mass:
                low = middle
            else:
                high = middle
        return low

    top = max(free - length, 0.0)
    if mass_at(0.0) >= mass:
        alpha = 0.0
    elif mass_at(top) <= mass:
        alpha = top
    else:
        # the piece: alpha's gap, then the gap of alpha + length inside it (breakpoints are
        # taken from the lists themselves, never recomputed, so rounding cannot empty a piece)
        in_gaps = starts[: gap_of(top) + 1]  # gap starts up to alpha's range
        gap = last_below(in_gaps)
        low, high = in_gaps[gap], min(starts[gap + 1], top)
        first = bisect.bisect_right(starts, low + length)
        end = bisect.bisect_left(starts, high + length)
        ends = [low, *(x - length for x in starts[first:end] if low < x - length < high), high]
        piece = last_below(ends[:-1])
        low, high = ends[piece], ends[piece + 1]
        middle_point = 0.5 * (low + high)
        i, j = gap_of(middle_point), gap_of(middle_point + length)  # fixed on this piece
        # Newton on the polynomial piece, kept inside the shrinking bracket [low, high].
        shift_i = gaps[i][0] - starts[i]  # v_start = alpha + shift_i
        shift_j = gaps[j][0] + length - starts[j]  # v_end = alpha + shift_j
        alpha = middle_point
        for _ in range(100):
            error = window_mass(alpha, i, j) - mass
            if error < 0.0:
                low = alpha
            else:
                high = alpha
            slope = k * ((alpha + shift_j) ** (k - 1) - (alpha + shift_i) ** (k - 1))
            step = alpha - error / slope if slope > 0.0 else 0.5 * (low + high)
            if not low < step < high:
                step = 0.5 * (low + high)
            if abs(step - alpha) <= 2e-16 or high - low <= 4e-16:  # alpha is in [0, 1]
                break
            alpha = step
    i, j = gap_of(alpha), gap_of(alpha + length)
    v_start = min(gaps[i][0] + (alpha - starts[i]), gaps[i][1])
    v_end = min(gaps[j][0] + (alpha + length - starts[j]), gaps[j][1])
    if i == j:
        window = ((v_start, v_end),)
    else:
        window = ((v_start, gaps[i][1]), *gaps[i + 1 : j], (gaps[j][0], v_end))
    remaining = gaps[:i]
    if v_start > gaps[i][0]:
        remaining.append((gaps[i][0], v_start))
    if v_end < gaps[j][1]:
        remaining.append((v_end, gaps[j][1]))
    remaining += gaps[j + 1 :]
    window = tuple((lo, hi) for lo, hi in window if hi > lo)
    return window, remaining
