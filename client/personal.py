"""Factors a node trains but never uploads stay on the node (FedSA-LoRA's B).

A method says so through its downlink: a factor in ``trainable`` but not in ``uplink``
(``aggregation.base.Downlink.personal``). The node then keeps that factor from round to
round, in two places:

* ``context.state["personal"]``: what Flower keeps between the rounds of a run (the
  resident worker round-trips it); read first;
* ``core.personal``'s file, ``<cache>/personal/<run tag>/<node>.npz``, rewritten every
  round: a node that restarted, or a resumed run (same run tag), continues with its own
  B, and ``fedlora export RUN --node NAME`` reads it on the node's machine.

A stored factor whose shape no longer fits (the node's rank changed) is dropped with a
warning and the factor starts from PEFT's init again. Stored bytes never go into the
reply: only ``uplink`` is exported.

Evaluation. The server never sees B, so it can evaluate neither a client's model nor send
one out for federated evaluation (whose global adapter has no B); the node evaluates its
just-trained personalised adapter itself, every round it trains, and reports
``personal-eval-loss`` / ``personal-eval-ppl`` / ``personal-eval-examples``, on:

* the held-out slice of federated evaluation when the run has one (``fraction-evaluate`` > 0,
  ``client.node.node_split``: never trained on; a release on private data under DP-SGD, as
  federated evaluation is);
* else, without DP-SGD, a slice of its training examples (``node-eval-fraction``, the node's
  own value first, ``core.data.split_heldout``) that it then does not train on;
* else nothing: the DP-SGD plan was made for all of the node's examples, so it trains on all.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import WARNING

from flwr.app import ConfigRecord, Context
from flwr.common import log

from client.node import NODE_EVAL_FRACTION, node_split
from core.config import RunConfig
from core.data import Example, split_heldout
from core.model import AdaptedModel
from core.personal import PersonalFactors, PersonalStore, default_directory
from core.trainer import evaluate
from core.wire import record_to_tensors, tensors_to_record

STATE_KEY = "personal"


def personal_factors(settings: ConfigRecord) -> frozenset[str]:
    """Factors this round trains but does not upload (empty for every shared method)."""
    trainable = frozenset(str(settings["trainable"]).split(","))
    return trainable - frozenset(str(settings["uplink"]).split(","))


@dataclass(frozen=True)
class PersonalRound:
    """One round's personal factors: loaded before training, stored and evaluated after."""

    factors: frozenset[str]
    store: PersonalStore | None
    train_examples: list[Example]
    heldout: list[Example]

    @staticmethod
    def start(*, context: Context, cfg: RunConfig, adapted: AdaptedModel, factors: frozenset[str],
              examples: list[Example], node: str, private: bool) -> PersonalRound:
        if not factors:
            return PersonalRound(factors=factors, store=None, train_examples=examples, heldout=[])
        store = PersonalStore(directory=default_directory(), run_key=cfg.run_tag or str(context.run_id), node=node)
        held = _held(context, store)
        if held is not None:
            _restore(adapted, held, factors)
        _, federated = node_split(context, cfg)  # federated evaluation's slice: ``examples`` excludes it
        if federated:
            return PersonalRound(factors=factors, store=store, train_examples=examples, heldout=federated)
        if private or len(examples) < 2:
            return PersonalRound(factors=factors, store=store, train_examples=examples, heldout=[])
        fraction = float(context.node_config.get(NODE_EVAL_FRACTION, cfg.node_eval_fraction))
        train_part, heldout = split_heldout(examples, fraction, cfg.seed)
        return PersonalRound(factors=factors, store=store, train_examples=train_part, heldout=heldout)

    def finish(self, *, context: Context, adapted: AdaptedModel, tokenizer, max_len: int,
               server_round: int) -> dict[str, float]:
        """Keep the trained personal factors; the held-out metrics of the personalised adapter."""
        if self.store is None:
            return {}
        kept = adapted.export(self.factors)
        context.state[STATE_KEY] = tensors_to_record(kept)
        spec = adapted.spec
        self.store.save(PersonalFactors(tensors=kept, rank=spec.rank, alpha=spec.alpha, server_round=server_round))
        if not self.heldout:
            return {}
        result = evaluate(adapted.model, self.heldout, tokenizer, max_len=max_len)
        return {"personal-eval-loss": result.loss, "personal-eval-ppl": result.perplexity,
                "personal-eval-examples": result.examples}


def _held(context: Context, store: PersonalStore) -> dict | None:
    if STATE_KEY in context.state.array_records:
        return record_to_tensors(context.state[STATE_KEY])
    stored = store.load()
    return None if stored is None else stored.tensors


def _restore(adapted: AdaptedModel, held: dict, factors: frozenset[str]) -> None:
    wanted = {m: {k: v for k, v in f.items() if k in factors} for m, f in held.items() if m in adapted.factors}
    fits = set(wanted) == set(adapted.factors) and all(
        tuple(v.shape) == tuple(adapted.factors[m][k].shape) for m, f in wanted.items() for k, v in f.items())
    if not fits:
        log(WARNING, "stored personal factors %s do not fit this rank-%d adapter; starting them afresh",
            sorted(factors), adapted.spec.rank)
        return
    adapted.load(wanted)

