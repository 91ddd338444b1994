"""What `make serve` and `make test` install, read from make's own plan (`make -n`) for a venv in a temporary
folder: serving installs the runtime dependencies only, testing adds the dev extra, and once the runtime
is in place `make test` only adds the extra."""
from __future__ import annotations

import subprocess

import pytest

from tests.deploy.files import REPO

RUNTIME_STAMP, DEV_STAMP = ".installed-runtime", ".installed-dev"


def planned_installs(target: str, venv) -> list[str]:
    """The commands `make TARGET` would run to set up the venv (and serve), in order; nothing is run."""
    result = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines()
            if line.startswith(("python3 -m venv", "sh deploy/install.sh", "touch " + str(venv) + "/.installed"))
            or line.endswith("kvserve serve")]


@pytest.fixture
def venv(tmp_path):
    return tmp_path / "venv"


def test_serve_installs_the_runtime_only(venv):
    assert planned_installs("serve", venv) == [
        f"python3 -m venv {venv}", f"sh deploy/install.sh {venv}/bin/python -e .", f"touch {venv}/{RUNTIME_STAMP}",
        f"{venv}/bin/kvserve serve"]


def test_test_installs_the_runtime_then_the_dev_extra(venv):
    assert planned_installs("test", venv) == [
        f"python3 -m venv {venv}", f"sh deploy/install.sh {venv}/bin/python -e .", f"touch {venv}/{RUNTIME_STAMP}",
        f"sh deploy/install.sh {venv}/bin/python -e '.[dev]'", f"touch {venv}/{DEV_STAMP}"]


def test_test_after_serve_only_adds_the_dev_extra(venv):
    venv.mkdir()
    (venv / RUNTIME_STAMP).touch()  # newer than pyproject.toml and deploy/install.sh: the runtime is up to date
    assert planned_installs("test", venv) == [
        f"sh deploy/install.sh {venv}/bin/python -e '.[dev]'", f"touch {venv}/{DEV_STAMP}"]
    (venv / DEV_STAMP).touch()
    assert planned_installs("test", venv) == []
    assert planned_installs("serve", venv) == [f"{venv}/bin/kvserve serve"]


def test_test_unpacks_llama_cpps_converter_once(venv):
    venv.mkdir()
    (venv / RUNTIME_STAMP).touch()
    (venv / DEV_STAMP).touch()
    plan = subprocess.run(["make", "-n", "test", f"VENV={venv}"], cwd=REPO, capture_output=True, text=True,
                          timeout=60).stdout
    assert "pip download -q --no-deps --no-binary :all: llama-cpp-python==" in plan
    assert f"-C {venv}/llama.cpp" in plan and "vendor/llama.cpp/convert_hf_to_gguf.py" in plan
    assert "vendor/llama.cpp/models/templates" in plan  # the families' chat templates (test_chat_templates.py)
    stamp = venv / "llama.cpp" / ".unpacked-converter-templates"
    stamp.parent.mkdir()
    stamp.touch()  # newer than the dev stamp: nothing to do
    plan = subprocess.run(["make", "-n", "test", f"VENV={venv}"], cwd=REPO, capture_output=True, text=True,
                          timeout=60).stdout
    assert "llama-cpp-python" not in plan
