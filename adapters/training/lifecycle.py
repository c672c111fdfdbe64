"""A run's lifecycle: claim its directory, check a resume, and end in a true status whatever happens.

- ``RunLock``: ``<run>/.lock``, created with O_CREAT|O_EXCL before any slow work and holding pid, host and start
  time; a second run on the same directory fails at once naming the holder; a lock whose pid is gone (same host)
  is stale and taken over with a warning.
- ``resume_changes``: the recipe now against the run's manifest ``config``. Keys in ``SAFE_ON_RESUME`` may change
  (recorded as a resume event); any other difference refuses the resume, one key per line.
- ``Lifecycle``: for the length of a run, SIGINT/SIGTERM stop training at a step boundary (a checkpoint saved first
  when ``save_on_interrupt``), and every ending is written to the manifest: complete, failed (reason), interrupted
  (step), diverged. A full disk becomes one line naming the path and the last complete checkpoint.

docs/runs.md describes all of it for users.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from adapters.training.distributed import PeerLostError, is_peer_lost
from adapters.utils.atomic import clear
from adapters.utils.errors import AdaptersError

LOCK = ".lock"
RESERVE = ".reserve"  # space held back for the failure record when the disk fills up
RESERVE_BYTES = 1 << 20  # a manifest before training ends is ~10 KB; a full one with its log history ~150 KB
STALE_UNREADABLE_S = 30  # a lock still empty after this long was left by a process killed while creating it


class RunInUseError(AdaptersError, RuntimeError):
    """Another live process holds the run directory."""


class ResumeError(AdaptersError, ValueError):
    """The recipe differs from the run's in keys that change what is trained."""


class DiskFullError(AdaptersError, OSError):
    """A write failed because the device is full; nothing partial was kept."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM ended the run; the manifest says ``interrupted`` and the run can be resumed.

    A KeyboardInterrupt, so that callers (a sweep) stop as they would on Ctrl-C instead of treating it as a failure.
    ``after_training``: the adapter was saved and the run is complete; only the evaluation after it was cut.
    """

    def __init__(self, step: int, run: Path, recipe: str, reason: str, signum: int, after_training: bool = False):
        self.step, self.run, self.reason, self.after_training = step, run, reason, after_training
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        super().__init__(self.line(recipe))

    def line(self, recipe_args: str) -> str:
        """The one line a user sees; ``recipe_args``: the recipe and the overrides as they were typed."""
        if self.after_training:
            return (
                "interrupted during the evaluation after training; the adapter is complete; "
                f"evaluate with: adapters eval {self.run}"
            )
        return (
            f"interrupted at step {self.step}; resume with: "
            f"adapters train {recipe_args} --run_name {self.run.name} --resume"
        )


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------- the lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class RunLock:
    """``<run>/.lock``: one claim of a run directory; ``release`` removes it only while it is still ours."""

    def __init__(self, path: Path, record: dict[str, Any]):
        self.path, self.record = path, record

    @staticmethod
    def holder(run: Path) -> dict[str, Any] | None:
        """The lock's record; {} when it is there but unreadable (being written, or cut by a kill)."""
        try:
            return json.loads((run / LOCK).read_text()) or {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    @staticmethod
    def is_stale(run: Path, rec: dict[str, Any]) -> bool:
        if not rec:
            try:
                return (datetime.now().timestamp() - (run / LOCK).stat().st_mtime) > STALE_UNREADABLE_S
            except FileNotFoundError:
                return True
        return rec.get("host") == socket.gethostname() and not _pid_alive(int(rec.get("pid", -1)))

    @staticmethod
    def in_use(run: Path, rec: dict[str, Any]) -> RunInUseError:
        if not rec:
            return RunInUseError(f"{run} is in use (its lock {run / LOCK} is being written by another process)")
        return RunInUseError(
            f"{run} is in use by pid {rec.get('pid')} on host {rec.get('host')} since {rec.get('started')}; "
            "wait for it, or choose another --run_name"
        )

    @classmethod
    def acquire(cls, run: Path, log) -> RunLock:
        """Create the lock atomically; take over a stale one (with a warning); else name the holder."""
        path = run / LOCK
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "token": uuid.uuid4().hex}
        for _ in range(100):  # a takeover, a release or a lock being written: retry briefly
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                rec = cls.holder(run)
                if rec is None:
                    continue  # released in between
                if not rec and not cls.is_stale(run, rec):
                    time.sleep(0.01)  # created an instant ago; its holder is writing its name into it
                    continue
                if not cls.is_stale(run, rec):
                    raise cls.in_use(run, rec) from None
                if cls._take_over(path, rec):
                    log(
                        f"[run] warning: taking over the stale lock of {run}: pid {rec.get('pid')} on host "
                        f"{rec.get('host')} (since {rec.get('started')}) is no longer running"
                    )
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            return cls(path, record)
        raise cls.in_use(run, cls.holder(run) or {})

    @staticmethod
    def _take_over(path: Path, stale: dict[str, Any]) -> bool:
        """Move the stale lock aside; if what was moved is not the stale record (another process took it over
        first and already holds a live lock), put it back."""
        aside = path.with_name(f"{LOCK}.{uuid.uuid4().hex}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(aside.read_text()) or {}
        except (OSError, ValueError):
            moved = {}
        if moved != stale:
            try:
                os.link(aside, path)  # never over a lock created meanwhile
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        if RunLock.holder(self.path.parent) == self.record:
            self.path.unlink(missing_ok=True)


def claim(run: Path, resume: bool, log) -> RunLock:
    """Claim ``run`` before any slow work: refuse a finished run (unless resuming) and a run in use."""
    if not resume and run.is_dir() and any(p.name not in (LOCK, RESERVE) for p in run.iterdir()):
        rec = RunLock.holder(run)
        if rec is not None and not RunLock.is_stale(run, rec):
            raise RunLock.in_use(run, rec)
        from adapters.utils.errors import PathExistsError

        raise PathExistsError(f"{run} already exists; pass --resume to continue it or choose another --run_name")
    run.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(run, log)
    if not resume and any(p.name not in (LOCK, RESERVE) for p in run.iterdir()):  # another run finished meanwhile
        lock.release()
        from adapters.utils.errors import PathExistsError

        raise PathExistsError(f"{run} already exists; pass --resume to continue it or choose another --run_name")
    return lock


def clear_staging(run: Path, log) -> list[Path]:
    """Remove what killed writes left: ``.NAME.staging`` / ``.NAME.old`` in the run and its checkpoints folder, and
    ``checkpoints/.staging``. Nothing reads them; they only take disk."""
    found = [p for d in (run, run / "checkpoints") if d.is_dir() for p in d.iterdir() if _is_leftover(p)]
    for p in found:
        clear(p)
    if found and log:
        log(f"[run] removed leftover staging folders: {', '.join(str(p) for p in found)}")
    return found


def remove_unborn(run: Path) -> bool:
    """Remove a run folder the claim created and nothing filled: no manifest.json, nothing but the lock, the reserve
    and staging leftovers (RELIABILITY row 42). A folder holding anything else is kept: a run, a user's files, or the
    evidence a refusal points to (data_audit.json, the quarantine file). True when it was removed."""
    if not run.is_dir() or (run / "manifest.json").exists():
        return False
    entries = list(run.iterdir())
    if any(p.name not in (LOCK, RESERVE) and not _is_leftover(p) for p in entries):
        return False
    try:
        for p in entries:
            if p.name != LOCK:  # a lock there now is another process's claim: then the folder stays
                clear(p)
        run.rmdir()
    except OSError:
        return False
    return True


def _is_leftover(p: Path) -> bool:
    n = p.name
    return n in (".staging", RESERVE) or (n.startswith(".") and (n.endswith(".staging") or n.endswith(".old")))


# ---------------------------------------------------------------------------------------------------- resume
# Keys a resume may change: how often the run logs, evaluates and saves, how long it trains (longer only), and what
# it does after training. None of them changes the function being trained or the order of the data. Everything
# else (learning rate, schedule, batch sizes, seed, LoRA, quantization, data files and data keys, max_length,
# base_kl_*, dtype, model, speed switches) would make the resumed run something no one configured: refused.
SAFE_ON_RESUME: frozenset[str] = frozenset(
    {
        # where the run lives (the directory itself), not what it computes
        "run_name",
        "output_root",
        # logging cadence and loggers
        "logging_steps",
        "logging_strategy",
        "logging_first_step",
        "report_to",
        "disable_tqdm",
        # evaluation and save cadence (evaluation cadence only without early stopping: see _safe)
        "eval_strategy",
        "eval_steps",
        "eval_delay",
        "per_device_eval_batch_size",
        "save_steps",
        "save_total_limit",
        "save_on_interrupt",
        # length: only to extend (see _safe)
        "max_steps",
        "num_train_epochs",
        # after training: evaluation, forgetting probe, reports; and the sweep's search space (not read by train)
        "eval_after_train",
        "eval_base",
        "eval_limit",
        "eval_max_new_tokens",
        "eval_generation_batch_size",
        "eval_samples",
        "labels",
        "rouge_l",
        "forgetting_probe",
        "forgetting_probe_tokens",
        "forgetting_threshold",
        "overfit_window",
        "quant_probe",
        "sweep",
    }
)
EVAL_CADENCE = frozenset({"eval_strategy", "eval_steps", "eval_delay"})  # early stopping decides on these evaluations


def _plain(v: Any) -> Any:
    """A value as the manifest's JSON holds it (tuples are lists, enums are strings)."""
    return json.loads(json.dumps(v, default=str))


def _show(v: Any) -> str:
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    return str(v) if isinstance(v, (int, float, str)) and v != "" else json.dumps(v)


def _value(cfg: dict[str, Any], recipe, key: str) -> Any:
    if key in cfg:
        return _plain(cfg[key])
    try:  # not recorded: the recipe did not give it, so the library default (as now)
        return _plain(getattr(recipe, key))
    except AttributeError:
        return None


def _safe(key: str, old: Any, new: Any, early_stopping: bool) -> str | None:
    """None when the change is safe, else why not (appended to the key's line; '' for plain refusals)."""
    if key not in SAFE_ON_RESUME:
        return ""
    if key in EVAL_CADENCE and early_stopping:
        return " (early stopping decides on these evaluations)"
    if key in ("max_steps", "num_train_epochs"):
        try:
            longer = float(new) > float(old) and (key != "max_steps" or float(old) > 0)
        except (TypeError, ValueError):
            longer = False
        return None if longer else " (a resume can only extend training)"
    return None


def resume_changes(run_config: dict[str, Any], recipe) -> dict[str, list[Any]]:
    """``{key: [in the run, now]}`` for the safe keys that differ; raise ResumeError listing every other one."""
    from adapters.config import Recipe

    then_cfg = {**run_config, **(run_config.get("sft_extra") or {})}
    then_cfg.pop("sft_extra", None)
    now_cfg = recipe.to_dict()
    defaults = Recipe()
    early = recipe.early_stopping_patience is not None or then_cfg.get("early_stopping_patience") is not None
    allowed, refused = {}, []
    for key in dict.fromkeys([*then_cfg, *now_cfg]):
        old, new = _value(then_cfg, defaults, key), _value(now_cfg, recipe, key)
        if old == new or (key in ("template", "base_kl_source") and "auto" in (old, new)):  # resolves again
            continue
        why = _safe(key, old, new, early)
        if why is None:
            allowed[key] = [old, new]
        else:
            refused.append(f"{key}: {_show(old)} in the run, {_show(new)} now{why}")
    if refused:
        raise ResumeError(
            "cannot resume: the recipe differs from the run's in keys that change what is trained:\n"
            + "\n".join(refused)
            + "\nresume with the run's values, or start a new run with another --run_name"
        )
    return allowed


def data_changes(then: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """The training sources' contents must be those the run trained on (same path, same sha256)."""
    old = {s.get("file"): s.get("sha256") for s in (then or {}).get("sources") or []}
    lines = [
        f"{s['file']}: sha256 {old[s['file']][:12]}… in the run, {s['sha256'][:12]}… now"
        for s in now.get("sources") or []
        if s.get("file") in old and old[s["file"]] and old[s["file"]] != s.get("sha256")
    ]
    if lines:
        raise ResumeError(
            "cannot resume: the training data changed since the run started:\n"
            + "\n".join(lines)
            + "\nrestore the files, or start a new run with another --run_name"
        )


def world_change(then: dict[str, Any], world_size: int) -> None:
    """A resume runs with the number of processes the run started with: the data each process reads, the sampler's
    order and the per-process RNG states in the checkpoints all follow it. Refused, naming the number to use."""
    was = int(then.get("world_size") or 1)
    if was != world_size:
        raise ResumeError(
            f"cannot resume: the run trained with {was} process(es) (effective batch "
            f"{then.get('effective_batch_size')}), this launch has {world_size}; the data order and the checkpoint's "
            f"per-process RNG states follow the number of processes. Resume with {was} process(es) "
            f"(accelerate launch --num_processes {was} ...), or start a new run with another --run_name"
        )


def resume_event(step: int, changes: dict[str, list[Any]], previous: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, "time": _now(), "changed": changes, "previous_status": previous.get("status")}


# ---------------------------------------------------------------------------------------------------- disk full
def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC as an OSError, or as the text torch's zip writer and safetensors give it."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        text = str(e)
        if any(s in text for s in ("No space left on device", "unexpected pos", "file write failed", "StorageFull")):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_message(target: Path, run: Path) -> str:
    from adapters.training.checkpoints import last_good_checkpoint

    last = last_good_checkpoint(run / "checkpoints", log=lambda _m: None)
    return (
        f"no space left on device while writing {target}; the last complete checkpoint is "
        f"{last if last else 'none (no checkpoint was completed)'}"
    )


# ---------------------------------------------------------------------------------------------------- the run
class Lifecycle:
    """``with Lifecycle(...) as life:`` around a run after its claim.

    Inside, SIGINT and SIGTERM are handled (the previous handlers come back after): during training the first one
    asks the Trainer, through ``callback()``, to stop at the end of the step (saving a checkpoint first when
    ``save_on_interrupt``); outside training, or on a second signal, it stops at once. On the way out the manifest
    gets the run's ending and the lock is released. ``manifest`` / ``trainer`` / ``writing`` are set by the run as
    they come to exist (``writing``: what is being written, for a disk-full message).
    """

    def __init__(self, run: Path, recipe_args: str, lock: RunLock | None, save_on_interrupt: bool, log):
        self.run, self.recipe_args, self.lock, self.log = run, recipe_args, lock, log
        self.save_on_interrupt = save_on_interrupt
        self.manifest: dict[str, Any] | None = None
        self.trainer = None
        self.writing = None  # a callable giving the path being written
        self.training = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ signals
    def __enter__(self) -> Lifecycle:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._on_signal)
        if self.lock is not None:
            self._reserve(True)
        return self

    def _reserve(self, hold: bool) -> None:
        """Hold (or give back) RESERVE_BYTES in the run directory: on a full disk, giving them back is what lets the
        manifest record the failure."""
        path = self.run / RESERVE
        if not hold:
            path.unlink(missing_ok=True)
            return
        try:
            with open(path, "wb") as fh:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fh.fileno(), 0, RESERVE_BYTES)
                else:
                    fh.write(b"\0" * RESERVE_BYTES)
        except OSError as e:  # already full: the failure will be reported when a real write fails
            path.unlink(missing_ok=True)
            self.log(f"[run] warning: could not reserve {RESERVE_BYTES >> 10} KB in {self.run}: {e}")

    def _on_signal(self, signum, frame) -> None:
        if self.training and self.signum is None:
            self.signum = signum
            step = self.trainer.state.global_step + 1 if self.trainer is not None else "?"
            then = ", after saving a checkpoint" if self.save_on_interrupt else ""
            name = signal.Signals(signum).name
            self.log(f"[interrupt] {name}: stopping at the end of step {step}{then}; {name} again stops at once")
            return
        self.signum = signum
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def any_rank_interrupted(self, args) -> bool:
        """Whether any process got a signal: all of them stop at the same step (a collective when several run)."""
        flag = self.signum is not None
        if getattr(args, "world_size", 1) > 1:
            import torch
            import torch.distributed as dist

            if dist.is_initialized():
                t = torch.tensor([int(flag)], device=args.device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                if t.item() and not flag:
                    self.signum = signal.SIGTERM  # another process was told; this one stops with it
                flag = bool(t.item())
        return flag

    def callback(self, guard=None):
        """The TrainerCallback that turns a signal into the Trainer's own stop (and save) at a step boundary."""
        from transformers import TrainerCallback

        life = self

        class StopOnSignal(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if not life.any_rank_interrupted(args):
                    return
                control.should_training_stop = True
                control.should_evaluate = False  # a scheduler's grace period is short: save, do not evaluate
                if life.save_on_interrupt and not (guard is not None and guard.bad):
                    control.should_save = True

        return StopOnSignal()

    def check_interrupted(self) -> None:
        """After trainer.train() returned: if a signal stopped it, end the run as interrupted."""
        if self.signum is not None:
            raise KeyboardInterrupt(signal.Signals(self.signum).name)

    # ------------------------------------------------------------------ endings
    def __exit__(self, tp, exc, tb) -> bool:
        try:
            if exc is not None:
                self._ending(exc)
        finally:
            for s, h in self._previous.items():
                signal.signal(s, h)
            if self.lock is not None:
                self._reserve(False)
                self.lock.release()
                if exc is not None and self.manifest is None:  # refused before anything of the run was written
                    remove_unborn(self.run)
        return False

    def _step(self) -> int:
        return int(self.trainer.state.global_step) if self.trainer is not None else 0

    def _ending(self, exc: BaseException) -> None:
        """Record how the run ended; raise the one-line form of an interrupt or a full disk."""
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, RunInterrupted):
            signum = self.signum or signal.SIGINT
            reason = signal.Signals(signum).name
            done = bool(self.manifest and self.manifest.get("status") == "complete")
            if not done:
                from adapters.training.checkpoints import last_good_checkpoint

                last = last_good_checkpoint(self.run / "checkpoints", log=lambda _m: None)
                self._record("interrupted", step=self._step(), reason=reason, checkpoint=str(last) if last else None)
            raise RunInterrupted(self._step(), self.run, self.recipe_args, reason, signum, done) from None
        if self.manifest is not None and self.manifest.get("status") == "diverged":
            return  # TrainingDiverged wrote its own record
        if isinstance(exc, Exception) and is_disk_full(exc):
            target = self.writing() if self.writing else getattr(exc, "filename", None) or self.run
            msg = disk_full_message(Path(target), self.run)
            clear_staging(self.run, None)  # free what the failed write took, and the reserve, so the record fits
            if self.lock is not None:
                self._reserve(False)
            self._record("failed", step=self._step(), reason=msg)
            raise DiskFullError(msg) from exc
        if isinstance(exc, Exception) and self._world_size() > 1 and is_peer_lost(exc):
            msg = self._peer_lost_message(exc)
            self._record("failed", step=self._step(), reason=msg)
            raise PeerLostError(msg) from exc
        if isinstance(exc, Exception):
            self._record("failed", step=self._step(), reason=f"{type(exc).__name__}: {exc}"[:2000])

    def _world_size(self) -> int:
        return int((self.manifest or {}).get("world_size") or os.environ.get("WORLD_SIZE", "1") or 1)

    def _peer_lost_message(self, exc: BaseException) -> str:
        """One line: what happened, the last complete checkpoint, and the resume (same number of processes)."""
        from adapters.training.checkpoints import last_good_checkpoint

        last = last_good_checkpoint(self.run / "checkpoints", log=lambda _m: None)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return (
            f"another process of the run stopped during step {self._step() + 1} (rank {os.environ.get('RANK', '?')} "
            f"of {self._world_size()} saw: {first}); the last complete checkpoint is "
            f"{last if last else 'none'}; resume with --run_name {self.run.name} --resume and "
            f"{self._world_size()} processes"
        )

    def _record(self, status: str, **details: Any) -> None:
        if self.manifest is None or self.lock is None:  # nothing recorded yet, or not the writing process
            return
        from adapters.utils.atomic import write_json

        self.manifest["status"] = status
        self.manifest[status] = {**details, "time": _now()}
        try:
            write_json(self.run / "manifest.json", self.manifest)
        except OSError as e:
            self.log(f"[run] could not record status {status!r} in {self.run / 'manifest.json'}: {e}")
