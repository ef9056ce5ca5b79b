"""Test hooks: delays that tests inject through the environment, to make multi-worker races certain.

JOB_TEST_CHIEF_DELAY_S=N makes the chief sleep N seconds before it writes the pretrain stage's exports and
before its final push after a stop. Unset (always, outside tests), nothing happens.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

CHIEF_DELAY_VARIABLE = "JOB_TEST_CHIEF_DELAY_S"


def chief_delay(cluster, what: str) -> None:
    """Sleep $JOB_TEST_CHIEF_DELAY_S seconds on the chief before `what` (a test hook; unset: no delay)."""
    seconds = float(os.environ.get(CHIEF_DELAY_VARIABLE) or 0)
    if seconds > 0 and cluster.is_chief:
        log.warning("test hook %s: the chief waits %g s before %s", CHIEF_DELAY_VARIABLE, seconds, what)
        time.sleep(seconds)
