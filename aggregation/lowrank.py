"""SVDs of low-rank products and random orthonormal bases, without dense d x k work.

A federated LoRA update is always a product ``B @ A`` with a thin inner dimension q
(one client's rank, or the sum of the ranks when several updates are stacked). Its
SVD never needs the ``d_out x d_in`` matrix: with ``B = Q_b R_b`` and
``A^T = Q_a R_a`` (thin QRs), ``B @ A = Q_b (R_b R_a^T) Q_a^T`` and only the small
``q x q`` core needs an SVD. That costs O((d_out + d_in) q^2) time and
O((d_out + d_in) q) memory instead of O(d_out d_in min(d_out, d_in)) and a dense
matrix per module, which is what makes FlexLoRA-style redistribution affordable on
a server that holds thousands of adapted modules.
"""

from __future__ import annotations

import numpy as np

from aggregation.base import Factors


def lowrank_svd(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``U, S, Vt`` of ``b @ a`` (``d_out x q`` times ``q x d_in``).

    Singular values come sorted in decreasing order, as from ``np.linalg.svd``; there
    are ``min(d_out, d_in, q)`` of them. ``U`` has orthonormal columns, ``Vt``
    orthonormal rows (also for zero singular values, so the basis stays usable).
    """
    b = np.asarray(b, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"cannot multiply factors of shapes {b.shape} and {a.shape}")
    q_b, r_b = np.linalg.qr(b)  # q_b: d_out x m, r_b: m x q
    q_a, r_a = np.linalg.qr(a.T)  # q_a: d_in x n, r_a: n x q
    u, s, vt = np.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u, s, vt @ q_a.T


def truncated_factors(
    u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int, *, split: str = "b"
) -> Factors:
    """Best rank-``rank`` factors (Eckart-Young) from an SVD, split between B and A.

    ``split="b"``: ``B = U_r S_r``, ``A = V_r^T``. ``split="sqrt"``:
    ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``. The product is the same; only the
    balance between the factors (and hence the optimiser's view of them) differs.
    If the SVD has fewer than ``rank`` components, fewer are returned.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    k = min(rank, s.shape[0])
    if split == "b":
        return {"B": u[:, :k] * s[:k], "A": vt[:k].copy()}
    if split == "sqrt":
        root = np.sqrt(s[:k])
        return {"B": u[:, :k] * root, "A": root[:, None] * vt[:k]}
    raise ValueError(f"unknown split {split!r}; expected 'b' or 'sqrt'")


def random_orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A ``rows x cols`` matrix with orthonormal columns (needs ``cols <= rows``).

    QR of a Gaussian matrix with the signs of R's diagonal moved into Q: the result
    is Haar-distributed and, unlike a bare QR, does not depend on the LAPACK build's
    sign convention, so a checkpointed run re-creates the same basis anywhere.
    """
    if cols > rows:
        raise ValueError(f"cannot have {cols} orthonormal columns in dimension {rows}")
    q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    return q * signs
