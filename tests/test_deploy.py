"""The deploy kit (deploy/): every file parses, every file a compose file or a
manifest names exists, the pieces point at each other (ports, service names,
labels, mounts), the dashboard and the alerts query only metrics the gateway
exports, the configs pass ``sluice check-config``, and promtool accepts the
Prometheus config and rules and passes the rules' unit tests.

No Docker engine, kubectl or network is needed: the Dockerfile, the compose
file and the manifests are checked statically. promtool tests skip when
promtool is not installed, unless SLUICE_REQUIRE_PROMETHEUS=1 (CI) makes them
fail instead.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE_CONFIG = DEPLOY / "config" / "sluice.yaml"
K8S = DEPLOY / "k8s"
K8S_CONFIG = K8S / "config" / "sluice.yaml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sluice.json"
GRAFANA_DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "sluice.yml"

# Labels that Prometheus (or the Prometheus Operator) attaches to every scraped series.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}


def require_tool(name: str) -> str:
    """The tool's path; skip without it, or fail when CI requires Prometheus."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install prometheus)"
        if os.environ.get("SLUICE_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(message + "; SLUICE_REQUIRE_PROMETHEUS=1 requires it")
        pytest.skip(message)
    return path


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


# -- what the gateway exports ------------------------------------------------------


def exported_metrics() -> dict[str, set[str]]:
    """Every series name /metrics can show, with its label names (``le`` on buckets)."""
    metrics = Metrics()
    # prometheus_client keeps a metric's name and label names in these attributes.
    labels_of = {
        collector._name: set(collector._labelnames)
        for collector in vars(metrics).values()
        if hasattr(collector, "_labelnames") and hasattr(collector, "_name")
    }
    exported: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        labels = labels_of.get(family.name, set())
        if family.type == "counter":
            exported[family.name + "_total"] = labels
        elif family.type == "histogram":
            exported[family.name + "_bucket"] = labels | {"le"}
            exported[family.name + "_sum"] = labels
            exported[family.name + "_count"] = labels
        else:
            exported[family.name] = labels
    return exported


def test_the_exported_metric_names_are_the_designs():
    exported = exported_metrics()
    for name, labels in {
        "sluice_requests_total": {"team", "key", "model", "endpoint", "status"},
        "sluice_tokens_total": {"team", "key", "model", "kind"},
        "sluice_moderation_actions_total": {"rule", "action", "direction"},
        "sluice_quota_rejections_total": {"team", "limit"},
        "sluice_request_duration_seconds_bucket": {"endpoint", "model", "le"},
        "sluice_time_to_first_token_seconds_bucket": {"model", "le"},
        "sluice_upstream_errors_total": {"upstream", "kind"},
        "sluice_overhead_seconds_count": {"endpoint"},
        "sluice_active_streams": set(),
    }.items():
        assert exported[name] == labels, name


# -- a small PromQL reader: which metrics and labels does an expression use? -------------

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on", "ignoring",
             "group_left", "group_right", "atan2"}
_LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_TOKEN = re.compile(
    r"""\s+|(?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)"""
    r"""|(?P<range>\[[^\]]*\])"""
    r"""|(?P<number>(?:\d+(?:\.\d+)?(?:e[+-]?\d+)?)(?:ms|[smhdwy])?(?:\d+(?:ms|[smhdwy]))*)"""
    r"""|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)"""
    r"""|(?P<braces>\{[^}]*\})"""
    r"""|(?P<labels>\(\s*(?:[A-Za-z_][A-Za-z0-9_]*\s*(?:,\s*[A-Za-z_][A-Za-z0-9_]*\s*)*,?\s*)?\))"""
    r"""|(?P<other>=~|!~|!=|==|>=|<=|[-+*/%^<>(),=@])""",
    re.IGNORECASE,
)
_MATCHER = re.compile(r"""([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*(?:"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')""")


class PromQL:
    """The metric selectors and the grouping labels of one expression."""

    def __init__(self, expr: str):
        self.expr = expr
        self.selectors: list[tuple[str, set[str]]] = []  # (metric, label names it matches on)
        self.grouping: set[str] = set()  # labels named in by/without/on/ignoring/group_*
        # Grafana's interval variables only appear in ranges; $team and friends only in strings.
        tokens = []
        pos = 0
        while pos < len(expr):
            match = _TOKEN.match(expr, pos)
            if match is None:
                raise AssertionError(f"cannot read {expr[pos:]!r} in {expr!r}")
            pos = match.end()
            if match.lastgroup:
                tokens.append((match.lastgroup, match.group(match.lastgroup)))
        for i, (kind, text) in enumerate(tokens):
            following = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
            if kind == "braces" and (i == 0 or tokens[i - 1][0] != "ident"):
                raise AssertionError(f"a selector without a metric name in {expr!r}")
            if kind == "labels":
                previous = tokens[i - 1][1].lower() if i else ""
                if previous in _LABEL_LIST_KEYWORDS:
                    self.grouping |= set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))
                    continue
                # Otherwise a function's or an expression's parentheses around one bare name:
                # `rate(x)` lexes as ident + labels; read the name inside as a metric.
                for name in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
                    if name.lower() not in _KEYWORDS:
                        self.selectors.append((name, set()))
                continue
            if kind != "ident" or text.lower() in _KEYWORDS:
                continue
            if following[0] == "labels" or following[1] == "(" or following[1].lower() in ("by", "without"):
                continue  # a function or an aggregation
            matchers = set(_MATCHER.findall(following[1])) if following[0] == "braces" else set()
            self.selectors.append((text, matchers))

    @property
    def metrics(self) -> set[str]:
        return {name for name, _ in self.selectors}


def check_query(expr: str, exported: dict[str, set[str]]) -> list[str]:
    """What is wrong with an expression: unknown metrics, labels the metrics do not have."""
    query = PromQL(expr)
    problems = []
    if not query.selectors:
        problems.append(f"no metric in {expr!r}")
    known_labels = set(TARGET_LABELS)
    for name, matchers in query.selectors:
        if name not in exported:
            problems.append(f"{name} is not a metric the gateway exports (in {expr!r})")
            continue
        known_labels |= exported[name]
        for label in matchers - exported[name] - TARGET_LABELS:
            problems.append(f"{name} has no label {label!r} (in {expr!r})")
    for label in query.grouping - known_labels:
        problems.append(f"no metric in {expr!r} has the label {label!r}")
    return problems


def test_the_promql_reader_finds_metrics_and_labels():
    query = PromQL(
        'sum by (team, limit) (rate(a_total{team=~"$team", x!="y"}[$__rate_interval]))'
        ' / on (team) group_left sum(b_total) by (team) > 0.1 and c offset 5m'
        ' or histogram_quantile(0.99, sum by (le) (rate(d_bucket[5m]))) or vector(0) or (e)'
    )
    assert query.selectors == [("a_total", {"team", "x"}), ("b_total", set()), ("c", set()), ("d_bucket", set()),
                               ("e", set())]
    assert query.grouping == {"team", "limit", "le"}
    exported = {"a_total": {"team", "limit"}, "b_total": {"team"}, "c": set(), "d_bucket": {"le"}, "e": set()}
    assert check_query(query.expr, exported) == ["a_total has no label 'x' (in " + repr(query.expr) + ")"]
    assert check_query("sum by (nope) (rate(sluice_requests_total[5m]))", exported_metrics()) == [
        "no metric in 'sum by (nope) (rate(sluice_requests_total[5m]))' has the label 'nope'"
    ]
    assert "sluice_requests is not a metric" in check_query("rate(sluice_requests[5m])", exported_metrics())[0]
    with pytest.raises(AssertionError):
        PromQL('{__name__="sluice_requests_total"}')


# -- every file parses; every file named exists ------------------------------------------


def test_every_deploy_file_parses():
    expected = {
        "Dockerfile", "Dockerfile.dockerignore", "README.md", "docker-compose.yml",
        "config/sluice.yaml", "prometheus/prometheus.yml", "prometheus/alerts.yml", "prometheus/alerts_test.yml",
        "grafana/dashboards/sluice.json", "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/sluice.yml", "k8s/kustomization.yaml", "k8s/deployment.yaml",
        "k8s/service.yaml", "k8s/hpa.yaml", "k8s/pdb.yaml", "k8s/servicemonitor.yaml", "k8s/prometheusrule.yaml",
        "k8s/secret.example.yaml", "k8s/config/sluice.yaml",
    }
    files = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert expected <= files, expected - files
    for name in sorted(files):
        path = DEPLOY / name
        if path.suffix in (".yml", ".yaml"):
            docs = load_yaml_docs(path)
            assert docs, f"{name} is empty"
            assert all(isinstance(doc, dict) for doc in docs), name
        elif path.suffix == ".json":
            assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict), name
        elif path.name == "Dockerfile":
            assert dockerfile_instructions(path), name


def test_the_readme_covers_each_piece():
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for needle in ("docker compose", "kubectl apply -k", "hash-key", "sluice-upstream", "OPENAI_API_KEY",
                   "promtool", "secret.example.yaml"):
        assert needle in text, needle


# -- Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continuation"
    return instructions


def dockerfile_stages(path: Path) -> list[dict[str, Any]]:
    stages: list[dict[str, Any]] = []
    for instruction, args in dockerfile_instructions(path):
        if instruction == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"image": parts[0], "name": name, "instructions": []})
        else:
            assert stages, f"{instruction} before the first FROM"
            stages[-1]["instructions"].append((instruction, args))
    return stages


def compose_services() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)["services"]


def build_context() -> Path:
    """The directory docker-compose.yml builds the gateway from (the repository root)."""
    build = compose_services()["sluice"]["build"]
    context = (COMPOSE_FILE.parent / build["context"]).resolve()
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    return context


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Whether Docker leaves a path out of the build context (last matching pattern wins)."""
    parts = PurePosixPath(relative).parts
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        for depth in range(1, len(parts) + 1):  # a pattern on a directory covers what is inside
            prefix = "/".join(parts[:depth])
            if fnmatch.fnmatch(prefix, pattern) or (pattern.startswith("**/") and fnmatch.fnmatch(prefix, pattern[3:])):
                ignored = not negate
                break
    return ignored


def test_dockerfile_is_multistage_slim_and_runs_as_a_user_with_a_healthcheck():
    stages = dockerfile_stages(DOCKERFILE)
    assert len(stages) >= 2, "multi-stage: build, then a clean runtime"
    for stage in stages:
        assert stage["image"] == "python:3.11-slim", stage["image"]
    runtime = stages[-1]["instructions"]

    users = [args for instruction, args in runtime if instruction == "USER"]
    assert users, "the runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    # The user exists: created in the runtime stage with that name or uid.
    created = " ".join(args for instruction, args in runtime if instruction == "RUN")
    assert "useradd" in created and (f"--uid {user}" in created or f" {user}" in created)

    healthchecks = [args for instruction, args in runtime if instruction == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/healthz" in healthchecks[0] and "CMD" in healthchecks[0]

    env = " ".join(args for instruction, args in runtime if instruction == "ENV")
    assert "SLUICE_SERVER__HOST=0.0.0.0" in env
    assert "SLUICE_CONFIG=/etc/sluice/config.yaml" in env
    entrypoint = [json.loads(args) for instruction, args in runtime if instruction == "ENTRYPOINT"][-1]
    command = [json.loads(args) for instruction, args in runtime if instruction == "CMD"][-1]
    assert entrypoint + command == ["sluice", "serve"]

    exposed = {int(port.split("/")[0]) for instruction, args in runtime if instruction == "EXPOSE" for port in args.split()}
    server = load_yaml(COMPOSE_CONFIG)["server"]
    assert {server["port"], server["metrics_port"]} <= exposed


def test_dockerfile_copies_files_that_exist_and_installs_the_package_with_its_encodings():
    context = build_context()
    ignore = [
        line.strip()
        for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    stages = dockerfile_stages(DOCKERFILE)
    names: list[str] = []
    copied = set()
    for stage in stages:
        for instruction, args in stage["instructions"]:
            if instruction in ("COPY", "ADD"):
                words = shlex.split(args)
                flags = [w for w in words if w.startswith("--")]
                paths = [w for w in words if not w.startswith("--")]
                sources = paths[:-1]
                from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
                if from_stage is not None:
                    assert from_stage in names, f"COPY --from={from_stage} names no earlier stage"
                    continue
                for source in sources:
                    assert (context / source).exists(), f"COPY {source}: no such file in the build context"
                    assert not dockerignored(source, ignore), f"COPY {source}: Dockerfile.dockerignore leaves it out"
                    copied.add(source.rstrip("/"))
        if stage["name"]:
            names.append(stage["name"])
    # What pip needs to build the package: the project file, its readme, the sources.
    pyproject = tomllib.loads((context / "pyproject.toml").read_text(encoding="utf-8"))
    assert {"pyproject.toml", pyproject["project"]["readme"], "proxy"} <= copied
    build_runs = " ".join(args for instruction, args in stages[0]["instructions"] if instruction == "RUN")
    assert "pip install ." in build_runs and "-e" not in build_runs.split()
    # The encodings travel as package data, and the build stage loads them offline.
    package_data = pyproject["tool"]["setuptools"]["package-data"]["proxy"]
    shipped = sorted(p.name for p in (context / "proxy" / "encodings").glob("*.tiktoken"))
    assert {"o200k_base.tiktoken", "cl100k_base.tiktoken"} <= set(shipped)
    assert all(any(fnmatch.fnmatch(f"encodings/{name}", glob) for glob in package_data) for name in shipped)
    assert not any(dockerignored(f"proxy/encodings/{name}", ignore) for name in shipped)
    assert "get_encoding('o200k_base')" in build_runs and "get_encoding('cl100k_base')" in build_runs


def test_the_dockerignore_reader():
    patterns = ["*", "!pyproject.toml", "!proxy", "**/__pycache__"]
    assert not dockerignored("proxy", patterns)
    assert not dockerignored("proxy/encodings/o200k_base.tiktoken", patterns)
    assert dockerignored("proxy/__pycache__/x.pyc", patterns)
    assert dockerignored("tests", patterns)
    assert dockerignored(".venv/bin/python", patterns)


# -- docker compose -------------------------------------------------------------------------


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of a service's bind mounts (named volumes left out)."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append(((COMPOSE_FILE.parent / volume["source"]).resolve(), volume["target"]))
            continue
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((COMPOSE_FILE.parent / source).resolve(), target))
    return mounts


def container_file(service: dict[str, Any], container_path: str) -> Path:
    """The host file a service sees at a container path, through its bind mounts."""
    for host, target in bind_mounts(service):
        target = target.rstrip("/")
        if container_path == target:
            return host
        if container_path.startswith(target + "/"):
            return host / container_path[len(target) + 1 :]
    raise AssertionError(f"nothing is mounted at {container_path}")


def test_compose_has_the_stack_and_every_file_it_names_exists():
    services = compose_services()
    assert {"sluice", "redis", "prometheus", "grafana"} <= set(services)
    build_context()
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for host, _ in bind_mounts(service):
            assert host.exists(), f"{name} mounts {host}, which does not exist"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on the unknown service {dependency}"
    declared = set(load_yaml(COMPOSE_FILE).get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if isinstance(volume, str) and not source.startswith((".", "/")):
                assert source in declared, f"{name} uses the undeclared volume {source}"


def test_compose_runs_the_gateway_on_its_config_with_the_key_from_the_environment():
    services = compose_services()
    sluice = services["sluice"]
    env = sluice["environment"]
    assert env["SLUICE_SERVER__HOST"] == "0.0.0.0"
    assert env["OPENAI_API_KEY"].startswith("${OPENAI_API_KEY")  # from the shell, never in a file
    assert container_file(sluice, env["SLUICE_CONFIG"]) == COMPOSE_CONFIG
    config = load_yaml(COMPOSE_CONFIG)
    assert any(u.get("api_key_env") == "OPENAI_API_KEY" for u in config["upstreams"])
    published = {str(p).split(":")[-1] for p in sluice.get("ports", [])}
    assert str(config["server"]["port"]) in published
    # The quota store is the compose Redis.
    assert config["accounting"]["store"] == "redis"
    redis_url = urlsplit(config["accounting"]["redis_url"])
    assert redis_url.hostname in services and services[redis_url.hostname]["image"].startswith("redis")
    assert (redis_url.port or 6379) == 6379
    assert sluice["depends_on"]["redis"]["condition"] == "service_healthy"
    # An upstream on a bare host name is a compose service.
    for upstream in config["upstreams"]:
        host = urlsplit(upstream["base_url"]).hostname
        if "." not in host:
            assert host in services, f"upstream {upstream['name']}: no compose service {host}"
    # Streams get to finish: compose waits longer than the gateway's grace.
    grace = sluice["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > config["server"]["shutdown_grace_seconds"]


def test_compose_prometheus_scrapes_the_gateway_and_loads_the_rules():
    services = compose_services()
    prometheus = services["prometheus"]
    config_flag = next(c for c in prometheus["command"] if c.startswith("--config.file="))
    config_path = config_flag.split("=", 1)[1]
    assert container_file(prometheus, config_path) == PROMETHEUS_CONFIG
    config = load_yaml(PROMETHEUS_CONFIG)
    for rule_file in config["rule_files"]:
        in_container = str(PurePosixPath(config_path).parent / rule_file)
        assert container_file(prometheus, in_container) == ALERTS
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "sluice")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    server = load_yaml(COMPOSE_CONFIG)["server"]
    assert targets == [f"sluice:{server.get('metrics_port') or server['port']}"]


def test_compose_grafana_is_provisioned_with_prometheus_and_the_dashboard():
    services = compose_services()
    grafana = services["grafana"]
    assert container_file(grafana, "/etc/grafana/provisioning/datasources/prometheus.yml") == GRAFANA_DATASOURCES
    assert container_file(grafana, "/etc/grafana/provisioning/dashboards/sluice.yml") == GRAFANA_DASHBOARD_PROVIDERS
    (datasource,) = load_yaml(GRAFANA_DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus"
    url = urlsplit(datasource["url"])
    assert url.hostname in services and "prometheus" in services[url.hostname]["image"]
    assert any(str(p).endswith(f":{url.port}") for p in services[url.hostname]["ports"])
    (provider,) = load_yaml(GRAFANA_DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    assert container_file(grafana, provider["options"]["path"] + "/sluice.json") == DASHBOARD
    home = grafana["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or container_file(grafana, home) == DASHBOARD


# -- the gateway's configs -------------------------------------------------------------------


def run_check_config(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_") and k != "OPENAI_API_KEY"}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(path)],
        capture_output=True, text=True, env=environ, cwd=path.parent, timeout=60, check=False,
    )


@pytest.mark.parametrize("path", [COMPOSE_CONFIG, K8S_CONFIG], ids=["compose", "k8s"])
def test_deploy_configs_pass_check_config(path):
    result = run_check_config(path, OPENAI_API_KEY="sk-deploy-test-0000")
    assert result.returncode == 0, result.stderr
    # The key comes from the environment: without it the config is refused, naming the variable.
    result = run_check_config(path)
    assert result.returncode == 1 and "OPENAI_API_KEY" in result.stderr
    config = load_yaml(path)
    assert config["accounting"]["store"] == "redis"
    assert config["server"]["host"] == "0.0.0.0"
    assert all(not key["sha256"].startswith("<") for key in config["keys"])


# -- Kubernetes ---------------------------------------------------------------------------------


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object, from the files the kustomization lists."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for doc in load_yaml_docs(K8S / resource):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} twice"
            objects[key] = doc
    return objects


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_kustomization_names_files_that_exist_and_every_manifest_is_well_formed():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), f"kustomization lists {resource}, which does not exist"
    for generator in kustomization.get("configMapGenerator", []):
        for entry in generator.get("files", []):
            source = entry.split("=", 1)[-1]
            assert (K8S / source).is_file(), f"configMapGenerator {generator['name']}: no file {source}"
            assert (K8S / source).resolve().is_relative_to(K8S.resolve()), "kustomize loads only files below it"
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert manifests == set(kustomization["resources"]), "a manifest is missing from the kustomization"
    for path in K8S.glob("*.yaml"):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_yaml_docs(path):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path.name
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), path.name
    kinds = {kind for kind, _ in k8s_objects()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"} <= kinds


def test_k8s_deployment_runs_replicas_with_probes_limits_secret_and_config():
    objects = k8s_objects()
    kustomization = load_yaml(K8S / "kustomization.yaml")
    deployment = objects[("Deployment", "sluice")]
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    pod = spec["template"]
    assert selects(spec["selector"]["matchLabels"], pod["metadata"]["labels"])
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = load_yaml(K8S_CONFIG)
    assert ports["http"] == config["server"]["port"]
    assert ports["metrics"] == config["server"]["metrics_port"]

    def probe_path(probe: dict[str, Any]) -> str:
        assert probe["httpGet"]["port"] in ("http", config["server"]["port"])
        return probe["httpGet"]["path"]

    assert probe_path(container["readinessProbe"]) == "/readyz"
    assert probe_path(container["livenessProbe"]) == "/healthz"
    if "startupProbe" in container:
        assert probe_path(container["startupProbe"]) == "/healthz"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind

    # The upstream key: the env var the config's upstream names, from a Secret.
    env = {e["name"]: e for e in container["env"]}
    key_env = config["upstreams"][0]["api_key_env"]
    secret_ref = env[key_env]["valueFrom"]["secretKeyRef"]
    example = load_yaml(K8S / "secret.example.yaml")
    assert example["kind"] == "Secret" and secret_ref["name"] == example["metadata"]["name"]
    assert secret_ref["key"] in example["stringData"]
    assert example["metadata"]["namespace"] == kustomization["namespace"]
    assert env["SLUICE_SERVER__HOST"]["value"] == "0.0.0.0"

    # The config: a ConfigMap the kustomization generates from config/sluice.yaml, at the path served.
    args = container["args"]
    config_path = args[args.index("--config") + 1] if "--config" in args else env["SLUICE_CONFIG"]["value"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mount = next(m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"].rstrip("/") + "/"))
    config_map = volumes[mount["name"]]["configMap"]["name"]
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == config_map]
    keys = dict(entry.split("=", 1) if "=" in entry else (Path(entry).name, entry) for entry in generator["files"])
    key = config_path[len(mount["mountPath"].rstrip("/")) + 1 :]
    assert (K8S / keys[key]).resolve() == K8S_CONFIG
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"

    # The gateway drains within the pod's grace period.
    assert pod["spec"]["terminationGracePeriodSeconds"] > config["server"]["shutdown_grace_seconds"]
    image = container["image"].split(":")[0]
    assert image in {i["name"] for i in kustomization.get("images", [])}


def test_k8s_redis_is_the_service_the_config_names():
    objects = k8s_objects()
    url = urlsplit(load_yaml(K8S_CONFIG)["accounting"]["redis_url"])
    service = objects[("Service", url.hostname)]
    assert (url.port or 6379) in {p["port"] for p in service["spec"]["ports"]}
    backends = [o for (kind, _), o in objects.items() if kind in ("Deployment", "StatefulSet")
                and selects(service["spec"]["selector"], o["spec"]["template"]["metadata"]["labels"])]
    assert len(backends) == 1 and backends[0]["spec"]["template"]["spec"]["containers"][0]["image"].startswith("redis")


def test_k8s_service_hpa_pdb_and_servicemonitor_point_at_the_gateway():
    objects = k8s_objects()
    deployment = objects[("Deployment", "sluice")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}

    service = objects[("Service", "sluice")]
    assert selects(service["spec"]["selector"], pod_labels)
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in container_ports
    service_ports = {p["name"] for p in service["spec"]["ports"]}

    hpa = next(o for (kind, _), o in objects.items() if kind == "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "sluice")
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]

    pdb = next(o for (kind, _), o in objects.items() if kind == "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "the PDB must still allow a drain"

    monitor = next(o for (kind, _), o in objects.items() if kind == "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports and endpoint.get("path", "/metrics") == "/metrics"
        assert endpoint["port"] == "metrics"


def test_k8s_prometheusrule_carries_exactly_the_alert_rules():
    objects = k8s_objects()
    rule = next(o for (kind, _), o in objects.items() if kind == "PrometheusRule")
    assert rule["spec"]["groups"] == load_yaml(ALERTS)["groups"]


# -- alerts and dashboard: only exported metrics -------------------------------------------------


def test_alerts_cover_the_issue_and_query_only_exported_metrics():
    exported = exported_metrics()
    rules = [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]
    problems = [p for rule in rules for p in check_query(rule["expr"], exported)]
    assert problems == []
    used = {name: PromQL(rule["expr"]).metrics for rule in rules for name in [rule["alert"]]}
    # Upstream error rate, 5xx rate, p99 time to first token, quota rejections, store errors.
    assert any("sluice_upstream_errors_total" in m for m in used.values())
    assert any("sluice_time_to_first_token_seconds_bucket" in m for m in used.values())
    assert any("sluice_quota_rejections_total" in m for m in used.values())
    exprs = {rule["alert"]: rule["expr"] for rule in rules}
    assert any('status=~"5.."' in e for e in exprs.values())
    assert any("0.99" in e and "time_to_first_token" in e for e in exprs.values())
    assert "sluice_store_errors_total" in used["SluiceQuotaStoreErrors"]
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    # Every alert has a unit test in alerts_test.yml.
    tested = {t["alertname"] for case in load_yaml(ALERTS_TEST)["tests"] for t in case["alert_rule_test"]
              if t.get("exp_alerts")}
    assert tested == set(names)


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            queries.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*([A-Za-z_][A-Za-z0-9_]*)\)", query)
            assert match, query
            queries.append(f"count by ({match.group(2)}) ({match.group(1)})")
    return queries


def test_dashboard_has_the_panels_and_queries_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exported = exported_metrics()
    queries = dashboard_queries(dashboard)
    problems = [p for q in queries for p in check_query(q, exported)]
    assert problems == []
    used = set().union(*(PromQL(q).metrics for q in queries))
    for metric in ("sluice_requests_total", "sluice_tokens_total", "sluice_quota_rejections_total",
                   "sluice_moderation_actions_total", "sluice_request_duration_seconds_bucket",
                   "sluice_time_to_first_token_seconds_bucket"):
        assert metric in used, metric
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in ("requests", "tokens / s by team", "rejections", "moderation", "duration", "time to first token"):
        assert topic in titles, topic
    # Tokens per team: a panel grouping tokens by team.
    assert any("sluice_tokens_total" in e and re.search(r"by \([^)]*team", e)
               for p in panels for e in (t["expr"] for t in p["targets"]))

    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    # Every panel and query reads the dashboard's data-source variable (or the provisioned uid).
    (datasource,) = load_yaml(GRAFANA_DATASOURCES)["datasources"]
    variables = {v["name"] for v in dashboard["templating"]["list"] if v["type"] == "datasource"}
    allowed = {datasource["uid"]} | {f"${{{name}}}" for name in variables} | {f"${name}" for name in variables}
    for panel in panels:
        for ref in [panel.get("datasource")] + [t.get("datasource") for t in panel["targets"]]:
            assert ref is None or ref["uid"] in allowed, panel["title"]
    assert dashboard["uid"] and dashboard["title"]


# -- promtool -------------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True, cwd=REPO, timeout=60, check=False)


def test_promtool_check_config():
    result = promtool("check", "config", str(PROMETHEUS_CONFIG.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules():
    result = promtool("check", "rules", str(ALERTS.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules():
    result = promtool("test", "rules", str(ALERTS_TEST.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules_of_the_prometheusrule(tmp_path):
    rule = next(d for d in load_yaml_docs(K8S / "prometheusrule.yaml") if d["kind"] == "PrometheusRule")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
