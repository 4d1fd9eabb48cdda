"""Small numeric helpers shared by the aggregators (weights, padding, stacking, means)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from aggregation.base import ClientInfo, ClientUpdate, Downlink, Factors, Tensors, check_rank


def example_weights(updates: Sequence[ClientUpdate]) -> np.ndarray:
    """p_k = n_k / sum(n) over the clients that replied this round (float64)."""
    if not updates:
        raise ValueError("cannot aggregate an empty list of client updates")
    counts = np.array([u.num_examples for u in updates], dtype=np.float64)
    return counts / counts.sum()


def pad_to(matrix: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Zero-pad a matrix at the bottom/right to ``shape`` (never truncates)."""
    rows, cols = matrix.shape
    if rows > shape[0] or cols > shape[1]:
        raise ValueError(f"cannot pad {matrix.shape} down to {shape}")
    out = np.zeros(shape, dtype=np.float64)
    out[:rows, :cols] = matrix
    return out


def truncate_lora(factors: Factors, rank: int) -> Factors:
    """Keep the first ``rank`` components of folded or raw LoRA factors."""
    return {"A": factors["A"][:rank, :].copy(), "B": factors["B"][:, :rank].copy()}


def fold(update: ClientUpdate, factor: str, module: str) -> np.ndarray:
    """``s_k * factor`` in float64: the client's scaling folded into one factor."""
    return update.scale * np.asarray(update.tensors[module][factor], dtype=np.float64)


def folded_lora(update: ClientUpdate) -> Tensors:
    """A LoRA upload as folded float64 factors {"B": s_k B_k, "A": A_k} per module."""
    return {
        name: {"B": fold(update, "B", name), "A": np.asarray(f["A"], np.float64)}
        for name, f in update.tensors.items()
    }


def unfold_for(factors: Factors, *, scale: float, into: str) -> Factors:
    """Divide a folded factor by a client's scaling so it loads into its adapter."""
    out = {name: np.asarray(value, dtype=np.float64).copy() for name, value in factors.items()}
    out[into] = out[into] / scale
    return out


def holder_weighted_mean(
    previous: Factors, updates: Sequence[ClientUpdate], weights: np.ndarray, module: str
) -> Factors:
    """Folded LoRA factors averaged per component over the clients that hold it.

    Component j of a rank-m adapter is row j of A and column j of the folded B (s B). A
    rank-r_k client holds components 0 .. r_k - 1. For each j the result is

        sum_{k holds j} w_k (s_k B_k[:, j], A_k[j]) / sum_{k holds j} w_k

    (weights renormalised over the holders), and where no client with w_k > 0 holds j,
    ``previous[...][j]`` (the global value the clients were sent) is kept.

    Why not the zero-padded mean: it averages each component with zeros from the
    clients that lack it, so a component no participant holds becomes exactly
    B[:, j] = 0 and A[j] = 0, and in a PEFT layer both factors of such a component get
    exactly zero gradient; it would never train again once ``clients-per-round`` left
    the highest-rank node out of one round. This is the rule of Fed-SB's per-entry mean
    of R (``aggregation.fed_sb.entrywise_mean``) applied to the components of (B, A).
    With every client at rank m it is the plain weighted mean sum_k w_k (s_k B_k, A_k).

    ``weights`` are one per update (e.g. p_k, or HetLoRA's norms); a client with weight 0
    counts as holding nothing. Returns new float64 arrays; nothing is mutated.
    """
    b_prev = np.asarray(previous["B"], dtype=np.float64)
    a_prev = np.asarray(previous["A"], dtype=np.float64)
    max_rank = a_prev.shape[0]
    b_sum = np.zeros_like(b_prev)
    a_sum = np.zeros_like(a_prev)
    mass = np.zeros(max_rank)
    for w, update in zip(weights, updates, strict=True):
        factors = update.tensors[module]
        rank = update.rank
        b_shape, a_shape = np.shape(factors["B"]), np.shape(factors["A"])
        if rank > max_rank or b_shape != (b_prev.shape[0], rank) or a_shape != (rank, a_prev.shape[1]):
            raise ValueError(
                f"node {update.node_id}, module {module}: B {b_shape} and A {a_shape} do not "
                f"fit rank {rank} <= {max_rank} on a {b_prev.shape[0]} x {a_prev.shape[1]} module"
            )
        b_sum[:, :rank] += w * fold(update, "B", module)
        a_sum[:rank] += w * np.asarray(factors["A"], dtype=np.float64)
        mass[:rank] += w
    held = mass > 0
    b_out, a_out = b_prev.copy(), a_prev.copy()
    b_out[:, held] = b_sum[:, held] / mass[held]
    a_out[held] = a_sum[held] / mass[held][:, None]
    return {"A": a_out, "B": b_out}


def component_mean(previous: np.ndarray, parts: Iterable[tuple[float, np.ndarray]], *, along: str) -> np.ndarray:
    """One factor averaged per component over the clients that hold it.

    ``holder_weighted_mean``'s rule for methods that aggregate a single factor (the other
    one shared). ``along="cols"``: component j is column j (a folded B, d_out x m);
    ``"rows"``: row j (an A, m x d_in). Each part ``(w_k, X_k)`` holds the first r_k
    components; component j becomes ``sum_{k: r_k > j} w_k X_k[j] / sum_{k: r_k > j} w_k``,
    and keeps ``previous[j]`` where no part with w_k > 0 holds it. With every part at
    the full rank this is the plain weighted mean. ``parts`` may be a generator: one
    upload is read at a time. Returns a new float64 array.
    """
    if along not in ("rows", "cols"):
        raise ValueError(f"along must be 'rows' or 'cols', got {along!r}")
    axis = 0 if along == "rows" else 1
    prev = np.asarray(previous, dtype=np.float64)
    total = np.zeros_like(prev)
    mass = np.zeros(prev.shape[axis])
    for w, part in parts:
        x = np.asarray(part, dtype=np.float64)
        held = x.shape[axis]
        if x.ndim != 2 or held > prev.shape[axis] or x.shape[1 - axis] != prev.shape[1 - axis]:
            raise ValueError(f"a {along} upload of shape {x.shape} does not fit the global factor of shape {prev.shape}")
        lead = (slice(None),) * axis + (slice(held),)  # the components this part holds
        total[lead] += w * x
        mass[:held] += w
    held = mass > 0
    out = prev.copy()
    if axis == 0:
        out[held] = total[held] / mass[held][:, None]
    else:
        out[:, held] = total[:, held] / mass[held]
    return out


def stack_lowrank(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> Factors:
    """[B_1 .. B_n] and [A_1; ..; A_n], so that B_stack @ A_stack = sum_i B_i @ A_i."""
    if not pairs:
        raise ValueError("nothing to stack")
    return {
        "B": np.concatenate([b for b, _ in pairs], axis=1),
        "A": np.concatenate([a for _, a in pairs], axis=0),
    }


def lowrank_fro_norm(factors: Factors) -> float:
    """||B @ A||_F without forming the d_out x d_in product.

    B = Q_b R_b and A^T = Q_a R_a give ||B A|| = ||R_b R_a^T|| (the Q's are
    orthonormal). The Gram-trace formula costs the same but squares the condition
    number: it loses half the digits when the product nearly cancels, which is
    exactly the case (applied - ideal) we measure.
    """
    b = np.asarray(factors["B"], dtype=np.float64)
    a = np.asarray(factors["A"], dtype=np.float64)
    if b.shape[1] * 2 > min(b.shape[0], a.shape[1]):
        # a stack wider than half the matrix: forming it (O(d k q)) beats QR (O(d q^2))
        return float(np.linalg.norm(b @ a))
    r_b = np.linalg.qr(b, mode="r")
    r_a = np.linalg.qr(a.T, mode="r")
    return float(np.linalg.norm(r_b @ r_a.T))


def dense(factors: Factors) -> np.ndarray:
    return np.asarray(factors["B"], dtype=np.float64) @ np.asarray(factors["A"], dtype=np.float64)


def module_names(tensors: Tensors) -> list[str]:
    return sorted(tensors)


def check_lora_update(update: ClientUpdate, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse an upload whose modules or factor shapes do not match the run.

    Stacking methods take the rank from the arrays; a client that reports one rank and
    sends another would otherwise be folded with the wrong ``s = alpha / rank``.
    """
    if set(update.tensors) != set(shapes):
        missing = sorted(set(shapes) - set(update.tensors))
        extra = sorted(set(update.tensors) - set(shapes))
        raise ValueError(
            f"node {update.node_id}: modules differ from the run (missing {missing}, "
            f"unexpected {extra})"
        )
    for name, (d_out, d_in) in shapes.items():
        factors = update.tensors[name]
        want = {"A": (update.rank, d_in), "B": (d_out, update.rank)}
        for factor, shape in want.items():
            got = np.shape(factors.get(factor)) if factor in factors else None
            if got != shape:
                raise ValueError(
                    f"node {update.node_id}, module {name}: {factor} has shape {got}, "
                    f"expected {shape} for rank {update.rank}"
                )


def folded_pairs(
    updates: Sequence[ClientUpdate], weights: np.ndarray, module: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(p_k s_k B_k, A_k)]`` in float64: the factors whose stack multiplies to T."""
    return [
        (p * fold(update, "B", module), np.asarray(update.tensors[module]["A"], np.float64))
        for p, update in zip(weights, updates, strict=True)
    ]


def truncated_downlink(factors: Tensors, client: ClientInfo, max_rank: int) -> Downlink:
    """The first ``client.rank`` components of global folded factors, un-folded for the
    client's scaling; A and B both train. Shared by every method that keeps a global
    (B, A) pair at the maximum rank and truncates it per client."""
    check_rank(client.rank, max_rank, node=client.node_id)
    adapter = {
        name: unfold_for(truncate_lora(f, client.rank), scale=client.scale, into="B")
        for name, f in factors.items()
    }
    return Downlink(adapter=adapter, trainable=frozenset({"A", "B"}))
