"""The operator's artifacts in ops/: the fleet dashboard and the alerting rules.

They name series, labels and label values as strings that nothing else checks: a
renamed metric would leave a panel blank and an alert silent. So every name they
use is looked up in what a live runner, after a little real work against the real
reference server, serves on /metrics.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from runner import Batch, Runner
from tests.support import World, eventually, serving

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "ops" / "grafana" / "pullwake-fleet.json"
RULES = ROOT / "ops" / "prometheus" / "pullwake-alerts.yml"
PROMTOOL = ROOT / "tools" / "promtool.sh"
LOCAL_STATE_GROUP = "pullwake-local-state"

SCRAPE_LABELS = frozenset({"instance", "job"})
"""Labels Prometheus adds to every scraped series (their values depend on the deployment)."""

PROMETHEUS_SERIES = frozenset({"up"})
"""Series Prometheus itself writes for each scrape target."""

# -- what an expression references -----------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"(?P<name>[a-zA-Z_:][\w:]*)?\s*\{(?P<matchers>[^}]*)\}")
_MATCHER = re.compile(r'(?P<label>[a-zA-Z_]\w*)\s*(?P<op>=~|!~|!=|=)\s*"(?P<value>(?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\((?P<labels>[^)]*)\)")
_METRIC = re.compile(r"\b(?:pullwake_\w+|up)\b(?!\s*\()")
_TEMPLATE_LABEL = re.compile(r"\{\{\s*(?:\$labels\.)?([a-zA-Z_]\w*)\s*\}\}|\$labels\.([a-zA-Z_]\w*)")


@dataclass
class Matcher:
    metric: str
    label: str
    op: str
    value: str


@dataclass
class References:
    """The series and labels one expression (and the text shown with it) needs."""

    where: str
    metrics: set[str] = field(default_factory=set)
    matchers: list[Matcher] = field(default_factory=list)
    labels: set[str] = field(default_factory=set)


def references(where: str, expr: str, *templates: str) -> References:
    """Metrics, label matchers and label names in `expr`, and label names the templates print.

    Enough PromQL for the expressions in ops/: every metric there is `pullwake_*` or `up`.
    """
    found = References(where)
    for selector in _SELECTOR.finditer(expr):
        for matcher in _MATCHER.finditer(selector["matchers"]):
            found.matchers.append(Matcher(selector["name"] or "", matcher["label"], matcher["op"], matcher["value"]))
    bare = _STRING.sub('""', expr)
    for grouping in _GROUPING.finditer(bare):
        found.labels.update(label.strip() for label in grouping["labels"].split(",") if label.strip())
    without_groupings = _GROUPING.sub("", _SELECTOR.sub(lambda m: m["name"] or "", bare))
    found.metrics.update(_METRIC.findall(without_groupings))
    found.metrics.update(m.metric for m in found.matchers if m.metric)
    for template in templates:
        for braced, dollar in _TEMPLATE_LABEL.findall(template):
            found.labels.add(braced or dollar)
    found.labels -= {"value"}  # {{ $value }}: the sample's value, not a label
    return found


def dashboard_references() -> list[References]:
    document = json.loads(DASHBOARD.read_text())
    found = []
    for variable in document["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((?P<metric>[\w:]+),\s*(?P<label>\w+)\)", query)
            assert match, f"variable {variable['name']}: expected label_values(metric, label), got {query}"
            found.append(references(f"variable {variable['name']}", match["metric"], "{{" + match["label"] + "}}"))
    for panel in panels(document):
        for target in panel.get("targets", []):
            found.append(references(f"panel {panel['title']!r}", target["expr"], target.get("legendFormat", "")))
    return found


def panels(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in document["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def rule_references(*, group: str | None = None, exclude: str | None = None) -> list[References]:
    found = []
    for each in rule_groups():
        if each["name"] == exclude or group not in (None, each["name"]):
            continue
        for rule in each["rules"]:
            shown = [*rule.get("annotations", {}).values(), *rule.get("labels", {}).values()]
            found.append(references(f"alert {rule['alert']}", rule["expr"], *shown))
    return found


# -- what a live runner serves ---------------------------------------------------------------


@dataclass
class Exposition:
    """Sample names in a /metrics text, with the labels and values each was seen with."""

    types: set[str] = field(default_factory=set)
    labels: dict[str, dict[str, set[str]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(set)))

    @classmethod
    def parse(cls, text: str) -> Exposition:
        parsed = cls()
        for family in text_string_to_metric_families(text):
            parsed.types.add(family.name)
            for sample in family.samples:
                seen = parsed.labels[sample.name]
                for label, value in sample.labels.items():
                    seen[label].add(value)
        return parsed

    def problems(self, refs: References) -> list[str]:
        """What `refs` names that this exposition lacks (empty when everything is there)."""
        wrong = []
        pullwake = {metric for metric in refs.metrics if metric not in PROMETHEUS_SERIES}
        for metric in sorted(pullwake):
            if metric not in self.labels:
                wrong.append(f"{refs.where}: no series {metric}")
        for matcher in refs.matchers:
            if matcher.label in SCRAPE_LABELS or matcher.metric in PROMETHEUS_SERIES:
                continue
            values = self.labels.get(matcher.metric, {}).get(matcher.label)
            if values is None:
                wrong.append(f"{refs.where}: {matcher.metric} has no label {matcher.label}")
                continue
            wanted = matcher.value.split("|") if matcher.op in ("=~", "!~") else [matcher.value]
            for value in wanted:
                if re.fullmatch(r"[\w-]+", value) and value not in values:
                    wrong.append(f'{refs.where}: {matcher.metric}{{{matcher.label}="{value}"}} never seen')
        available = set(SCRAPE_LABELS)
        for metric in pullwake:
            available.update(self.labels.get(metric, {}))
        for label in sorted(refs.labels - available):
            wrong.append(f"{refs.where}: label {label} is on none of {sorted(pullwake)}")
        return wrong


async def scrape_after_some_work(world: World) -> str:
    """Run a runner that completes, retries, fails and dead-letters batches, renews and loses a
    lease, and return its /metrics.

    Three subscriptions on streams of their own: one whose handler works (slowly enough to
    renew its lease), and two whose handlers fail, without and with a dead-letter stream.
    """
    ok, failed, dead = f"{world.sub}-ok", f"{world.sub}-failed", f"{world.sub}-dead"
    failures: Counter[str] = Counter()

    async def handle(batch: Batch) -> None:
        await trio.sleep(0.7)  # past a third of the lease: renewed once

    async def fail(batch: Batch) -> None:
        if batch.subscription == dead or failures[batch.subscription] < 2:  # a redelivery of `failed` works
            failures[batch.subscription] += 1
            raise RuntimeError(f"{batch.subscription} fails on purpose")

    await world.create("ok", "failed", "dead")
    settings = world.settings(
        metrics_listen="127.0.0.1:0",
        handler_max_attempts=2,
        subscriptions=(
            world.spec(ok, pattern=None, streams=(world.stream("ok"),), lease_ttl_ms=1_500),
            world.spec(failed, pattern=None, streams=(world.stream("failed"),)),
            world.spec(dead, pattern=None, streams=(world.stream("dead"),), dead_letter_stream=world.stream("letters")),
        ),
    )
    runner = Runner(settings, handlers={ok: handle, failed: fail, dead: fail})
    async with serving(runner) as metrics_url, httpx.AsyncClient(base_url=metrics_url or "") as scraper:

        async def seen(*needles: str) -> bool:
            text = (await scraper.get("/metrics")).text
            return all(needle in text for needle in needles)

        await world.append("ok", {"n": 1})
        await world.append("failed", {"n": 2})
        await world.append("dead", {"n": 3})
        await eventually(
            lambda: seen('outcome="ok"', 'outcome="retried"', 'outcome="failed"', 'outcome="dead_lettered"'),
            what="ok, retried, failed and dead-lettered batches",
        )
        await eventually(lambda: not runner.health().in_flight, what="the claims to end")
        assert await seen('pullwake_lease_renewals_total{result="ok"}')
        # The next ack of the `ok` subscription is refused: its lease is lost.
        await world.inject(f"/v1/stream/__ds/subscriptions/{ok}/ack", status=400, count=1)
        await world.append("ok", {"n": 4})
        await eventually(lambda: seen('pullwake_lease_renewals_total{result="lost"}'), what="a lost lease")
        await world.clear_faults()
        # The server forgets the subscription and an event arrives before the runner re-creates it
        # on its next connect: the new subscription starts past that event, a gap the runner replays.
        await eventually(lambda: not runner.health().in_flight, what="the claims to end")
        await world.delete_subscription(ok)
        await world.append("ok", {"n": 5})
        # Liveness probes of the wake stream time out: the runner resets the stream and reconnects.
        await world.inject(world.stream_path(world.wake), delayMs=2_000, count=3)
        await eventually(lambda: seen("pullwake_subscription_gaps_total{"), what="a gap in a subscription")
        return (await scraper.get("/metrics")).text


def test_the_reference_extraction_sees_names_labels_and_values() -> None:
    refs = references(
        "example",
        'sum by (instance, le) (rate(pullwake_x_bucket{a="1", b=~"p|q", instance=~"$instance"}[5m])) '
        "and on (job) up == 1",
        "{{instance}} {{ $labels.c }} {{ $value }}",
    )
    assert refs.metrics == {"pullwake_x_bucket", "up"}
    assert [(m.metric, m.label, m.op, m.value) for m in refs.matchers] == [
        ("pullwake_x_bucket", "a", "=", "1"),
        ("pullwake_x_bucket", "b", "=~", "p|q"),
        ("pullwake_x_bucket", "instance", "=~", "$instance"),
    ]
    assert refs.labels == {"instance", "le", "job", "c"}


async def test_every_series_and_label_the_dashboard_and_alerts_use_is_served(world: World) -> None:
    served = Exposition.parse(await scrape_after_some_work(world))
    refs = [*dashboard_references(), *rule_references(exclude=LOCAL_STATE_GROUP)]
    assert sum(len(r.metrics) for r in refs) > 20, "the extraction found next to nothing: is it broken?"
    problems = [problem for each in refs for problem in served.problems(each)]
    assert not problems, "\n".join(problems)


async def test_the_local_state_alerts_use_series_the_runner_serves(world: World) -> None:
    served = Exposition.parse(await scrape_after_some_work(world))
    refs = rule_references(group=LOCAL_STATE_GROUP)
    assert refs, f"no rules in group {LOCAL_STATE_GROUP}"
    problems = [problem for each in refs for problem in served.problems(each)]
    assert not problems, "\n".join(problems)


def promtool(*args: str) -> str:
    """Run promtool (skips the test only where promtool cannot be had); its stdout."""
    try:
        result = subprocess.run([str(PROMTOOL), *args], capture_output=True, text=True, timeout=300)
    except OSError as exc:
        pytest.skip(f"tools/promtool.sh cannot run here: {exc}")
    if result.returncode == 3:
        pytest.skip(f"promtool cannot be had here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    return result.stdout


def promtool_check_rules(path: Path) -> str:
    """`promtool check rules` on `path`."""
    return promtool("check", "rules", str(path))


def test_the_rules_pass_promtool() -> None:
    promtool_check_rules(RULES)


def test_a_failed_run_alerts_even_when_its_runner_restarted_since(tmp_path: Path) -> None:
    """The runner counts failed runs since it started: a restart puts the count back to 0. The alert
    must still fire for the failure before it, and for a runner whose first scrape already shows one."""
    rule = next(rule for group in rule_groups() for rule in group["rules"] if rule["alert"] == "PullwakeRunsFailed")

    def firing(instance: str) -> dict[str, Any]:
        labels = {"instance": instance, "job": "pullwake-runner", "status": "failed"}
        annotations = {
            key: re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m[1]], value)
            for key, value in rule["annotations"].items()
        }
        return {"exp_labels": {**labels, **rule["labels"]}, "exp_annotations": annotations}

    series = 'pullwake_runs_ended_total{{status="failed",instance="{}",job="pullwake-runner"}}'
    unit = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # failed at minute 3, restarted at minute 5 (back to 0): still firing at 10
                    {"series": series.format("restarted"), "values": "0 0 0 1 1 0 0 0 0 0 0"},
                    # a runner that failed a run before its first scrape
                    {"series": series.format("new"), "values": "_ _ _ _ _ _ _ _ 1 1 1"},
                    {"series": series.format("quiet"), "values": "0 0 0 0 0 0 0 0 0 0 0"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "10m",
                        "alertname": "PullwakeRunsFailed",
                        "exp_alerts": [firing("new"), firing("restarted")],
                    },
                    {"eval_time": "30m", "alertname": "PullwakeRunsFailed", "exp_alerts": []},
                ],
            }
        ],
    }
    tests = tmp_path / "runs-failed.test.yml"
    tests.write_text(yaml.safe_dump(unit))
    promtool("test", "rules", str(tests))


def test_the_dashboard_queries_are_promql_that_promtool_accepts(tmp_path: Path) -> None:
    """Each panel's query, its Grafana variables filled in, checked as a recording rule."""
    document = json.loads(DASHBOARD.read_text())
    filled = {"$__rate_interval": "5m", "$__interval": "1m", "$instance": ".*"}
    records = []
    for panel in panels(document):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in filled.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"panel {panel['title']!r}: unknown variable in {expr}"
            records.append({"record": f"dashboard:panel{panel['id']}:{target['refId']}", "expr": expr})
    rules = tmp_path / "dashboard-queries.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    assert f"SUCCESS: {len(records)} rules found" in promtool_check_rules(rules)


def test_durable_runs_have_their_panels_and_an_alert_on_failed_runs() -> None:
    shown = {metric for each in dashboard_references() for metric in each.metrics}
    assert {"pullwake_runs", "pullwake_run_steps_total"} <= shown, "a durable-runs panel is missing"
    alerted = {(m.metric, m.label, m.value) for each in rule_references() for m in each.matchers}
    assert ("pullwake_runs_ended_total", "status", "failed") in alerted, "no alert on failed runs"
    rule = next(rule for group in rule_groups() for rule in group["rules"] if rule["alert"] == "PullwakeRunsFailed")
    assert rule["annotations"]["why"].strip(), "the alert says why it is worth acting on"


def test_every_alert_says_what_it_is_and_what_to_do() -> None:
    groups = rule_groups()
    assert [group["name"] for group in groups] == ["pullwake-runner", LOCAL_STATE_GROUP]
    alerts = [rule for group in groups for rule in group["rules"]]
    names = [rule["alert"] for rule in alerts]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    for rule in alerts:
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        runbook = annotations["runbook"]
        assert runbook.strip(), rule["alert"]
        assert "\n" not in runbook.strip(), f"{rule['alert']}: the runbook is one line"
    local = {metric for each in rule_references(group=LOCAL_STATE_GROUP) for metric in each.metrics}
    assert local == {"pullwake_state_write_failures_total", "pullwake_degraded"}, "the group is for those alone"
    elsewhere = {metric for each in rule_references(exclude=LOCAL_STATE_GROUP) for metric in each.metrics}
    assert not local & elsewhere, "the series not served yet stay in their own group"


def test_the_dashboard_loads_and_every_panel_queries_prometheus() -> None:
    document = json.loads(DASHBOARD.read_text())
    assert document["uid"] == "pullwake-fleet"
    assert document["title"]
    assert 36 <= document["schemaVersion"] <= 41
    variables = {variable["name"]: variable for variable in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    shown = [panel for panel in panels(document) if panel["type"] != "row"]
    assert len(shown) >= 10
    ids = [panel["id"] for panel in panels(document)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in shown:
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        targets = panel["targets"]
        assert targets, title
        assert all(target["expr"].strip() for target in targets), title
        assert all(target["datasource"] == panel["datasource"] for target in targets), title
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), title
        assert all('instance=~"$instance"' in target["expr"] for target in targets), f"{title} ignores $instance"
        for target in targets:
            quantile = "histogram_quantile" in target["expr"]
            assert not quantile or re.search(r"rate\(\w+_bucket\{", target["expr"]), title
            assert not quantile or "le)" in target["expr"].replace(" ", ""), f"{title}: keep `le` in the sum"
        if panel["type"] == "timeseries":
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{title} has no unit"
