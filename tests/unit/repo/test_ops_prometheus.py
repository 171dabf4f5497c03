"""ops/prometheus: the alert rules name only metrics and labels the services really export
(chatpipe/runtime/metric_defs.py, or a documented exporter's), cover what the operations guide promises, and
Prometheus scrapes every chatpipe service of compose.yaml on the port it serves /metrics on. Where
promtool is installed (Debian's `prometheus` package; scripts/test installs it), the config and the rules
are also checked by promtool and the alerts unit-tested (ops/prometheus/alerts.test.yml)."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from chatpipe.runtime import metric_defs

ROOT = Path(__file__).resolve().parents[3]
OPS = ROOT / "ops" / "prometheus"
SOURCES = [ROOT / d for d in ("chatpipe", "ingest", "processors", "sinks")]

#: metrics of other exporters the rules may use, with their labels (as their documentation gives them)
EXTERNAL = {
    "up": {"job", "instance"},  # Prometheus, per target
    # danielqsj/kafka_exporter (compose.yaml's kafka-exporter), README "Metrics": Consumer Groups
    "kafka_consumergroup_lag": {"consumergroup", "topic", "partition"},
    "kafka_consumergroup_lag_sum": {"consumergroup", "topic"},
}
#: labels Prometheus itself adds to every scraped series
TARGET_LABELS = {"job", "instance"}
FUNCTION_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
OPERATOR_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2"}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                "topk", "quantile"}  # fmt: skip


def exported() -> dict[str, set[str]]:
    """Every series name the services export, with its label names (histograms and counters expanded
    as the text format writes them: _bucket/_sum/_count with `le`, _total, _created)."""
    names: dict[str, set[str]] = {}
    classes = [c for n, c in inspect.getmembers(metric_defs, inspect.isclass) if n.endswith("Metrics")]
    assert len(classes) >= 5, classes
    for cls in classes:
        registry = CollectorRegistry()
        metrics = cls(registry)
        for metric in vars(metrics).values():
            kind = getattr(metric, "_type", None)
            labels = set(getattr(metric, "_labelnames", ()))
            if isinstance(metric, metric_defs.LoopHistogram):
                kind, name = "histogram", metric.name
            else:
                name = metric._name
            if kind == "counter":
                names[name + "_total"] = labels
                names[name + "_created"] = labels
            elif kind == "gauge":
                names[name] = labels
            elif kind == "histogram":
                names[name + "_bucket"] = labels | {"le"}
                names[name + "_sum"] = labels
                names[name + "_count"] = labels
            else:
                raise AssertionError(f"{cls.__name__}: unexpected metric {metric!r}")
    return names


EXPORTED = exported()


@dataclass
class Query:
    """What a PromQL expression refers to: series names with their label matchers, and grouping labels."""

    selectors: list[tuple[str, list[tuple[str, str, str]]]] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)


_TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<braces>\{[^}]*\})
      | (?P<brackets>\[[^\]]*\])
      | (?P<number>(?<![A-Za-z_:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
      | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
      | (?P<other>\S)""",
    re.VERBOSE,
)
_MATCHER = re.compile(r"""\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?""")


def parse(expr: str) -> Query:
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    q = Query()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if kind == "ident" and text in FUNCTION_KEYWORDS and following[1] == "(":
            j = i + 2
            while tokens[j][1] != ")":
                if tokens[j][0] == "ident":
                    q.grouping.add(tokens[j][1])
                j += 1
            i = j + 1
            continue
        if text in AGGREGATIONS and following[1] in ("by", "without"):
            i += 1  # `sum by (...) (...)`: the grouping comes next
            continue
        if kind == "ident" and following[1] != "(" and text not in OPERATOR_KEYWORDS | FUNCTION_KEYWORDS:
            matchers: list[tuple[str, str, str]] = []
            if following[0] == "braces":
                body = following[1][1:-1]
                matchers = [m.groups() for m in _MATCHER.finditer(body)]
                assert "".join(m.group() for m in _MATCHER.finditer(body)).strip() == body.strip(), body
                i += 1
            q.selectors.append((text, matchers))
        i += 1
    return q


def rules() -> Iterator[dict[str, Any]]:
    doc = yaml.safe_load((OPS / "alerts.yml").read_text(encoding="utf-8"))
    for group in doc["groups"]:
        yield from group["rules"]


RULES = list(rules())


def test_the_parser_finds_names_matchers_and_grouping() -> None:
    q = parse(
        'sum by (le, job) (rate(a_b_bucket{x="1", y=~"5.."}[5m])) / clamp_min(sum(rate(c_total[5m])), 1e-9)'
        " > 0.01 and on (instance) d == 1"
    )
    assert q.selectors == [("a_b_bucket", [("x", "=", "1"), ("y", "=~", "5..")]), ("c_total", []), ("d", [])]
    assert q.grouping == {"le", "job", "instance"}


def test_every_rule_is_an_alert_with_severity_summary_and_description() -> None:
    assert len(RULES) >= 10
    names = [r["alert"] for r in RULES]
    assert len(names) == len(set(names)), "alert names must be unique"
    for r in RULES:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


@pytest.mark.parametrize("rule", RULES, ids=[r["alert"] for r in RULES])
def test_alert_names_only_exported_metrics_and_labels(rule: dict[str, Any]) -> None:
    q = parse(rule["expr"])
    assert q.selectors, rule["expr"]
    known = {**EXPORTED, **EXTERNAL}
    labels_in_query: set[str] = set(TARGET_LABELS)
    for name, matchers in q.selectors:
        assert name in known, (
            f"{rule['alert']}: {name} is exported by no service (chatpipe/runtime/metric_defs.py)"
        )
        labels = known[name] | TARGET_LABELS
        labels_in_query |= labels
        for label, op, value in matchers:
            assert label in labels, f"{rule['alert']}: {name} has no label {label!r}"
            if op == "=" and name in EXPORTED:
                assert value_is_produced(value), f"{rule['alert']}: no code produces {label}={value!r}"
    assert q.grouping <= labels_in_query, f"{rule['alert']}: groups by unknown labels"


def value_is_produced(value: str) -> bool:
    """A label value the code really sets: a literal in the source, or an HTTP status (str(status))."""
    if value.isdigit():
        return True
    needle = f'"{value}"'
    return any(needle in p.read_text(encoding="utf-8") for d in SOURCES for p in d.rglob("*.py"))


def test_value_check_can_fail() -> None:
    assert value_is_produced("dead_letter") and value_is_produced("unavailable")
    assert not value_is_produced("no-such-outcome-anywhere")


@pytest.mark.parametrize(
    ("what", "metric", "matcher"),
    [
        ("spool depth growing", "chatpipe_ingest_spool_depth", None),
        ("spool stalled", "chatpipe_ingest_spool_stalled", None),
        ("consumer lag", "kafka_consumergroup_lag", None),
        ("ingest dead letters", "chatpipe_ingest_dead_letters_total", None),
        ("processor dead letters", "chatpipe_processor_dead_letters_total", None),
        ("sink dead letters", "chatpipe_sink_records_total", ("outcome", "dead_letter")),
        ("ingest 5xx", "chatpipe_ingest_webhooks_total", ("outcome", "unavailable")),
        ("api 5xx", "chatpipe_api_requests_total", ("status", "5..")),
        ("reconciler 429s", "chatpipe_reconciler_requests_total", ("status", "429")),
        ("sink paused", "chatpipe_sink_store_up", None),
        ("a target down", "up", None),
    ],
)
def test_the_issues_alerts_exist(what: str, metric: str, matcher: tuple[str, str] | None) -> None:
    for r in RULES:
        for name, matchers in parse(r["expr"]).selectors:
            if name == metric and (matcher is None or matcher in [(m[0], m[2]) for m in matchers]):
                return
    raise AssertionError(f"no alert on {what} ({metric} {matcher or ''})")


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def metrics_port(service: dict[str, Any]) -> int:
    """The port a chatpipe service serves /metrics on, from its command line (or the defaults)."""
    command = service["command"]
    for flag in ("--metrics-port", "--web-port", "--port"):
        if flag in command:
            return int(command[command.index(flag) + 1])
    return {"ingest": 8080, "api": 8081, "worker": 6066}[command[0]]


def test_prometheus_scrapes_every_chatpipe_service_on_its_metrics_port() -> None:
    config = yaml.safe_load((OPS / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    services = compose()["services"]
    long_running = {
        name: s
        for name, s in services.items()
        if s.get("image") == "chatpipe:latest" and "entrypoint" not in s
    }
    assert set(long_running) == {"ingest", "worker", "sink", "api", "reconcile"}
    for name, service in long_running.items():
        job = jobs.get(f"chatpipe-{name}")
        assert job is not None, f"no scrape job for {name}"
        (sd,) = job["dns_sd_configs"]
        assert sd["names"] == [name] and sd["port"] == metrics_port(service), name
    exporter = jobs["kafka-exporter"]["static_configs"][0]["targets"]
    assert exporter == ["kafka-exporter:9308"] and "kafka-exporter" in services
    assert config["rule_files"] == ["alerts.yml"]
    prometheus = services["prometheus"]
    assert "./ops/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert prometheus["profiles"] == ["monitoring"] and services["kafka-exporter"]["profiles"] == [
        "monitoring"
    ]


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: prometheus)")


@needs_promtool
@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool(args: list[str]) -> None:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, *args], cwd=OPS, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
