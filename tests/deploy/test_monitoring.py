"""Prometheus and Grafana, checked with the real programs: promtool on the project's config and on the real
server's /metrics, and a real Prometheus on loopback scraping a real server, through which every PromQL
expression of the Grafana dashboard must evaluate and return data."""

from __future__ import annotations

import json
import math
import re
import subprocess
import urllib.error
import urllib.parse
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from client import Client, ServerError
from server.process import ServerProcess

from .conftest import DEPLOY, ROOT, free_port, http_get, tool_env, wait_until

PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "nlpserve.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "nlpserve.yml"

# What the test sends, by (method, gRPC status code): the request counter must show exactly this.
CLASSIFY_OK, CLASSIFY_NOT_FOUND, GENERATE_OK, STREAM_OK = 5, 2, 2, 2
EXPECTED = {
    ("Classify", "OK"): CLASSIFY_OK,
    ("Classify", "NOT_FOUND"): CLASSIFY_NOT_FOUND,
    ("Generate", "OK"): GENERATE_OK,
    ("GenerateStream", "OK"): STREAM_OK,
}

# Dashboard variables, as Grafana would substitute them: all models, and a rate window that covers the test.
VARIABLES = {"model": ".*", "__rate_interval": "5m", "__interval": "15s"}


def panel_queries() -> list[tuple[str, str]]:
    """(panel title and refId, PromQL) for every target of every panel, rows included."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard["panels"])
    for panel in list(panels):
        panels.extend(panel.get("panels", []))
    return [(f"{p['title']} [{t['refId']}]", t["expr"]) for p in panels for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in VARIABLES, f"dashboard variable ${name} has no test value"
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def send_known_traffic(target: str) -> None:
    with Client(target=target, timeout=60) as client:
        for i in range(CLASSIFY_OK):
            client.classify([f"a fine film, number {i}", "dull"])
        for _ in range(CLASSIFY_NOT_FOUND):
            with pytest.raises(ServerError) as error:
                client.classify(["to nowhere"], model="no-such-model")
            assert error.value.code.name == "NOT_FOUND"
        for i in range(GENERATE_OK):
            client.generate(f"def f{i}(", model="docgpt", max_new_tokens=8)
        for i in range(STREAM_OK):
            chunks = list(client.generate_stream(f"class C{i}:", model="docgpt", max_new_tokens=8))
            assert chunks


def requests_by_method_and_code(metrics_text: str) -> dict[tuple[str, str], float]:
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "nlpserve_requests_total":
                key = (sample.labels["method"], sample.labels["code"])
                counts[key] = counts.get(key, 0) + sample.value
    return counts


# ---------------------------------------------------------------------------------------------------------
# Static checks of the Grafana provisioning


def test_dashboard_uses_the_provisioned_datasource_and_covers_every_metric():
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert (datasource["type"], datasource["url"]) == ("prometheus", "http://prometheus:9090")
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts

    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
    exprs = " ".join(expr for _, expr in panel_queries())
    # The panels: every server metric appears in some panel.
    for metric in (
        "nlpserve_requests_total",
        "nlpserve_request_duration_seconds_bucket",
        "nlpserve_queue_duration_seconds_bucket",
        "nlpserve_batch_size",
        "nlpserve_generated_tokens_total",
        "nlpserve_time_to_first_token_seconds_bucket",
        "nlpserve_inter_token_latency_seconds_bucket",
        "nlpserve_active_sequences",
        "nlpserve_queue_depth",
        "nlpserve_model_info",
    ):
        assert metric in exprs, f"no panel shows {metric}"
    for quantile in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (le, model, method) (rate(nlpserve_request_duration"
            in exprs
        )
    assert 'code!="OK"' in exprs and "provider" in exprs


# ---------------------------------------------------------------------------------------------------------
# promtool


def test_promtool_accepts_the_alerting_rules(promtool):
    result = subprocess.run(
        [str(promtool), "check", "rules", str(ALERTS)],
        check=False,
        capture_output=True,
        text=True,
        env=tool_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_config(promtool):
    result = subprocess.run(
        [str(promtool), "check", "config", str(PROMETHEUS_CONFIG)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_servers_metrics(promtool, quick_repo):
    with ServerProcess(quick_repo) as server:
        send_known_traffic(server.target)  # every histogram and labelled series has samples
        text = http_get(server.metrics_url)
    assert "nlpserve_request_duration_seconds_bucket" in text
    result = subprocess.run(
        [str(promtool), "check", "metrics"], input=text, check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------
# A real Prometheus scraping a real server


def prometheus_config(target: str, own_port: int) -> dict:
    """The project's config with the server's address instead of Docker's DNS, and a 1 s scrape interval."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    # Relative to the config file, which the test writes elsewhere.
    assert config["rule_files"] == [ALERTS.name]
    config["rule_files"] = [str(ALERTS)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "dns_sd_configs" in jobs["nlpserve"]  # compose: every replica of the `server` service
    del jobs["nlpserve"]["dns_sd_configs"]
    jobs["nlpserve"]["static_configs"] = [{"targets": [target]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{own_port}"]}]
    return config


class PrometheusAPI:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> dict:
        body = json.loads(http_get(f"{self.base}{path}?{urllib.parse.urlencode(params)}"))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query; a PromQL error fails the test with Prometheus's message."""
        try:
            data = self.get("/api/v1/query", query=expr)
        except urllib.error.HTTPError as e:  # 400, with Prometheus's error message in the body
            pytest.fail(f"Prometheus rejected {expr!r}: {e} {e.read().decode(errors='replace')}")
        return data["result"]


def test_prometheus_scrapes_the_server_and_every_dashboard_panel_has_data(
    prometheus_bin, quick_repo, tmp_path: Path, daemons
):
    with ServerProcess(quick_repo) as server:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(f"127.0.0.1:{server.metrics_port}", port)))
        argv = [
            str(prometheus_bin),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        prometheus = daemons(argv, tmp_path / "prometheus.log", tool_env())
        api = PrometheusAPI(port)
        wait_until(
            lambda: http_get(f"{api.base}/-/ready"),
            "Prometheus ready",
            process=prometheus.process,
            logs=prometheus.logs,
        )

        def target_up() -> bool:
            targets = api.get("/api/v1/targets")["activeTargets"]
            return any(t["labels"]["job"] == "nlpserve" and t["health"] == "up" for t in targets)

        # A first scrape before the traffic, so that rates see the counters grow.
        wait_until(
            target_up,
            "the server's target up in Prometheus",
            process=prometheus.process,
            logs=prometheus.logs,
        )
        assert api.query('up{job="nlpserve"} == 1')

        def scraped_counts() -> dict[tuple[str, str], float]:
            result = api.query("sum by (method, code) (nlpserve_requests_total)")
            return {(r["metric"]["method"], r["metric"]["code"]): float(r["value"][1]) for r in result}

        # Two rounds, each followed by a scrape: a labelled series appears at its first request, and a rate
        # needs two samples of it. Prometheus scrapes every second; compare exactly once it has.
        for round_ in (1, 2):
            send_known_traffic(server.target)
            expected = {key: count * round_ for key, count in EXPECTED.items()}
            wait_until(
                lambda expected=expected: scraped_counts() == expected,
                f"Prometheus to show the requests sent {expected}",
                process=prometheus.process,
                logs=lambda: f"{scraped_counts()}\n{prometheus.logs()}",
            )
        assert scraped_counts() == expected
        assert requests_by_method_and_code(http_get(server.metrics_url)) == expected

        # Every alerting rule evaluates without error against the real series.
        shipped = [
            rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
        ]

        def rules() -> list[dict]:
            return [rule for group in api.get("/api/v1/rules")["groups"] for rule in group["rules"]]

        def all_evaluated() -> bool:  # Prometheus reports year 1 for a rule it has not evaluated yet
            loaded = rules()
            return len(loaded) == len(shipped) and not any(
                r["lastEvaluation"].startswith("0001") for r in loaded
            )

        wait_until(
            all_evaluated, "every alerting rule evaluated", process=prometheus.process, logs=prometheus.logs
        )
        assert sorted(r["name"] for r in rules()) == sorted(shipped)
        assert all(r["health"] == "ok" for r in rules()), rules()

        empty = []
        queries = panel_queries()
        assert len(queries) >= 13
        for title, expr in queries:
            result = api.query(substitute(expr))
            values = [float(r["value"][1]) for r in result]
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{title}: {substitute(expr)} -> {result}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
