"""What the stages say when they skip work: every skipped run or evaluation names itself and why."""

from __future__ import annotations

import logging
import types

from job.config import load_config
from job.layout import RunLayout


def test_a_completed_downstream_run_says_it_is_skipped(tmp_path, caplog):
    """It returned its done.json silently (in `run`, the evaluate stage met each finetune run again unannounced)."""
    from job.downstream import PRETRAINED, train_downstream

    layout = RunLayout(tmp_path)
    ctx = types.SimpleNamespace(config=load_config("demo"), layout=layout, completed=lambda directory: {"done": 1})
    caplog.set_level(logging.INFO, logger="job.downstream")
    assert train_downstream(ctx, PRETRAINED, 1.0, 0) == {"done": 1}
    directory = layout.downstream(PRETRAINED, "finetune", 1.0, 0)
    assert f"downstream {directory.name}: complete in {directory}, skipping (use --force to redo)" in caplog.text


def test_evaluations_switched_off_are_named_with_their_keys(caplog):
    from job.evaluations import log_switched_off

    config = load_config("demo", ["evaluate.colour_baseline=false", "evaluate.s4l=true",
                                  "evaluate.evaluations=['linear_probe', 'linear_probe_200', 'depth_probe', "
                                  "'colour_baseline', 'scratch_baseline', 'label_efficiency', 's4l']"])
    caplog.set_level(logging.INFO, logger="job.evaluations")
    log_switched_off(config)
    assert ("evaluate: skipping k-NN (not in evaluate.evaluations), all-class linear probe "
            "(evaluate.linear_probe_200 = false), linear probe by depth (evaluate.depth_probe = false), "
            "all-class linear probe by depth (not in evaluate.evaluations), "
            "colour-histogram baseline (evaluate.colour_baseline = false)" in caplog.text)
    assert "scratch" not in caplog.text and "S4L" not in caplog.text
