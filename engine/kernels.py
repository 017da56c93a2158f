"""Fused CPU kernels for trimming, electing and merging task vectors held in one (T, D) buffer.

Why not plain torch: the usual TIES code sorts (`kthvalue`) the flattened model and builds several
T x D temporaries; on a 2-core CPU that is ~45 s and ~20 GB for 8 ViT-B/32 task vectors. Here:

* thresholds: exact top-K selection without sorting D entries: a seeded random sample brackets the
  K-th largest magnitude, one counting pass finds how many entries lie above the bracket and
  collects the few inside it, and a small sort of those gives the exact value. If the bracket was
  unlucky (verified, not assumed) the bracket is widened and the pass repeated.
* elect + disjoint merge: one pass over chunks of entries, accumulating in cache-sized scratch
  buffers, so no T x D mask or copy ever exists.

Every kernel works on float32 numpy views of torch tensors (zero-copy). The torch fallbacks below
(`*_torch`) implement the same semantics for CUDA tensors and other dtypes.
"""
from __future__ import annotations

import math

import numpy as np
import torch

try:  # numba is optional: without it the torch path is used (slower, same results)
    import numba
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

CHUNK = 4096  # entries per merge chunk: T x CHUNK floats stay in L2
SMALL_SEGMENT = 1 << 16  # below this many entries a plain sort is cheaper than sampling
SAMPLE_SIZE = 1 << 18
# Fast-math without reciprocal approximations: the data is finite (validated on load), and
# reassociation only lets per-chunk reductions vectorise; every result stays exact to float32.
FAST = {"nnan", "ninf", "nsz", "reassoc", "contract"}
BRACKET_SIGMAS = 6.0


# --------------------------------------------------------------------------------------------
# Thresholds: the K-th largest |x| of each (task, segment)
# --------------------------------------------------------------------------------------------

def keep_count(n: int, k_pct: float) -> int:
    """Entries kept by a trim to k percent of n: ceil(k*n/100), at least one (docs/methods.md, TIES-Merging)."""
    if n == 0:
        return 0
    return max(1, min(n, math.ceil(k_pct * n / 100.0 - 1e-9)))


if HAVE_NUMBA:

    @njit(cache=True, nogil=True, fastmath=FAST)
    def _count_and_collect(x, lo, hi, out):
        """Count |x| > hi and copy the |x| in [lo, hi] into out; returns (n_above, n_inside).

        Two branch-free loops: a counting pass (vectorises) and a compaction that always stores
        and advances only on a hit, so the ~20 % random "above" outcomes never mispredict.
        Past len(out) hits it keeps counting, so the caller can see the overflow and retry.
        """
        n = x.shape[0]
        n_above = 0
        for i in range(n):
            n_above += abs(x[i]) > hi
        n_inside = 0
        cap = out.shape[0] - 1
        for i in range(n):
            a = abs(x[i])
            out[min(n_inside, cap)] = a
            n_inside += (a >= lo) & (a <= hi)
        return n_above, n_inside

    @njit(cache=True, nogil=True)
    def _kth_largest_abs(x, k, sample_bits):
        """Exact k-th largest |x| (1-based k) of a 1-D float32 array."""
        n = x.shape[0]
        if n <= SMALL_SEGMENT:
            a = np.abs(x)
            return np.partition(a, n - k)[n - k]
        m = sample_bits.shape[0]
        sample = np.empty(m, dtype=np.float32)
        for i in range(m):
            # multiply-shift maps 32 random bits onto [0, n) without a slow modulo
            sample[i] = abs(x[((sample_bits[i] & 0xFFFFFFFF) * n) >> 32])
        p = k / n
        sigmas = BRACKET_SIGMAS
        while True:
            # bracket the k-th largest by sample order statistics a few standard deviations apart
            spread = sigmas * math.sqrt(m * p * (1.0 - p)) + 2.0
            centre = m * (1.0 - p)
            lo_pos = int(centre - spread)
            hi_pos = int(centre + spread)
            lo = np.partition(sample, lo_pos)[lo_pos] if lo_pos >= 0 else np.float32(0.0)
            hi = np.partition(sample, hi_pos)[hi_pos] if hi_pos < m else np.float32(np.inf)
            cap = int(n * (hi_pos - lo_pos + 1) / m * 2.0) + 1024
            buf = np.empty(min(cap, n) + 1, dtype=np.float32)
            n_above, n_inside = _count_and_collect(x, lo, hi, buf)
            if n_above < k <= n_above + n_inside and n_inside < buf.shape[0]:
                # the (k - n_above)-th largest of the entries inside the bracket
                pos = n_inside - (k - n_above)
                return np.partition(buf[:n_inside], pos)[pos]
            if lo_pos < 0 and hi_pos >= m:
                a = np.abs(x)  # the sample cannot bracket it: fall back to a full selection
                return np.partition(a, n - k)[n - k]
            sigmas *= 4.0

    @njit(cache=True, parallel=True)
    def _thresholds_kernel(data, seg_starts, keep, sample_bits, out):
        """out[t, s] = keep[t, s]-th largest |data[t, seg]|, in parallel over (task, segment)."""
        n_tasks = data.shape[0]
        n_segs = seg_starts.shape[0] - 1
        for job in prange(n_tasks * n_segs):
            t = job // n_segs
            s = job % n_segs
            k = keep[t, s]
            if k <= 0:
                out[t, s] = np.inf
            else:
                out[t, s] = _kth_largest_abs(data[t, seg_starts[s]:seg_starts[s + 1]], k, sample_bits)


def _as_numpy_rows(data: torch.Tensor) -> np.ndarray:
    return data.detach().numpy()


def trim_thresholds_cpu(data: torch.Tensor, seg_starts: np.ndarray, keep: np.ndarray) -> torch.Tensor:
    """Thresholds (T, S) for a float32 CPU buffer; see module docstring."""
    rng = np.random.default_rng(0)  # fixed seed: thresholds are exact anyway, this only fixes timing
    sample_bits = rng.integers(0, 1 << 32, size=SAMPLE_SIZE, dtype=np.uint64)
    out = np.empty(keep.shape, dtype=np.float32)
    _thresholds_kernel(_as_numpy_rows(data), seg_starts.astype(np.int64), keep.astype(np.int64), sample_bits, out)
    return torch.from_numpy(out)


def trim_thresholds_torch(data: torch.Tensor, seg_starts: np.ndarray, keep: np.ndarray) -> torch.Tensor:
    """Same as trim_thresholds_cpu with torch ops (CUDA, or any dtype)."""
    n_tasks, n_segs = keep.shape
    out = torch.empty((n_tasks, n_segs), dtype=torch.float32)
    for t in range(n_tasks):
        for s in range(n_segs):
            seg = data[t, int(seg_starts[s]):int(seg_starts[s + 1])]
            k = int(keep[t, s])
            if k <= 0:
                out[t, s] = math.inf
            else:
                out[t, s] = seg.abs().float().topk(k, sorted=False).values.min()
    return out


# --------------------------------------------------------------------------------------------
# Elect + disjoint merge
# --------------------------------------------------------------------------------------------

if HAVE_NUMBA:

    @njit(cache=True, parallel=True, fastmath=FAST)
    def _ties_merge_kernel(data, item_start, item_end, item_seg, thr, tie_sign, use_mean, scale, out,
                           item_sign_sum, item_ties):
        """Fused trim -> elect -> disjoint merge over work items (contiguous runs within one segment).

        thr[t, seg] is task t's trim threshold for the item's segment (keep |x| >= thr).
        An elected sign of exactly 0 with kept entries is a tie: it is resolved to tie_sign (0, +1, -1)
        and counted in item_ties so the caller can apply the global-majority rule.
        Every inner loop runs over entries j and is branch-free, so it vectorises; about 20 % of
        entries pass a trim at random, which would make branches mispredict constantly.
        """
        n_tasks = data.shape[0]
        zero = np.float32(0.0)
        one = np.float32(1.0)
        for it in prange(item_start.shape[0]):
            start = item_start[it]
            end = item_end[it]
            seg = item_seg[it]
            width = end - start
            total = np.zeros(width, dtype=np.float32)
            n_kept = np.zeros(width, dtype=np.float32)
            for t in range(n_tasks):
                th = thr[t, seg]
                row = data[t, start:end]
                for j in range(width):
                    v = row[j]
                    keep = abs(v) >= th
                    total[j] += v if keep else zero
                    n_kept[j] += one if keep & (v != zero) else zero
            sign = np.empty(width, dtype=np.float32)
            sign_sum = zero
            ties = zero
            for j in range(width):
                s = total[j]
                tie = (s == zero) & (n_kept[j] > zero)
                sg = one if s > zero else (-one if s < zero else (tie_sign if tie else zero))
                sign[j] = sg
                sign_sum += sg
                ties += one if tie else zero
            item_sign_sum[it] = sign_sum
            item_ties[it] = ties
            agreed = np.zeros(width, dtype=np.float32)
            count = np.zeros(width, dtype=np.float32)
            for t in range(n_tasks):
                th = thr[t, seg]
                row = data[t, start:end]
                for j in range(width):
                    v = row[j]
                    agree = (abs(v) >= th) & (v * sign[j] > zero)
                    agreed[j] += v if agree else zero
                    count[j] += one if agree else zero
            dst = out[start:end]
            if use_mean:
                for j in range(width):
                    dst[j] = scale * (agreed[j] / max(count[j], one))
            else:
                for j in range(width):
                    dst[j] = scale * agreed[j]


def work_items(seg_starts: np.ndarray, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split [0, D) into runs of at most `chunk` entries that never cross a segment boundary."""
    starts, ends, segs = [], [], []
    for s in range(len(seg_starts) - 1):
        a, b = int(seg_starts[s]), int(seg_starts[s + 1])
        if b <= a:
            continue
        edges = np.arange(a, b, chunk, dtype=np.int64)
        starts.append(edges)
        ends.append(np.minimum(edges + chunk, b))
        segs.append(np.full(len(edges), s, dtype=np.int64))
    if not starts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(starts), np.concatenate(ends), np.concatenate(segs)


def ties_merge_cpu(data: torch.Tensor, seg_starts: np.ndarray, thresholds: torch.Tensor, *, disjoint: str,
                   scale: float, tie_rule: str) -> torch.Tensor:
    """Merged, scaled task vector (D,) from a float32 CPU (T, D) buffer."""
    starts, ends, segs = work_items(seg_starts)
    out = torch.empty(data.shape[1], dtype=torch.float32)
    sign_sum = np.zeros(len(starts), dtype=np.float32)
    ties = np.zeros(len(starts), dtype=np.float32)
    thr = thresholds.numpy().astype(np.float32)
    args = (_as_numpy_rows(data), starts, ends, segs, thr)
    first_tie_sign = 1.0 if tie_rule == "positive" else 0.0
    _ties_merge_kernel(*args, np.float32(first_tie_sign), disjoint == "mean", np.float32(scale), out.numpy(),
                       sign_sum, ties)
    if tie_rule == "global_majority" and ties.sum() > 0:
        majority = float(np.sign(sign_sum.sum(dtype=np.float64)))  # exact: per-item sums are small integers
        if majority != 0.0:  # an all-tie model stays at zero, as sgn(0) = 0 in the official code
            _ties_merge_kernel(*args, np.float32(majority), disjoint == "mean", np.float32(scale), out.numpy(),
                               sign_sum, ties)
    return out


def ties_trim_block(block: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Trim step on rows [T, n] of one segment: entries below their task's threshold [T, 1] become 0."""
    block = block.float()
    return torch.where(block.abs() >= thresholds, block, torch.zeros_like(block))


def ties_elect_block(kept: torch.Tensor, tie_rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Elect step: the sign of the summed trimmed values per entry, and where they tie exactly (some
    value kept, sum 0). Ties get + under the "positive" rule; "global_majority" resolves them later
    with `ties_resolve_ties`, as it needs the whole model's elected signs."""
    sign = torch.sign(kept.sum(0))
    tie = (sign == 0) & (kept != 0).any(0)
    if tie_rule == "positive":
        sign = torch.where(tie, torch.ones_like(sign), sign)
    return sign, tie


def ties_resolve_ties(sign: torch.Tensor, tie: torch.Tensor, majority: float) -> torch.Tensor:
    return torch.where(tie, torch.full_like(sign, majority), sign) if majority else sign


def ties_disjoint_block(kept: torch.Tensor, sign: torch.Tensor, disjoint: str, scale: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint merge step: (scale · mean or sum of the trimmed values agreeing with the elected sign,
    the agreement mask [T, n])."""
    agree = (kept * sign) > 0
    agreed = torch.where(agree, kept, torch.zeros_like(kept)).sum(0)
    if disjoint == "mean":
        agreed = agreed / agree.sum(0).clamp(min=1)
    return scale * agreed, agree


TORCH_CHUNK = 1 << 22  # entries per chunk of the torch path: memory stays at a few T x chunk


def _elected_chunks(data: torch.Tensor, seg_starts: np.ndarray, thresholds: torch.Tensor, tie_rule: str):
    """Trim and elect over the stack chunk by chunk: (segment, start, end, sign, tie) per chunk."""
    for s in range(len(seg_starts) - 1):
        for a in range(int(seg_starts[s]), int(seg_starts[s + 1]), TORCH_CHUNK):
            b = min(a + TORCH_CHUNK, int(seg_starts[s + 1]))
            sign, tie = ties_elect_block(ties_trim_block(data[:, a:b], thresholds[:, s:s + 1]), tie_rule)
            yield s, a, b, sign, tie


def ties_merge_torch(data: torch.Tensor, seg_starts: np.ndarray, thresholds: torch.Tensor, *, disjoint: str,
                     scale: float, tie_rule: str) -> torch.Tensor:
    """Reference-grade torch implementation, chunked by segment so memory stays at a few T x chunk.
    Its three steps are the `ties_*_block` functions, which the TIES lesson shows one by one."""
    out = torch.empty(data.shape[1], dtype=torch.float32, device=data.device)
    thresholds = thresholds.to(data.device)
    signs = list(_elected_chunks(data, seg_starts, thresholds, tie_rule))
    elected_sum = torch.zeros((), dtype=torch.float64, device=data.device)
    n_ties = 0
    for *_, sign, tie in signs:
        n_ties += int(tie.sum())
        elected_sum += sign.sum(dtype=torch.float64)
    majority = float(torch.sign(elected_sum)) if tie_rule == "global_majority" and n_ties else 0.0
    for s, a, b, sign, tie in signs:
        kept = ties_trim_block(data[:, a:b], thresholds[:, s:s + 1])
        out[a:b] = ties_disjoint_block(kept, ties_resolve_ties(sign, tie, majority), disjoint, scale)[0]
    return out


def ties_majority_sign(data: torch.Tensor, seg_starts: np.ndarray, thresholds: torch.Tensor) -> float:
    """The model-wide majority sign that "global_majority" gives exact ties (0.0 when none tie)."""
    total, n_ties = 0.0, 0
    for *_, sign, tie in _elected_chunks(data, seg_starts, thresholds.to(data.device), "global_majority"):
        total += float(sign.sum(dtype=torch.float64))
        n_ties += int(tie.sum())
    return float(np.sign(total)) if n_ties else 0.0


def can_use_numba(data: torch.Tensor) -> bool:
    return HAVE_NUMBA and data.device.type == "cpu" and data.dtype == torch.float32 and data.is_contiguous()
