"""Command line: `autotrans run|strategy|plan|diff|inspect|verify`. Heavy modules
(torch, protobuf, MPI) are imported only by the commands that need them."""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autotrans", description="Transform LLM checkpoints between parallel layouts and formats.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def job_command(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_, description=help_)
        c.add_argument("config", help="job YAML (a MindSpore Transformers training YAML works)")
        c.add_argument("overrides", nargs="*", metavar="key=value", help="OmegaConf dot-list overrides")
        c.add_argument("--no-progress", action="store_true", help="no progress bar")
        return c

    job_command("run", "run the job: transform, convert, merge LoRA or preprocess data")
    job_command("strategy", "dry run: write the destination strategy files, touch no weights")
    plan = job_command("plan", "print what the job would read and write, touching no weights")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    d = sub.add_parser("diff", help="print layout differences between two strategies; exit 1 if any")
    d.add_argument("a")
    d.add_argument("b")
    i = sub.add_parser("inspect", help="describe a checkpoint or strategy: format, ranks, parameters, layouts")
    i.add_argument("path")
    v = sub.add_parser("verify", help="reassemble two checkpoints and compare every tensor bit for bit")
    v.add_argument("a")
    v.add_argument("b")
    v.add_argument("--strategy-a", default="", help="strategy of A when it is distributed (default: A/../strategy)")
    v.add_argument("--strategy-b", default="", help="strategy of B when it is distributed (default: B/../strategy)")
    return p


def dispatch(args: argparse.Namespace) -> int:
    if args.command in ("run", "strategy", "plan"):
        from runner import config

        cfg = config.load(args.config, args.overrides)
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from runner import __version__

        print(f"autotrans {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    from runner.errors import AutotransError, one_line

    try:
        return dispatch(args)
    except AutotransError as e:
        if args.debug:
            traceback.print_exc()
        print(f"autotrans: error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the environment, not a bug: a full disk, a missing permission
        from runner.errors import disk_error

        if args.debug:
            traceback.print_exc()
        print(f"autotrans: error: {one_line(str(disk_error(e, e.filename or 'a file', 'access')))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("autotrans: interrupted; run the same job again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say what, keep the traceback for --debug
        if args.debug:
            traceback.print_exc()
        else:
            print(f"autotrans: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
