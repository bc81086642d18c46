"""Exception types and the exit codes they map to (DESIGN §6).

Code 1 is for bugs and keeps its traceback; every other failure is an `MmctlError` whose lines are printed
one per problem, with no traceback, and whose `exit_code` is what the process returns.
"""

from __future__ import annotations

OK = 0
BUG = 1
USAGE = 2
DATA = 3
UNSAFE = 4
NON_FINITE = 5
BUSY = 6
INTERRUPTED = 75


class MmctlError(Exception):
    """A failure the user can act on. `problems` are the lines to print (one per problem)."""

    exit_code = BUG

    def __init__(self, *problems: str):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class UsageError(MmctlError):
    """Bad command line or recipe: unknown key, wrong type, out of range, conflicting fields."""

    exit_code = USAGE


class DataError(MmctlError):
    """An input file or artifact is missing, corrupt or does not match what was expected."""

    exit_code = DATA


class UnsafeInputError(MmctlError):
    """An input was refused because loading it could run code or escape its directory."""

    exit_code = UNSAFE


class NonFiniteError(MmctlError):
    """Training produced a non-finite loss or gradient; the last good checkpoint is intact."""

    exit_code = NON_FINITE


class BusyError(MmctlError):
    """Another mmctl process holds the output directory; nothing was changed. Retry when it has finished."""

    exit_code = BUSY


class Interrupted(MmctlError):
    """Ctrl-C or SIGTERM, after a resumable checkpoint was saved."""

    exit_code = INTERRUPTED
