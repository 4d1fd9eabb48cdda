"""Differential privacy for fedlora.

* Local DP-SGD per client with Opacus (``dpsgd``), accounted over a node's whole history
  in a durable ledger (``ledger``, ``accounting``), with a target ε enforced before each
  round (``budget``) and planned per round by ``client.private_round``.
* Central, user-level DP as a wrapper around sum-type aggregators (``central``), its ε
  accounted per round and bounded by ``dp-central-epsilon`` (``accounting.CentralAccount``).
* Settings from the run config and node config (``settings``); the run's worst ε from
  the database (``report``).

The README's "Differential privacy" section is the user-facing description.
"""
