"""Command line: `autotrans run|strategy|plan|diff|inspect|verify`. Heavy modules
(torch, protobuf, MPI) are imported only by the commands that need them."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

EXAMPLES = """\
examples:
  autotrans run configs/demo.yaml
  autotrans run train.yaml load_checkpoint=/ckpt/rank_dirs output_dir=/out
  autotrans strategy train.yaml            # write destination strategy files only
  autotrans plan job.yaml --json           # what the job would read and write
  autotrans diff strategy_a/ strategy_b/   # exit 1 if the layouts differ
  autotrans inspect /ckpt/rank_dirs
  autotrans verify /ckpt/full.safetensors /out/transformed_checkpoint
"""


# Flags that may stand anywhere on the command line (SPEC 3): taken out before parsing.
FLAGS = {
    "--debug": "show tracebacks on errors",
    "--no-progress": "no progress bar",
    "--json": "machine-readable output (autotrans plan)",
}
JOB_COMMANDS = ("run", "strategy", "plan")


def build_parser(job_keys: str = "") -> argparse.ArgumentParser:
    """The parser; `job_keys` (the job keys' listing) goes under the job commands' help."""
    p = argparse.ArgumentParser(
        prog="autotrans", description="Transform LLM checkpoints between parallel layouts and formats.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, help_ in FLAGS.items():
        p.add_argument(flag, action="store_true", help=help_ + " (anywhere on the line)")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_: str, flags: tuple[str, ...], **kwargs) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_, description=help_, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        for flag in flags:  # listed in this command's help; parsed by the top parser (hoisted)
            c.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=FLAGS[flag])
        return c

    def job_command(name: str, help_: str, flags: tuple[str, ...] = ("--debug", "--no-progress")) -> argparse.ArgumentParser:
        c = command(name, help_, flags, usage=f"autotrans {name} CONFIG.yaml [key=value ...] [{'] ['.join(flags)}]", epilog=job_keys)
        c.add_argument("config", nargs="?", help="job YAML (a MindSpore Transformers training YAML works)")
        c.add_argument("overrides", nargs="*", metavar="key=value", help="OmegaConf dot-list overrides of the job keys below")
        return c

    job_command("run", "run the job: transform, convert, merge LoRA or preprocess data")
    job_command("strategy", "dry run: write the destination strategy files, touch no weights")
    job_command("plan", "print what the job would read and write, touching no weights", ("--debug", "--json"))
    d = command("diff", "print layout differences between two strategies; exit 1 if any", ("--debug",))
    d.add_argument("a")
    d.add_argument("b")
    i = command("inspect", "describe a checkpoint or strategy: format, ranks, parameters, layouts", ("--debug",))
    i.add_argument("path")
    v = command("verify", "reassemble two checkpoints and compare every tensor bit for bit", ("--debug", "--no-progress"))
    v.add_argument("a")
    v.add_argument("b")
    v.add_argument("--strategy-a", default="", help="strategy of A when it is distributed (default: A/../strategy)")
    v.add_argument("--strategy-b", default="", help="strategy of B when it is distributed (default: B/../strategy)")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line, flags taken from wherever they stand (SPEC 3)."""
    rest = argv[:argv.index("--")] if "--" in argv else argv
    flags = [a for a in rest if a in FLAGS]
    argv = flags + [a for a in rest if a not in FLAGS] + argv[len(rest):]
    wants_help = any(a in ("-h", "--help") for a in argv) and any(c in argv for c in JOB_COMMANDS)
    if wants_help:  # the listing reads the sections' schemas: built only when asked for
        from runner.config import describe_keys

        parser = build_parser(describe_keys())
    else:
        parser = build_parser()
    args = parser.parse_args(argv)
    if args.json and args.command != "plan":
        parser.error("--json is an option of autotrans plan")
    if args.command in JOB_COMMANDS and args.config is None:
        print(f"usage: autotrans {args.command} CONFIG.yaml [key=value ...]\n"
              f"autotrans {args.command}: error: give a job file (autotrans {args.command} --help lists the job keys)", file=sys.stderr)
        sys.exit(2)
    return args


def load_job(path: str, overrides: list[str]):
    """The checked job; under mpiexec every rank reads it and a mistake is said once."""
    from runner import config
    from runner.launch import launched_size

    if launched_size() > 1:
        from runner import log
        from runner.collective import Link

        link = Link()
        log.configure(quiet=link.rank != 0)  # a warning about the job file is said once
        return link.step("read the job file", lambda: config.load(path, overrides))
    return config.load(path, overrides)


def said_by_rank_0(e: BaseException) -> bool:
    """Whether `e` holds on every MPI rank alike (a failed step, an interrupt that reached
    every rank), so that rank 0 says it for the job and this rank, another, stays quiet
    (SPEC 3: one line for the job)."""
    collective = sys.modules.get("runner.collective")
    return (collective is not None and isinstance(e, (collective.StepError, KeyboardInterrupt))
            and collective.MPI.COMM_WORLD.Get_rank() != 0)


def dispatch(args: argparse.Namespace) -> int:
    if args.command in ("run", "strategy", "plan"):
        cfg = load_job(args.config, args.overrides)
        show = not args.no_progress
        if args.command == "plan":
            from runner.plan_report import report

            return report(cfg, as_json=args.json)
        if args.command == "strategy":
            from dataclasses import replace

            cfg = replace(cfg, only_save_strategy=True)
        from runner.dispatch import run_job

        return run_job(cfg, show_progress=show)
    if args.command == "diff":
        from runner.inspect import diff

        return diff(args.a, args.b)
    if args.command == "inspect":
        from runner.inspect import inspect

        return inspect(args.path)
    if args.command == "verify":
        from runner.verify import verify_paths

        return verify_paths(args.a, args.b, args.strategy_a, args.strategy_b)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    if args.version:
        from runner import __version__

        print(f"autotrans {__version__}")
        return 0
    if not args.command:
        build_parser().print_help()
        return 2
    from runner import log
    from runner.errors import AutotransError, Interrupted, message_line

    log.configure(debug=bool(getattr(args, "debug", False)))
    log.hold()  # until the job gets going: a failure's line comes before the warnings leading to it

    def interrupted(signum: int, frame: object) -> None:
        raise Interrupted(signum)
    handlers = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return dispatch(args)
    except AutotransError as e:
        if args.debug:
            traceback.print_exc()
        if not said_by_rank_0(e):
            print(message_line(f"autotrans: error: {e}"), file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # the reader went away (`| head`): end quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except OSError as e:  # the environment, not a bug: a full disk, a missing permission
        from runner.errors import disk_error

        if args.debug:
            traceback.print_exc()
        print(message_line(f"autotrans: error: {disk_error(e, e.filename or 'a file', 'access')}"), file=sys.stderr)
        return 1
    except MemoryError:  # the machine's limit, not a bug: say so in one line
        print("autotrans: error: out of memory; give the job more memory (or fewer transform_process_num workers)", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if not said_by_rank_0(e):
            print(f"autotrans: interrupted ({signal.Signals(signum).name}); run the same job again to resume", file=sys.stderr)
        if "runner.collective" in sys.modules:  # under MPI: no MPI_Finalize, which would wait on ranks mid-step
            log.release()
            sys.stderr.flush()
            os._exit(128 + signum)
        return 128 + signum
    except Exception as e:  # a bug: say what, keep the traceback for --debug
        if args.debug:
            traceback.print_exc()
        else:
            print(message_line(f"autotrans: internal error: {type(e).__name__}: {str(e)[:200]} (rerun with --debug for the traceback)"), file=sys.stderr)
        return 1
    finally:
        log.release()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
