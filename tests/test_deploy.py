"""deploy/kubernetes and deploy/slurm (no cluster here): every manifest parses, and the workers run the same
`classifier search` as the README's scale-out section, with secrets that exist and one GPU each."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
import yaml
from conftest import REPO

from classifier.cli import main

KUBERNETES = REPO / "deploy" / "kubernetes"
SBATCH = REPO / "deploy" / "slurm" / "search.sbatch"
SEARCH_OPTIONS = {name for param in main.commands["search"].params for name in param.opts}
COMPOSE_IMAGES = {
    service["image"] for service in yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"].values()
}


def documents() -> list[dict]:
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        found += [document for document in yaml.safe_load_all(path.read_text()) if document]
    return found


def by_kind(kind: str) -> dict[str, dict]:
    return {document["metadata"]["name"]: document for document in documents() if document.get("kind") == kind}


def containers() -> list[dict]:
    workloads = [*by_kind("Deployment").values(), *by_kind("StatefulSet").values(), *by_kind("Job").values()]
    return [container for workload in workloads for container in workload["spec"]["template"]["spec"]["containers"]]


@pytest.fixture(scope="module")
def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Beyond one host\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, "README.md has no '## Beyond one host' section"
    return match.group(1)


def test_kustomization_lists_every_manifest_but_the_secret_template():
    listed = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["resources"]
    present = {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert sorted(listed) == sorted(present)


def test_services_run_the_images_of_docker_compose():
    assert {container["image"] for container in containers()} == COMPOSE_IMAGES
    assert set(by_kind("StatefulSet")) == {"postgres", "minio"} and set(by_kind("Deployment")) == {"mlflow"}
    services = by_kind("Service")
    assert set(services) == {"postgres", "minio", "mlflow"}
    assert all(service["spec"].get("type", "ClusterIP") == "ClusterIP" for service in services.values())


def test_every_secret_reference_names_a_key_of_the_secret_template():
    secret = yaml.safe_load((KUBERNETES / "secrets.example.yaml").read_text())
    assert all(value == "" for value in secret["stringData"].values()), "the template ships no credentials"
    references = [
        variable["valueFrom"]["secretKeyRef"]
        for container in containers()
        for variable in container.get("env", [])
        if "secretKeyRef" in variable.get("valueFrom", {})
    ]
    assert references
    assert {reference["name"] for reference in references} == {secret["metadata"]["name"]}
    assert {reference["key"] for reference in references} == set(secret["stringData"])
    literal = [
        variable["name"] for container in containers() for variable in container.get("env", []) if "value" in variable
    ]
    assert not [name for name in literal if re.search("PASSWORD|SECRET|USER", name)], "credentials come from the Secret"


def test_workers_are_an_indexed_job_of_classifier_search_with_one_gpu_each(readme_section):
    job = by_kind("Job")["search-workers"]["spec"]
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"] >= 2
    assert job["template"]["spec"]["restartPolicy"] == "OnFailure" and job["backoffLimitPerIndex"] >= 1
    (worker,) = job["template"]["spec"]["containers"]
    arguments = worker["command"]
    assert arguments[:2] == ["classifier", "search"]
    assert {argument for argument in arguments if argument.startswith("--")} <= SEARCH_OPTIONS
    assert (REPO / arguments[arguments.index("--config") + 1]).is_file()
    assert arguments[arguments.index("--storage") + 1].startswith("postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@")
    assert worker["resources"]["limits"] == {"nvidia.com/gpu": 1}
    environment = {variable["name"]: variable for variable in worker["env"]}
    assert environment["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(environment)
    assert " ".join(arguments[:3]) in readme_section and "parallelism" in readme_section


def test_the_tracking_server_runs_mlflows_basic_auth_app():
    (server,) = by_kind("Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"]
    script = server["command"][-1]
    assert script.startswith("exec mlflow server --app-name basic-auth")
    names = {variable["name"] for variable in server["env"]}
    assert {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "AWS_SECRET_ACCESS_KEY"} <= names


def test_the_slurm_job_array_runs_one_search_worker_per_gpu(readme_section):
    text = SBATCH.read_text()
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", text, re.M))
    assert directives["gres"] == "gpu:1" and re.fullmatch(r"0-\d+", directives["array"])
    assert "requeue" in directives
    command = shlex.split(re.search(r"^exec srun (classifier search .*?)$", text.replace("\\\n", " "), re.M | re.S)[1])
    assert command[:2] == ["classifier", "search"]
    assert {argument for argument in command if argument.startswith("--")} <= SEARCH_OPTIONS
    assert f"sbatch --array=0-7 {SBATCH.relative_to(REPO)}" in readme_section
    assert "kubectl apply -k deploy/kubernetes" in readme_section
