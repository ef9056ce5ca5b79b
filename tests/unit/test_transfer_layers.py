"""Tests for the ["auto"] transfer-layer choice among cross-validated candidates (job.downstream.chosen_candidate)."""

from __future__ import annotations

import math

import pytest

from job.config import load_config
from job.downstream import chosen_candidate
from job.errors import JobError

# The committed cpu-real run's cross-validated scores on its 900 train images (4 folds), shortened.
SCORES = {"block_2_add": 0.843, "block_5_add": 0.871, "block_9_add": 0.866, "block_12_add": 0.794,
          "block_2_add+block_5_add": 0.880, "block_2_add+block_9_add": 0.878, "block_2_add+block_12_add": 0.856}
EXAMPLES = 900


def test_without_a_tolerance_the_best_score_wins():
    assert chosen_candidate(SCORES, EXAMPLES, 0.0) == "block_2_add+block_5_add"


def test_within_the_tolerance_the_deepest_candidate_wins_and_the_better_scored_at_its_depth():
    se = math.sqrt(0.880 * 0.120 / EXAMPLES)  # 0.0108
    # block_9_add (0.866) and block_2_add+block_9_add (0.878) are as deep: the better scored one.
    assert chosen_candidate(SCORES, EXAMPLES, 1.0) == "block_2_add+block_9_add"
    # block_2_add+block_12_add is 0.024 below the best: 2.2 standard errors.
    assert chosen_candidate(SCORES, EXAMPLES, 2.0) == "block_2_add+block_9_add"
    assert chosen_candidate(SCORES, EXAMPLES, 0.024 / se + 0.01) == "block_2_add+block_12_add"
    # A smaller tolerance than the gap to the deeper candidate (0.002) keeps the best.
    assert chosen_candidate(SCORES, EXAMPLES, 0.001 / se) == "block_2_add+block_5_add"


def test_depth_is_the_layers_place_in_the_network_not_in_a_list():
    scores = {"block_12_add": 0.87, "block_2_add+block_9_add": 0.875, "block_5_add": 0.88}  # listed out of order
    assert chosen_candidate(scores, EXAMPLES, 1.0) == "block_12_add"


def test_more_examples_narrow_the_tolerance():
    assert chosen_candidate(SCORES, 1_000_000, 1.0) == "block_2_add+block_5_add"


@pytest.mark.parametrize("value", ["-1", "-0.5"])
def test_a_negative_tolerance_is_an_error_naming_the_key(value):
    with pytest.raises(JobError, match="finetune.transfer_tolerance_se"):
        load_config("cpu-real", [f"finetune.transfer_tolerance_se={value}"])
