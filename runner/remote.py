"""A SlicePool across MPI ranks, for sources no single node sees whole (SPEC 9).

Regions of source ranks this rank sees come from its own files (LocalPool); any other
region is requested from the rank that serves that source rank, and arrives by
point-to-point messages, in chunks of whole rows received straight into the region's
buffer. Every rank both writes its own files and serves its peers' requests: serving
runs from the Link's wait loop and between tensors, never blocking in MPI, so ranks
that ask each other at the same time cannot deadlock. Memory in flight is bounded:
each transfer keeps at most IN_FLIGHT chunks of CHUNK bytes being sent."""

from __future__ import annotations

import math

import numpy as np
from mpi4py import MPI

from runner.collective import Link
from runner.errors import AutotransError
from runner.execute import LocalPool
from runner.plan import ReadItem

REQUEST, HEADER, DATA = 101, 102, 103
CHUNK = 16 << 20
IN_FLIGHT = 2


def row_chunks(shape: tuple[int, ...], itemsize: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of dim 0 (one row for a 0-d array), each at most CHUNK
    bytes unless a single row is larger; sender and receiver cut the same way."""
    rows = shape[0] if shape else 1
    row_bytes = math.prod(shape[1:]) * itemsize
    if rows == 0 or row_bytes == 0:
        return []
    per = max(1, CHUNK // row_bytes)
    return [(i, min(i + per, rows)) for i in range(0, rows, per)]


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(1) if a.ndim == 0 else a


def _bytes(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.uint8)


class _Send:
    """One region going to one peer, a few chunks at a time."""

    def __init__(self, p2p, dest: int, view: np.ndarray):
        self.p2p, self.dest, self.view = p2p, dest, _rows(view)
        self.todo = row_chunks(view.shape, view.itemsize)
        self.inflight: list[tuple[MPI.Request, np.ndarray]] = []

    def advance(self) -> bool:
        before = len(self.inflight) + len(self.todo)
        self.inflight = [(r, b) for r, b in self.inflight if not r.Test()]
        while self.todo and len(self.inflight) < IN_FLIGHT:
            start, stop = self.todo.pop(0)
            buf = _bytes(np.ascontiguousarray(self.view[start:stop]))
            self.inflight.append((self.p2p.Isend(buf, self.dest, DATA), buf))
        return len(self.inflight) + len(self.todo) != before

    @property
    def done(self) -> bool:
        return not self.inflight and not self.todo


class RemotePool:
    """Regions of the source ranks in `seen` from local files; others from the rank
    `owner[src_rank]` that serves them."""

    def __init__(self, link: Link, local: LocalPool, seen: set[int], owner: dict[int, int]):
        self.link, self.local, self.seen, self.owner = link, local, seen, owner
        self.sends: list[_Send] = []
        self.notes: list[MPI.Request] = []  # headers on their way
        link.handlers.append(self._serve_safely)

    def region(self, read: ReadItem) -> np.ndarray:
        if read.src_rank in self.seen:
            return self.local.region(read)
        server = self.owner[read.src_rank]
        p2p = self.link.p2p
        sent = p2p.isend(read, dest=server, tag=REQUEST)
        reply = p2p.irecv(source=server, tag=HEADER)
        header: list = []

        def answered() -> bool:
            if not header:
                ok, msg = reply.test()
                if ok:
                    header.append(msg)
            return bool(header) and sent.Test()

        self.link.wait_until(answered)
        kind, detail = header[0]
        if kind == "error":
            raise AutotransError(detail)
        out = np.empty(read.region.sizes, np.dtype(detail))
        rows = _rows(out)
        reqs = [p2p.Irecv(_bytes(rows[a:b]), server, DATA) for a, b in row_chunks(out.shape, out.itemsize)]
        self.link.wait(reqs)
        return out

    def _serve_safely(self) -> bool:
        try:
            return self._serve()
        except Exception as e:  # a peer is waiting for these bytes: nothing can recover it
            self.link.abort(f"failed while serving source slices: {type(e).__name__}: {e}")
            raise

    def _serve(self) -> bool:
        p2p, did = self.link.p2p, False
        status = MPI.Status()
        while p2p.iprobe(source=MPI.ANY_SOURCE, tag=REQUEST, status=status):
            peer = status.Get_source()
            read: ReadItem = p2p.recv(source=peer, tag=REQUEST)
            try:
                view = self.local.region(read)
            except Exception as e:
                msg = str(e) if isinstance(e, AutotransError) else f"{type(e).__name__}: {e}"
                self.notes.append(p2p.isend(("error", f"MPI rank {self.link.rank} cannot read source rank {read.src_rank}'s {read.src_name}: {msg}"), dest=peer, tag=HEADER))
            else:
                self.notes.append(p2p.isend(("ok", view.dtype.str), dest=peer, tag=HEADER))
                self.sends.append(_Send(p2p, peer, view))
            did = True
        for s in self.sends:
            did = s.advance() or did
        self.sends = [s for s in self.sends if not s.done]
        self.notes = [r for r in self.notes if not r.Test()]
        if did:
            self.local.release()
        return did

    def release(self) -> None:
        self.local.release()

    def close(self) -> None:
        """Finish what is being sent (its receivers are waiting for it), then stop serving."""
        self.link.wait_until(lambda: not self.sends and not self.notes)
        self.link.handlers.remove(self._serve_safely)
        self.local.close()
