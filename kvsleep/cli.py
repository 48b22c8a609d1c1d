"""The `kvsleep` command: serve, check-config, sim-engine, simulate, and a small admin client."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from kvsleep import __version__
from kvsleep.config import Config, ConfigError, config_schema, load_config, summary
from kvsleep.eventloop import return_large_buffers_to_the_os, run_event_loop
from kvsleep.web.server import KvsleepServer

if TYPE_CHECKING:
    from kvsleep.lab.simulate import Trace

log = logging.getLogger("kvsleep")

DEFAULT_URL = "http://127.0.0.1:8080"


def _setup_logging(level: str, json_logs: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:

        class _Json(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                return json.dumps(
                    {
                        "ts": record.created,
                        "level": record.levelname,
                        "logger": record.name,
                        "msg": record.getMessage(),
                    }
                )

        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _default_config_path() -> str:
    return str(resources.files("kvsleep") / "demo.yaml")


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file, secrets=False)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    _print_warnings(config)
    print(summary(config))
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    print(json.dumps(config_schema(), indent=2))
    return 0


def _print_warnings(config: Config) -> None:
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level, args.log_json)
    path = args.config or _default_config_path()
    if args.config is None:
        log.info("no --config given: running the embedded demo (%s)", path)
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(
            f"kvsleep: refusing to start: {len(exc.problems)} configuration problem(s)",
            file=sys.stderr,
        )
        return 2
    overrides = functools.partial(_command_line_overrides, args)
    return_large_buffers_to_the_os()
    try:
        return run_event_loop(_serve(overrides(config), path, overrides))
    except KeyboardInterrupt:
        return 0


def _command_line_overrides(args: argparse.Namespace, config: Config) -> Config:
    """What `serve`'s flags change in a config file; applied to every reload as well, so that a
    reload does not see them as changes that take a restart."""
    if args.config is None:
        # The embedded file lives in the installed package: keep its state and logs in the
        # working directory instead.
        config = dataclasses.replace(config, state_dir=".kvsleep-state", log_dir=".kvsleep-logs")
    if args.attach:
        config = dataclasses.replace(config, attach=True)
    if args.host is not None or args.port is not None:
        router = config.router
        config = dataclasses.replace(
            config,
            router=dataclasses.replace(
                router,
                host=router.host if args.host is None else args.host,
                port=router.port if args.port is None else args.port,
            ),
        )
    return config


async def _serve(config: Config, path: str, overrides: Callable[[Config], Config]) -> int:
    """Bind first (a taken port launches nothing), listen at once (requests for engines still
    starting are held), then launch; SIGTERM is honoured at any point."""
    from kvsleep.control.launcher import Launcher, LaunchError
    from kvsleep.web.connections import bind
    from kvsleep.web.server import KvsleepServer, serve

    cfg = config.router
    try:
        sock = bind(cfg.host, cfg.port)
    except OSError as exc:
        print(
            f"kvsleep: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 2
    server = KvsleepServer(config, config_path=path, overrides=overrides)
    hidden = [cfg.admin_token_env] if cfg.admin_token_env else []
    launcher = Launcher(
        server.manager, server.metrics, config.log_dir, config.state_dir, hidden_env=hidden
    )
    server.launcher = launcher
    launched = [m for m in config.models if m.launched and not config.attach]
    launcher.prepare(launched)
    server.launching = bool(launched)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_on_hup, server)
    if config.attach:
        _log_attach(config)
    serving = asyncio.create_task(serve(server, stop, sock), name="kvsleep-serve")
    launching = asyncio.create_task(launcher.start(), name="kvsleep-launch")
    stopped = asyncio.create_task(stop.wait())
    code = 0
    try:
        await asyncio.wait({launching, stopped, serving}, return_when=asyncio.FIRST_COMPLETED)
        if launching.done():
            launching.result()  # a LaunchError ends kvsleep
            server.launching = False
            await asyncio.wait({stopped, serving}, return_when=asyncio.FIRST_COMPLETED)
    except LaunchError as exc:
        print(f"kvsleep: {exc}", file=sys.stderr)
        code = 1
    finally:
        launching.cancel()
        with contextlib.suppress(asyncio.CancelledError, LaunchError):
            await launching
        stop.set()
        stopped.cancel()
        try:
            await serving
        finally:
            await launcher.stop()
    return code


def _log_attach(config: Config) -> None:
    log.info("attach mode: routing to %d running engines, launching none", len(config.models))
    host = config.router.host
    if host in ("localhost", "127.0.0.1", "::1"):
        log.info(
            "listening on %s only (kvcached's frontend listens on 0.0.0.0): to serve other "
            "machines set router.host (router_host) to 0.0.0.0, and router.admin_token_env "
            "so that control routes need a token",
            host,
        )


def _reload_on_hup(server: KvsleepServer) -> None:
    # A bad file is logged by reload_config and the running configuration stays.
    with contextlib.suppress(ConfigError):
        server.reload_config()


def cmd_sim_engine(args: argparse.Namespace) -> int:
    from kvsleep.sim.engine import main_sim, settings_from_args

    _setup_logging(args.log_level, False)
    return main_sim(settings_from_args(args)) or 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from kvsleep.config import parse_config
    from kvsleep.lab import simulate, traces

    try:
        if args.config:
            config = load_config(args.config, secrets=False)
        elif args.synthetic:
            config = parse_config(traces.SYNTHETIC_CONFIG, "<synthetic models>")
        else:
            print(
                "kvsleep simulate: --config is required with --trace and --prometheus",
                file=sys.stderr,
            )
            return 2
        sweep = (
            tuple(float(x) for x in args.thresholds.split(",") if x.strip())
            if args.thresholds
            else simulate.DEFAULT_SWEEP
        )
        wake_history: dict[str, float] = {}
        if args.trace:
            trace = simulate.load_csv(args.trace)
        elif args.synthetic:
            trace = traces.synthetic(args.synthetic, args.seed)
        else:
            end = simulate._timestamp(args.end) if args.end else time.time()
            trace, wake_history = simulate.trace_from_prometheus(
                args.prometheus, simulate.parse_duration(args.range), end
            )
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    except (simulate.TraceError, ValueError, KeyError) as exc:
        print(f"kvsleep simulate: {exc}", file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError) as exc:
        print(f"kvsleep simulate: cannot read {args.prometheus}: {exc}", file=sys.stderr)
        return 1
    _print_warnings(config)
    if args.save_trace:
        simulate.write_csv(trace, args.save_trace)
    if args.replicas is not None:
        return _simulate_replicas(args, config, trace, wake_history)
    comparison = simulate.simulate_config(
        config,
        trace,
        wake_history=wake_history,
        sweep=sweep,
        sleep_seconds=args.sleep_seconds,
        timeline=bool(args.plot),
    )
    if args.json:
        print(json.dumps(comparison.as_dict(), indent=2))
    else:
        print(simulate.format_table(comparison))
    if args.plot:
        try:
            simulate.plot(comparison, args.plot)
        except ImportError:
            print(
                "kvsleep simulate: --plot needs matplotlib (pip install 'kvsleep[plot]')",
                file=sys.stderr,
            )
            return 1
    return 0


def _simulate_replicas(
    args: argparse.Namespace, config: Config, trace: Trace, wake_history: dict[str, float]
) -> int:
    """`kvsleep simulate --replicas N`: warm vs cold autoscaling vs always-on (lab/autoscale)."""
    from kvsleep.core.scaling import ScalingPolicy
    from kvsleep.lab import autoscale, simulate

    try:
        if args.thresholds or args.plot:
            raise ValueError("--thresholds and --plot compare idle thresholds, not --replicas")
        strategies = autoscale.parse_strategies(args.strategies)
        names = trace.models
        if args.model is not None:
            if args.model not in names:
                raise ValueError(f"--model {args.model}: no request for it in the trace")
            names = [args.model]
        if not names:
            raise ValueError("the trace has no requests")
        models, configured, notes = autoscale.lab_models(config, names, wake_history)
        models = autoscale.with_wake(models, args.wake_seconds)
        # The model's `scaling:` block (else the config's defaults), the options given on top.
        given = {
            key: value
            for key in (
                "min_awake",
                "max_awake",
                "target_in_flight",
                "scale_up_after_seconds",
                "scale_down_after_seconds",
            )
            if (value := getattr(args, key)) is not None
        }
        scaling = {
            name: dataclasses.replace(policy, **given) for name, policy in configured.items()
        }
        default = dataclasses.replace(ScalingPolicy(), **given)
        for policy in [default, *scaling.values()]:
            if policy.max_awake is not None and policy.min_awake > policy.max_awake:
                raise ValueError(
                    f"min_awake {policy.min_awake} is more than max_awake {policy.max_awake}"
                )
        settings = autoscale.LabSettings(
            replicas=args.replicas,
            scaling=default,
            capacity=args.capacity,
            cold_start_seconds=args.cold_start_seconds,
            asleep_gb=args.asleep_gb,
            check_seconds=args.check_seconds or simulate.tick_interval(config, models),
            sleep_seconds=args.sleep_seconds,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"kvsleep simulate: {exc}", file=sys.stderr)
        return 2
    comparison = autoscale.compare_scaling(trace, models, settings, strategies, notes, scaling)
    if args.json:
        print(json.dumps(comparison.as_dict(), indent=2))
    else:
        print(autoscale.format_scaling(comparison))
    return 0


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def _non_negative(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return number


def _positive(value: str) -> float:
    number = _non_negative(value)
    if number == 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {value}")
    return number


def _admin(
    args: argparse.Namespace, method: str, path: str, show: Callable[[Any], str] | None = None
) -> int:
    token = args.token or os.environ.get("KVSLEEP_ADMIN_TOKEN")
    req = urllib.request.Request(args.url.rstrip("/") + path, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            body, ok = resp.read(), True
    except urllib.error.HTTPError as exc:
        body, ok = exc.read(), False
    except (urllib.error.URLError, OSError) as exc:
        print(f"kvsleep: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    try:
        doc = json.loads(body)
    except ValueError:
        print(body.decode(errors="replace"))
    else:
        print(show(doc) if ok and show is not None else json.dumps(doc, indent=2))
    return 0 if ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    from kvsleep.web.status_page import status_table

    return _admin(args, "GET", "/sleep/status", None if args.json else status_table)


def _url(value: str) -> str:
    """`host:port` is taken to mean `http://host:port`, as curl does."""
    return value if "://" in value else f"http://{value}"


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0-65535)")
    return port


def cmd_sleep(args: argparse.Namespace) -> int:
    return _admin(args, "POST", f"/models/{urllib.parse.quote(args.model, safe='')}/sleep")


def cmd_wake(args: argparse.Namespace) -> int:
    return _admin(args, "POST", f"/models/{urllib.parse.quote(args.model, safe='')}/wake")


def cmd_adopt(args: argparse.Namespace) -> int:
    model = urllib.parse.quote(args.model, safe="")
    return _admin(args, "POST", f"/models/{model}/adopt?state={args.state}")


def build_parser() -> argparse.ArgumentParser:
    from kvsleep.sim.engine import add_sim_arguments

    parser = argparse.ArgumentParser(
        prog="kvsleep",
        description="Route OpenAI traffic by model and put idle vLLM/SGLang engines to sleep.",
    )
    parser.add_argument("--version", action="version", version=f"kvsleep {__version__}")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the router, the reconcile loop and launched engines")
    serve.add_argument("--config", help="YAML config (default: the embedded two-engine demo)")
    serve.add_argument(
        "--attach",
        action="store_true",
        help="route to the engines the config names without launching them "
        "(as the config key attach: true)",
    )
    serve.add_argument("--log-level", default="info", help="debug, info, warning, error")
    serve.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    serve.add_argument("--host", help="listen on this address (overrides router.host)")
    serve.add_argument("--port", type=_port, help="listen on this port (overrides router.port)")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file (exit 2 on problems)")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    schema = sub.add_parser(
        "config-schema",
        help="print the JSON Schema of the config file (for editors: see README, Configure)",
    )
    schema.set_defaults(func=cmd_config_schema)

    sim = sub.add_parser("sim-engine", help="run a simulated vLLM or SGLang engine (no GPU)")
    add_sim_arguments(sim)
    sim.add_argument("--log-level", default="info")
    sim.set_defaults(func=cmd_sim_engine)

    simulate = sub.add_parser(
        "simulate",
        help="replay request arrivals through the sleep policy; compare thresholds",
        description="Replay per-model request arrivals through the same policy code the live "
        "reconciler runs, on a virtual clock, and compare always-on, the config's thresholds, "
        "a fixed 300 s, adaptive thresholds and a sweep of fixed ones.",
    )
    simulate.add_argument(
        "--config",
        help="kvsleep config: models, memory_gb, wake_eta_seconds, "
        "policy (optional with --synthetic)",
    )
    source = simulate.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", metavar="CSV", help="timestamp,model,duration per request")
    source.add_argument(
        "--prometheus",
        metavar="URL",
        help="rebuild arrivals from kvsleep's own metrics in this Prometheus",
    )
    source.add_argument(
        "--synthetic",
        choices=["poisson", "bursty", "diurnal", "batch", "step", "sine"],
        help="a seeded synthetic trace (see kvsleep/lab/traces.py; step and sine are "
        "busy enough for --replicas)",
    )
    simulate.add_argument("--range", default="7d", help="with --prometheus: how far back (7d)")
    simulate.add_argument(
        "--end", help="with --prometheus: end of the range, Unix time or ISO 8601 (default: now)"
    )
    simulate.add_argument("--seed", type=int, default=0, help="with --synthetic")
    simulate.add_argument(
        "--thresholds",
        help="fixed thresholds to sweep, comma-separated seconds (default: 15 to 3600)",
    )
    simulate.add_argument(
        "--sleep-seconds",
        type=float,
        default=0.0,
        help="how long a sleep takes in the replay (default: instant)",
    )
    simulate.add_argument("--json", action="store_true", help="print JSON instead of the table")
    simulate.add_argument(
        "--plot",
        metavar="PNG",
        help="plot memory held over time, wakes "
        "marked (needs matplotlib: pip install 'kvsleep[plot]')",
    )
    simulate.add_argument("--save-trace", metavar="CSV", help="also write the replayed trace")
    lab = simulate.add_argument_group(
        "replicas (warm autoscaling vs cold autoscaling vs always-on)",
        "With --replicas N each model of the trace runs as N replicas, scaled by the warm "
        "autoscaler (sleep/wake), by the same decisions paying engine starts (cold), or all "
        "awake; see README, Warm autoscaling in the policy lab.",
    )
    lab.add_argument(
        "--replicas", type=_positive_int, metavar="N", help="replicas per model (e.g. 3)"
    )
    lab.add_argument(
        "--strategies",
        default=",".join(("warm", "cold", "always-on")),
        help="comma-separated: warm, cold, always-on (default: all three)",
    )
    lab.add_argument("--model", help="only this model of the trace")
    lab.add_argument(
        "--capacity",
        type=_positive_int,
        default=12,
        help="requests one replica serves at once; more queue in it (default 12)",
    )
    lab.add_argument(
        "--wake-seconds",
        type=_non_negative,
        help="wake latency (default: the model's wake_eta_seconds or wake history)",
    )
    lab.add_argument(
        "--cold-start-seconds",
        type=_non_negative,
        default=90.0,
        help="engine start latency of a cold step up (default 90)",
    )
    lab.add_argument(
        "--asleep-gb",
        type=_non_negative,
        default=0.0,
        help="GPU memory an asleep replica still holds (default 0)",
    )
    lab.add_argument(
        "--check-seconds",
        type=_positive,
        help="how often the scaler decides (default: the config's check_interval_seconds)",
    )
    # The scaler's keys: default the model's `scaling:` block, else the config's defaults.
    for flag, kind, meta, text, default in (
        ("--min-awake", _non_negative_int, "N", "replicas kept awake (0: scale to zero)", "0"),
        ("--max-awake", _positive_int, "N", "most replicas awake at once", "all"),
        ("--target-in-flight", _positive, "N", "requests one awake replica should carry", "8"),
        ("--scale-up-after-seconds", _non_negative, "S", "above target this long: wake one", "5"),
        ("--scale-down-after-seconds", _non_negative, "S", "fits in fewer: sleep one", "120"),
    ):
        lab.add_argument(
            flag,
            type=kind,
            metavar=meta,
            help=f"{text} (default: the model's scaling block, else {default})",
        )
    simulate.set_defaults(func=cmd_simulate)

    for name, func, helptext in (
        ("status", cmd_status, "show every model's sleep state"),
        ("sleep", cmd_sleep, "put a model to sleep (drains first)"),
        ("wake", cmd_wake, "wake a model"),
        (
            "adopt",
            cmd_adopt,
            "say what a model's engine is (asleep or awake), for a model in state unknown",
        ),
    ):
        p = sub.add_parser(name, help=helptext)
        if name != "status":
            p.add_argument("model")
        if name == "adopt":
            p.add_argument(
                "state",
                choices=("asleep", "awake"),
                help="asleep: its memory is released; awake: it holds its memory (after an "
                "interrupted wake, kvsleep finishes the wake's remaining steps first)",
            )
        p.add_argument(
            "--url",
            type=_url,
            default=os.environ.get("KVSLEEP_URL", DEFAULT_URL),
            help=f"kvsleep address, URL or host:port (default {DEFAULT_URL}, or $KVSLEEP_URL)",
        )
        p.add_argument("--token", help="admin bearer token (default $KVSLEEP_ADMIN_TOKEN)")
        p.add_argument("--timeout", type=float, default=600.0)
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the raw JSON document")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `kvsleep`: what it can do, not an error
        parser.print_help()
        return 0
    return args.func(args)
