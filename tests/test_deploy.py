"""deploy/: the Dockerfiles (hadolint), the compose files (docker-compose config), the Kubernetes
manifests (rendered by kubectl's kustomize, validated by kubernetes-validate), the alert rules
(promtool check/test rules), and the Grafana dashboard and alert queries run by a real Prometheus
against a real ``segsynth serve`` started with the deployment's own streams.yaml."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

from test_serve import api, free_port, service

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "segsynth.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"


def tool(name: str) -> str:
    """A checker .ci/run installs: found next to the interpreter (PyPI) or on PATH (Debian); a
    skip outside CI, a failure in it."""
    found = Path(sys.executable).with_name(name)
    path = str(found) if found.exists() else shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed; .ci/run installs it")
        pytest.skip(f"{name} not installed (.ci/run installs it)")
    return path


def check(*cmd, cwd: Path | None = None, input: str | None = None) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, input=input, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


# ---- images ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint_and_run_as_a_user_with_a_healthcheck(dockerfile):
    path = DEPLOY / dockerfile
    check(tool("hadolint"), "--failure-threshold", "info", path)  # any finding fails
    text = path.read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(stages) == 2, "a build stage and a runtime stage"
    base = re.search(r"^ARG \w+_IMAGE=(\S+)$", text, re.M)[1]
    assert re.search(r":\d+\.\d+\.\d+-", base), f"base image not pinned to a release: {base}"
    runtime = text[text.rindex("\nFROM "):]
    assert re.search(r"^USER 10001:10001$", runtime, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*/healthz", runtime, re.M)
    assert "COPY --from=build /opt/segsynth /opt/segsynth" in runtime
    lock = re.search(r"pip install -r /tmp/(\S+)", text)[1]
    pins = [line for line in (DEPLOY / lock).read_text().splitlines() if line and not line.startswith(("#", "-r"))]
    assert pins and all(re.fullmatch(r"[\w.-]+==[\w.]+", p) for p in pins), pins
    for copied in re.findall(r"^COPY (?!--)(\S+)", text, re.M):  # everything copied is in the build context
        assert (DEPLOY.parent / copied).exists(), copied


def test_the_lock_pins_every_runtime_requirement():
    import tomllib

    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]
    needed = project["dependencies"] + project["optional-dependencies"]["serve"]
    pinned = {re.split(r"==", line)[0].lower().replace("_", "-")
              for line in (DEPLOY / "requirements.lock").read_text().splitlines() if "==" in line}
    for req in needed:
        name = re.match(r"[\w.-]+", req)[0].lower().replace("_", "-")
        assert name in pinned, f"{name} is a requirement of the image but not in deploy/requirements.lock"


# ---- compose ----------------------------------------------------------------------------------------
def volume(entry) -> tuple[str, str]:
    """(source, target) of a compose volume, short ("src:dst:mode") or long syntax."""
    if isinstance(entry, dict):
        return entry.get("source", ""), entry["target"]
    source, target = entry.split(":")[:2]
    return source, target


def test_compose_files_resolve_with_the_secrets_make_secrets_makes(tmp_path):
    compose = tool("docker-compose")
    work = tmp_path / "deploy"
    shutil.copytree(DEPLOY, work, ignore=shutil.ignore_patterns("secrets"))
    check(work / "make-secrets")
    token = (work / "secrets" / "segsynth-token").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert stat.S_IMODE((work / "secrets").stat().st_mode) == 0o700
    check(work / "make-secrets")  # a second run keeps what is there
    assert (work / "secrets" / "segsynth-token").read_text() == token
    for files, image in ((["compose.yaml"], "segsynth:cpu"), (["compose.yaml", "compose.gpu.yaml"], "segsynth:gpu")):
        args = [a for f in files for a in ("-f", f)]
        config = yaml.safe_load(check(compose, *args, "config", cwd=work))
        services = config["services"]
        assert set(services) == {"segsynth", "prometheus", "grafana"}
        app = services["segsynth"]
        assert app["image"] == image and (DEPLOY.parent / app["build"]["dockerfile"]).exists()
        command = app["command"]
        config_in_container = command[command.index("--config") + 1]
        mounts = {target: source for source, target in map(volume, app["volumes"])}
        assert Path(mounts[config_in_container]) == work / "streams.yaml"
        assert command[command.index("--token-file") + 1] == "/run/secrets/segsynth-token"
        for name, svc in services.items():  # every file a container mounts is in deploy/
            for source, _ in map(volume, svc.get("volumes", [])):
                if source.startswith("/"):
                    assert Path(source).exists(), (name, source)
        gpu = app.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        assert (gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]) == (image == "segsynth:gpu")
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["segsynth:8080"]
    check(tool("promtool"), "check", "config", DEPLOY / "prometheus" / "prometheus.yml")


# ---- Kubernetes -------------------------------------------------------------------------------------
def render(tmp_path: Path, overlay: str, component: bool = False) -> list[dict]:
    """kubectl kustomize of an overlay (with the Prometheus-operator component added through a
    kustomization beside a copy of deploy/k8s), validated by kubernetes-validate --strict."""
    kubectl = tool("kubectl")
    root = tmp_path / f"k8s-{overlay}-{component}"
    shutil.copytree(DEPLOY / "k8s", root / "k8s")
    top = root / "top"
    top.mkdir()
    (top / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"../k8s/overlays/{overlay}"],
        **({"components": ["../k8s/components/prometheus-operator"]} if component else {})}))
    text = check(kubectl, "kustomize", top)
    (root / "rendered.yaml").write_text(text)
    out = check(tool("kubernetes-validate"), "--strict", root / "rendered.yaml")
    docs = [d for d in yaml.safe_load_all(text) if d]
    core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert out.count(" passed for resource ") == len(core), out
    return docs


def by_kind(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, (kind, [d["kind"] for d in docs])
    return found[0]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"], ids=lambda o: f"overlay-{o}")  # not the "gpu" mark
def test_kustomize_overlays_render_valid_manifests(tmp_path, overlay):
    docs = render(tmp_path, overlay)
    deployment, svc, streams = by_kind(docs, "Deployment"), by_kind(docs, "Service"), by_kind(docs, "ConfigMap")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels == svc["spec"]["selector"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == f"segsynth:{overlay}"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["spec"]["securityContext"]["runAsNonRoot"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    args = container["args"]
    config = Path(args[args.index("--config") + 1])
    assert volumes[mounts[str(config.parent)]]["configMap"]["name"] == streams["metadata"]["name"]
    assert yaml.safe_load(streams["data"][config.name]) == yaml.safe_load((DEPLOY / "streams.yaml").read_text())
    token = Path(args[args.index("--token-file") + 1])
    assert volumes[mounts[str(token.parent)]]["secret"]["secretName"] == "segsynth-token"
    assert svc["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        claim = by_kind(docs, "PersistentVolumeClaim")["metadata"]["name"]
        assert volumes[mounts["/cache"]] == {"name": "cache", "persistentVolumeClaim": {"claimName": claim}}
    else:
        assert volumes[mounts["/cache"]]["emptyDir"] == {}


def test_the_token_secret_of_the_readme_and_the_prometheus_operator_objects(tmp_path):
    readme = (DEPLOY / "README.md").read_text()
    command = re.search(r"^kubectl create secret generic segsynth-token .*$", readme, re.M)[0]
    key = re.search(r"--from-file=(\w+)=", command)[1]
    assert key == "token"  # the file name --token-file reads in the pod
    secret = tmp_path / "token.txt"
    secret.write_text("0123456789abcdef")
    made = check(tool("kubectl"), "create", "secret", "generic", "segsynth-token", f"--from-file={key}={secret}",
                 "--dry-run=client", "-o", "yaml")
    (tmp_path / "secret.yaml").write_text(made)
    assert " passed for resource secret/segsynth-token" in check(tool("kubernetes-validate"), "--strict",
                                                                   tmp_path / "secret.yaml")
    docs = render(tmp_path, "cpu", component=True)
    pod = by_kind(docs, "Deployment")["spec"]["template"]
    monitor = by_kind(docs, "PodMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert {e["port"] for e in monitor["podMetricsEndpoints"]} <= ports
    assert {e["path"] for e in monitor["podMetricsEndpoints"]} == {"/metrics"}
    rule = by_kind(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text()), "prometheusrule.yaml differs from alerts.yml"


# ---- alerts -----------------------------------------------------------------------------------------
def test_alert_rules_check_and_their_unit_tests_pass():
    promtool = tool("promtool")
    assert "SUCCESS: 6 rules found" in check(promtool, "check", "rules", ALERTS)
    check(promtool, "test", "rules", "alerts.test.yml", cwd=ALERTS.parent)
    tests = yaml.safe_load((ALERTS.parent / "alerts.test.yml").read_text())["tests"]
    rules = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    fired = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == rules, "every alert has a test in which it fires"


# ---- the dashboard and the rules against a live service -----------------------------------------------
FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "increase", "irate", "histogram_quantile", "vector",
             "label_values", "abs", "clamp_min", "topk", "printf"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: label matchers, ranges, grouping labels,
    strings and Grafana variables taken out, then every identifier not called as a function."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"(?<![\w:])\d+(\.\d+)?(e[+-]?\d+)?(?![\w:])", "", expr)  # numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = m[0]
        if word in KEYWORDS or expr[m.end():].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in board["templating"]["list"]]
    return exprs


def test_metric_names_are_read_from_promql():
    assert metric_names('sum by (stream, le) (rate(a_b_bucket{stream=~"$stream"}[$__rate_interval]))') == {"a_b_bucket"}
    assert metric_names("x == 0 or y{state=\"failed\"} == 1") == {"x", "y"}
    # label_values' second argument is a label name: the caller drops it
    assert metric_names("label_values(segsynth_stream_up, stream)") == {"segsynth_stream_up", "stream"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m]))) > 1e3") == {"h_bucket"}


@pytest.mark.network
def test_dashboard_and_alert_queries_run_on_a_live_service_scraped_by_prometheus(tmp_path, tiny_segmenter):
    prometheus = tool("prometheus")
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "segsynth" and board["panels"]
    for panel in board["panels"]:
        assert all(t["datasource"]["uid"] == "prometheus" for t in panel["targets"])
    sources = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert sources["datasources"][0]["uid"] == "prometheus"
    rules = [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]

    root = tmp_path / "media"
    root.mkdir()
    streams = yaml.safe_load((DEPLOY / "streams.yaml").read_text())  # the deployment's demo stream ...
    for spec in streams["streams"]:
        spec["sinks"] = [s.replace("/data/", f"{root}/") for s in spec["sinks"]]
    streams["streams"].append({"id": "short", "source": "lavfi:testsrc2=size=160x120:rate=10", "max_frames": 5,
                               "sinks": [str(root / "short.mkv")]})  # ... and one that ends
    (tmp_path / "streams.yaml").write_text(yaml.safe_dump(streams))
    with service(tmp_path, tiny_segmenter, "--config", tmp_path / "streams.yaml") as (base, _, _):
        deadline = time.monotonic() + 30
        while api(base, "GET", "/v1/streams/short")[1]["state"] != "closed":
            assert time.monotonic() < deadline, "the short stream did not end"
            time.sleep(0.3)
        _, exposition = api(base, "GET", "/metrics")
        families = set(re.findall(r"^# TYPE (\S+)", exposition, re.M))
        samples = set(re.findall(r"^([a-zA-Z_:][\w:]*)[{ ]", exposition, re.M))
        assert re.search(r'^segsynth_stream_state\{state="closed",stream="short"\} 1\.0$', exposition, re.M), exposition
        assert re.search(r'^segsynth_stream_target_fps\{stream="demo"\} 5\.0$', exposition, re.M), exposition
        assert re.search(r'^segsynth_stream_up\{stream="demo"\} 1\.0$', exposition, re.M)
        assert not re.search(r'^segsynth_stream_up\{stream="short"\}', exposition, re.M)
        for expr in dashboard_queries() + rules:
            names = metric_names(expr) - {"up"} - ({"stream"} if expr.startswith("label_values") else set())
            for name in names:  # GPU families are declared, without samples, where there is no GPU
                assert name in samples or name in families, f"{name} (in {expr!r}) is not in /metrics"

        # A real Prometheus with the deployment's own config (target, interval changed) and rules
        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["scrape_configs"][0]["static_configs"] = [{"targets": [base[len("http://"):]]}]
        config["rule_files"] = [str(ALERTS)]
        (tmp_path / "prom.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prom.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        promurl = f"http://127.0.0.1:{port}"

        def query(expr: str) -> list:
            expr = expr.replace("$__rate_interval", "10s").replace('"$stream"', '".*"')
            status, reply = api(promurl, "GET", f"/api/v1/query?query={urllib.parse.quote(expr)}")
            assert status == 200 and reply["status"] == "success", (expr, reply)
            return reply["data"]["result"]

        try:
            deadline = time.monotonic() + 60
            while True:  # frames scraped twice: rates exist
                try:
                    if query('rate(segsynth_frames_total{stage="encode", stream="demo"}[10s]) > 0'):
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "Prometheus saw no frames"
                time.sleep(1)
            time.sleep(3)
            for panel in board["panels"]:
                for target in panel["targets"]:
                    result = query(target["expr"])
                    if "gpu" not in target["expr"]:  # no GPU here: those panels are empty
                        assert result, (panel["title"], target["expr"])
            for expr in rules:
                query(expr)  # each parses and evaluates on live data
            status, reply = api(promurl, "GET", "/api/v1/rules")
            loaded = [r for g in reply["data"]["groups"] for r in g["rules"]]
            assert len(loaded) == len(rules) and all(r["health"] == "ok" for r in loaded), loaded
        finally:
            prom.terminate()
            prom.wait(30)


# ---- the CPU image, built and run by a real container engine -------------------------------------------
CONTAINERS_CONF = """\
[containers]
default_ulimits = []  # the machine's limits: raising them is not permitted in this sandbox
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""


@pytest.mark.slow  # debootstrap, pip and the build: about two minutes on two cores
@pytest.mark.network
def test_the_cpu_image_builds_runs_as_its_user_and_passes_its_healthcheck(tmp_path):
    """podman builds deploy/Dockerfile on a Python base made here with debootstrap from the
    Debian mirror (the image registries are out of reach on these machines; the base stands in
    for python:3.11-slim-bookworm: Debian 12, Python 3.11), runs `serve` with the demo
    streams.yaml and a token file, and runs the image's own HEALTHCHECK."""
    podman, debootstrap = tool("podman"), tool("debootstrap")
    env = {**os.environ, "CONTAINERS_CONF": str(tmp_path / "containers.conf")}
    (tmp_path / "containers.conf").write_text(CONTAINERS_CONF)

    def pod(*args, timeout=600, ok=True):
        r = subprocess.run([podman, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0 or not ok, f"podman {' '.join(map(str, args))}:\n{r.stdout}\n{r.stderr}"
        return r

    base, image, name = "localhost/segsynth-test-base:bookworm", "localhost/segsynth-test:cpu", "segsynth-test"
    if pod("image", "exists", base, ok=False).returncode != 0:
        rootfs = tmp_path / "rootfs"
        check(debootstrap, "--variant=minbase", "--include=python3,python3-venv,python-is-python3,ca-certificates",
              "bookworm", rootfs, "http://deb.debian.org/debian")
        ca = next((c for c in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                               "/etc/ssl/certs/ca-certificates.crt") if c and Path(c).is_file()), None)
        if ca:  # a TLS-intercepting proxy between this machine and PyPI: the build trusts what we trust
            shutil.copy(ca, rootfs / "etc/ssl/certs/ca-certificates.crt")
            (rootfs / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([podman, "import", "-", base], stdin=tar.stdout, env=env, capture_output=True,
                                  text=True, timeout=300)
        assert tar.wait() == 0 and imported.returncode == 0, imported.stderr
    pod("build", "--format", "docker", "--network", "host", "--build-arg", f"PYTHON_IMAGE={base}",
        "-f", DEPLOY / "Dockerfile", "-t", image, DEPLOY.parent)
    built = json.loads(pod("image", "inspect", image).stdout)[0]
    assert built["Config"]["User"] == "10001:10001" and built["Config"]["Entrypoint"] == ["segsynth"]
    assert "/healthz" in " ".join(built["Healthcheck"]["Test"])

    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123456789abcdef")
    token.chmod(0o644)
    pod("rm", "-f", name, ok=False)
    # host network, the service on loopback only
    pod("run", "-d", "--name", name, "--network", "host", "-v", f"{token}:/run/secrets/segsynth-token:ro",
        "-v", f"{DEPLOY / 'streams.yaml'}:/etc/segsynth/streams.yaml:ro", image,
        "serve", "--host", "127.0.0.1", "--port", "8080", "--token-file", "/run/secrets/segsynth-token",
        "--media-root", "/data", "--config", "/etc/segsynth/streams.yaml", "--segmenter", "voc", "--generator", "none")
    try:
        deadline = time.monotonic() + 120
        while pod("healthcheck", "run", name, ok=False).returncode != 0:
            assert pod("inspect", name).stdout.count('"Running": true'), pod("logs", name).stderr
            assert time.monotonic() < deadline, "the healthcheck did not pass: " + pod("logs", name).stderr
            time.sleep(2)
        status, streams = api("http://127.0.0.1:8080", "GET", "/v1/streams",
                              headers={"Authorization": "Bearer 0123456789abcdef0123456789abcdef"})
        assert status == 200 and [s["state"] for s in streams["streams"]] == ["running"], streams
        assert api("http://127.0.0.1:8080", "GET", "/v1/streams")[0] == 401  # the token guards the API
        assert pod("exec", name, "id", "-u").stdout.strip() == "10001"
        pod("stop", "-t", "30", name)
        assert pod("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
        assert "every stream drained and closed" in pod("logs", name).stderr
    finally:
        pod("rm", "-f", name, ok=False)
        pod("rmi", "-f", image, ok=False)
