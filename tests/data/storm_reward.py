"""A reward storm (issue #21 §5): dynamo_openrlhf.reward's math-verify check, with every ``math_verify.parse``
in its helper processes sleeping ``$DYNAMO_STORM_SLEEP_S`` seconds (default 3600) first, so every sample that
reaches math-verify runs past ``--dynamo.reward_timeout``. Use it as ``--reward.remote_url <this file>``.

The helpers run this file's ``_serve()`` (``MathReward(helper_file=__file__)``): math-verify's own loop with
the slow ``parse``, under the same per-sample time budget as the built-in reward.
"""

import os
import threading
import time

from dynamo_openrlhf import reward as _reward


def _serve():  # the helper process
    import math_verify

    real_parse = math_verify.parse
    delay = float(os.environ.get("DYNAMO_STORM_SLEEP_S", "3600"))

    def slow_parse(*args, **kwargs):
        time.sleep(delay)
        return real_parse(*args, **kwargs)

    math_verify.parse = slow_parse  # _reward._serve imports it from math_verify after this
    _reward._serve()


_LOCK = threading.Lock()
_SCORER = None


def reward_func(queries, prompts, labels, **kwargs):
    global _SCORER
    with _LOCK:
        if _SCORER is None:
            _SCORER = _reward.MathReward(helper_file=__file__)
    return _SCORER(queries, prompts, labels, **kwargs)
