from datetime import datetime

import numpy as np

from server.rounds import ClientOutcome, RoundReport, tensors_hash


def test_round_report_totals_count_every_outcome():
    outcomes = (ClientOutcome(node_id=1, status="ok", bytes_down=10, bytes_up=3),
                ClientOutcome(node_id=2, status="rejected", bytes_down=7, bytes_up=5),
                ClientOutcome(node_id=3, status="ok", bytes_down=1, bytes_up=0))
    now = datetime(2026, 1, 1)
    report = RoundReport(number=1, started_at=now, finished_at=now, outcomes=outcomes, aggregated=True,
                         train_loss=None, relative_error=None, aggregate_seconds=0.0)
    assert (report.bytes_down, report.bytes_up, report.num_ok) == (18, 8, 2)


def test_tensors_hash_ignores_insertion_order_but_not_values():
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((3, 2), np.float32)
    one = tensors_hash({"m1": {"A": a, "B": b}, "m2": {"A": a}})
    same = tensors_hash({"m2": {"A": a.copy()}, "m1": {"B": b, "A": a}})
    changed = b.copy()
    changed[0, 0] = np.nextafter(np.float32(1), np.float32(2))
    assert one == same
    assert one != tensors_hash({"m1": {"A": a, "B": changed}, "m2": {"A": a}})
    # the key is part of the hash: the same array under another factor name differs
    assert one != tensors_hash({"m1": {"A": a, "C": b}, "m2": {"A": a}})
