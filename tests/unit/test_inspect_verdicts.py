"""The inspector's verdict rules on hand-built cases, each verdict at least once."""

from __future__ import annotations

import pytest
import torch

from pipeline.inspect.verdicts import VERDICTS, count_verdicts, verdict

CASES = {
    # name: (ious of the queries with the object, their scores, expected verdict)
    "one confident covering query": ([0.8, 0.2, 0.0], [0.9, 0.95, 0.1], "found"),
    "exactly at both thresholds": ([0.5], [0.3], "found"),
    "covering query below threshold": ([0.7, 0.0], [0.1, 0.9], "low_score"),
    "a good box with low score beats a confident poor one": ([0.4, 0.6], [0.9, 0.2], "low_score"),
    "confident but only overlapping": ([0.3, 0.05], [0.9, 0.9], "mislocalised"),
    "just above near": ([0.1], [0.01], "mislocalised"),
    "two confident covering queries": ([0.9, 0.6, 0.1], [0.8, 0.5, 0.9], "duplicate"),
    "second covering query unconfident": ([0.9, 0.6], [0.8, 0.29], "found"),
    "nothing near": ([0.09, 0.0], [0.99, 0.99], "missed"),
    "no query at all": ([], [], "missed"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_verdict_rules(name):
    ious, scores, expected = CASES[name]
    got = verdict(torch.tensor(ious, dtype=torch.float32), torch.tensor(scores, dtype=torch.float32), 0.3)
    assert got == expected


def test_every_verdict_is_exercised():
    assert {case[2] for case in CASES.values()} == set(VERDICTS)


def test_threshold_moves_found_to_low_score():
    ious, scores = torch.tensor([0.8]), torch.tensor([0.5])
    assert verdict(ious, scores, 0.3) == "found"
    assert verdict(ious, scores, 0.6) == "low_score"


def test_counts_list_every_verdict():
    counts = count_verdicts([{"verdict": "found"}, {"verdict": "found"}, {"verdict": "missed"}])
    assert counts == {"found": 2, "low_score": 0, "mislocalised": 0, "duplicate": 0, "missed": 1}
