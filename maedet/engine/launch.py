"""Process start-up shared by the tools: argument handling, errors, output dir,
seeding, and spawning N local processes (``--num-gpus``)."""

from __future__ import annotations

import argparse
import functools
import logging
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any, Callable, Sequence, Tuple

import torch

from maedet.config.loader import save_config
from maedet.engine.trainer import FINISHED_MARKER
from maedet.utils import distributed as du
from maedet.utils.errors import ConfigError, MaedetError
from maedet.utils.logger import log_to_files, setup_logger

__all__ = [
    "default_argument_parser",
    "run_tool",
    "setup_run",
    "launch",
    "check_writable_dir",
    "claim_output_dir",
    "free_subdir",
    "error_line",
]

logger = logging.getLogger("maedet")


def default_argument_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE", help="YAML config (may use _base_ inheritance)")
    p.add_argument("--output-dir", default=None, metavar="DIR", help="output directory (overrides output_dir)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in the output directory (its last_checkpoint file)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a fresh run in an output directory that holds another run, deleting that run's files",
    )
    p.add_argument(
        "--num-gpus",
        type=int,
        default=1,
        metavar="N",
        help="start N local processes (one per GPU; gloo processes on a CPU machine)",
    )
    p.add_argument(
        "opts", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.batch_size=8 solver.lr=1e-4"
    )
    return p


def run_tool(main: Callable[[], Any]) -> None:
    """Run a tool's main: a :class:`MaedetError` becomes one ``error:`` line and exit 2."""
    try:
        rc = main()
    except MaedetError as e:
        rank = f"[rank {du.get_rank()}] " if du.get_world_size() > 1 else ""
        line = f"error: {rank}{error_line(e)}"
        print(line, file=sys.stderr, flush=True)
        log_to_files(line)  # also into log.txt, where a user looks after a cluster job died
        du.destroy_distributed()
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:  # a bug: keep the traceback on stderr, and put it in log.txt too
        log_to_files("fatal error:\n" + traceback.format_exc().rstrip())
        raise
    sys.exit(int(rc or 0))


def error_line(e: BaseException) -> str:
    """One line for an error; a DataLoader worker's wrapped traceback is reduced to its message."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = [line for line in msg.strip().splitlines() if line.strip()][-1].strip()
        prefix = f"{type(e).__module__}.{type(e).__name__}: "
        msg = last[len(prefix) :] if last.startswith(prefix) else last
    return " ".join(msg.split("\n"))


def check_writable_dir(path: str) -> None:
    """Create ``path`` if needed and make sure files can be written into it."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"output directory {path} is not writable: {e.strerror or e}") from e


# What a training run leaves in its output directory (tensorboard events in tb/, pictures in vis/).
RUN_FILES = ("last_checkpoint", "metrics.jsonl", FINISHED_MARKER, "model_final.pth", "encoder_final.pth", "tb", "vis")
_RUN_FILE_PREFIXES = ("model_", "log", "config.yaml", "eval")


def previous_run_files(output_dir: str) -> list:
    """The files of a training run that made progress in ``output_dir`` (checkpoints,
    metrics, final weights), sorted; [] for a missing or empty folder, or one whose run
    stopped before its first checkpoint or logged iteration."""
    if not os.path.isdir(output_dir):
        return []
    names = sorted(os.listdir(output_dir))
    return [n for n in names if n in RUN_FILES or (n.startswith("model_") and n.endswith(".pth"))]


def claim_output_dir(output_dir: str, resume: bool, overwrite: bool) -> None:
    """A fresh run never writes into a folder that holds another run.

    Raises:
        ConfigError: ``output_dir`` holds another run's files and neither ``resume`` nor
            ``overwrite`` is set; the message names the folder, what is in it and the choices.
    With ``overwrite``, that run's files (checkpoints, metrics, logs, config, tb/, vis/) are
    deleted first; other files in the folder are left alone.
    """
    found = previous_run_files(output_dir)
    if not found or resume:
        return
    if not overwrite:
        shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise ConfigError(
            f"output directory {output_dir} holds another run ({shown}); continue it with --resume, "
            "choose another --output-dir, or pass --overwrite to delete that run's files and start over"
        )
    import shutil

    for n in os.listdir(output_dir):
        p = os.path.join(output_dir, n)
        if n in RUN_FILES or n.startswith(_RUN_FILE_PREFIXES) or n.startswith(".model_"):
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
    logger.info(f"--overwrite: the previous run's files in {output_dir} were deleted")


def free_subdir(parent: str, name: str) -> str:
    """``parent/name``, or ``parent/name_2``, ``name_3`` ... : the first that does not exist yet."""
    path, k = os.path.join(parent, name), 1
    while os.path.exists(path):
        k += 1
        path = os.path.join(parent, f"{name}_{k}")
    return path


def setup_run(
    cfg: Any,
    config_path: str,
    device_name: str,
    seed: int,
    threads: int = 0,
    resume: bool = False,
    overwrite: bool = False,
) -> torch.device:
    """Join the process group, prepare the output dir, logs and seeds.

    A fresh run (not ``resume``) refuses an output dir that holds another run unless
    ``overwrite`` (:func:`claim_output_dir`), before anything is written. Writes the
    resolved config ``cfg`` (its ``output_dir`` is used) to ``output_dir/config.yaml`` (rank 0).
    """
    device = du.init_distributed(device_name)
    if du.is_main_process():
        claim_output_dir(cfg.output_dir, resume, overwrite)
        check_writable_dir(cfg.output_dir)
    du.synchronize()
    setup_logger(cfg.output_dir)
    if threads > 0:
        torch.set_num_threads(threads)
    if du.is_main_process():
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    logger.info(f"config {config_path}; resolved config written to {os.path.join(cfg.output_dir, 'config.yaml')}")
    logger.info(
        f"world size {du.get_world_size()}, device {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads per process"
    )
    torch.manual_seed(seed + du.get_rank())
    import random

    import numpy as np

    random.seed(seed + du.get_rank())
    np.random.seed((seed + du.get_rank()) % (2**32))
    return device


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Exit code of a worker whose collective failed because another worker died first: the
# launcher then reports that other worker's error, the cause, rather than this echo of it.
PEER_FAILED = 3
_PEER_FAILURE_TEXT = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote process")


def _is_peer_failure(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(t in text for t in _PEER_FAILURE_TEXT)


def _worker(local_rank: int, world_size: int, port: int, fn: Callable, args: Sequence[Any]) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
        }
    )
    try:
        run_tool(functools.partial(fn, *args))
    except RuntimeError as e:
        if not _is_peer_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"[rank {local_rank}] stopped: another process failed ({first[:200]})", file=sys.stderr, flush=True)
        sys.exit(PEER_FAILED)


def _root_cause(ctx, failed_index: int, failed_code: int, wait_s: float = 10.0) -> Tuple[int, int]:
    """(index, exit code) of the worker whose failure the others echo.

    A worker that exited with :data:`PEER_FAILED` (or raised) only saw another
    one die; give the others a moment to exit and prefer one with its own code.
    """
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        codes = [p.exitcode for p in ctx.processes]
        own = [(i, c) for i, c in enumerate(codes) if c not in (None, 0, PEER_FAILED) and c > 0]
        if own:
            return own[0]
        if all(c is not None for c in codes):
            break
        time.sleep(0.05)
    return failed_index, failed_code


def launch(fn: Callable, num_procs: int, args: Sequence[Any] = ()) -> None:
    """Run ``fn(*args)`` in ``num_procs`` local processes (one per GPU, or CPU/gloo).

    Under ``torchrun`` (``WORLD_SIZE`` set) or with ``num_procs == 1`` it runs
    in this process. If any process fails, the others are terminated and the
    launcher exits non-zero; the failing rank's error is on stderr. A SIGTERM to
    the launcher is passed to every process (they save a checkpoint and exit
    143, and so does the launcher); Ctrl-C stops all of them with exit 130.
    """
    if num_procs <= 1 or "WORLD_SIZE" in os.environ:
        run_tool(functools.partial(fn, *args))
        return
    import torch.multiprocessing as mp

    port = _find_free_port()
    ctx = mp.start_processes(
        _worker, args=(num_procs, port, fn, tuple(args)), nprocs=num_procs, join=False, start_method="spawn"
    )
    # A scheduler's SIGTERM reaches this launcher only: pass it on, so that the
    # workers save a checkpoint and exit with 143 (without this the launcher
    # dies and the workers get SIGINT from their parent-death signal, saving nothing).
    stopping = []

    def _forward(signum, frame):
        stopping.append(signum)
        for p in ctx.processes:
            if p.is_alive():
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    try:
        prev = signal.signal(signal.SIGTERM, _forward)
    except ValueError:  # not the main thread: signals cannot be handled here
        prev = None
    try:
        # After a forwarded SIGTERM, let every worker finish its checkpoint before
        # stragglers are terminated; after a failure, stop the others at once
        # (SIGTERM, then SIGKILL 30 s later). ``stopping`` is read after the wait,
        # so a SIGTERM that arrives during it is taken into account.
        while True:
            alive = [p.sentinel for p in ctx.processes if p.exitcode is None]
            if alive:
                multiprocessing.connection.wait(alive)
            if not stopping and any(p.exitcode == PEER_FAILED for p in ctx.processes):
                _root_cause(ctx, 0, PEER_FAILED)  # let the worker that failed first exit on its own
            if ctx.join(timeout=0, grace_period=60.0 if stopping else None):
                break
    except mp.ProcessExitedException as e:
        if stopping and e.exit_code == 143:
            print("stopped by SIGTERM: checkpoint saved; rerun with --resume to continue", file=sys.stderr)
            sys.exit(143)
        index, code = (e.error_index, e.exit_code)
        if code == PEER_FAILED:
            index, code = _root_cause(ctx, index, code)
        print(f"error: process {index} exited with code {code}; all processes stopped", file=sys.stderr)
        sys.exit(code if code and code > 0 else 1)
    except mp.ProcessRaisedException as e:
        print(f"error: a process failed:\n{e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        # Ctrl-C: the workers in the terminal's process group got SIGINT too and save a
        # checkpoint at the iteration they agree on; SIGTERM asks the same of any that did
        # not (a second SIGINT would mean "stop at once"). A second Ctrl-C here stops waiting.
        for p in ctx.processes:
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in ctx.processes:
            p.join(60)
            if p.is_alive():
                p.kill()
        print("interrupted: checkpoint saved; rerun with --resume to continue", file=sys.stderr)
        sys.exit(130)
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)
    sys.exit(0)
