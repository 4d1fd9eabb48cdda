"""Privacy accounting with Opacus's accountants: a node's DP-SGD history, a run's central DP.

A history is Opacus's own format: ``((noise_multiplier, sample_rate, steps), ...)``,
one entry per run of steps with the same noise and sample rate. Everything here is a
pure function of a history, so the same numbers come out whether the history was
built by one long training run or by many rounds, processes or runs on a node.

Why ``compose`` merges entries the way Opacus's ``step`` does: the PRV accountant
discretises each entry separately, so ``[(s, q, 3), (s, q, 3)]`` and ``[(s, q, 6)]``
give slightly different upper bounds. Merging keeps "3 rounds of n steps" bit-for-bit
equal to "3n steps in one go".

``CentralAccount`` applies the same functions to central (user-level) DP: each
aggregated round is one release of the sampled Gaussian mechanism, so a run's history
is ``((z, q, rounds), ...)`` with q the share of nodes sampled per round.

Opacus is imported lazily (it adds seconds to start-up), so the server and config
validation can use the accountant names without it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    from opacus.accountants import IAccountant

Entry = tuple[float, float, int]  # (noise multiplier, sample rate, steps)
History = tuple[Entry, ...]

#: the largest noise multiplier calibration will try before calling the budget too small
MAX_NOISE_MULTIPLIER = 1e6
#: the smallest it will return: below ~0.3 the PRV accountant needs minutes per ε and
#: answers ε in the hundreds or inf, i.e. no meaningful guarantee to calibrate for
MIN_NOISE_MULTIPLIER = 0.3


def _prv() -> IAccountant:
    from opacus.accountants import PRVAccountant

    return PRVAccountant()


def _rdp() -> IAccountant:
    from opacus.accountants import RDPAccountant

    return RDPAccountant()


#: accountant name -> factory. PRV (Gopi et al. 2021) gives the tightest figures and is
#: what we report by default; RDP is the classic, looser bound. Opacus's Gaussian (GDP)
#: accountant is left out on purpose: it is only accurate for very many steps.
ACCOUNTANTS: dict[str, Callable[[], IAccountant]] = {"prv": _prv, "rdp": _rdp}


def accountant_names() -> list[str]:
    return sorted(ACCOUNTANTS)


def check_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown DP accountant {name!r}; valid: {', '.join(accountant_names())}")


def check_history(history: Sequence[Sequence[float]]) -> History:
    """A validated copy as tuples; a malformed entry is named, never silently dropped."""
    out = []
    for i, entry in enumerate(history):
        if len(entry) != 3:
            raise ValueError(f"privacy history entry {i} is {entry!r}, expected (noise, sample rate, steps)")
        sigma, rate, steps = float(entry[0]), float(entry[1]), entry[2]
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"privacy history entry {i}: noise multiplier {sigma!r} is not >= 0")
        if not 0 < rate <= 1:
            raise ValueError(f"privacy history entry {i}: sample rate {rate!r} is not in (0, 1]")
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"privacy history entry {i}: steps {steps!r} is not a positive integer")
        out.append((sigma, rate, int(steps)))
    return tuple(out)


def compose(history: History, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """``history`` followed by ``steps`` steps at (noise, rate), merged like Opacus's ``step``."""
    if steps == 0:
        return history
    if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
        return (*history[:-1], (noise_multiplier, sample_rate, history[-1][2] + steps))
    return (*history, (noise_multiplier, sample_rate, steps))


def total_steps(history: History) -> int:
    return sum(entry[2] for entry in history)


def make_accountant(name: str, history: History = ()) -> IAccountant:
    """A fresh Opacus accountant holding ``history`` (through its own state-dict API)."""
    check_accountant(name)
    accountant = ACCOUNTANTS[name]()
    if history:
        accountant.load_state_dict({"history": list(history), "mechanism": accountant.mechanism()})
    return accountant


def epsilon(history: History, *, delta: float, accountant: str) -> float:
    """ε spent by ``history`` at ``delta`` (0 for an empty history)."""
    if not history:
        return 0.0
    if any(entry[0] == 0 for entry in history):
        return math.inf  # a step without noise has no finite guarantee
    # PRV takes log(1 - q), which is -inf at q = 1; the result is still right.
    with np.errstate(divide="ignore"):
        return float(make_accountant(accountant, history).get_epsilon(delta))


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior: History = (),
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (to ``tolerance`` in ε) keeping ``prior`` plus
    ``steps`` steps at ``sample_rate`` within ``target_epsilon``.

    Unlike ``make_private_with_epsilon`` (which assumes nothing was spent before),
    this composes with the node's prior history, so a second run on the same data
    gets only what the first one left.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise ValueError(f"planned steps must be >= 1, got {steps}")
    spent = epsilon(prior, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise ValueError(f"privacy budget exhausted: ε = {spent:.4g} already spent >= target {target_epsilon:.4g}")

    def eps(sigma: float) -> float:
        return epsilon(compose(prior, sigma, sample_rate, steps), delta=delta, accountant=accountant)

    # Bracket [low, high] with eps(low) > target >= eps(high), doubling or halving from 1,
    # then bisect in log space until ε is within ``tolerance`` below the target.
    high = low = 1.0
    eps_high = eps(high)
    if eps_high > target_epsilon:
        while eps_high > target_epsilon:
            low, high = high, high * 2.0
            if high > MAX_NOISE_MULTIPLIER:
                raise ValueError(
                    f"privacy budget too small: ε = {target_epsilon} at δ = {delta} cannot be met over "
                    f"{steps} steps at sample rate {sample_rate:.4g} with a noise multiplier <= "
                    f"{MAX_NOISE_MULTIPLIER:g}"
                )
            eps_high = eps(high)
    else:
        while True:
            if low <= MIN_NOISE_MULTIPLIER:
                return MIN_NOISE_MULTIPLIER  # the target allows less noise than is worth accounting
            low = max(low / 2.0, MIN_NOISE_MULTIPLIER)
            eps_low = eps(low)
            if eps_low > target_epsilon:
                break
            high, eps_high = low, eps_low
    while target_epsilon - eps_high > tolerance and high / low > 1.0 + 1e-6:
        mid = math.sqrt(low * high)
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return high


def affordable_steps(
    *,
    history: History,
    noise_multiplier: float,
    sample_rate: float,
    max_steps: int,
    target_epsilon: float,
    delta: float,
    accountant: str,
) -> int:
    """The most steps (<= ``max_steps``) that keep ε within ``target_epsilon``; ε grows with steps."""

    def fits(steps: int) -> bool:
        projected = compose(history, noise_multiplier, sample_rate, steps)
        return epsilon(projected, delta=delta, accountant=accountant) <= target_epsilon

    if fits(max_steps):
        return max_steps
    low, high = 0, max_steps  # fits(low) (or low == 0), not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


# --- central (user-level) DP: one sampled Gaussian release per aggregated round ------------


class CentralBudgetExhausted(RuntimeError):
    """The next round would take the run's user-level ε past ``dp-central-epsilon``."""


def sample_rate(clients_per_round: int, nodes: int) -> float:
    """q = clients per round / nodes (1 when there are fewer nodes than that).

    The strategy samples a fixed number of nodes without replacement; the accountants
    assume Poisson sampling at q. Treating one as the other is the usual DP-FedAvg
    analysis (McMahan et al. 2018) and what Flower's DP wrappers do. Retries within a
    round (``round-retries``) re-sample nodes that did not reply and are not counted.
    """
    if clients_per_round < 1:
        raise ValueError(f"clients per round must be >= 1, got {clients_per_round}")
    return 1.0 if nodes <= clients_per_round else clients_per_round / nodes


@dataclass(frozen=True, kw_only=True)
class CentralAccount:
    """The user-level ε a run's central DP has spent, and its budget (0: none)."""

    noise_multiplier: float
    delta: float
    accountant: str = "prv"
    budget: float = 0.0
    history: History = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"central DP accounting needs a noise multiplier > 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp-delta must be in (0, 1), got {self.delta}")
        if not (math.isfinite(self.budget) and self.budget >= 0):
            raise ValueError(f"dp-central-epsilon must be a finite number >= 0 (0 = no budget), got {self.budget}")
        check_accountant(self.accountant)
        object.__setattr__(self, "history", check_history(self.history))

    @functools.cached_property
    def epsilon(self) -> float:
        """ε spent so far at ``delta`` (0 before the first aggregated round)."""
        return epsilon(self.history, delta=self.delta, accountant=self.accountant)

    @property
    def rounds(self) -> int:
        return total_steps(self.history)

    def projected(self, rate: float) -> float:
        """ε after one more round at sample rate ``rate``."""
        return epsilon(compose(self.history, self.noise_multiplier, rate, 1), delta=self.delta,
                       accountant=self.accountant)

    def check_next(self, *, round_number: int, rate: float) -> float:
        """The projected ε of round ``round_number``; raises before a round that would pass the budget."""
        projected = self.projected(rate)
        if self.budget and projected > self.budget:
            raise CentralBudgetExhausted(
                f"central DP budget exhausted: round {round_number} would bring user-level ε to "
                f"{projected:.6g} > dp-central-epsilon {self.budget:.6g} (δ = {self.delta:g}, q = {rate:.4g}, "
                f"z = {self.noise_multiplier:g}); spent {self.epsilon:.6g} over {self.rounds} rounds"
            )
        return projected

    def charged(self, rate: float) -> CentralAccount:
        """This account after one aggregated (noised) round at sample rate ``rate``."""
        return dataclasses.replace(self, history=compose(self.history, self.noise_multiplier, rate, 1))

    def to_json(self) -> dict[str, Any]:
        return {"accountant": self.accountant, "history": [list(entry) for entry in self.history]}

    def restored(self, saved: Mapping[str, Any] | None, *, rounds: int) -> CentralAccount:
        """Continue from a checkpoint's ``to_json``.

        A checkpoint written before central DP was accounted holds none: its ``rounds``
        are counted at q = 1, an upper bound on what they spent (ε grows with q).
        """
        if not saved:
            return dataclasses.replace(self, history=((self.noise_multiplier, 1.0, rounds),) if rounds else ())
        if saved.get("accountant") != self.accountant:
            raise ValueError(f"checkpoint's central DP accountant {saved.get('accountant')!r} is not "
                             f"dp-accountant {self.accountant!r}")
        return dataclasses.replace(self, history=check_history(saved.get("history", ())))
