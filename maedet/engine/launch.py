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
import traceback
from typing import Any, Callable, Optional, Sequence

import torch

from maedet.config.loader import save_config
from maedet.engine import distributed as du
from maedet.engine.events import setup_logger
from maedet.engine.schedule import LRSchedule
from maedet.errors import ConfigError, MaedetError

__all__ = ["default_argument_parser", "run_tool", "setup_run", "launch", "check_writable_dir", "derive_schedule",
           "build_lr_schedule"]

logger = logging.getLogger("maedet")


def default_argument_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE", help="YAML config (may use _base_ inheritance)")
    p.add_argument("--output-dir", default=None, metavar="DIR", help="output directory (overrides output_dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in the output directory (its last_checkpoint file)")
    p.add_argument("opts", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. train.batch_size=8 solver.lr=1e-4")
    return p


def run_tool(main: Callable[[], Any]) -> None:
    """Run a tool's main: a :class:`MaedetError` becomes one ``error:`` line and exit 2."""
    try:
        rc = main()
    except MaedetError as e:
        rank = f"[rank {du.get_rank()}] " if du.get_world_size() > 1 else ""
        print(f"error: {rank}{error_line(e)}", file=sys.stderr, flush=True)
        du.destroy_distributed()
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(rc or 0))


def error_line(e: BaseException) -> str:
    """One line for an error; a DataLoader worker's wrapped traceback is reduced to its message."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = [line for line in msg.strip().splitlines() if line.strip()][-1].strip()
        prefix = f"{type(e).__module__}.{type(e).__name__}: "
        msg = last[len(prefix):] if last.startswith(prefix) else last
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


def setup_run(cfg, config_path: str, device_name: str, seed: int, threads: int = 0) -> torch.device:
    """Join the process group, prepare the output dir, logs and seeds.

    Writes the resolved config to ``output_dir/config.yaml`` (rank 0).
    """
    device = du.init_distributed(device_name)
    if du.is_main_process():
        check_writable_dir(cfg.output_dir)
    du.synchronize()
    setup_logger(cfg.output_dir)
    if threads > 0:
        torch.set_num_threads(threads)
    if du.is_main_process():
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    logger.info(f"config {config_path}; resolved config written to {os.path.join(cfg.output_dir, 'config.yaml')}")
    logger.info(f"world size {du.get_world_size()}, device {device}, torch {torch.__version__}")
    torch.manual_seed(seed + du.get_rank())
    import random

    import numpy as np

    random.seed(seed + du.get_rank())
    np.random.seed((seed + du.get_rank()) % (2**32))
    return device


def derive_schedule(solver, dataset_len: int, samples_per_iter: int):
    """Peak lr, max_iter and warm-up iterations from a :class:`SolverConfig`.

    Epoch lengths use ``dataset_len // samples_per_iter`` iterations (at least 1).
    """
    if solver.lr is not None:
        lr = float(solver.lr)
    elif solver.base_batch_size > 0:
        lr = solver.base_lr * samples_per_iter / solver.base_batch_size
    else:
        lr = solver.base_lr
    iters_per_epoch = max(1, dataset_len // samples_per_iter)
    if solver.max_iter > 0:
        max_iter = solver.max_iter
    elif solver.epochs > 0:
        max_iter = max(1, int(round(solver.epochs * iters_per_epoch)))
    else:
        raise ConfigError("set solver.max_iter or solver.epochs to a positive number")
    warmup = solver.warmup_iters if solver.warmup_iters > 0 else int(round(solver.warmup_epochs * iters_per_epoch))
    return lr, max_iter, min(warmup, max_iter)


def build_lr_schedule(solver, max_iter: int, warmup: int) -> LRSchedule:
    """The lr schedule of a :class:`SolverConfig`, with its values checked up front."""
    if solver.schedule not in ("cosine", "multistep", "constant"):
        raise ConfigError(f"solver.schedule must be cosine, multistep or constant, got '{solver.schedule}'")
    if solver.schedule == "multistep":
        bad = [int(x) for x in solver.steps if not 0 < int(x) < max_iter]
        if bad:
            raise ConfigError(f"solver.steps {list(solver.steps)}: steps {bad} are outside (0, max_iter={max_iter})")
    if solver.optimizer.lower() not in ("adamw", "sgd"):
        raise ConfigError(f"solver.optimizer must be adamw or sgd, got '{solver.optimizer}'")
    if solver.fused not in ("auto", "on", "off"):
        raise ConfigError(f"solver.fused must be auto, on or off, got '{solver.fused}'")
    return LRSchedule(solver.schedule, max_iter, warmup, solver.warmup_factor, solver.min_lr_ratio,
                      solver.steps, solver.gamma)


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, world_size: int, port: int, fn: Callable, args: Sequence[Any]) -> None:
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(local_rank),
        "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
    })
    run_tool(functools.partial(fn, *args))


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
    ctx = mp.start_processes(_worker, args=(num_procs, port, fn, tuple(args)), nprocs=num_procs,
                             join=False, start_method="spawn")
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
            if ctx.join(timeout=0, grace_period=60.0 if stopping else None):
                break
    except mp.ProcessExitedException as e:
        if stopping and e.exit_code == 143:
            print("stopped by SIGTERM: checkpoint saved; rerun with --resume to continue", file=sys.stderr)
            sys.exit(143)
        print(f"error: process {e.error_index} exited with code {e.exit_code}; all processes stopped",
              file=sys.stderr)
        sys.exit(e.exit_code if e.exit_code and e.exit_code > 0 else 1)
    except mp.ProcessRaisedException as e:
        print(f"error: a process failed:\n{e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C: the workers got SIGINT too; wait for them, no traceback
        for p in ctx.processes:
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        for p in ctx.processes:
            p.join(30)
            if p.is_alive():
                p.kill()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)
    sys.exit(0)
