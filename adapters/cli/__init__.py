"""The adapters command line: one module per verb (register adds its arguments, run calls one library function).

main() is the console script and python -m adapters. A user's mistake is an AdaptersError: one line on stderr, exit 2.
So is an output the system refuses (read-only, no permission, disk full): one line naming the path, exit 2. Ctrl-C
(and SIGTERM in export and merge, which remove their staging folders on the way out) is one line, exit 128+signal,
as ``train`` does. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from adapters.utils.errors import AdaptersError

DESCRIPTION = "The adapters command line. Each verb parses its arguments and calls one function of the package."
# the order of adapters --help
VERBS = ("train", "plan", "recipes", "data", "merge", "export", "push", "bench", "eval", "generate", "sweep", "doctor")
STAGED = ("export", "merge")  # verbs that write through a staging folder and remove it when stopped
# errors of the system, not of the package: the place named cannot be written (or read) as asked
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import warnings

    warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices meant for library authors
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # per-call int8 dtype notes on CPU
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="adapters", description=DESCRIPTION)
    sub = ap.add_subparsers(dest="verb", required=True)
    for verb in VERBS:
        importlib.import_module(f"adapters.cli.{verb}").register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    _quiet_libraries()
    try:
        with _sigterm_interrupts(args.verb in STAGED):
            return args.func(args, rest)
    except AdaptersError as e:
        _report(f"adapters {args.verb}: error: {e}", e)
        return 2
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        _report(f"adapters {args.verb}: error: {where}{e.strerror or e}", AdaptersError(str(e)))
        return 2
    except KeyboardInterrupt as e:
        name = str(e) if str(e) in ("SIGINT", "SIGTERM") else "SIGINT"
        kept = (
            "; nothing partial was kept (staging removed), earlier outputs are unchanged" if args.verb in STAGED else ""
        )
        print(f"adapters {args.verb}: interrupted ({name}){kept}", file=sys.stderr)
        return 128 + signal.Signals[name].value
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear down the process group a launched verb created, before the interpreter does. Left to interpreter
    finalization, gloo's worker threads and rank 0's store can outlive the objects they hold, and the process
    aborts ("terminate called without an active exception", SIGABRT) instead of exiting with its code: seen on a
    refused run under `accelerate launch` on a loaded machine, where the launcher then reported exit -6 for rank 0.
    Local to each process (no collective), so a rank whose peers are gone does not wait here."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - an exit path: the verb's own outcome is what the user must see
            pass


@contextmanager
def _sigterm_interrupts(on: bool) -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt("SIGTERM") for the call, so the staging folders are removed as on Ctrl-C."""
    import threading

    if not on or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report(line: str, e: AdaptersError) -> None:
    """Print a user's mistake once. Under a launcher every process raises the same error: rank 0 prints it (or a
    survivor that lost its peers, which may be any rank), and each writes it to torch elastic's error file, so the
    launcher's failure summary names it instead of pointing at a traceback no one recorded."""
    from adapters.training.distributed import PeerLostError

    if os.environ.get("RANK", "0") == "0" or isinstance(e, PeerLostError):
        print(line, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        import json
        import time

        try:
            with open(error_file, "w") as fh:  # the format torch.distributed.elastic reads back
                json.dump({"message": line, "timestamp": int(time.time())}, fh)
        except OSError:
            pass
