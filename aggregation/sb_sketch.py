"""Fed-SB's federated LoRA-SB init: a single-pass randomized SVD of the nodes' summed gradients.

LoRA-SB (Ponkshe, Singhal et al. 2024, arXiv 2411.19557, Sec. 4 / Alg. 1) starts the adapter
from the best rank-r approximation of an approximated first full fine-tuning step,
``dW = -lr * sign(sum_i grad_W l_i)`` over a few batches. In a federation no one holds that
sum: each node k holds its own ``G_k = sum_{i in node k} grad_W l_i``. What is linear in
``G_k`` can be summed on the server without seeing any ``G_k`` whole, so each node sends two
linear sketches with test matrices every party draws from the run seed
(Tropp, Yurtsever, Udell & Cevher 2017, "Practical sketching algorithms for low-rank matrix
approximation", SIAM J. Matrix Anal. Appl. 38(4), Alg. 2 / Sec. 4; Halko, Martinsson & Tropp
2011, Sec. 5.5):

    range sketch      Y_k = G_k Omega    (d_out x k,  Omega: d_in x k)
    co-range sketch   W_k = Psi G_k      (l x d_in,   Psi: l x d_out,  l >= k)

The server sums them (``Y = G Omega``, ``W = Psi G`` for ``G = sum_k G_k``), takes
``Q = orth(Y)`` and ``X = (Psi Q)^+ W``, so ``G_hat = Q X`` (exactly G when rank(G) <= k),
and reads the SVD of G_hat from the small ``k x d_in`` matrix X. One message per node, and
with DP on one Gaussian release per node (a two-pass range finder would be two adaptive
releases of the same data).

The step this init approximates (``approximated_step``) is *not* LoRA-SB's sign step:
``sign`` is entrywise and nonlinear, so ``sign(sum_k G_k)`` cannot be formed from sums of
sketches. It is the normalised gradient step

    dW_fed = -lr * sqrt(d_out * d_in) * G_hat / ||G_hat||_F

which has the sign step's Frobenius norm (lr * sqrt(d_out d_in) when no gradient entry is 0)
and G_hat's singular vectors instead of sign(G)'s. B R A is exactly the best rank-r
approximation of dW_fed (Eckart-Young); it equals the best rank-r approximation of the
normalised ``G`` when rank(G) <= k; with DP it is that of the noisy sketches' G_hat.

Pure numpy: both ends (``client.lora_sb``, ``server.lora_sb_round``) draw Omega and Psi here.
"""

from __future__ import annotations

import math

import numpy as np

from aggregation.base import Factors, ModuleShape
from aggregation.seeded_init import module_rng


def sketch_sizes(shape: ModuleShape, *, rank: int, oversample: int) -> tuple[int, int]:
    """(k, l): range sketch ``rank + p`` columns, co-range ``k + p`` rows, capped by the module."""
    if rank < 1 or oversample < 0:
        raise ValueError(f"sketch needs rank >= 1 and oversample >= 0, got {rank} and {oversample}")
    if rank > min(shape.d_out, shape.d_in):
        raise ValueError(f"rank {rank} exceeds the module's {shape.d_out} x {shape.d_in}")
    k = min(rank + oversample, shape.d_out, shape.d_in)
    return k, min(k + oversample, shape.d_out)


def sketch_matrices(seed: int, module: str, shape: ModuleShape, *, rank: int,
                  oversample: int) -> tuple[np.ndarray, np.ndarray]:
    """``Omega`` (d_in x k) and ``Psi`` (l x d_out), Gaussian, scaled so sketches keep norms.

    The 1/sqrt(width) scaling (Johnson-Lindenstrauss) makes ``||G Omega||`` and ``||Psi G||``
    about ``||G||``, so a DP clip bound means the same as on a gradient; Q and X do not
    depend on it.
    """
    k, l = sketch_sizes(shape, rank=rank, oversample=oversample)
    rng = module_rng(seed, module, "lora-sb-sketch")
    omega = rng.standard_normal((shape.d_in, k)) / math.sqrt(k)
    psi = rng.standard_normal((l, shape.d_out)) / math.sqrt(l)
    return omega, psi


def sketch(gradient: np.ndarray, omega: np.ndarray, psi: np.ndarray) -> Factors:
    """One gradient's ``{"Y": G Omega, "W": Psi G}`` (what a node sends, summed over its examples)."""
    g = np.asarray(gradient, dtype=np.float64)
    return {"Y": g @ omega, "W": psi @ g}


def reconstruct(y: np.ndarray, w: np.ndarray, psi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Q, X) with ``G_hat = Q @ X`` from the summed sketches."""
    y = np.asarray(y, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    if y.shape[0] != psi.shape[1] or w.shape[0] != psi.shape[0]:
        raise ValueError(f"sketches Y {y.shape}, W {w.shape} do not fit Psi {psi.shape}")
    q, _ = np.linalg.qr(y)  # orthonormal columns even when Y is rank-deficient
    x = np.linalg.lstsq(psi @ q, w, rcond=None)[0]
    return q, x


def step_scale(singular_values: np.ndarray, shape: ModuleShape, learning_rate: float) -> float:
    """``lr * sqrt(d_out d_in) / ||G_hat||_F``: the sign step's Frobenius norm (0 for G_hat = 0)."""
    norm = float(np.linalg.norm(singular_values))
    return 0.0 if norm == 0.0 else learning_rate * math.sqrt(shape.d_out * shape.d_in) / norm


def approximated_step(y: np.ndarray, w: np.ndarray, psi: np.ndarray, shape: ModuleShape,
                      learning_rate: float) -> np.ndarray:
    """The dense ``dW_fed`` the init approximates (tests and diagnostics; the init never forms it)."""
    q, x = reconstruct(y, w, psi)
    scale = step_scale(np.linalg.svd(x, compute_uv=False), shape, learning_rate)
    return -scale * (q @ x)


def init_from_sketches(y: np.ndarray, w: np.ndarray, psi: np.ndarray, shape: ModuleShape, *,
                       rank: int, learning_rate: float) -> Factors:
    """``{"B", "A", "R"}`` with ``B @ R @ A`` the best rank-r approximation of ``dW_fed``.

    Same layout as ``fed_sb.lora_sb_init``: B orthonormal columns, A orthonormal rows, R the
    (folded) diagonal of the leading singular values of dW_fed, in decreasing order.
    """
    q, x = reconstruct(y, w, psi)
    if not 1 <= rank <= min(x.shape):
        raise ValueError(f"rank {rank} needs a sketch of at least that width, got {x.shape}")
    u, s, vt = np.linalg.svd(x, full_matrices=False)  # G_hat = (Q u) diag(s) vt
    scale = step_scale(s, shape, learning_rate)
    # dW_fed = -scale * G_hat: the minus sign goes into A, so R keeps dW_fed's singular values
    return {"B": (q @ u[:, :rank]).copy(), "A": -vt[:rank].copy(), "R": np.diag(scale * s[:rank])}
