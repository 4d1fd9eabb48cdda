"""Replies a node sends, built without torch: the thin ClientApp answers with them too.

Every reply carries a ``status`` the server records ("ok", "resync", "declined",
"failed"), a reason, the frozen-factor hash the node holds, its metrics and an
``update`` (empty unless it trained).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict


def status_reply(msg: Message, *, status: str, metrics: dict, reason: str = "", frozen_hash: str = "") -> Message:
    content = RecordDict(
        {
            "status": ConfigRecord({"status": status, "reason": reason, "frozen-hash": frozen_hash}),
            "metrics": MetricRecord(metrics),
            "update": ArrayRecord(),
        }
    )
    return Message(content, reply_to=msg)
