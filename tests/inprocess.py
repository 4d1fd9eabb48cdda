"""A run of the real ServerApp and ClientApp in this process, for tests: ``cli.inprocess`` with a RunConfig.

What the in-process engine leaves out is Flower's engines themselves (processes, Ray,
gRPC, the SuperLink's state), which tests/integration covers.
"""

from __future__ import annotations

from typing import Any

from cli.inprocess import InProcessGrid, run_app
from core.config import RunConfig


def run(*, num_nodes: int, node_configs: dict[int, dict] | None = None, **settings: Any) -> InProcessGrid:
    """One run of ``server.app.main`` over ``num_nodes`` in-process nodes; the grid, for inspection."""
    return run_app(RunConfig(simulation_nodes=num_nodes, **settings).to_flower(), num_nodes, node_configs)
