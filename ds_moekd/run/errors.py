"""Errors a user can act on, the exit codes, and the one top-level handler (docs/reliability.md).

The handler prints one short message (what, where, what to do) and exits non-zero; the
traceback only with `--debug` or DS_MOEKD_DEBUG=1.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback

# Exit codes (documented in README.md and docs/reliability.md).
EXIT_OK = 0
EXIT_ERROR = 1  # unexpected: a bug or an unclassified failure (rerun with --debug)
EXIT_USAGE = 2  # a config, data or model problem the user fixes
EXIT_NUMERICS = 3  # non-finite loss / gradients beyond the policy's limit
EXIT_HANG = 4  # the watchdog saw no progress, a collective timed out, or a rank was lost
EXIT_ENVIRONMENT = 5  # disk full, port in use: the machine, not the inputs
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGINT after writing a checkpoint (EX_TEMPFAIL: resume later)


class UserError(Exception):
    """A failure with a message that says what, where and what to do."""

    exit_code = EXIT_USAGE


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message says which and where."""


class NumericsError(UserError):
    exit_code = EXIT_NUMERICS


class EnvironmentProblem(UserError):
    exit_code = EXIT_ENVIRONMENT


class PeerLost(UserError):
    """Another rank stopped answering (killed, crashed, or its node was lost): resume from a checkpoint."""

    exit_code = EXIT_HANG


# What a failed collective says when another rank stopped answering.
COLLECTIVE_TIMED_OUT = ("Timed out waiting", "collective operation timeout")
PEER_CLOSED = ("Connection closed by peer", "Connection reset by peer")


def peer_failure(exc: BaseException) -> bool:
    return any(s in str(exc) for s in COLLECTIVE_TIMED_OUT + PEER_CLOSED)


class Preempted(UserError):
    """Not a failure: the run stopped on a signal after committing a checkpoint."""

    exit_code = EXIT_PREEMPTED


def debug_enabled(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("DS_MOEKD_DEBUG", "") not in ("", "0")


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception escaping a command."""
    if isinstance(exc, UserError):
        return exc.exit_code, str(exc)
    if isinstance(exc, ConfigError):
        return EXIT_USAGE, f"config error: {exc}"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return EXIT_ENVIRONMENT, f"disk full: {exc}; free space (or point output_dir elsewhere) and resume"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE or "address already in use" in str(exc).lower():
        port = os.environ.get("MASTER_PORT", "?")
        return EXIT_ENVIRONMENT, (f"port {port} on {os.environ.get('MASTER_ADDR', '?')} is in use (another job?); "
                                  "set MASTER_PORT to a free port, or leave it unset for a single-node launch script")
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in COLLECTIVE_TIMED_OUT):
        return EXIT_HANG, ("a collective timed out (train.collective_timeout_s): another rank stalled or died; "
                           f"resume from the last checkpoint with train.resume=true ({str(exc).splitlines()[0][-120:]})")
    if any(s in str(exc) for s in PEER_CLOSED):
        return EXIT_ERROR, ("lost contact with another rank (it failed, was killed or stopped); "
                            "that rank's own message says why")
    if isinstance(exc, FileNotFoundError):
        return EXIT_USAGE, f"file not found: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(exc, ValueError | KeyError):  # the loaders' checks say what and where
        return EXIT_USAGE, str(exc).strip("'\"")
    return EXIT_ERROR, f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"


def run_command(fn, argv: list[str], prog: str) -> None:
    """Run `fn(argv without --debug)`; turn any exception into a message and an exit code."""
    debug = debug_enabled(argv)
    if debug:
        os.environ["DS_MOEKD_DEBUG"] = "1"  # nested commands and spawned ranks see it too
    try:
        fn([a for a in argv if a != "--debug"])
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the top-level handler
        code, message = classify(exc)
        if debug:
            traceback.print_exc()
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        label = "" if code == EXIT_PREEMPTED else "error: "  # a requested stop is not an error
        print(f"{prog}{where}: {label}{message}", file=sys.stderr)
        sys.stderr.flush()
        sys.exit(code)
