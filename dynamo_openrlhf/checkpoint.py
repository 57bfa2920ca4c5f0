"""Crash-safe checkpoint files: every file of an OpenRLHF/DeepSpeed checkpoint is written atomically.

OpenRLHF saves a PPO checkpoint with ``DeepspeedStrategy.save_ckpt`` -> ``DeepSpeedEngine.save_checkpoint``
(in the policy actor's process). The DynaMO state (the pass-rate pool bit for bit, the step counter, the
running token normaliser; :meth:`~dynamo_openrlhf.ppo_trainer.DynamoPPOTrainer.dynamo_state_dict`) travels in
``client_states["dynamo"]`` and lands inside ``<ckpt.path>/_actor/<tag>/mp_rank_00_model_states.pt``, so the
pool and the model of one tag are always the same step. What DeepSpeed 0.19 and OpenRLHF 0.11.2 write
non-atomically, and what a kill at that moment does (measured, ``tests/test_checkpoint_faults.py``):

* ``latest`` is opened with ``"w"`` (truncated) and then written: a kill in between leaves it empty, and the
  next ``--ckpt.load_enable`` fails inside DeepSpeed with a bare ``AssertionError`` (no checkpoint of tag ``""``);
* each ``*.pt`` is written in place by ``torch.save`` (a kill leaves a truncated zip), the metric file
  ``metric.json`` by ``json.dump``; nothing is fsynced, so a power loss can lose what a kill cannot.

:func:`install_atomic_checkpoints` (idempotent, in the process that saves) makes each of those files a
temporary file in the same directory, fsynced, renamed over the final name, then the directory fsynced
(:func:`atomic_write`), and writes ``latest`` last, the same way. A kill at any moment of a save therefore
leaves ``latest`` naming the previous complete checkpoint (or the new one, complete); leftover temporary
files (``.<name>.tmp-<pid>-<n>``) are never read. Before OpenRLHF rotates old checkpoints out
(``--ckpt.max_num``), a directory of the tag being saved that ``latest`` does not name (the remains of an
interrupted save of that tag) is removed, so the rotation cannot count it and delete the checkpoint the run
resumed from. ``--ckpt.max_num 1`` still deletes the previous checkpoint before writing the next (OpenRLHF's
order): a kill during that save leaves none. The pool inside is checked again when it is restored (its
own length and CRC-32 checksums, :meth:`dynamo_openrlhf.PassRatePool.from_bytes`).

:func:`resume_problem` checks, before a resume, that ``latest`` names a tag whose model-state file is a
complete archive, and names the file when not.

Fault injection (tests only): with ``DYNAMO_OPENRLHF_SAVE_FAULT=k`` the process SIGKILLs itself at the k-th
save point it reaches (1-based, counted over the process's life; :func:`save_point`); with
``DYNAMO_OPENRLHF_SAVE_FAULT_LOG=<path>`` each point reached appends ``<k>\\t<what>\\n`` to that file.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import threading
import time
import zipfile
from typing import IO, Callable, List, Optional, Tuple

__all__ = ["FAULT_ENV", "FAULT_LOG_ENV", "MODEL_STATES", "atomic_write", "atomic_write_bytes",
           "install_atomic_checkpoints", "atomic_checkpoints_installed", "latest_tag", "resume_problem",
           "last_complete_checkpoint", "describe_last_checkpoint", "save_point", "save_points_reached",
           "actor_rng_states", "restore_actor_rng_states", "QueueLedger", "QueueLedgerActor"]

FAULT_ENV = "DYNAMO_OPENRLHF_SAVE_FAULT"
FAULT_LOG_ENV = "DYNAMO_OPENRLHF_SAVE_FAULT_LOG"
#: The model-state file of a DeepSpeed checkpoint tag (one model-parallel rank), where client_states live.
MODEL_STATES = "mp_rank_00_model_states.pt"

_points = 0
_points_lock = threading.Lock()
_temp_counter = itertools.count()
_installed = False


def save_points_reached() -> int:
    """How many save points this process has passed (see :func:`save_point`)."""
    return _points


def save_point(what: str) -> None:
    """One moment of a save at which a kill leaves a distinct state on disk. Counts it; logs it to
    ``$DYNAMO_OPENRLHF_SAVE_FAULT_LOG`` when set; SIGKILLs this process when it is the
    ``$DYNAMO_OPENRLHF_SAVE_FAULT``-th point (a test's fault injection; unset: no effect)."""
    global _points
    with _points_lock:
        _points += 1
        k = _points
    log = os.environ.get(FAULT_LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{k}\t{what}\n")
    fault = os.environ.get(FAULT_ENV)
    if fault and int(fault) == k:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(directory: str) -> None:
    # Persists a rename; some file systems refuse to fsync a directory (not an error).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Writes the file ``path`` so that a crash at any moment leaves either its previous content (or
    no file) or the new one, complete: ``write(f)`` fills a new temporary file in the same directory,
    which is fsynced, renamed over ``path``, and the directory fsynced. On an exception the temporary
    file is removed and ``path`` is untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    name = os.path.basename(path)
    if not name:
        raise ValueError(f"atomic_write: {path!r} does not name a file")
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}-{next(_temp_counter)}")
    save_point(f"before {name}")
    try:
        with open(tmp, "xb") as f:
            save_point(f"{name}: empty temporary file")
            write(f)
            f.flush()
            save_point(f"{name}: temporary file written, not synced")
            os.fsync(f.fileno())
        save_point(f"{name}: temporary file synced, not renamed")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    save_point(f"{name}: renamed, directory not synced")
    _fsync_dir(directory)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """:func:`atomic_write` of the bytes ``data``."""
    atomic_write(path, lambda f: f.write(data))


def atomic_checkpoints_installed() -> bool:
    return _installed


def install_atomic_checkpoints() -> None:
    """Patches DeepSpeed's torch checkpoint engine (every ``*.pt`` of a checkpoint), its ``latest``
    pointer and OpenRLHF's checkpoint metric file to :func:`atomic_write`; ``latest`` is written after
    every other file of the tag. Idempotent; call it in each process that saves (the policy actor)."""
    global _installed
    if _installed:
        return
    import json

    import torch
    from deepspeed import comm as dist
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.engine import DeepSpeedEngine
    from openrlhf.utils.deepspeed.deepspeed import DeepspeedStrategy

    def save(self, state_dict, path: str):
        atomic_write(path, lambda f: torch.save(state_dict, f,
                                                _use_new_zipfile_serialization=self.zipfile_serialization))

    orig_save_checkpoint = DeepSpeedEngine.save_checkpoint

    def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest=True, **kwargs):
        if tag is None:
            tag = f"global_step{self.global_steps}"  # DeepSpeed's default, needed here for `latest`
        done = orig_save_checkpoint(self, save_dir, tag=tag, client_state=client_state, save_latest=False, **kwargs)
        if save_latest and not self.checkpoint_engine.is_decoupled():
            if self.global_rank == 0:
                atomic_write_bytes(os.path.join(save_dir, "latest"), str(tag).encode())
            dist.barrier()
        return done

    def write_ckpt_metric(self, ckpt_dir, metric_value, metric_key=None):
        os.makedirs(ckpt_dir, exist_ok=True)
        text = json.dumps({"metric_key": metric_key, "metric_value": metric_value}, indent=2, sort_keys=True)
        atomic_write_bytes(self._get_ckpt_metric_path(ckpt_dir), text.encode())

    orig_save_ckpt = DeepspeedStrategy.save_ckpt

    def save_ckpt(self, model, save_dir, tag=None, *args, **kwargs):
        # A directory of this tag that `latest` does not name is what an interrupted save of it left; OpenRLHF's
        # rotation would count it as a checkpoint and delete the last complete one (the resumed-from tag) to
        # make room, so a second kill would leave none. It is about to be overwritten anyway.
        if tag is not None and self.is_rank_0() and tag != latest_tag(save_dir):
            shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
        return orig_save_ckpt(self, model, save_dir, tag, *args, **kwargs)

    TorchCheckpointEngine.save = save
    DeepspeedStrategy.save_ckpt = save_ckpt
    DeepSpeedEngine.save_checkpoint = save_checkpoint
    DeepspeedStrategy._write_ckpt_metric = write_ckpt_metric
    _installed = True


def latest_tag(ckpt_dir: str) -> Optional[str]:
    """The tag ``<ckpt_dir>/latest`` names (DeepSpeed's resume pointer), or None without one."""
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def resume_problem(ckpt_dir: str) -> Optional[str]:
    """Why ``--ckpt.load_enable`` cannot resume from ``ckpt_dir`` (``<ckpt.path>/_actor``), naming the
    file; None when it can, or when no save ever completed (no directory or no ``latest``: OpenRLHF starts
    from step 0).
    Checks that ``latest`` names a tag and that the tag's model-state file (which holds the DynaMO pool)
    ends with its zip directory (a truncated file does not; the directory is read, not the tensors); the
    pool's own checksums are checked when it is restored."""
    if not os.path.isdir(ckpt_dir):
        return None
    latest = os.path.join(ckpt_dir, "latest")
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None  # no save completed (a kill during the first one): OpenRLHF starts from step 0
    if not tag:
        return f"{latest} is empty (a save was interrupted while writing it): write the tag of the last " \
               f"complete checkpoint into it (one of {sorted(_tags(ckpt_dir))})"
    states = os.path.join(ckpt_dir, tag, MODEL_STATES)
    if not os.path.isfile(states):
        return f"{latest} names checkpoint {tag!r}, but {states} does not exist"
    with open(states, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":
        return None  # torch's legacy (pickle) format: no directory to check
    try:
        # The zip directory sits at the end of the file: a truncated file has none.
        with zipfile.ZipFile(states):
            pass
    except (zipfile.BadZipFile, OSError) as e:
        return f"{states} is not a complete checkpoint file ({e})"
    return None


def last_complete_checkpoint(ckpt_path: str) -> Optional[tuple]:
    """The checkpoint ``--ckpt.load_enable`` would resume from: ``(directory, step)`` of the tag that
    ``<ckpt_path>/_actor/latest`` names (``ckpt_path`` is ``--ckpt.path``), or None when there is none or it
    is not complete (:func:`resume_problem` names why). ``step`` is the global step of DeepSpeed's
    ``global_step<N>`` tag, or None for a tag of another form."""
    actor = os.path.join(os.fspath(ckpt_path), "_actor")
    tag = latest_tag(actor)
    if not tag or resume_problem(actor) is not None:
        return None
    digits = tag[len("global_step"):] if tag.startswith("global_step") else ""
    return os.path.join(actor, tag), (int(digits) if digits.isdigit() else None)


def describe_last_checkpoint(ckpt_path: Optional[str]) -> str:
    """One phrase for a message that ends a run: the last complete checkpoint under ``--ckpt.path``
    (``<dir> (step N): --ckpt.load_enable resumes from it``) or ``none`` and why."""
    if not ckpt_path:
        return "none (no --ckpt.path known to this process)"
    found = last_complete_checkpoint(ckpt_path)
    if found is None:
        actor = os.path.join(os.fspath(ckpt_path), "_actor")
        problem = resume_problem(actor)
        if problem is not None:
            return f"none usable ({problem})"
        return f"none under {ckpt_path} (--ckpt.load_enable starts again from step 0)"
    directory, step = found
    at = f"step {step}" if step is not None else "its step unknown"
    return f"{directory} ({at}): --ckpt.load_enable resumes from it"


def _tags(ckpt_dir: str):
    return [d for d in os.listdir(ckpt_dir) if os.path.isfile(os.path.join(ckpt_dir, d, MODEL_STATES))]


# ------------------------------------------------------------------------------------------------
# The policy actors' torch generator (OpenRLHF's replay-buffer shuffle), which no checkpoint holds
# ------------------------------------------------------------------------------------------------


def _get_rng_state(_actor):
    import torch

    return torch.get_rng_state()


def _set_rng_state(_actor, state) -> None:
    import torch

    torch.set_rng_state(state)


def actor_rng_states(actor_group) -> list:
    """The CPU torch generator state (a uint8 tensor) of each rank of OpenRLHF's policy-actor group, in rank
    order. OpenRLHF's ``ppo_train`` shuffles the replay buffer into micro-batches with a ``DataLoader`` that draws
    from this generator, seeded once when the actor starts and saved by neither OpenRLHF nor DeepSpeed: without it
    a resumed run trains its first step on the same samples in another order. Read through each actor's
    ``__ray_call__`` (runs in the actor's process)."""
    import ray

    return list(ray.get([h.__ray_call__.remote(_get_rng_state) for h in actor_group._actor_handlers]))


def restore_actor_rng_states(actor_group, states) -> bool:
    """Sets each policy-actor rank's generator to ``states`` (from :func:`actor_rng_states`); False (and nothing
    set) when the group's size differs from the saved one's (another ``--actor.num_nodes`` / GPUs per node: the
    shuffle cannot continue as saved)."""
    import ray

    handles = actor_group._actor_handlers
    if len(handles) != len(states):
        return False
    ray.get([h.__ray_call__.remote(_set_rng_state, st) for h, st in zip(handles, states)])
    return True


# ------------------------------------------------------------------------------------------------
# The async trainer's queued batches at a checkpoint
# ------------------------------------------------------------------------------------------------


class QueueLedger:
    """The batches that may be waiting in the async queue when the trainer writes a checkpoint (a queue cannot
    be read without taking from it). The generator announces each such batch as soon as it is generated (under
    the rollout lock, before the trainer's next weight broadcast can start) and records it, pickled with its
    ``BATCH_KEY`` entry (which holds the generator's state after it), just before it puts the batch in the queue.
    At a save of step s the trainer takes the batches of steps > s (:meth:`after`), once every announced one is
    recorded (the async actor :class:`QueueLedgerActor` waits for that). So the checkpoint holds every batch
    generated by then and the generator's state after the last of them. Runs as a Ray actor without CPUs, created
    by :class:`~dynamo_openrlhf.ppo_trainer_async.DynamoPPOTrainerAsync` when the run can write checkpoints."""

    def __init__(self):
        self._entries: List[Tuple[int, bytes]] = []
        self._announced: set = set()

    def announce(self, step: int) -> None:
        self._announced.add(int(step))

    def record(self, step: int, blob: bytes) -> None:
        step = int(step)
        if self._entries and step <= self._entries[-1][0]:
            raise ValueError(f"QueueLedger.record: batch {step} after batch {self._entries[-1][0]} (steps must rise)")
        self._entries.append((step, blob))
        self._announced.discard(step)

    def unrecorded(self, step: int) -> List[int]:
        """Batches of steps > ``step`` announced but not recorded yet (on their way to the queue)."""
        return sorted(b for b in self._announced if b > int(step))

    def after(self, step: int) -> List[Tuple[int, bytes]]:
        """The recorded batches of steps > ``step``, in order; forgets the others (the trainer has taken them)."""
        self._entries = [e for e in self._entries if e[0] > int(step)]
        self._announced = {b for b in self._announced if b > int(step)}
        return list(self._entries)


class QueueLedgerActor:
    """:class:`QueueLedger` served as an async Ray actor (``ray.remote(num_cpus=0)(QueueLedgerActor)``; defined
    here, undecorated, so that its worker imports only this light module): :meth:`after` waits for the announced
    batches' records."""

    def __init__(self):
        self.ledger = QueueLedger()

    async def announce(self, step: int) -> None:
        self.ledger.announce(step)

    async def record(self, step: int, blob: bytes) -> None:
        self.ledger.record(step, blob)

    async def after(self, step: int, timeout_s: float = 600.0) -> List[Tuple[int, bytes]]:
        import asyncio

        deadline = time.monotonic() + timeout_s
        while self.ledger.unrecorded(step):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the generator announced batches {self.ledger.unrecorded(step)} but did not "
                                   f"record them within {timeout_s:g} s (did it stop?)")
            await asyncio.sleep(0.01)  # the generator records right after releasing the rollout lock
        return self.ledger.after(step)
