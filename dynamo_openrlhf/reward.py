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
in a small pool of persistent helper processes (stdlib only on this side), forked on first use from
one warm "zygote" process that imported math-verify once (about a second, once; a helper then
costs a fork, milliseconds). Every sample gets a wall-clock budget (``DYNAMO_REWARD_TIMEOUT_S``,
default 5 s) and an address-space cap (``DYNAMO_REWARD_MEMORY_MB``, default 2048): past either, the
helper is killed (and a fresh fork replaces it on next use) and the sample is a *timeout* (reward 0),
so a step whose every sample times out costs about ``ceil(samples / workers) x timeout``. Nothing
here raises into the trainer: any failure of the machinery gives reward 0 counted as ``math_error``.

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
import socket
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
# Helper processes: a warm zygote forks them (this side and the zygote use the stdlib only)
# ----------------------------------------------------------------------------------------------
#
# Importing math-verify (sympy, the LaTeX parser) takes about a second of CPU. A helper that ran past its
# budget is killed (it may be stuck in sympy's C code), so a storm of timeouts would import math-verify
# once per sample. Instead one long-lived *zygote* process imports the helper file once (and runs its
# ``_preload()``) and forks every helper on request: a replacement costs a fork (milliseconds), not an
# import. The trainer never forks itself (it is multi-threaded); the zygote is single-threaded and only
# forks, kills and reaps.
#
# Wiring: the trainer starts the zygote with one end of an AF_UNIX SOCK_SEQPACKET socket pair (one
# JSON message per packet). For a helper, the trainer makes a stream socket pair and passes one end
# with the "fork" request (SCM_RIGHTS); the forked child puts it on its fd 0 and 1 and runs the helper
# file's ``_serve()``: one JSON request per line in, one JSON reply per line out, as before.
# No orphans: the zygote exits (killing and reaping its helpers) when the trainer closes the control
# socket or when its parent pid changes (the trainer died, even by SIGKILL); each helper gets
# PR_SET_PDEATHSIG=SIGKILL towards the zygote. (PDEATHSIG is not used for the zygote itself: it fires
# when the *thread* that started the zygote ends, and OpenRLHF calls the reward from worker threads.)

_ZYGOTE_CMD = (
    "import importlib.util,sys;"
    "s=importlib.util.spec_from_file_location('_dynamo_reward_zygote',sys.argv[1]);"
    "m=importlib.util.module_from_spec(s);s.loader.exec_module(m);"
    "m._zygote_main(sys.argv[2],int(sys.argv[3]),int(sys.argv[4]))"
)
_HELPER_ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
_CTL_BYTES = 1 << 16  # largest control message (a fork request carries the environment's changes)
_PARENT_POLL_S = 0.25  # how often the zygote checks that the trainer is still its parent


def _wrap_gold(label: str) -> str:
    if "$" in label or "\\boxed" in label or "\\(" in label or "\\[" in label:
        return label
    return f"${label}$"


# Answers of the usual kinds, checked once in the zygote: the first check of a kind in a process does lazy
# work (sympy imports, the LaTeX parser's caches) that would otherwise cost every new helper 15-140 ms.
_WARM_UP = (("7", "7"), ("\\frac{7}{2}", "3.5"), ("0.5", "\\frac{1}{2}"), ("-3", "-3"), ("\\sqrt{2}", "2^{1/2}"),
            ("x+1", "1+x"), ("2\\pi", "\\pi \\cdot 2"), ("\\{1, 2\\}", "\\{2, 1\\}"), ("(0, 1]", "(0,1]"),
            ("10\\%", "0.1"), ("3 \\times 10^{2}", "300"), ("\\dfrac{a}{b}", "a/b"))


def _preload() -> None:  # pragma: no cover - runs in the zygote
    """Imports math-verify and checks answers of the usual kinds, so that forked helpers start warm."""
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from math_verify import parse, verify

    for pred, gold in _WARM_UP:
        try:
            verify(parse(_wrap_gold(gold), parsing_timeout=None), parse("$" + pred + "$", parsing_timeout=None),
                   timeout_seconds=None)
        except Exception:
            pass  # a warm-up only


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


def _prctl():  # pragma: no cover - runs in the zygote
    """libc's ``prctl`` (Linux), or None."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except Exception:
        return None


def _linux_setup(prctl, name: bytes, pdeathsig: bool) -> None:  # pragma: no cover - zygote and helpers
    """Name the process (``/proc/<pid>/comm``, what ``ps -o comm`` and ``top`` show) and, if ``pdeathsig``,
    have it get SIGKILL when its parent dies."""
    if prctl is None:
        return
    import signal

    prctl(15, name, 0, 0, 0)  # PR_SET_NAME (15 bytes at most)
    if pdeathsig:
        prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


def _helper_child(ctl, conn_fd: int, env: dict, serve, zygote_pid: int, prctl) -> None:  # pragma: no cover
    """Runs in a child just forked by the zygote: become a helper on ``conn_fd``; never returns."""
    code = 1
    try:
        ctl.close()
        _linux_setup(prctl, b"reward-helper", pdeathsig=True)
        if os.getppid() != zygote_pid:  # the zygote died between fork and prctl
            os._exit(1)
        os.dup2(conn_fd, 0)
        os.dup2(conn_fd, 1)
        os.close(conn_fd)
        os.environ.clear()
        os.environ.update(env)
        sys.stdin = open(0, "r", encoding="utf-8", closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)
        serve()
        code = 0
    finally:
        os._exit(code)


def _zygote_main(helper_file: str, parent_pid: int, ctl_fd: int) -> None:  # pragma: no cover - the zygote
    """The zygote: load ``helper_file`` (and run its ``_preload()``), then fork helpers until told to stop.

    Requests (one JSON packet each, answered by one packet): ``{"op": "fork", "set": {..}, "unset": [..]}``
    with the helper's socket attached (the environment changes are relative to the zygote's own
    environment; reply ``{"pid": pid}``), ``{"op": "kill", "pid": pid}`` (SIGKILL and reap, if it is a
    helper of this zygote; reply ``{"killed": bool}``). End of file on the control socket, or a new parent
    pid, ends the zygote after killing every helper."""
    import gc
    import importlib.util
    import select
    import signal
    import socket

    ctl = socket.socket(fileno=ctl_fd)
    if os.path.abspath(helper_file) == os.path.abspath(__file__):
        serve, preload = _serve, _preload
    else:
        spec = importlib.util.spec_from_file_location("_dynamo_reward_helper", helper_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        serve, preload = module._serve, getattr(module, "_preload", None)
    if preload is not None:
        preload()
    prctl = _prctl()
    _linux_setup(prctl, b"reward-zygote", pdeathsig=False)  # see the section comment: no PDEATHSIG here
    base_env = dict(os.environ)
    gc.collect()
    gc.freeze()  # keep the imported objects out of the helpers' collections (fewer copied pages)
    me = os.getpid()
    ctl.send(json.dumps({"ready": True, "pid": me}).encode())
    helpers = set()
    try:
        while os.getppid() == parent_pid:
            for pid in list(helpers):  # reap helpers that ended by themselves
                if os.waitpid(pid, os.WNOHANG)[0]:
                    helpers.discard(pid)
            if not select.select([ctl], [], [], _PARENT_POLL_S)[0]:
                continue
            msg, fds, _, _ = socket.recv_fds(ctl, _CTL_BYTES, 1)
            if not msg:
                break  # the trainer closed the control socket
            req = json.loads(msg)
            if req.get("op") == "fork" and len(fds) == 1:
                env = dict(base_env)
                env.update(req.get("set", {}))
                for k in req.get("unset", []):
                    env.pop(k, None)
                pid = os.fork()
                if pid == 0:
                    _helper_child(ctl, fds[0], env, serve, me, prctl)
                os.close(fds[0])
                helpers.add(pid)
                ctl.send(json.dumps({"pid": pid}).encode())
            elif req.get("op") == "kill":
                pid = int(req.get("pid", -1))
                killed = pid in helpers  # only an unreaped child of ours: its pid cannot have been reused
                if killed:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    helpers.discard(pid)
                ctl.send(json.dumps({"killed": killed}).encode())
            else:
                for fd in fds:
                    os.close(fd)
                ctl.send(json.dumps({"error": f"bad request {str(req)[:100]}"}).encode())
    finally:
        for pid in helpers:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in helpers:
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass
        os._exit(0)


def _helper_env() -> dict:
    env = dict(os.environ)
    env.update(_HELPER_ENV)
    return env


class _Zygote:
    """The trainer's handle on a zygote process (thread-safe: one request at a time)."""

    def __init__(self, helper_file: str, startup_timeout: float):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.env = _helper_env()  # the zygote's environment: fork requests send the changes to it
        self.lock = threading.Lock()
        self.sock = ours
        self._eof = False
        self.startup_timeout = startup_timeout
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _ZYGOTE_CMD, os.path.abspath(__file__), helper_file, str(os.getpid()),
                 str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=self.env, pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        reply = self._recv(startup_timeout)
        if not reply or not reply.get("ready"):
            try:  # it ended (the socket is at end of file) or is still running past the timeout
                code = self.proc.wait(timeout=5 if reply is None and self._eof else 0)
            except subprocess.TimeoutExpired:
                code = None
            self.close()
            what = (f"exited with code {code} before it was ready" if code is not None
                    else f"did not start within {startup_timeout:g}s")
            raise RuntimeError(f"math-verify helper zygote ({helper_file}) {what} (is math-verify installed? "
                               "does the file define _serve()? does it import without error?)")
        self.pid = self.proc.pid

    def _recv(self, timeout: float) -> Optional[dict]:
        """The zygote's next message, or None (no message within ``timeout``, or end of file: ``_eof``)."""
        if not _readable(self.sock, timeout):
            return None
        data = self.sock.recv(_CTL_BYTES)
        self._eof = not data
        return json.loads(data) if data else None

    def _request(self, msg: dict, timeout: float, fds=()) -> dict:
        with self.lock:
            try:
                socket.send_fds(self.sock, [json.dumps(msg).encode()], list(fds))
                reply = self._recv(timeout)
            except OSError:
                reply = None
            if reply is None:  # dead or hung: this zygote is not used again
                self.close()
                raise RuntimeError(f"the helper zygote (pid {self.proc.pid}) did not answer {msg['op']!r}")
            return reply

    def fork(self, conn: socket.socket, timeout: float) -> int:
        """Pid of a new helper serving on ``conn`` (forked by the zygote)."""
        env = _helper_env()
        changed = {k: v for k, v in env.items() if self.env.get(k) != v}
        unset = [k for k in self.env if k not in env]
        reply = self._request({"op": "fork", "set": changed, "unset": unset}, timeout, [conn.fileno()])
        if "pid" not in reply:
            raise RuntimeError(f"the helper zygote could not fork a helper: {reply}")
        return int(reply["pid"])

    def kill(self, pid: int) -> None:
        """SIGKILL the helper ``pid`` and wait until it is gone (a loaded machine may delay the zygote's
        answer by seconds: it gets the startup timeout, past which the zygote is given up, helpers and all)."""
        self._request({"op": "kill", "pid": pid}, self.startup_timeout)

    def alive(self) -> bool:
        return self.sock.fileno() >= 0 and self.proc.poll() is None

    def close(self) -> None:
        """End the zygote; it kills and reaps every helper first."""
        try:
            self.sock.close()  # end of file for the zygote
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # its helpers get SIGKILL from PR_SET_PDEATHSIG
            self.proc.wait()


def _readable(sock: socket.socket, timeout: float) -> bool:
    """Whether ``sock`` is readable within ``timeout`` seconds."""
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(max(0.0, timeout)))


class _Helper:
    """One helper process (forked by the zygote) and the trainer's end of its socket."""

    def __init__(self, zygote: _Zygote, startup_timeout: float, helper_file: str):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.pid = zygote.fork(theirs, startup_timeout)
        except Exception:
            ours.close()
            raise
        finally:
            theirs.close()
        self.zygote, self.sock, self.buf = zygote, ours, b""
        reply = self._read(startup_timeout)
        if not reply or not reply.get("ready"):
            self.kill()
            raise RuntimeError(f"math-verify helper process ({helper_file}) did not start within "
                               f"{startup_timeout:g}s")

    def _read(self, timeout: float) -> Optional[dict]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not _readable(self.sock, left):
                return None
            data = self.sock.recv(1 << 16)
            if not data:
                return None  # the helper died
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def ask(self, pred: str, gold: str, timeout: float) -> Optional[dict]:
        """The helper's reply, or None when it exceeded ``timeout`` (the helper is then dead)."""
        self.sock.sendall((json.dumps({"pred": pred, "gold": gold}) + "\n").encode(), socket.MSG_NOSIGNAL)
        reply = self._read(timeout)
        if reply is None:
            self.kill()
        return reply

    def alive(self) -> bool:
        """False once the helper or its zygote is gone (its socket is at end of file)."""
        if self.sock.fileno() < 0 or not self.zygote.alive():
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True  # nothing to read: idle and alive
        except OSError:
            return False

    def kill(self) -> None:
        try:
            self.zygote.kill(self.pid)
        except Exception:
            pass  # the zygote is gone, and its helpers with it
        try:
            self.sock.close()
        except OSError:
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
    ``startup_timeout_s``: how long the zygote or a helper may take to start; ``helper_file``: the Python file
    whose ``_serve()`` the helpers run (default: this file's math-verify loop; another checker speaking the same
    one-JSON-line protocol gets the same time and memory budget, and may define ``_preload()``, run once in
    the zygote before any helper is forked, to do its slow imports there).

    Processes: on first use one zygote starts (imports the helper file and runs its ``_preload``: about a
    second for math-verify), then forks the helpers (milliseconds each; lazily, or all at once with
    ``start()``). A sample past its budget has its helper killed, and the next sample of that slot gets a
    fresh fork. So a step whose every sample times out costs ``ceil(samples / P) x timeout_s`` plus the kills
    and forks, 14-27 ms a round on 2 loaded CPUs (once the zygote is up; docs/faults.md, "Reward storm"), where
    the parallelism P is ``min(workers, threads calling the scorer)`` (OpenRLHF: ``min(32, cpus + 4)``).
    ``close()`` ends the zygote and every helper; they also end when the trainer process dies.
    Thread-safe: OpenRLHF calls the reward from a pool of threads."""

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
        self._n = max(1, n)
        self._closed = False
        self._zygote: Optional[_Zygote] = None
        self._zygote_lock = threading.Lock()
        self.zygote_starts = 0  # zygote processes started so far (1 unless one died)
        self.helper_starts = 0  # helpers forked so far

    def _fork_helper(self) -> "_Helper":
        with self._zygote_lock:
            if self._closed:
                raise RuntimeError("the scorer is closed")
            if self._zygote is None or not self._zygote.alive():
                if self._zygote is not None:
                    self._zygote.close()
                self._zygote = None
                self._zygote = _Zygote(self.helper_file, self.startup_timeout_s)
                self.zygote_starts += 1
            zygote = self._zygote
        helper = _Helper(zygote, self.startup_timeout_s, self.helper_file)
        with self._zygote_lock:
            self.helper_starts += 1
        return helper

    def start(self) -> "MathReward":
        """Start the zygote and every helper now instead of at first use (e.g. before timing a step)."""
        helpers = [self._slots.get() for _ in range(self._n)]
        try:
            for i, helper in enumerate(helpers):
                if helper is None or not helper.alive():
                    helpers[i] = self._fork_helper()
        finally:
            for helper in helpers:
                self._slots.put(helper)
        return self

    def pids(self) -> dict:
        """``{"zygote": pid or None, "helpers": [pids of the idle helpers]}`` (for tests and debugging)."""
        with self._slots.mutex:
            idle = [h.pid for h in self._slots.queue if h is not None]
        z = self._zygote
        return {"zygote": z.pid if z is not None and z.alive() else None, "helpers": idle}

    def score(self, response: str, label) -> Score:
        answer = extract_answer(response)
        if answer is None:
            return Score(0.0, "malformed", None, "no answer found")
        if len(answer) > self.max_answer_chars:
            return Score(0.0, "malformed", answer[:64] + "...", "answer too long")
        helper = self._slots.get()
        try:
            if helper is not None and not helper.alive():
                helper.kill()  # gone (e.g. its zygote died): close our end
                helper = None
            if helper is None:
                helper = self._fork_helper()
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
            if helper is not None and self._closed:
                helper.kill()
                helper = None
            self._slots.put(helper)
        status = reply.get("status", "error")
        if status not in STATUSES:
            status = "error"
        return Score(1.0 if status == "correct" else 0.0, status, answer, reply.get("detail", ""))

    def close(self) -> None:
        """Kill the zygote and every helper (also helpers busy in other threads: their samples are timeouts).
        Later calls score nothing: each sample is an ``error`` ("the scorer is closed")."""
        with self._zygote_lock:
            self._closed = True
            zygote, self._zygote = self._zygote, None
        if zygote is not None:
            zygote.close()  # the zygote kills and reaps its helpers before it exits
        helpers = []
        while True:
            try:
                helpers.append(self._slots.get_nowait())
            except queue.Empty:
                break
        for helper in helpers:
            if helper is not None:
                helper.kill()
            self._slots.put(None)  # a thread waiting for a slot wakes up and sees the scorer closed

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
