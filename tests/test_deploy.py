"""The deployment files, checked by real validators, and docker-compose.yml run as local processes.

- docker-compose.yml against the Compose Specification's JSON schema (vendored in deploy/schema/);
- every kustomize overlay rendered by `kubectl kustomize` and validated, strictly, against the Kubernetes
  OpenAPI schemas that `kubernetes-validate` ships (offline);
- the Dockerfiles linted by hadolint;
- the compose file's teacher and two trainers run with their commands and environment exactly as written
  there, as local processes: service names map to 127.0.0.1, volumes to a tmp dir, the toy world to the
  quick one. No Docker engine and no cluster are needed.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.teacher.launch import free_port
from trainer.config import load_config

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILES = sorted((ROOT / "deploy" / "docker").glob("*.Dockerfile"))
# one teacher Service; overlays/two-teachers has two (test_two_teachers_overlay_wires_one_trainer_to_both_teachers)
ONE_TEACHER_OVERLAYS = ["base", "overlays/cpu-demo", "overlays/gpu"]
OVERLAYS = [*ONE_TEACHER_OVERLAYS, "overlays/two-teachers"]
K8S_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]


def tool(name: str) -> str:
    """A validator's executable from the virtual environment's pip packages (or PATH)."""
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not path:
        pytest.fail(f"{name} not found: install the dev extras (pip install -e '.[dev]')")
    return str(path)


# ---- Compose ------------------------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification():
    schema = json.loads((ROOT / "deploy" / "schema" / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(COMPOSE)]
    assert not errors, "\n".join(errors)
    # the validator is not a rubber stamp: a misspelt key and a wrong type are rejected
    broken = json.loads(json.dumps(COMPOSE))
    broken["services"]["trainer"]["contanier_name"] = "x"
    broken["services"]["teacher"]["ports"] = "8000:8000"
    messages = " ".join(e.message for e in validator.iter_errors(broken))
    assert "'contanier_name' was unexpected" in messages and "'8000:8000' is not of type 'array'" in messages


def test_compose_trainers_scale_behind_a_healthy_teacher():
    trainer, teacher = SERVICES["trainer"], SERVICES["teacher"]
    # `--scale trainer=N`: nothing that two replicas could collide on
    assert "container_name" not in trainer and "ports" not in trainer
    assert "out=/runs/$${HOSTNAME}" in trainer["command"][-1]
    assert trainer["depends_on"]["teacher"] == {"condition": "service_healthy"}
    assert trainer["depends_on"]["toy-build"] == {"condition": "service_completed_successfully"}
    assert "readyz.py" in " ".join(teacher["healthcheck"]["test"])
    for name in ("teacher", "trainer"):
        files = [entry["path"] for entry in SERVICES[name]["env_file"]]
        assert files == ["deploy/teacher.env.example", "deploy/teacher.env"]
    # CPU by default; the gpu profile reserves an NVIDIA device
    assert all("profiles" not in SERVICES[name] for name in ("toy-build", "teacher", "trainer"))
    for name in ("teacher-gpu", "trainer-gpu"):
        assert SERVICES[name]["profiles"] == ["gpu"]
    devices = SERVICES["teacher-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "teacher-gpu:8000" in SERVICES["trainer-gpu"]["command"][-1]
    # both teachers reach remote trainers the same way: a published port, on loopback unless told otherwise
    for name, port in (("teacher", 8000), ("teacher-gpu", 8001)):
        assert SERVICES[name]["ports"] == [f"${{TROPD_TEACHER_BIND:-127.0.0.1}}:{port}:8000"]
    # the images run as a non-root user, for whom an added capability would do nothing: none is added
    assert all("cap_add" not in service for service in SERVICES.values())


def test_compose_builds_each_image_once():
    """Parallel builds of one tag by several services fail (`image ... already exists`): one service builds
    each image, the others use it and never try to pull it (it exists only locally)."""
    builders: dict[str, list[str]] = {}
    for name, service in SERVICES.items():
        if "build" in service:
            builders.setdefault(service["image"], []).append(name)
    assert builders == {
        "tropd-trainer:0.1.0": ["toy-build"],
        "tropd-teacher-cpu:0.1.0": ["teacher"],
        "tropd-teacher:0.1.0": ["teacher-gpu"],
    }
    for name, service in SERVICES.items():
        if "build" not in service:
            assert service["image"] in builders and service["pull_policy"] == "never", name


def test_compose_two_teachers_profile_wires_one_trainer_to_both_teachers():
    """Each named teacher of the trainer's overrides is a teacher service of the compose file, on the port it
    serves, with the key it asks for, healthy before the trainer starts; each scores some of the toy tasks."""
    profile = sorted(name for name, service in SERVICES.items() if service.get("profiles") == ["two-teachers"])
    assert profile == ["teacher-code", "teacher-math", "trainer-two-teachers"]
    # `docker compose up` is unchanged: the default services are the one-teacher demo's
    defaults = {name for name, service in SERVICES.items() if "profiles" not in service}
    assert defaults == {"toy-build", "teacher", "trainer"}
    trainer = SERVICES["trainer-two-teachers"]
    overrides = dict(word.split("=", 1) for word in train_words("trainer-two-teachers") if "=" in word)
    assert not [key for key in overrides if key.startswith("teacher.")]  # named teachers only
    teachers: dict[str, dict] = {}
    for key, value in overrides.items():
        if key.startswith("teachers."):
            name, field = key.split(".")[1:]
            teachers.setdefault(name, {})[field] = value
    hosts = set()
    for name, teacher in teachers.items():
        url = urlsplit(teacher["url"])
        assert url.hostname in SERVICES, f"teacher {name}: no service {url.hostname} in docker-compose.yml"
        command = SERVICES[url.hostname]["command"]
        assert command[:3] == ["tropd", "teacher", "serve"]
        assert url.port == int(command[command.index("--port") + 1])
        assert teacher["api_key_env"] == command[command.index("--api-key-env") + 1]
        assert env_files(SERVICES[url.hostname]) == env_files(trainer)  # the one key
        assert trainer["depends_on"][url.hostname] == {"condition": "service_healthy"}
        assert teacher["client_id"] == "trainer-two-teachers-1"  # its hostname, in each teacher's /metrics
        hosts.add(url.hostname)
    assert hosts == {"teacher-math", "teacher-code"}  # two teacher services, one per name
    toy_teachers = {key: value for key, value in overrides.items() if key.startswith("data.toy_teachers.")}
    assert set(toy_teachers.values()) == set(teachers)


def train_words(name: str) -> list[str]:
    """The arguments of a compose trainer's `tropd train`, as its shell passes them (TROPD_TRAIN_ARGS unset, the
    container's hostname NAME-1)."""
    script = interpolate(SERVICES[name]["command"][-1], {})  # Compose's `$$` is the shell's `$`
    words = shlex.split(script.replace("${HOSTNAME}", f"{name}-1").replace("${TROPD_TRAIN_ARGS:-}", ""))
    assert words[:3] == ["exec", "tropd", "train"], words
    return words[3:]


def interpolate(text: str, env: dict) -> str:
    """Compose's variable interpolation: `$$` is a literal `$`; ${VAR}, ${VAR:-default}, ${VAR-default}."""

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.group(1) or match.group(4), match.group(2), match.group(3) or ""
        value = env.get(name)
        if (op == ":-" and not value) or (op == "-" and value is None):
            return default
        return value or ""

    return re.sub(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*))?\}|\$(\w+)", one, text)


def image_env(service: dict) -> dict:
    """The ENV instructions of the Dockerfile that builds the service's image (in the service that builds it)."""
    build = next(s["build"] for s in SERVICES.values() if s["image"] == service["image"] and "build" in s)
    text = (ROOT / build["dockerfile"]).read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(item.split("=", 1) for item in shlex.split(line[4:]))
    return env


def env_files(service: dict) -> dict:
    env = {}
    for entry in service.get("env_file", []):
        path = ROOT / entry["path"]
        if not path.is_file():
            assert not entry.get("required", True), f"required env_file {path} is missing"
            continue
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, value = line.split("=", 1)
                env[key.strip()] = value
    return env


class Host:
    """Runs compose services as local processes: volumes in a tmp dir, service names on 127.0.0.1."""

    def __init__(self, tmp: Path, toy: Path, host_env: dict):
        self.tmp, self.host_env, self.port = tmp, host_env, free_port()
        self.volumes = {name: tmp / "volumes" / name for name in COMPOSE["volumes"]}
        for path in self.volumes.values():
            path.mkdir(parents=True)
        (self.volumes["toy"] / "toy").symlink_to(toy)  # the `toy` volume holds the toy world at toy/

    def localize(self, service: dict, text: str) -> str:
        mounts = {"/app": ROOT}  # the images' WORKDIR holds the repository's files
        for spec in service.get("volumes", []):
            name, target = spec.split(":")[:2]
            mounts[target] = self.volumes[name]
        # one pass, so that a host path never gets mapped again
        pattern = "|".join(re.escape(target) for target in sorted(mounts, key=len, reverse=True))
        text = re.sub(rf"(?<![\w./-])({pattern})(?=/|\s|$)", lambda m: str(mounts[m.group(1)]), text)
        text = re.sub(r"//[\w.-]+:8000\b", f"//127.0.0.1:{self.port}", text)  # service DNS names, loopback
        return text.replace("0.0.0.0", "127.0.0.1")

    def command(self, service: dict, words: list[str]) -> list[str]:
        words = [self.localize(service, interpolate(word, self.host_env)) for word in words]
        return [str(self.port) if i and words[i - 1] == "--port" else w for i, w in enumerate(words)]

    def env(self, service: dict, **extra: str) -> dict:
        env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(self.tmp / "home"), "LANG": "C.UTF-8"}
        env.update(image_env(service))
        env.update(env_files(service))
        for key, value in service.get("environment", {}).items():
            if value is not None:
                env[key] = interpolate(str(value), self.host_env)
            elif key in self.host_env:  # a name without a value: passed on from the host when set there
                env[key] = self.host_env[key]
        return {**env, **extra}

    def start(self, name: str, log: str, **extra: str) -> subprocess.Popen:
        service = SERVICES[name]
        return subprocess.Popen(
            self.command(service, service["command"]),
            cwd=ROOT,
            env=self.env(service, **extra),
            stdout=(self.tmp / log).open("w"),
            stderr=subprocess.STDOUT,
        )

    def healthcheck(self, name: str) -> int:
        service = SERVICES[name]
        kind, *words = service["healthcheck"]["test"]
        assert kind == "CMD"
        words = [sys.executable if w == "python" else w for w in self.command(service, words)]
        return subprocess.run(words, cwd=ROOT, env=self.env(service), capture_output=True, timeout=30).returncode


# a few small steps: the test runs on 2 CPU cores
TRAIN_ARGS = (
    "steps=2 threads=1 rollout.prompts_per_step=4 rollout.max_new_tokens=16 eval.before_after=false "
    "eval.every=0 eval.n=4 eval.kl_prompts=4 checkpoint_every=0 tensorboard=false plot=false"
)


def test_compose_teacher_serves_two_trainers(toy_quick, tmp_path):
    host = Host(tmp_path, toy_quick, {"TROPD_TOY_ARGS": "--quick", "TROPD_TRAIN_ARGS": TRAIN_ARGS})
    (tmp_path / "home").mkdir()
    # toy-build finds the world already in its volume and exits at once
    build = host.start("toy-build", "toy-build.log")
    assert build.wait(timeout=120) == 0, (tmp_path / "toy-build.log").read_text()
    assert "cached" in (tmp_path / "toy-build.log").read_text()

    teacher = host.start("teacher", "teacher.log")
    trainers: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 240
        while host.healthcheck("teacher") != 0:  # what Compose's `service_healthy` waits for
            assert teacher.poll() is None, (tmp_path / "teacher.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the teacher was not healthy after 240 s"
            time.sleep(1)
        url = f"http://127.0.0.1:{host.port}"
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 401  # the env file's key is required

        # two replicas of one service: Docker gives each container its own hostname
        for i in (1, 2):
            trainers.append(host.start("trainer", f"trainer-{i}.log", HOSTNAME=f"trainer-{i}"))
        for i, process in enumerate(trainers, 1):
            assert process.wait(timeout=300) == 0, (tmp_path / f"trainer-{i}.log").read_text()[-3000:]
            run = host.volumes["runs"] / f"trainer-{i}"
            assert json.loads((run / "summary.json").read_text())["steps"] == 2

        key = host.env(SERVICES["teacher"])["TROPD_API_KEY"]
        metrics = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {key}"}, timeout=5).text
        for i in (1, 2):
            found = re.search(rf'^tropd_client_requests_total\{{client="trainer-{i}"\}} (\S+)$', metrics, re.M)
            assert found and float(found.group(1)) > 0, f"no requests from trainer-{i} in /metrics"
    finally:
        for process in trainers:
            if process.poll() is None:
                process.kill()
        teacher.send_signal(signal.SIGTERM)  # what `docker compose stop` sends
        try:
            code = teacher.wait(timeout=int(SERVICES["teacher"]["stop_grace_period"].rstrip("s")))
        except subprocess.TimeoutExpired:
            teacher.kill()
            code = teacher.wait()
    assert code == 0, (tmp_path / "teacher.log").read_text()[-3000:]


def test_compose_models_fetches_once(toy_quick, tmp_path):
    """The `models` one-shot, as written, with directories as its sources: fills the `models` volume, and a
    second run finds it done."""
    host = Host(tmp_path, toy_quick, {"TROPD_TEACHER_SOURCE": str(toy_quick / "teacher"),
                                      "TROPD_STUDENT_SOURCE": str(toy_quick / "student")})  # fmt: skip
    (tmp_path / "home").mkdir()
    for run in (1, 2):
        process = host.start("models", f"models-{run}.log")
        log = (tmp_path / f"models-{run}.log").read_text
        assert process.wait(timeout=120) == 0, log()
    assert log().count("already fetched") == 2
    for role in ("teacher", "student"):
        fetched = host.volumes["models"] / role
        assert (fetched / "model.safetensors").read_bytes() == (toy_quick / role / "model.safetensors").read_bytes()
    assert "models:/models:ro" in SERVICES["teacher-gpu"]["volumes"]  # TROPD_TEACHER_MODEL=/models/teacher


# ---- Kubernetes ---------------------------------------------------------------------------------------

CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
                  "CustomResourceDefinition", "PriorityClass", "IngressClass", "RuntimeClass"}  # fmt: skip
USER_KEY = "a-key-of-the-users-own"


def k8s_copy(tmp: Path, key: bool = True) -> Path:
    """deploy/k8s copied, with (or without) the gpu overlay's user-supplied key file."""
    shutil.copytree(ROOT / "deploy" / "k8s", tmp / "k8s")
    key_file = tmp / "k8s" / "overlays" / "gpu" / "teacher-key.env"  # one the user may have made here
    key_file.unlink(missing_ok=True)
    if key:
        key_file.write_text(f"TROPD_API_KEY={USER_KEY}\n")
    return tmp / "k8s"


def render(directory: Path) -> list[dict]:
    result = subprocess.run([tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    k8s = k8s_copy(tmp_path_factory.mktemp("k8s"))
    return {overlay: render(k8s / overlay) for overlay in OVERLAYS}


def find(docs: list[dict], kind: str, name: str, exact: bool = False) -> dict:
    """The one object of `kind` named `name` (with kustomize's content hash after it, unless `exact`)."""
    matches = [
        d
        for d in docs
        if d["kind"] == kind and (d["metadata"]["name"] == name if exact else d["metadata"]["name"].startswith(name))
    ]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} found"
    return matches[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_overlay_validates_against_the_kubernetes_schemas(rendered, overlay):
    for doc in rendered[overlay]:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay}: {doc['kind']} {doc['metadata']['name']} (k8s {version}): {exc.message}")
    # strict validation rejects what the API server would not accept
    job = json.loads(json.dumps(find(rendered[overlay], "Job", "tropd-trainer")))
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", ONE_TEACHER_OVERLAYS)
def test_kustomize_overlay_wires_teacher_and_trainers(rendered, overlay, tmp_path):
    docs = rendered[overlay]
    deployment, job = find(docs, "Deployment", "tropd-teacher"), find(docs, "Job", "tropd-trainer")
    service, policy = find(docs, "Service", "tropd-teacher", exact=True), find(docs, "NetworkPolicy", "tropd-teacher")
    # every teacher pod, by name: trainers expand it into one replica per pod (teacher.resolve_replicas)
    pods = find(docs, "Service", "tropd-teacher-pods")
    assert pods["spec"]["clusterIP"] == "None" and pods["spec"]["selector"] == service["spec"]["selector"]
    teacher_pod, trainer_pod = deployment["spec"]["template"], job["spec"]["template"]
    teacher = teacher_pod["spec"]["containers"][0]
    assert service["spec"]["selector"].items() <= teacher_pod["metadata"]["labels"].items()
    assert (
        find(docs, "PodDisruptionBudget", "tropd-teacher")["spec"]["selector"]["matchLabels"]
        == (deployment["spec"]["selector"]["matchLabels"])
    )
    assert teacher["readinessProbe"]["exec"]["command"][-1].endswith("/readyz")
    assert teacher["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Prometheus scrapes /metrics without the key: the service must serve it open
    assert teacher_pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert "--metrics-open" in teacher["command"]
    # only trainer pods (and Prometheus) reach the teacher
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= teacher_pod["metadata"]["labels"].items()
    sources = [rule["from"][0] for rule in policy["spec"]["ingress"]]
    assert sources[0]["podSelector"]["matchLabels"].items() <= trainer_pod["metadata"]["labels"].items()
    assert all("namespaceSelector" in s for s in sources[1:])
    for pod in (teacher_pod, trainer_pod):
        assert_hardened(pod)
    # trainers: an indexed Job whose config points at the teacher Service's DNS name and loads as a TrainConfig
    assert job["spec"]["completionMode"] == "Indexed"
    config_map = find(docs, "ConfigMap", "tropd-trainer-config")
    (tmp_path / "trainer.yaml").write_text(config_map["data"]["trainer.yaml"])
    config = load_config(str(tmp_path / "trainer.yaml"), ["out=/runs/x"])
    assert config.teacher.url == f"http://{pods['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert config.teacher.resolve_replicas
    secret = find(docs, "Secret", "tropd-teacher-key")
    key_ref = next(e["valueFrom"]["secretKeyRef"] for e in teacher["env"] if e["name"] == "TROPD_API_KEY")
    assert key_ref["name"] == secret["metadata"]["name"] == "tropd-teacher-key"  # a fixed name: see below
    # the trainers read the key from the Secret mounted as a file (read again on a 401: rotation, no restart)
    trainer = trainer_pod["spec"]["containers"][0]
    assert "TROPD_API_KEY" not in [e["name"] for e in trainer.get("env", [])] and config.teacher.api_key_env is None
    volume = next(v for v in trainer_pod["spec"]["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == "tropd-teacher-key" and "subPath" not in str(trainer["volumeMounts"])
    mount = next(m for m in trainer["volumeMounts"] if m["name"] == volume["name"])
    item = volume["secret"]["items"][0]
    assert item["key"] == "TROPD_API_KEY" and config.teacher.api_key_file == f"{mount['mountPath']}/{item['path']}"
    # the model paths come from one ConfigMap: what the teacher serves and the trainers train
    sources = find(docs, "ConfigMap", "tropd-model-sources")
    env = {e["name"]: e["valueFrom"]["configMapKeyRef"] for e in teacher["env"] + trainer["env"] if "valueFrom" in e
           and "configMapKeyRef" in e["valueFrom"]}  # fmt: skip
    assert env["TEACHER_DIR"] == {"name": sources["metadata"]["name"], "key": "TEACHER_DIR"}
    assert env["STUDENT_DIR"] == {"name": sources["metadata"]["name"], "key": "STUDENT_DIR"}
    assert "$(TEACHER_DIR)" in teacher["command"] and "student=${STUDENT_DIR}" in trainer["command"][-1]
    models = next(c for c in teacher_pod["spec"]["initContainers"] if c["name"] == "models")
    assert {"configMapRef": {"name": sources["metadata"]["name"]}} in models["envFrom"]
    assert any(m["mountPath"] == "/models" and not m.get("readOnly") for m in models["volumeMounts"])
    claims = [
        v["persistentVolumeClaim"]["claimName"] for v in trainer_pod["spec"]["volumes"] if "persistentVolumeClaim" in v
    ]
    assert "tropd-runs" in claims and find(docs, "PersistentVolumeClaim", "tropd-runs")


def assert_hardened(pod: dict) -> None:
    """Pod security: non-root, no privilege escalation, read-only root filesystem, resources everywhere."""
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["limits"]["memory"]


def test_two_teachers_overlay_wires_one_trainer_to_both_teachers(rendered):
    """Each named teacher of the trainer's config is a Service of the overlay in front of its own teacher
    Deployment, which the trainer waits for, whose NetworkPolicy admits it and which serves the key it mounts;
    each teacher scores some of the toy tasks."""
    docs = rendered["overlays/two-teachers"]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert sorted(deployments) == ["tropd-teacher-code", "tropd-teacher-math"]  # the cpu-demo's teacher is gone
    assert not [d for d in docs if d["metadata"]["name"] in ("tropd-teacher", "tropd-teacher-pods")]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}

    def teacher_behind(host: str, port: int) -> str:
        """The one teacher Deployment whose pods the Service named `host` sends its `port` to."""
        assert host in services, f"no Service {host} in the overlay"
        assert port in [p["port"] for p in services[host]["spec"]["ports"]], (host, port)
        selector = services[host]["spec"]["selector"].items()
        names = [n for n, d in deployments.items() if selector <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(names) == 1, f"Service {host} selects {names}"
        return names[0]

    job = find(docs, "Job", "tropd-trainer")
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1  # one trainer
    trainer_pod = job["spec"]["template"]
    trainer = trainer_pod["spec"]["containers"][0]
    config = yaml.safe_load(find(docs, "ConfigMap", "tropd-trainer-config")["data"]["trainer.yaml"])
    assert "teacher" not in config and " teacher." not in trainer["command"][-1]  # named teachers only
    urls = {name: urlsplit(teacher["url"]) for name, teacher in config["teachers"].items()}
    wired = {name: teacher_behind(url.hostname, url.port) for name, url in urls.items()}
    assert sorted(wired.values()) == sorted(deployments)  # two teachers, each its own Deployment
    assert set(config["data"]["toy_teachers"].values()) == set(config["teachers"])
    for name in config["teachers"]:
        assert f"teachers.{name}.client_id=" in trainer["command"][-1]
    # the trainer starts when both answer /readyz
    wait = " ".join(trainer_pod["spec"]["initContainers"][0]["command"])
    waits = re.findall(r"http://([\w.-]+):(\d+)/readyz", wait)
    assert sorted(teacher_behind(host, int(port)) for host, port in waits) == sorted(deployments)
    # the key: each teacher serves the Secret that the trainer mounts as the file its config names
    volume = next(v for v in trainer_pod["spec"]["volumes"] if "secret" in v)
    mount = next(m for m in trainer["volumeMounts"] if m["name"] == volume["name"])
    key_file = f"{mount['mountPath']}/{volume['secret']['items'][0]['path']}"
    assert [teacher["api_key_file"] for teacher in config["teachers"].values()] == [key_file] * len(wired)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]
        labels = pod["metadata"]["labels"].items()
        teacher = pod["spec"]["containers"][0]
        key_ref = next(e["valueFrom"]["secretKeyRef"] for e in teacher["env"] if e["name"] == "TROPD_API_KEY")
        assert key_ref["name"] == volume["secret"]["secretName"]
        # its NetworkPolicy admits the trainer's pods
        (policy,) = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels]
        admitted = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"].items()
        assert admitted <= trainer_pod["metadata"]["labels"].items(), name
        # both pods build the toy world into the one volume at start: one at a time
        models = next(c for c in pod["spec"]["initContainers"] if c["name"] == "models")
        assert models["command"][:2] == ["flock", "/models"] and "/models" in models["command"][2:]
        assert_hardened(pod)
    assert_hardened(trainer_pod)


def test_two_teacher_trainer_configs_load(rendered, tmp_path):
    """The trainers of both two-teacher examples, their config and overrides as written, load as a TrainConfig
    with the two named teachers."""
    compose = load_config(None, [word for word in train_words("trainer-two-teachers") if "=" in word])
    config_map = find(rendered["overlays/two-teachers"], "ConfigMap", "tropd-trainer-config")
    (tmp_path / "trainer.yaml").write_text(config_map["data"]["trainer.yaml"])
    k8s = load_config(str(tmp_path / "trainer.yaml"), ["out=/runs/x", "teachers.math.client_id=x"])
    for config in (compose, k8s):
        assert sorted(config.teachers) == ["code", "math"]
        assert config.data.toy_teachers == {"math": "math", "code": "code", "general": "math"}
        assert len({teacher.top_k for teacher in config.teachers.values()}) == 1
    assert all(teacher.resolve_replicas for teacher in k8s.teachers.values())


def test_gpu_overlay_sizes_follow_its_options(tmp_path):
    """GPUs per teacher and trainer nodes, set once in options.yaml, reach every field that must agree."""
    k8s_copy(tmp_path)
    options = tmp_path / "k8s" / "overlays" / "gpu" / "options.yaml"
    text = options.read_text().replace('tensorParallelSize: "1"', 'tensorParallelSize: "4"')
    options.write_text(text.replace('trainerNodes: "2"', 'trainerNodes: "4"'))
    docs = render(tmp_path / "k8s" / "overlays" / "gpu")
    teacher = find(docs, "Deployment", "tropd-teacher")["spec"]["template"]["spec"]["containers"][0]
    assert teacher["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert {"name": "TENSOR_PARALLEL_SIZE", "value": "4"} in teacher["env"]
    assert "$(TENSOR_PARALLEL_SIZE)" in teacher["command"]
    job = find(docs, "Job", "tropd-trainer")
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    trainer = job["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "NNODES", "value": "4"} in trainer["env"]
    assert "--rdzv-backend=c10d" in trainer["command"][-1]
    ddp = find(docs, "Service", "tropd-trainer-ddp")
    assert ddp["spec"]["clusterIP"] == "None" and job["spec"]["template"]["spec"]["subdomain"] == "tropd-trainer-ddp"
    assert all(d["metadata"]["name"] != "tropd-gpu-options" for d in docs)  # local config, not applied


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_namespaced_object_has_the_namespace(rendered, overlay):
    """An object without a namespace lands in whatever namespace the user's context points at (the rendezvous
    Service that an overlay adds, say), where the pods that need it cannot find it."""
    missing = [f"{d['kind']} {d['metadata']['name']}" for d in rendered[overlay]
               if d["kind"] not in CLUSTER_SCOPED and d["metadata"].get("namespace") != "tropd"]  # fmt: skip
    assert not missing, f"{overlay}: no namespace tropd on {', '.join(missing)}"
    assert find(rendered[overlay], "Namespace", "tropd")


def test_gpu_overlay_refuses_to_render_without_a_key_of_the_users_own(rendered, tmp_path):
    result = subprocess.run([tool("kubectl"), "kustomize", str(k8s_copy(tmp_path, key=False) / "overlays" / "gpu")],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0 and "teacher-key.env" in result.stderr
    secret = find(rendered["overlays/gpu"], "Secret", "tropd-teacher-key")
    assert base64.b64decode(secret["data"]["TROPD_API_KEY"]).decode() == USER_KEY  # not the demo key
    assert (ROOT / "deploy" / "k8s" / "overlays" / "gpu" / "teacher-key.env.example").is_file()
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/k8s/overlays/gpu/teacher-key.env"], cwd=ROOT)
    assert ignored.returncode == 0, "git must ignore the gpu overlay's key file"


def test_gpu_overlay_runs_the_real_model_example(rendered, tmp_path):
    """Models from the hub (configs/qwen3-8b-to-0.6b.yaml's pair), a teacher on a GPU, two trainer pods on
    GPUs; the trainer config is the example's, with the cluster's paths."""
    docs = rendered["overlays/gpu"]
    sources = find(docs, "ConfigMap", "tropd-model-sources")["data"]
    assert sources["TEACHER_SOURCE"] == "hf://Qwen/Qwen3-8B" and sources["STUDENT_SOURCE"] == "hf://Qwen/Qwen3-0.6B"
    assert sources["TEACHER_DIR"] == "/models/teacher" and sources["STUDENT_DIR"] == "/models/student"
    config_map = find(docs, "ConfigMap", "tropd-trainer-config")
    (tmp_path / "trainer.yaml").write_text(config_map["data"]["trainer.yaml"])
    config = load_config(str(tmp_path / "trainer.yaml"), [f"student={sources['STUDENT_DIR']}", "out=/runs/x"])
    example = load_config(str(ROOT / "configs" / "qwen3-8b-to-0.6b.yaml"))
    for section in ("loss", "guidance", "rollout", "optim"):
        assert getattr(config, section) == getattr(example, section), section
    assert (config.dtype, config.steps, config.teacher.top_k) == (example.dtype, example.steps, example.teacher.top_k)
    assert all(path.startswith(sources["DATA_DIR"] + "/") for path in config.data.train + config.data.eval)
    teacher = find(docs, "Deployment", "tropd-teacher")["spec"]["template"]["spec"]["containers"][0]
    assert teacher["command"][teacher["command"].index("--dtype") + 1] == "bfloat16"
    trainer_pods = find(docs, "Job", "tropd-trainer")["spec"]
    trainer = trainer_pods["template"]["spec"]["containers"][0]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == "1" and trainer_pods["parallelism"] == 2
    assert trainer["image"] == teacher["image"] == "tropd-teacher:0.1.0"  # CUDA torch


def test_models_init_container_fetches_what_its_configmap_names(rendered, toy_quick, tmp_path):
    """The base's `models` init container, run as written (its shell command, its ConfigMap as environment),
    with directories as sources: it fills the volume, and a restarted pod finds it done."""
    docs = rendered["base"]
    pod = find(docs, "Deployment", "tropd-teacher")["spec"]["template"]["spec"]
    models = next(c for c in pod["initContainers"] if c["name"] == "models")
    volume = tmp_path / "models"
    sources = find(docs, "ConfigMap", "tropd-model-sources")["data"]
    env = {key: value.replace("/models", str(volume)) for key, value in sources.items()}
    env |= {"TEACHER_SOURCE": str(toy_quick / "teacher"), "STUDENT_SOURCE": str(toy_quick / "student")}
    env |= {e["name"]: e["value"] for e in models["env"]} | {"HOME": str(tmp_path), "PATH": f"{BIN}:/usr/bin:/bin"}
    for _ in range(2):
        result = subprocess.run(models["command"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert result.returncode == 0, result.stderr
    assert result.stdout.count("already fetched") == 2
    assert sorted(p.name for p in volume.iterdir()) == ["student", "teacher"]  # no DATA_SOURCE: no data
    # the base's own sources are the directories themselves: models copied in by hand are only checked
    assert sources["TEACHER_SOURCE"] == sources["TEACHER_DIR"] and sources["STUDENT_SOURCE"] == sources["STUDENT_DIR"]


@pytest.mark.parametrize("overlay, node_gib", [("overlays/cpu-demo", 6), ("overlays/two-teachers", 8)])
def test_local_demo_fits_a_two_cpu_cluster(rendered, overlay, node_gib):
    """A 2-CPU kind or minikube node keeps about 1 CPU and 2 GiB for its own pods (API server, etcd, DNS, ...): the
    demo's pods must request less than the rest of a node of 2 CPUs and `node_gib` GiB (docs/deployment.md)."""
    cpu = memory = 0.0
    for doc in rendered[overlay]:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        pods = doc["spec"].get("replicas", doc["spec"].get("parallelism", 1))
        spec = doc["spec"]["template"]["spec"]

        def requests(containers, key):
            return [quantity(c["resources"]["requests"][key]) for c in containers]

        # the scheduler reserves the largest of the init containers and the sum of the containers
        cpu += pods * max(requests(spec.get("initContainers", []), "cpu") + [sum(requests(spec["containers"], "cpu"))])
        memory += pods * max(requests(spec.get("initContainers", []), "memory")
                             + [sum(requests(spec["containers"], "memory"))])  # fmt: skip
    assert cpu <= 1.0 and memory <= (node_gib - 2) * 2**30, (cpu, memory / 2**30)


def quantity(text: str) -> float:
    """A Kubernetes quantity (`250m`, `2`, `1Gi`, `512Mi`) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for unit, factor in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


# ---- Dockerfiles --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    result = subprocess.run([tool("hadolint"), "--format", "json", "--no-fail", str(dockerfile)], capture_output=True)
    findings = json.loads(result.stdout or b"[]")
    # errors fail the build; warnings too (among them: unpinned apt and pip packages, `latest` images)
    errors = [f"{f['line']}: {f['code']} {f['message']}" for f in findings if f["level"] in ("error", "warning")]
    assert not errors, "\n".join(errors)
    text = dockerfile.read_text()
    assert re.search(r"^FROM python:\d+\.\d+\.\d+-slim-\w+$", text, re.M), "pin the base image's version"
    assert re.search(r"^USER 10001:10001$", text, re.M), "run as a non-root user"
    if dockerfile.name.startswith("teacher"):
        assert re.search(r"^HEALTHCHECK .*\n.*readyz\.py", text, re.M)
