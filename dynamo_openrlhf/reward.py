"""Math-verify reward for OpenRLHF's remote reward-function contract.

Use it in either of two ways (both load this same file):

* ``--reward.remote_url dynamo_openrlhf.reward`` (built-in: ``python -m dynamo_openrlhf.train``
  resolves an importable module name that defines ``reward_func`` to its file path), or
* ``--reward.remote_url /path/to/dynamo_openrlhf/reward.py`` (a plain file, as OpenRLHF expects;
  this file imports nothing from the package, so it also works copied elsewhere).

OpenRLHF 0.11.2 calls ``reward_func(queries, prompts, labels)`` once per sample from a worker
thread of the rollout engine (``asyncio.to_thread``); ``queries`` are the decoded prompt+response
texts. It returns ``{"rewards": tensor[B], "scores": tensor[B], "extra_logs": {name: float}}``.

Answer extraction rule (applied to the response, i.e. the query with the prompt prefix removed):
  1. the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; a response
     that opens a box but never closes one (cut off) is malformed, with no fallback;
  2. else the text after the last "final answer" / "the answer is" (up to the end of the line);
  3. else the last number (``-12``, ``3.5``, ``7/2``) in the response;
  4. else the response is *malformed* (reward 0). So is an answer longer than
     ``max_answer_chars`` (256), which also keeps adversarial inputs away from sympy.

Verification: ``math_verify.parse`` of the gold label (wrapped in ``$...$`` unless it already
carries LaTeX delimiters or ``\\boxed``) and of the extracted answer, then ``math_verify.verify``.
An answer math-verify cannot parse counts as *malformed*.

Bounded time per sample: math-verify's own timeouts use ``signal.alarm`` and fail in threads,
and a signal cannot interrupt a long C-level big-integer operation inside sympy anyway. So its
timeouts are disabled (``parsing_timeout=None``, ``timeout_seconds=None``) and parse+verify run
in a small pool of persistent helper processes (stdlib only on this side; started lazily, about a
second each). Every sample gets a wall-clock budget (``DYNAMO_REWARD_TIMEOUT_S``, default 5 s)
and an address-space cap (``DYNAMO_REWARD_MEMORY_MB``, default 2048): past either, the helper is
killed (and replaced on next use) and the sample is a *timeout* (reward 0). Nothing here raises
into the trainer: any failure of the machinery gives reward 0 counted as ``math_error``.

``extra_logs`` holds per-call counts ``math_correct``, ``math_wrong``, ``math_malformed``,
``math_timeout``, ``math_error``. OpenRLHF calls once per sample and averages ``extra_logs`` over
the batch, so its logs show these as per-step *rates*.

Environment: ``DYNAMO_REWARD_TIMEOUT_S``, ``DYNAMO_REWARD_MEMORY_MB``, ``DYNAMO_REWARD_WORKERS``
(pool size, default 2), ``DYNAMO_REWARD_DUMP`` (path: append one JSON line per scored sample with
prompt, response, label, extracted answer, status and reward — for debugging/tests).
"""

import json
import os
import queue
import re
import selectors
import subprocess
import sys
import threading
import time
from typing import List, NamedTuple, Optional, Sequence

__all__ = ["reward_func", "extract_answer", "MathReward", "Score", "STATUSES"]

STATUSES = ("correct", "wrong", "malformed", "timeout", "error")
MAX_ANSWER_CHARS = 256
MAX_RESPONSE_CHARS = 8192  # only the tail of a very long response is searched

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FINAL = re.compile(r"(?:final\s+answer|the\s+answer\s+is)\s*(?:is)?\s*[:=]?\s*", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?")


def _last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None."""
    for m in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
        # unbalanced: try an earlier one
    return None


def extract_answer(response: str) -> Optional[str]:
    """The answer string per the module's documented rule, or None (malformed)."""
    text = response[-MAX_RESPONSE_CHARS:]
    if _BOXED.search(text):  # a boxed answer was attempted: it must be complete
        boxed = _last_boxed(text)
        if boxed is None or not boxed.strip():
            return None
        return boxed.strip()
    finals = list(_FINAL.finditer(text))
    if finals:
        tail = text[finals[-1].end():].split("\n", 1)[0].strip()
        tail = tail.rstrip(".").strip().strip("$").strip()
        if tail:
            return tail
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace(" ", "")
    return None


def _response_of(query: str, prompt: str) -> str:
    return query[len(prompt):] if prompt and query.startswith(prompt) else query


# ----------------------------------------------------------------------------------------------
# Helper process (runs _serve(); imports math_verify only)
# ----------------------------------------------------------------------------------------------

_SERVE_CMD = (
    "import importlib.util,sys;"
    "s=importlib.util.spec_from_file_location('_dynamo_reward_helper',sys.argv[1]);"
    "m=importlib.util.module_from_spec(s);s.loader.exec_module(m);m._serve()"
)


def _wrap_gold(label: str) -> str:
    if "$" in label or "\\boxed" in label or "\\(" in label or "\\[" in label:
        return label
    return f"${label}$"


def _serve() -> None:  # pragma: no cover - runs in the helper process
    """Helper loop: one JSON request per stdin line, one JSON reply per line on the real stdout."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # anything libraries print must not corrupt the protocol
    mem_mb = int(os.environ.get("DYNAMO_REWARD_MEMORY_MB", "2048"))
    if mem_mb > 0:
        try:
            import resource

            limit = mem_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except Exception:
            pass
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from math_verify import parse, verify

    out.write('{"ready": true}\n')
    for line in sys.stdin:
        try:
            req = json.loads(line)
            gold = parse(_wrap_gold(req["gold"]), parsing_timeout=None)
            pred = parse("$" + req["pred"] + "$", parsing_timeout=None)
            if not pred:
                pred = parse(req["pred"], parsing_timeout=None)
            if not gold:
                reply = {"status": "error", "detail": "label could not be parsed"}
            elif not pred:
                reply = {"status": "malformed", "detail": "answer could not be parsed"}
            else:
                ok = verify(gold, pred, timeout_seconds=None)
                reply = {"status": "correct" if ok else "wrong"}
        except MemoryError:
            reply = {"status": "timeout", "detail": "memory budget exceeded"}
        except Exception as e:  # never die on a bad sample
            reply = {"status": "error", "detail": f"{type(e).__name__}: {str(e)[:200]}"}
        out.write(json.dumps(reply) + "\n")


class _Helper:
    def __init__(self, startup_timeout: float, helper_file: str):
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVE_CMD, helper_file],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
            bufsize=1,
        )
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        reply = self._read(startup_timeout)
        if not reply or not reply.get("ready"):
            self.kill()
            raise RuntimeError(f"math-verify helper process ({helper_file}) did not start within "
                               f"{startup_timeout:g}s (is math-verify installed?)")

    def _read(self, timeout: float) -> Optional[dict]:
        if not self.sel.select(timeout):
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def ask(self, pred: str, gold: str, timeout: float) -> Optional[dict]:
        """The helper's reply, or None when it exceeded ``timeout`` (the helper is then dead)."""
        self.proc.stdin.write(json.dumps({"pred": pred, "gold": gold}) + "\n")
        self.proc.stdin.flush()
        reply = self._read(timeout)
        if reply is None:
            self.kill()
        return reply

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass
        try:
            self.sel.close()
        except Exception:
            pass


class Score(NamedTuple):
    reward: float
    status: str  # one of STATUSES
    answer: Optional[str] = None
    detail: str = ""


class MathReward:
    """Scores responses against labels with math-verify under a per-sample time/memory budget.

    ``timeout_s``: wall-clock budget per sample in seconds (default ``$DYNAMO_REWARD_TIMEOUT_S`` or 5);
    ``workers``: helper processes, i.e. samples checked at once (default ``$DYNAMO_REWARD_WORKERS`` or 2);
    ``startup_timeout_s``: how long a helper may take to start; ``helper_file``: the Python file whose
    ``_serve()`` the helpers run (default: this file's math-verify loop; another checker speaking the same
    one-JSON-line protocol gets the same time and memory budget). A sample past its budget costs its slot
    ``timeout_s`` plus a helper restart, so a step whose every sample times out takes about
    ``ceil(samples / workers) x (timeout_s + helper start)`` (measured: docs/faults.md)."""

    def __init__(self, timeout_s: Optional[float] = None, workers: Optional[int] = None,
                 max_answer_chars: int = MAX_ANSWER_CHARS, startup_timeout_s: float = 120.0,
                 helper_file: Optional[str] = None):
        self.timeout_s = float(timeout_s if timeout_s is not None else os.environ.get("DYNAMO_REWARD_TIMEOUT_S", 5.0))
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {self.timeout_s}")
        self.helper_file = os.path.abspath(helper_file or __file__)
        if not os.path.isfile(self.helper_file):
            raise ValueError(f"helper_file {self.helper_file} does not exist")
        self.max_answer_chars = max_answer_chars
        self.startup_timeout_s = startup_timeout_s
        n = int(workers if workers is not None else os.environ.get("DYNAMO_REWARD_WORKERS", 2))
        self._slots = queue.Queue()  # of Optional[_Helper]
        for _ in range(max(1, n)):
            self._slots.put(None)  # helpers start lazily
        self._closed = False

    def score(self, response: str, label) -> Score:
        answer = extract_answer(response)
        if answer is None:
            return Score(0.0, "malformed", None, "no answer found")
        if len(answer) > self.max_answer_chars:
            return Score(0.0, "malformed", answer[:64] + "...", "answer too long")
        helper = self._slots.get()
        try:
            if helper is None or not helper.alive():
                helper = _Helper(self.startup_timeout_s, self.helper_file)
            reply = helper.ask(answer, str(label), self.timeout_s)
            if reply is None:
                helper = None
                return Score(0.0, "timeout", answer, f"over {self.timeout_s:g}s")
        except Exception as e:
            if helper is not None:
                helper.kill()
            helper = None
            return Score(0.0, "error", answer, f"{type(e).__name__}: {e}")
        finally:
            self._slots.put(helper)
        status = reply.get("status", "error")
        if status not in STATUSES:
            status = "error"
        return Score(1.0 if status == "correct" else 0.0, status, answer, reply.get("detail", ""))

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                helper = self._slots.get_nowait()
            except queue.Empty:
                break
            if helper is not None:
                helper.kill()

    def __call__(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence, **kwargs) -> dict:
        counts = {f"math_{s}": 0.0 for s in STATUSES}
        rewards: List[float] = []
        dump = os.environ.get("DYNAMO_REWARD_DUMP")
        rows = []
        for query, prompt, label in zip(queries, prompts, labels):
            response = _response_of(query, prompt)
            try:
                s = self.score(response, label)
            except Exception as e:  # pragma: no cover - score() already catches
                s = Score(0.0, "error", None, str(e))
            counts[f"math_{s.status}"] += 1.0
            rewards.append(s.reward)
            if dump:
                rows.append({"prompt": prompt, "response": response, "label": label, "answer": s.answer,
                             "status": s.status, "reward": s.reward, "time": time.time()})
        if dump and rows:
            try:
                with _DUMP_LOCK, open(dump, "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in rows))
            except OSError:
                pass
        try:
            import torch

            r = torch.tensor(rewards, dtype=torch.float32)
            return {"rewards": r, "scores": r.clone(), "extra_logs": counts}
        except ImportError:  # e.g. served over HTTP from a torch-free process
            return {"rewards": rewards, "scores": list(rewards), "extra_logs": counts}


_DUMP_LOCK = threading.Lock()
_DEFAULT: Optional[MathReward] = None
_DEFAULT_LOCK = threading.Lock()


def _default() -> MathReward:
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            import atexit

            _DEFAULT = MathReward()
            atexit.register(_DEFAULT.close)
        return _DEFAULT


def reward_func(queries, prompts, labels, **kwargs) -> dict:
    """OpenRLHF remote reward function (see the module docstring)."""
    return _default()(queries, prompts, labels, **kwargs)
