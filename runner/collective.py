"""Exception-safe steps across MPI ranks (DESIGN, pattern 7).

Every step runs on every rank; the outcomes are gathered and a failure anywhere raises
the same error, naming the step and the failing rank, on all of them, so no rank is
left waiting for one that gave up. Waiting never parks a rank inside a blocking MPI
call: requests are tested with a short sleep between tests, and while a rank waits it
keeps serving its peers (slice requests, progress counters) through `handlers`, so a
rank that is ahead never starves one that is behind. A failure that cannot be reported
through a step (a bug between steps, a broken transfer) aborts the whole MPI job.

Imported only under MPI: importing it initialises MPI."""

from __future__ import annotations

import array
import fcntl
import json
import os
import sys
import termios
import time
from typing import Any, Callable, TypeVar

import mpi4py

mpi4py.rc.thread_level = "single"  # one thread per rank talks MPI
from mpi4py import MPI  # noqa: E402

import numpy as np  # noqa: E402

from runner.errors import AutotransError, message_line  # noqa: E402

T = TypeVar("T")
OUTCOME_BYTES = 2048  # one rank's step outcome, JSON, on the wire
MAX_SLEEP = 0.002  # seconds between tests while nothing happens
BEAT_TAG = 1


class StepError(AutotransError):
    """A step failed on some rank; raised with the same message on every rank."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class Link:
    """This rank's view of the MPI job: steps, exchanges, and a wait loop that serves."""

    def __init__(self, comm: Any = None):
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.p2p = self.comm.Dup()  # slices and counters travel apart from the steps
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.handlers: list[Callable[[], bool]] = []  # each returns True when it did work
        # liveness (SPEC 9, mpi_timeout): every rank that polls tells the others it is
        # alive; a rank not heard from for `timeout` seconds ends the job
        self.beats = self.comm.Dup()
        self.timeout: float | None = None
        self.seen = [time.monotonic()] * self.size  # when each rank was last heard from
        self.beaten = 0.0
        self.sent: list = []

    def poll(self) -> bool:
        """Serve whatever peers asked for; True when something was done."""
        self._beat()
        did = False
        for h in list(self.handlers):
            did = h() or did
        return did

    def wait_until(self, done: Callable[[], bool]) -> None:
        delay = 0.0
        while not done():
            if self.poll():
                delay = 0.0
            else:
                delay = min(delay * 2 or 1e-5, MAX_SLEEP)
            time.sleep(delay)
            self._check_peers()

    def watch(self, timeout: float | None) -> None:
        """End the job when a rank is not heard from for `timeout` seconds (None: never)."""
        self.timeout = timeout
        self.seen = [time.monotonic()] * self.size

    def _beat(self) -> None:
        """Say this rank is alive (at most every timeout / 5 s) and hear the others."""
        if self.timeout is None:
            return
        now = time.monotonic()
        status = MPI.Status()
        while self.beats.iprobe(source=MPI.ANY_SOURCE, tag=BEAT_TAG, status=status):
            self.beats.recv(source=status.Get_source(), tag=BEAT_TAG)
            self.seen[status.Get_source()] = now
        if now - self.beaten >= min(1.0, self.timeout / 5):
            self.sent = [r for r in self.sent if not r.Test()]
            self.sent += [self.beats.isend(None, dest=r, tag=BEAT_TAG) for r in range(self.size) if r != self.rank]
            self.beaten = now

    def _check_peers(self) -> None:
        """End the job on every rank when a peer has been silent for `timeout` seconds:
        the lowest rank still heard from says which, for the job, and aborts (mpiexec
        then ends every rank, the silent one included); the others wait for that."""
        if self.timeout is None:
            return
        now = time.monotonic()
        silent = [r for r in range(self.size) if r != self.rank and now - self.seen[r] > self.timeout]
        if not silent:
            return
        speaker = min(r for r in range(self.size) if r not in silent)
        if speaker == self.rank:
            print(f"autotrans: error: MPI rank {silent[0]} of {self.size} made no progress for {self.timeout:g} s "
                  f"(mpi_timeout){f' (and {len(silent) - 1} more)' if len(silent) > 1 else ''}; ending the job on every rank",
                  file=sys.stderr, flush=True)
        else:
            time.sleep(max(5.0, self.timeout / 5))  # the speaker's abort ends this rank first
        self._abort_quietly()

    def wait(self, requests: list) -> None:
        self.wait_until(lambda: MPI.Request.Testall(requests))

    def step(self, name: str, fn: Callable[[], T]) -> T:
        """Run `fn` here, gather every rank's outcome; raise StepError everywhere if any
        rank failed. A StepError from a nested step already holds on every rank."""
        value, outcome, cause = None, {}, None
        try:
            value = fn()
        except StepError:
            raise
        except AutotransError as e:
            outcome, cause = {"msg": str(e), "code": e.exit_code}, e
        except OSError as e:  # the environment (a full disk, a lost mount), not a bug
            outcome, cause = {"msg": str(e), "code": 1}, e
        except Exception as e:  # a bug on one rank must not hang the others
            outcome, cause = {"msg": f"internal error: {type(e).__name__}: {e}", "code": 1}, e
        failed = [(r, o) for r, o in enumerate(self._gather(outcome)) if o]
        if failed:
            rank, first = failed[0]
            more = f" (and on {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise StepError(f"{name} failed on MPI rank {rank} of {self.size}{more}: {first['msg']}", first["code"]) from cause
        return value  # type: ignore[return-value]

    def _gather(self, outcome: dict) -> list[dict]:
        send = np.zeros(OUTCOME_BYTES, np.uint8)
        data = _encode(outcome)
        send[: len(data)] = np.frombuffer(data, np.uint8)
        recv = np.zeros((self.size, OUTCOME_BYTES), np.uint8)
        self.wait([self.comm.Iallgather(send, recv)])
        return [json.loads(bytes(row).rstrip(b"\0") or b"{}") for row in recv]

    def exchange(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order. Call only right after a step succeeded, so
        that every rank is here."""
        return self.comm.allgather(obj)

    def abort(self, message: str) -> None:
        print(message_line(f"autotrans: error: MPI rank {self.rank}: {message}; stopping every rank"), file=sys.stderr, flush=True)
        self._abort_quietly()

    def _abort_quietly(self) -> None:
        """MPI_Abort, without the MPI library's own line about it: the job's line is said."""
        sys.stderr.flush()
        _wait_until_read(2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        self.comm.Abort(1)


def _wait_until_read(fd: int, timeout: float = 2.0) -> None:
    """Wait (at most `timeout` s) until the reader of the pipe `fd` has taken what this
    process wrote: mpiexec's proxy, ended by an abort right after the write, could drop
    the job's line unread. Returns at once when `fd` is no pipe."""
    unread = array.array("i", [0])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fcntl.ioctl(fd, termios.FIONREAD, unread)
        except OSError:
            return
        if unread[0] == 0:
            return
        time.sleep(0.005)


def _encode(outcome: dict) -> bytes:
    """The outcome as JSON that fits OUTCOME_BYTES (a long message is cut short)."""
    data = json.dumps(outcome).encode()
    keep = len(outcome.get("msg", ""))
    while len(data) > OUTCOME_BYTES:
        keep //= 2
        data = json.dumps(dict(outcome, msg=outcome["msg"][:keep] + " ...")).encode()
    return data
