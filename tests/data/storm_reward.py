"""A reward storm (issue #21 §5): dynamo_openrlhf.reward's math-verify check, with every ``math_verify.parse``
in its helper processes sleeping ``$DYNAMO_STORM_SLEEP_S`` seconds (default 3600) first, so every sample that
reaches math-verify runs past ``--dynamo.reward_timeout``. Use it as ``--reward.remote_url <this file>``.

The helpers run this file's ``_serve()`` (``MathReward(helper_file=__file__)``): math-verify's own loop with
the slow ``parse``, under the same per-sample time budget as the built-in reward. ``_preload()`` runs once in
the zygote that forks the helpers (math-verify imported and warmed there). With ``$DYNAMO_STORM_MARKS`` set
to a file, the zygote appends ``preload <pid>`` to it, each helper ``serve <pid> <parent pid>`` when it starts
and ``parse <pid>`` before each slow parse (tests).
"""

import os
import threading
import time

from dynamo_openrlhf import reward as _reward


def _mark(text):
    path = os.environ.get("DYNAMO_STORM_MARKS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text + "\n")


def _preload():  # the zygote, once
    _mark(f"preload {os.getpid()}")
    _reward._preload()


def _serve():  # a helper process (forked by the zygote)
    import math_verify

    _mark(f"serve {os.getpid()} {os.getppid()}")
    real_parse = math_verify.parse
    delay = float(os.environ.get("DYNAMO_STORM_SLEEP_S", "3600"))

    def slow_parse(*args, **kwargs):
        _mark(f"parse {os.getpid()}")
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
