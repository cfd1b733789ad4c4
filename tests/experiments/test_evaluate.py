"""`bnrnn evaluate`'s score table."""

from __future__ import annotations

from bnrnn_experiments.evaluate import format_scores


def test_score_table_names_running_statistics_only_beside_re_estimated_ones() -> None:
    plain = format_scores("acc", {"running": {"test": {"acc": 90.0}}, "reestimated": None})
    assert "running" not in plain and "90.0000" in plain
    bn = {"running": {"test": {"acc": 90.0}}, "reestimated": {"test": {"acc": 91.0}}}
    assert "acc (running stats)" in format_scores("acc", bn)
