#!/usr/bin/env bash
# Run an autotrans job on N MPI ranks, on this machine or on several (SPEC 9).
#
#   ./launch.sh -n 8 [--hosts h1,h2 | --hostfile F] CONFIG.yaml [key=value ...] [--no-progress]
#
# Options (before CONFIG):
#   -n, -np N        MPI ranks (default 1)
#   --hosts h1,h2    hosts; ranks are placed in blocks (ranks 0..N/2-1 on h1, ...), as
#                    training launchers do, unless a host is given as h:slots
#   --hostfile F     a host file in the launcher's own format
#   --mpi "ARGS"     extra mpiexec arguments, passed as they are (e.g. "-iface eth0")
#   --debug          tracebacks on errors
#   --dry-run        print the mpiexec command instead of running it
# Everything from CONFIG on goes to `autotrans run` unchanged. The environment is
# forwarded to every rank. mpiexec is $MPIEXEC, else the one on PATH (the `mpich`
# wheel installs one next to python), else the one beside this python. Works with
# MPICH / Intel MPI (hydra) and Open MPI.
set -euo pipefail

usage() { sed -n '2,19s/^# \{0,1\}//p' "$0"; exit "${1:-2}"; }

n=1 hosts="" hostfile="" extra="" debug="" dry=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|-np) n="${2:?-n needs a number}"; shift 2 ;;
    --hosts) hosts="${2:?--hosts needs h1,h2,...}"; shift 2 ;;
    --hostfile) hostfile="${2:?--hostfile needs a file}"; shift 2 ;;
    --mpi) extra="${2?--mpi needs arguments}"; shift 2 ;;
    --debug) debug="--debug"; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    -*) echo "launch.sh: unknown option $1 (options go before CONFIG; see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { echo "launch.sh: give a job CONFIG.yaml (see --help)" >&2; exit 2; }
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "launch.sh: -n must be a positive integer, got $n" >&2; exit 2; }
[[ -z "$hosts" || -z "$hostfile" ]] || { echo "launch.sh: give --hosts or --hostfile, not both" >&2; exit 2; }
[[ -z "$hostfile" || -f "$hostfile" ]] || { echo "launch.sh: host file $hostfile does not exist" >&2; exit 2; }

# the interpreter itself, not a shim (pyenv), so remote ranks run the same one
python="${AUTOTRANS_PYTHON:-$("$(command -v python3 || command -v python)" -c 'import sys; print(sys.executable)')}"
mpiexec="${MPIEXEC:-$(command -v mpiexec || true)}"
if [[ -z "$mpiexec" ]]; then
  mpiexec="$(dirname "$python")/mpiexec"
  [[ -x "$mpiexec" ]] || { echo "launch.sh: no mpiexec found; pip install 'autotrans[mpi]' (the mpich wheel) or set MPIEXEC" >&2; exit 2; }
fi

if "$mpiexec" --version 2>&1 | grep -qiE "open mpi|openrte"; then flavor=openmpi; else flavor=hydra; fi

# Block placement: each host gets ceil(n / hosts) slots unless it names its own.
slotted=""
if [[ -n "$hosts" ]]; then
  IFS=, read -ra list <<< "$hosts"
  per=$(( (n + ${#list[@]} - 1) / ${#list[@]} ))
  for h in "${list[@]}"; do
    [[ "$h" == *:* ]] || h="$h:$per"
    slotted="${slotted:+$slotted,}$h"
  done
fi

cmd=("$mpiexec" -n "$n")
if [[ $flavor == hydra ]]; then
  [[ -n "$slotted" ]] && cmd+=(-hosts "$slotted")
  [[ -n "$hostfile" ]] && cmd+=(-f "$hostfile")
  cmd+=(-genvall)
else
  [[ -n "$slotted" ]] && cmd+=(--host "$slotted")
  [[ -n "$hostfile" ]] && cmd+=(--hostfile "$hostfile")
  [[ $(id -u) -eq 0 ]] && cmd+=(--allow-run-as-root)
  # Open MPI forwards only what -x names: name every exported variable it may carry.
  while IFS= read -r name; do
    [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ && ! "$name" =~ ^(OMPI_|PMIX_|BASH_FUNC|_$) ]] && cmd+=(-x "$name")
  done < <(compgen -e)
fi
[[ -n "$extra" ]] && read -ra more <<< "$extra" && cmd+=("${more[@]}")
cmd+=("$python" -m runner ${debug:+"$debug"} run "$@")

if [[ -n "$dry" ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
