"""`chatpipe` command line: one sub-command per component, plus `dev` (everything on one machine).

Configuration comes from `CHATPIPE_*` environment variables (see README); flags override them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from chatpipe.runtime.config import Settings

log = logging.getLogger("chatpipe")

#: Set by `chatpipe dev` for its children: a file the child creates once it is ready.
READY_FILE_ENV = "CHATPIPE_READY_FILE"


def _ready_callback(env: dict[str, str], name: str) -> Callable[[], None]:
    path = env.get(READY_FILE_ENV)

    def ready() -> None:
        log.info("%s ready", name)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(str(os.getpid()))

    return ready


def cmd_dev(settings: Settings, args: argparse.Namespace, env: dict[str, str]) -> int:
    from chatpipe.dev import run_dev

    return run_dev(settings, env)


def cmd_ingest(settings: Settings, args: argparse.Namespace, env: dict[str, str]) -> int:
    from chatpipe.runtime.serve import run, serve_until_signal
    from ingest.app import create_app, fast_dispatch

    if not (settings.webhook_token or settings.oauth_client_id or settings.insecure):
        return _refuse_open("ingest", "CHATPIPE_WEBHOOK_TOKEN (or CHATPIPE_OAUTH_CLIENT_ID/_SECRET)")
    if settings.ingest_workers > 1 and args.worker_index is None:
        return _ingest_workers(settings, env)
    index = args.worker_index or 0
    app = create_app(settings, spool_dir=settings.state_dir / "spool" / f"ingest-{index}")
    run(
        serve_until_signal(
            app,
            settings.ingest_host,
            settings.ingest_port,
            _ready_callback(env, "ingest"),
            reuse_port=args.reuse_port or args.worker_index is not None,
            dispatch=fast_dispatch,
            header_timeout=settings.ingest_header_timeout,
        ),
        settings.event_loop,
    )
    return 0


def _ingest_workers(settings: Settings, env: dict[str, str]) -> int:
    """N ingest processes sharing one port (SO_REUSEPORT), each with its own spool; stop them together."""
    import subprocess
    import time

    ready_base = env.get(READY_FILE_ENV) or str(settings.state_dir / "run" / "ingest")
    ready_files = [Path(f"{ready_base}.{i}") for i in range(settings.ingest_workers)]
    for f in ready_files:
        f.unlink(missing_ok=True)
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "chatpipe.cli", "ingest", "--worker-index", str(i)],
            env={
                **env,
                READY_FILE_ENV: str(ready_files[i]),
                **({INSECURE_ENV: "1"} if settings.insecure else {}),
            },
        )
        for i in range(settings.ingest_workers)
    ]
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    log.info("started %d ingest workers on port %d", len(children), settings.ingest_port)
    code = 0
    ready = False
    while not stopping:
        if not ready and all(f.exists() for f in ready_files):
            ready = True
            _ready_callback(env, "ingest")()
        dead = [c for c in children if c.poll() is not None]
        if dead:
            log.error("ingest worker pid=%d exited with %s", dead[0].pid, dead[0].returncode)
            code = 1
            break
        time.sleep(0.2)
    for c in children:
        if c.poll() is None:
            c.send_signal(signal.SIGTERM)
    for c in children:
        c.wait()
    return code


def cmd_worker(settings: Settings, args: argparse.Namespace, env: dict[str, str]) -> int:
    from processors.runner import run_worker

    return run_worker(settings, _ready_callback(env, "worker"))


def cmd_sink(settings: Settings, args: argparse.Namespace, env: dict[str, str]) -> int:
    from aiohttp import web

    from chatpipe.runtime.serve import add_health_routes, serve_in_thread
    from chatpipe.runtime.tuning import tune_gc
    from sinks.connect import open_store
    from sinks.worker import SinkWorker, pii_policy

    if args.migrate_only:
        store = open_store(settings.store_url, pii_policy(settings))
        store.migrate()
        store.close()
        print("migrations applied")
        return 0
    worker = SinkWorker(settings)
    if settings.metrics_port:
        app = web.Application()
        assigned = worker.assigned
        add_health_routes(app, worker.metrics_registry, lambda: (True, {"assigned": assigned.is_set()}))
        serve_in_thread(app, settings.api_host, settings.metrics_port)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.stop())
    tune_gc()  # started: what is alive now lives as long as the process
    worker.run(on_ready=_ready_callback(env, "sink"))
    return 0


def cmd_api(settings: Settings, args: argparse.Namespace, env: dict[str, str]) -> int:
    from chatpipe.runtime.serve import run, serve_until_signal
    from sinks.api import create_app, load_api_keys

    try:
        keys = load_api_keys(settings)
    except (ValueError, OSError) as exc:
        print(f"chatpipe: configuration error: {exc}", file=sys.stderr)
        return 2
    if not (keys or settings.insecure):
        return _refuse_open("api", "CHATPIPE_API_KEYS or CHATPIPE_API_KEYS_FILE")
    app = create_app(settings)
    ready = _ready_callback(env, "api")
    run(serve_until_signal(app, settings.api_host, settings.api_port, ready), settings.event_loop)
    return 0


INSECURE_ENV = "CHATPIPE_INSECURE"


def _refuse_open(command: str, what: str) -> int:
    """A production service never starts open by accident: it needs credentials or an explicit --insecure."""
    print(
        f"chatpipe {command}: refusing to start without authentication: set {what}, "
        f"or pass --insecure ({INSECURE_ENV}=1) to serve anyone",
        file=sys.stderr,
    )
    return 2


def cmd_reconcile(settings: Settings, args: argparse.Namespace, env: dict[str, str]) -> int:
    from chatpipe.reconciler import run_reconciler

    return run_reconciler(settings, _ready_callback(env, "reconcile"))


def cmd_registry(settings: Settings, args: argparse.Namespace, env: dict[str, str]) -> int:
    from chatpipe.runtime.serve import run, serve_until_signal
    from schemas.registry import create_registry_app

    storage = Path(args.storage) if args.storage else settings.state_dir / "registry.json"
    app = create_registry_app(storage)
    run(serve_until_signal(app, args.host, args.port, _ready_callback(env, "registry")), settings.event_loop)
    return 0


def cmd_topics(settings: Settings, args: argparse.Namespace, env: dict[str, str]) -> int:
    from chatpipe.runtime.topics import ensure_topics

    created = ensure_topics(settings, settings.partitions, settings.replication_factor)
    print("created: " + (", ".join(created) or "nothing (all topics exist)"))
    return 0


def cmd_schemas(settings: Settings, args: argparse.Namespace, env: dict[str, str]) -> int:
    from schemas import evolution

    if args.action == "check":
        return evolution.cmd_check([] if args.schema_dir is None else ["--schema-dir", str(args.schema_dir)])
    if args.action == "release":
        return evolution.cmd_release(
            [] if args.schema_dir is None else ["--schema-dir", str(args.schema_dir)]
        )
    return evolution.cmd_register(args.url or settings.schema_registry_url)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatpipe",
        description="Stream-processing pipeline for 8x8 Chat Apps webhooks: "
        "ingest -> Kafka (Avro) -> Faust -> PostgreSQL/SQLite -> read API.",
        epilog="Configuration: CHATPIPE_* environment variables (see README); flags override them.",
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (env CHATPIPE_LOG_LEVEL)")
    parser.add_argument("--log-format", choices=["text", "json"], help="env CHATPIPE_LOG_FORMAT")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("dev", help="run the whole pipeline on this machine with embedded defaults")
    p.add_argument("--ingest-port", type=int, help="env CHATPIPE_INGEST_PORT (default 8080)")
    p.add_argument("--api-port", type=int, help="env CHATPIPE_API_PORT (default 8081)")
    p.add_argument("--state-dir", type=Path, help="where state lives (default .chatpipe)")
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("ingest", help="run the webhook ingest service")
    p.add_argument("--port", dest="ingest_port", type=int, help="env CHATPIPE_INGEST_PORT")
    p.add_argument("--host", dest="ingest_host", help="env CHATPIPE_INGEST_HOST")
    p.add_argument(
        "--reuse-port", action="store_true", help="SO_REUSEPORT: let several ingest processes share the port"
    )
    p.add_argument(
        "--workers",
        dest="ingest_workers",
        type=int,
        help="run N ingest processes on the port (env CHATPIPE_INGEST_WORKERS)",
    )
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="start without CHATPIPE_WEBHOOK_TOKEN or OAuth2: accept webhooks from anyone "
        "(env CHATPIPE_INSECURE)",
    )
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("worker", help="run the Faust stream processor")
    p.add_argument(
        "--web-port",
        dest="worker_web_port",
        type=int,
        help="port of the worker's /healthz and /metrics (env CHATPIPE_WORKER_WEB_PORT)",
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("sink", help="run the store sink (PostgreSQL or SQLite)")
    p.add_argument("--migrate-only", action="store_true", help="apply database migrations and exit")
    p.add_argument("--metrics-port", type=int, help="serve /healthz and /metrics on this port")
    p.set_defaults(func=cmd_sink)

    p = sub.add_parser("api", help="run the read API")
    p.add_argument("--port", dest="api_port", type=int, help="env CHATPIPE_API_PORT")
    p.add_argument("--host", dest="api_host", help="env CHATPIPE_API_HOST")
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="start without CHATPIPE_API_KEYS: serve every subaccount's data to anyone "
        "(env CHATPIPE_INSECURE)",
    )
    p.set_defaults(func=cmd_api)

    p = sub.add_parser(
        "reconcile",
        help="look up messages stuck in a non-final state with 8x8's Retrieve message details API "
        "(off unless CHATPIPE_8X8_API_KEY is set)",
    )
    p.add_argument("--metrics-port", type=int, help="serve /healthz and /metrics on this port")
    p.add_argument(
        "--reconcile-after",
        dest="reconcile_after",
        type=float,
        help="seconds without a status change before a lookup (env CHATPIPE_RECONCILE_AFTER, default 900)",
    )
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("registry", help="run the embedded Confluent-compatible schema registry")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8085)
    p.add_argument("--storage", help="JSON file holding the schemas (default STATE_DIR/registry.json)")
    p.set_defaults(func=cmd_registry)

    p = sub.add_parser("topics", help="create chatpipe's topics on the configured broker")
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("schemas", help="check schema evolution, register subjects, release versions")
    p.add_argument(
        "action",
        choices=["check", "register", "release"],
        help="check: every .avsc is compatible (FULL unless it says otherwise) with every released "
        "version under schemas/history; register: register every subject with the registry; "
        "release: snapshot changed schemas as the next released version",
    )
    p.add_argument("--url", help="registry for `register` (env CHATPIPE_SCHEMA_REGISTRY_URL)")
    p.add_argument("--schema-dir", type=Path, help="directory of .avsc files (default: the installed ones)")
    p.set_defaults(func=cmd_schemas)

    from chatpipe.configref import add_config_parser
    from chatpipe.export import add_export_parser
    from chatpipe.replay import add_replay_parser
    from chatpipe.simulate import add_simulate_parser
    from chatpipe.verify import add_verify_parser

    add_simulate_parser(sub)
    add_verify_parser(sub)
    add_replay_parser(sub)
    add_config_parser(sub)
    add_export_parser(sub)
    return parser


_FLAG_FIELDS = (
    "ingest_workers",
    "ingest_port",
    "ingest_host",
    "api_port",
    "api_host",
    "state_dir",
    "worker_web_port",
    "metrics_port",
    "log_level",
    "log_format",
    "reconcile_after",
    "insecure",
)


def main(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    args = build_parser().parse_args(argv)
    overrides = {k: getattr(args, k, None) for k in _FLAG_FIELDS}
    try:
        settings = Settings.from_env(env, **overrides)
    except ValueError as exc:
        print(f"chatpipe: configuration error: {exc}", file=sys.stderr)
        return 2
    from chatpipe.runtime.serve import setup_logging

    setup_logging(settings.log_level, settings.log_format, args.command)
    try:
        return int(args.func(settings, args, env) or 0)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
