"""The `ctxrobot` command line.

Each subcommand is a thin handler: parse, call into the package, print, return an exit
status (0 ok, 1 failed, 2 bad input). Heavy imports happen inside handlers so that
`ctxrobot --help` and `ctxrobot validate` stay fast on a Pi.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from ctxrobot.manifest.defaults import DEFAULT_MANIFEST, memory_arg
from ctxrobot.model.errors import UserError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("ctxrobot")


# -- validate -----------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    from ctxrobot.manifest.schema import check_file

    bad = 0
    for path in args.paths:
        report = check_file(Path(path))
        # Warnings (a loosened privilege, a writable host mount) do not make a file invalid.
        for problem in [*report.errors, *report.warnings]:
            print(problem, file=sys.stderr)
        if report.errors:
            bad += 1
        else:
            print(f"{path}: valid")
    return EXIT_USAGE if bad else EXIT_OK


# -- run ----------------------------------------------------------------------------------
class _StopOnSignal:
    """SIGINT/SIGTERM ask the runtime to stop; the run then ends like a normal one."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signal = signum
        log.warning("%s received: stopping", signal.Signals(signum).name)
        self._stop()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def cmd_run(args: argparse.Namespace) -> int:
    from ctxrobot.manifest.schema import load_manifest, with_scenario
    from ctxrobot.observe.readers import print_summary
    from ctxrobot.service.runtime import RunFailed, RunOptions, Runtime, run_folder

    manifest = load_manifest(Path(args.config))
    if args.scenario:
        manifest = with_scenario(manifest, args.scenario)
    only = tuple(args.only.split(",")) if args.only else None
    unknown = sorted(set(only or ()) - {t.name for t in manifest.tasks})
    if unknown:
        print(f"ctxrobot run: --only names unknown task(s): {', '.join(unknown)}", file=sys.stderr)
        return EXIT_USAGE
    out = run_folder(args.out)
    runtime = Runtime(
        manifest,
        RunOptions(
            out_dir=out,
            policy=args.policy,
            duration_s=args.duration,
            metrics_port=args.metrics_port,
            no_drop=args.no_drop,
            only_tasks=only,
            cpus=args.cpus,
            memory_bytes=args.memory,
            keep_s=args.keep,
        ),
    )
    status = EXIT_OK
    summary = None
    with _StopOnSignal(runtime.request_stop):
        try:
            runtime.start()
            runtime.wait()
        except RunFailed as err:
            print(f"ctxrobot run: {err}", file=sys.stderr)
            status = EXIT_FAILED
        finally:
            summary = runtime.stop()
    if summary is not None:
        if not args.json:
            from rich.console import Console

            print_summary(summary, Console())
            print(f"run database: {out / 'run.db'}")
        else:
            print(json.dumps(summary))
    return status


# -- daemon, ctl, dash ---------------------------------------------------------------------
def cmd_daemon(args: argparse.Namespace) -> int:
    from ctxrobot.manifest.schema import load_manifest
    from ctxrobot.service.daemon import Daemon, DaemonOptions
    from ctxrobot.service.runtime import RunFailed, run_folder

    config = Path(args.config)
    load_manifest(config)  # its problems are reported now, before the daemon starts
    out = run_folder(args.out)
    daemon = Daemon(
        DaemonOptions(
            config=config,
            socket=Path(args.socket),
            out_dir=out,
            read_group=args.read_group,
            operator_group=args.operator_group,
            policy=args.policy,
            metrics_port=args.metrics_port,
            keep_s=args.keep,
        )
    )
    with _StopOnSignal(daemon.request_stop):
        try:
            return daemon.serve()
        except RunFailed as err:
            print(f"ctxrobot daemon: {err}", file=sys.stderr)
            return EXIT_FAILED


def _parse_value(text: str) -> object:
    """CLI override values: JSON when it parses (true, 0.5, "x"), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def cmd_ctl(args: argparse.Namespace) -> int:
    """A refusal or an unusable peer is a ControlError: one line, exit 2 (main's handler)."""
    from ctxrobot.service.control import ControlClient

    params: dict[str, Any] = {}
    cmd = args.action
    if cmd == "override":
        pairs = [kv.partition("=") for kv in args.signals]
        bad = [k for k, eq, _ in pairs if not eq]
        if bad:
            print(f"ctxrobot ctl override: expected NAME=VALUE, got {bad[0]!r}", file=sys.stderr)
            return EXIT_USAGE
        params["signals"] = {k: _parse_value(v) for k, _, v in pairs}
    elif cmd == "clear-override":
        cmd, params["clear"] = "override", True
    elif cmd in ("stop", "start", "restart"):
        cmd, params = "task", {"action": args.action, "name": args.task}
    with ControlClient(Path(args.socket)) as client:
        result = client.call(cmd, **params)
    print(json.dumps(result, indent=None if args.json else 2))
    return EXIT_OK


def cmd_dash(args: argparse.Namespace) -> int:
    from ctxrobot.observe.dash import run_dash, snapshot_text
    from ctxrobot.service.control import ControlClient

    client = ControlClient(Path(args.socket))
    status = client.call("status")  # a ControlError is one line and exit 2
    if args.json:
        print(json.dumps(status))
    elif args.once:
        width = args.width or shutil.get_terminal_size((120, 40)).columns
        print(snapshot_text(status, width=width))
    else:
        run_dash(lambda: client.call("status"), interval_s=args.interval)
    client.close()
    return EXIT_OK


# -- ps -----------------------------------------------------------------------------------
def cmd_ps(args: argparse.Namespace) -> int:
    from ctxrobot.service.control import ControlClient, ControlError
    from ctxrobot.service.listing import container_rows

    # The daemon's view when one runs (same rows, but only its own run); else Docker's.
    try:
        with ControlClient(Path(args.socket), timeout_s=2.0) as client:
            rows = client.call("ps")
    except ControlError:
        rows = container_rows()
    if args.json:
        print(json.dumps(rows))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table("task", "container", "run", "state", "weight", "cpu cap", "frozen")
    for row in rows:
        cap = "-" if row["share_cap"] is None else f"{row['share_cap']:.2f}"
        table.add_row(
            row["task"],
            row["name"],
            row["run"],
            row["state"],
            str(row["weight"] if row["weight"] is not None else "-"),
            cap,
            {True: "yes", False: "no", None: "-"}[row["frozen"]],
        )
    if rows:
        Console().print(table)
    else:
        print("no ctxrobot containers")
    return EXIT_OK


# -- eval ---------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from ctxrobot.service.evaluate import EvalError, evaluate_in_container

    try:
        return evaluate_in_container(
            args.task,
            args.dataset,
            json_output=args.json,
            extra=args.extra,
            cpu=args.cpu,
            map_out=args.map_out,
        )
    except EvalError as err:
        print(f"ctxrobot eval: {err}", file=sys.stderr)
        return EXIT_USAGE


# -- report / trace -----------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from ctxrobot.observe.report import write_report

    # A folder without a usable run.db, or an --out that cannot be written: one line, exit 2.
    for path in write_report(args.run_dir, args.out):
        print(path)
    return EXIT_OK


def cmd_trace(args: argparse.Namespace) -> int:
    from ctxrobot.observe.trace import write_trace

    print(write_trace(args.run_dir, args.out))
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------
def _add_robot_options(p: argparse.ArgumentParser, keep_also: str = "") -> None:
    """The options `run` and `daemon` share: which robot, which policy, where to record
    (`keep_also`: what else `--keep` does for this command)."""
    p.add_argument(
        "--config",
        default=str(DEFAULT_MANIFEST),
        metavar="PATH",
        help="robot manifest (default: config/robot.yaml)",
    )
    p.add_argument(
        "--policy",
        choices=["cfs", "static", "weights", "ctx"],
        help="scheduling policy (default: the manifest's scheduler.policy)",
    )
    p.add_argument("--out", metavar="DIR", help="run folder for run.db (default: runs/<time>)")
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on 127.0.0.1:PORT (0: any free port, logged)",
    )
    p.add_argument(
        "--keep",
        type=hours_arg,
        metavar="HOURS",
        help="keep only the last HOURS of events in run.db (e.g. 24 or 0.5): a robot records "
        f"about 75 MB an hour; such a run cannot be replayed{keep_also} (default: keep "
        "everything)",
    )


def hours_arg(text: str) -> float:
    """An argparse type: a positive number of hours → seconds."""
    try:
        hours = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of hours") from None
    if not (hours > 0 and math.isfinite(hours)):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of hours")
    return hours * 3600.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctxrobot",
        description=(
            "Context-aware task runtime for small robots: runs perception tasks in "
            "containers and re-shares the CPU among them when the robot's context changes."
        ),
        epilog="Run `ctxrobot COMMAND --help` for a command's options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "validate",
        help="check manifests and scenarios; print FILE:LINE:COL for every problem",
        description="Check robot manifests or scenario files. Exit 0 when all are valid, "
        "2 otherwise, after printing every problem as FILE:LINE:COL: message.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="manifest or scenario YAML file")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "run",
        help="run a robot manifest: start the task containers, replay the scenario, report",
        description="Start the manifest's task containers, play its scenario, schedule the "
        "CPU by context, and print a per-task latency summary. Containers are removed "
        "at the end, on Ctrl-C, on SIGTERM and on errors.",
    )
    _add_robot_options(p)
    p.add_argument(
        "--duration", type=float, metavar="S", help="stop after S seconds (default: scenario)"
    )
    p.add_argument(
        "--json", action="store_true", help="print the summary as one JSON line at the end"
    )
    p.add_argument("--scenario", metavar="PATH", help="replay this scenario instead")
    p.add_argument("--only", metavar="TASKS", help="run only these tasks (comma-separated names)")
    p.add_argument(
        "--no-drop",
        action="store_true",
        help="never drop a sample: the run ends when every task has processed every input",
    )
    p.add_argument(
        "--cpus",
        type=float,
        metavar="X",
        help="confine all task containers to X CPUs (a parent cgroup), e.g. a Pi's envelope",
    )
    p.add_argument(
        "--memory",
        type=memory_arg,
        metavar="SIZE",
        help="confine all task containers to SIZE of memory, e.g. 1Gi",
    )
    p.set_defaults(func=cmd_run)

    from ctxrobot.service.control import default_socket

    socket_help = (
        f"daemon control socket (default: {default_socket()}; env CTXROBOT_CONTROL_SOCKET)"
    )

    p = sub.add_parser(
        "daemon",
        help="run the robot as a service with a control API (see config/systemd/)",
        description="Run the manifest until stopped (the scenario replays in a loop), restart "
        "crashed tasks with back-off, and serve a control API on a Unix socket (mode 0660, "
        "owned by --read-group): readers may ask for status, context and ps; operators may "
        "also override, reload, start/stop tasks and shut down. SIGTERM/SIGINT: stop tasks, "
        "flush the run database, exit 0.",
    )
    # Every start records into a new run folder: the window must hold across restarts too.
    _add_robot_options(
        p,
        keep_also="; the run folders beside this one whose runs last recorded more than HOURS "
        "ago are removed (at the start, then every 10 minutes)",
    )
    p.add_argument("--socket", default=str(default_socket()), metavar="PATH", help=socket_help)
    p.add_argument(
        "--read-group",
        metavar="GROUP",
        help="group that may read status, context and ps (default: the daemon's own group); "
        "operators must be members too, the socket belongs to it",
    )
    p.add_argument(
        "--operator-group",
        metavar="GROUP",
        help="group that may also override, reload, start/stop tasks and shut down "
        "(default: only root and the daemon's own user)",
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one JSON object per log line (for journald and log shippers)",
    )
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser(
        "ctl",
        help="talk to a running daemon: status, context override, reload, task control",
        description="Send one request to the daemon's control API and print the JSON answer.",
    )
    p.add_argument("--socket", default=str(default_socket()), metavar="PATH", help=socket_help)
    p.add_argument("--json", action="store_true", help="compact JSON on one line")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("status", help="the full status document (tasks, context, actuation)")
    actions.add_parser("context", help="current context signals, overrides and active rules")
    o = actions.add_parser(
        "override",
        help="pin context signals, e.g. voice_active=true speed=0.5",
        description="Pin context signals to values until cleared, to test a robot on the "
        'bench. Values are JSON (true, 0.5, "moving") or plain strings.',
    )
    o.add_argument("signals", nargs="+", metavar="NAME=VALUE")
    actions.add_parser("clear-override", help="remove every pinned signal")
    actions.add_parser("reload", help="re-read the manifest's rules (tasks keep running)")
    for verb in ("stop", "start", "restart"):
        t = actions.add_parser(verb, help=f"{verb} one task's container")
        t.add_argument("task", metavar="TASK")
    actions.add_parser("ps", help="the daemon's containers")
    actions.add_parser("shutdown", help="stop the daemon cleanly")
    p.set_defaults(func=cmd_ctl)

    p = sub.add_parser(
        "dash",
        help="live terminal dashboard of a running daemon",
        description="Per task: state, criticality, CPU allocated vs used, latency "
        "p50/p95/p99 with a sparkline, deadline misses, drops; context signals, active "
        "rules and actuation latency. Keys: q quit, p pause, s sort, arrows/enter select.",
    )
    p.add_argument("--socket", default=str(default_socket()), metavar="PATH", help=socket_help)
    p.add_argument("--once", action="store_true", help="print one plain-text snapshot and exit")
    p.add_argument("--json", action="store_true", help="print one status document as JSON")
    p.add_argument(
        "--width",
        type=int,
        metavar="COLS",
        help="snapshot width with --once (default: the terminal's)",
    )
    p.add_argument(
        "--interval", type=float, default=0.25, metavar="S", help="refresh period (default 0.25)"
    )
    p.set_defaults(func=cmd_dash)

    p = sub.add_parser(
        "ps",
        help="list ctxrobot containers with their state and CPU allocation",
        description="List every container ctxrobot manages (found by label), with its "
        "state and the CPU weight, cap and freeze state read from its cgroup. Asks the "
        "daemon when one answers on --socket.",
    )
    p.add_argument("--socket", default=str(default_socket()), metavar="PATH", help=socket_help)
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser(
        "eval",
        help="run a task's evaluator in its container on a dataset folder",
        description="Run TASK's evaluator in its container, on DATASET mounted read-only, on "
        "one CPU, and print its metrics. Layouts: slam = *_laser.txt.gz + *_odom.txt + "
        "laser.yaml [+ *.relations]; signs = images/ + annotations/ (VOC) and/or Images/ + "
        "GT-*.csv; speech = audio/*.wav + transcripts.tsv. Arguments after -- go to the evaluator "
        "(`-- --max-scans 500`, `-- --mode command`); a host path among them (with a /) is "
        "mounted read-only under /host for it (`-- --models ~/models`).",
    )
    p.add_argument("task", choices=["slam", "signs", "speech"])
    p.add_argument("dataset", type=Path, metavar="DATASET_DIR")
    p.add_argument("--json", action="store_true", help="last line: one JSON object of metrics")
    p.add_argument(
        "--cpu",
        type=int,
        metavar="N",
        help="the CPU to pin the evaluation to (default: 1, away from cpu 0's interrupts; "
        "cpu 0 on a one-CPU machine); two evaluations on two CPUs do not disturb each other",
    )
    p.add_argument("--map-out", type=Path, metavar="DIR", help="slam: write the map to DIR")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "report",
        help="render PNG plots of a run",
        description="Plot latency over time per task with context bands, stacked CPU "
        "allocation, and the actuation-latency histogram of a run.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="DIR", help="where to write the PNGs (default: RUN_DIR/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "trace",
        help="export a run as a Chrome/Perfetto trace",
        description="Write a trace-event JSON (open it in ui.perfetto.dev): one track per "
        "task, samples as slices, context changes as instants.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--out",
        metavar="PATH",
        help="output file, or a folder for trace.json (default: RUN_DIR/trace.json)",
    )
    p.set_defaults(func=cmd_trace)

    from ctxrobot.data.fetch import add_data_parser

    add_data_parser(sub)
    from ctxrobot.streams.record import add_record_parser

    add_record_parser(sub)

    from ctxrobot.bench.bench import add_bench_parser

    add_bench_parser(sub)

    from ctxrobot.bench.sim.cli import add_sim_parser

    add_sim_parser(sub)
    return parser


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: journald and log shippers parse fields, not prose."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` belongs to the evaluator (`ctxrobot eval slam DIR -- --max-scans 9`).
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    if extra and args.command != "eval":
        parser.error(f"arguments after -- are only for `eval`: {' '.join(extra)}")
    args.extra = extra
    handler = logging.StreamHandler(sys.stderr)
    if getattr(args, "log_format", "text") == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    # SIGTERM (systemd, `kill`, a CI timeout) unwinds like Ctrl-C, so every command's cleanup
    # runs: an evaluation's container is removed, a recording keeps what it wrote. `run` and
    # `daemon` replace this with a graceful stop while they run.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return _run_command(args)


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    log.warning("%s received: stopping", signal.Signals(signum).name)
    sys.exit(128 + signum)


def _run_command(args: argparse.Namespace) -> int:
    """Run the subcommand; a problem the user can fix is one line and exit 2, anything else
    one line and exit 1 — never a traceback unless `-v` asks for it."""
    from ctxrobot.manifest.problems import ManifestError

    try:
        return int(args.func(args))
    except ManifestError as err:
        # Compiler-style `file:line:col: problem` lines, one per problem, as `validate` prints.
        print(err, file=sys.stderr)
        return EXIT_USAGE
    except UserError as err:
        log.debug("details", exc_info=True)
        print(f"ctxrobot {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        log.debug("details", exc_info=True)
        hint = "" if args.verbose else " (run with -v for the details)"
        print(f"ctxrobot {args.command}: {type(err).__name__}: {err}{hint}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
