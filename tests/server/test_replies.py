"""Reading a reply: a client's malformation is a rejection with a reason, and nothing passed in changes."""

from __future__ import annotations

import dataclasses

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

import aggregation
from aggregation import ModelSpec, ModuleShape
from core.wire import tensors_to_record
from server.local_grid import reply_from, task_identity
from server.replies import Beliefs, read_reply
from server.rounds import NodeState
from server.validation import UpdateLimits

SPEC = ModelSpec(modules={"m": ModuleShape(d_out=4, d_in=3)}, max_rank=4)


def _read(content: RecordDict, known: NodeState):
    task_identity()
    sent = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
    return read_reply(node=5, reply=reply_from(5, content, sent), bytes_down=10, known=known, spec=SPEC,
                      aggregator=aggregation.create("fedavg"), limits=UpdateLimits())


def test_a_trained_reply_becomes_an_update_and_the_nodes_word_comes_back_as_beliefs():
    import numpy as np

    known = NodeState(key="k", rank=2, alpha=4.0, num_examples=7, merged_through=1)
    before = dataclasses.replace(known)
    content = RecordDict({
        "update": tensors_to_record({"m": {"A": np.ones((2, 3), np.float32), "B": np.ones((4, 2), np.float32)}}),
        "metrics": MetricRecord({"num-examples": 7, "train-loss": 1.5, "merged-through": 3}),
        "status": ConfigRecord({"status": "ok", "frozen-hash": "abc"}),
    })
    read = _read(content, known)
    assert read.outcome.status == "ok" and read.update.rank == 2 and read.update.node_id == "k"
    assert read.beliefs == Beliefs(merged_through=3, frozen_hash="abc")
    assert known == before  # the strategy applies the beliefs; the reader changes nothing


def test_a_malformed_reply_is_rejected_with_its_reason_and_still_reports_what_it_could():
    known = NodeState(key="k", rank=2, alpha=4.0, num_examples=7)
    content = RecordDict({"metrics": MetricRecord({"num-examples": 7, "train-loss": 1.5, "merged-through": 2})})
    read = _read(content, known)
    assert read.outcome.status == "rejected" and "no 'update' record" in read.outcome.reason
    assert read.update is None and read.beliefs.merged_through == 2
