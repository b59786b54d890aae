"""Whether this process was launched by mpiexec, read from the launcher's environment
without loading MPI (a single-process run never imports mpi4py)."""

from __future__ import annotations

import os

# World-size variables set by MPICH / Intel MPI (hydra; also Slurm's PMI2), Open MPI
# and MVAPICH; not MPI_LOCALNRANKS, which counts only this node's ranks.
SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_size(environ=os.environ) -> int:
    """The MPI world size the launcher announced; 1 when not launched by mpiexec."""
    for var in SIZE_VARS:
        value = environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1
