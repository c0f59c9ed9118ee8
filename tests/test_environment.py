"""environment.yml must not drift from pyproject.toml, the single source of dependencies."""

import re
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from sage_core.paths import ROOT

# Conda entries that are tools of the environment itself, not dependencies of the package.
CONDA_TOOLS = {"python", "pip"}
LOCAL_PACKAGE = re.compile(r"^(?:-e\s+|--editable\s+)?\.(?:\[(?P<extras>[^\]]*)\])?$")
CONDA_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)\s*(?P<spec>.*)$")


def load_pyproject(text):
    project = tomllib.loads(text)["project"]
    runtime = {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}
    extras = {
        extra: {canonicalize_name(r.name): r for r in map(Requirement, reqs)}
        for extra, reqs in project.get("optional-dependencies", {}).items()
    }
    return project, runtime, extras


def conda_specifier(spec):
    """A conda version spec as a PEP 440 SpecifierSet: `=1.2` and `1.2` mean `==1.2`."""
    spec = spec.strip().replace(" ", "")
    if not spec:
        return SpecifierSet()
    if spec[0].isdigit():
        spec = "==" + spec
    elif spec.startswith("=") and not spec.startswith("=="):
        spec = "=" + spec
    return SpecifierSet(spec)


def drift(pyproject_text, environment_text):
    """Every way environment.yml disagrees with pyproject.toml, as readable lines."""
    project, runtime, extras = load_pyproject(pyproject_text)
    declared = dict(runtime)
    for reqs in extras.values():
        declared.update(reqs)
    env = yaml.safe_load(environment_text)
    problems = []

    listed = []  # (where, name, specifier)
    pip_entries = []
    for entry in env.get("dependencies", []):
        if isinstance(entry, dict):
            pip_entries.extend(entry.get("pip", []))
            continue
        match = CONDA_SPEC.match(str(entry))
        listed.append(("conda", match["name"], conda_specifier(match["spec"]), str(entry)))

    python = [spec for _, name, spec, _ in listed if name == "python"]
    requires = SpecifierSet(project["requires-python"])
    pins = [next(iter(spec)) for spec in python if len(spec) == 1]
    if len(python) != 1 or len(pins) != 1 or pins[0].operator != "==":
        problems.append("environment.yml must pin python once, to one version (python=3.11)")
    else:
        version = pins[0].version.removesuffix(".*")
        # conda's python=3.11 admits every 3.11.x: all of them must satisfy requires-python.
        series = [f"{version}.0", f"{version}.99"] if version.count(".") == 1 else [version]
        for candidate in series:
            if not requires.contains(candidate):
                problems.append(f"python {candidate} does not satisfy requires-python {requires}")

    installs_package = False
    for entry in pip_entries:
        local = LOCAL_PACKAGE.match(entry.strip())
        if local:
            given = {e.strip() for e in (local["extras"] or "").split(",") if e.strip()}
            missing = set(extras) - given
            if missing:
                problems.append(f"pip entry {entry!r} lacks extras {sorted(missing)}")
            installs_package = True
            continue
        req = Requirement(entry)
        listed.append(("pip", req.name, req.specifier, entry))
    if not installs_package:
        problems.append("environment.yml must pip-install the package itself (-e .[test])")

    for where, name, spec, entry in listed:
        key = canonicalize_name(name)
        if key in CONDA_TOOLS and where == "conda":
            continue
        if key not in declared:
            problems.append(f"{where} dependency {entry!r} is not declared in pyproject.toml")
        elif spec != declared[key].specifier:
            problems.append(
                f"{where} dependency {entry!r} differs from pyproject's {str(declared[key])!r}"
            )
    return problems


PYPROJECT = (ROOT / "pyproject.toml").read_text()
ENVIRONMENT = (ROOT / "environment.yml").read_text()


def test_environment_yml_matches_pyproject():
    assert drift(PYPROJECT, ENVIRONMENT) == []


def test_torch_pinned_at_runtime_transformers_pinned_only_for_tests():
    _, runtime, extras = load_pyproject(PYPROJECT)
    assert str(runtime["torch"].specifier) == "==2.13.0"
    assert "transformers" not in runtime
    [pin] = extras["test"]["transformers"].specifier
    assert pin.operator == "=="
    assert [extra for extra, reqs in extras.items() if "transformers" in reqs] == ["test"]


GOOD = """
dependencies:
  - python=3.11
  - pip
  - pip:
      - -e .[test]
"""


@pytest.mark.parametrize(
    ("environment", "complaint"),
    [
        (GOOD.replace("python=3.11", "python=3.12"), "does not satisfy requires-python"),
        (GOOD.replace("python=3.11", "python>=3.11"), "must pin python once"),
        (GOOD.replace("  - pip\n", "  - pip\n  - pandas\n"), "'pandas' is not declared"),
        (GOOD.replace("  - pip\n", "  - pip\n  - torch=2.5.0\n"), "'torch=2.5.0' differs"),
        (GOOD.replace("  - pip\n", "  - pip\n  - numpy\n"), "'numpy' differs"),
        (GOOD + "      - transformers==5.0.0\n", "'transformers==5.0.0' differs"),
        (GOOD + "      - requests\n", "'requests' is not declared"),
        (GOOD.replace("-e .[test]", "-e ."), "lacks extras ['test']"),
        (GOOD.replace("      - -e .[test]\n", "      - tqdm>=4.66\n"), "must pip-install"),
    ],
)
def test_drift_is_detected(environment, complaint):
    problems = drift(PYPROJECT, environment)
    assert any(complaint in p for p in problems), problems


def test_matching_pins_are_accepted():
    environment = GOOD.replace("  - pip\n", "  - pip\n  - torch=2.13.0\n  - numpy>=1.26,<3\n")
    assert drift(PYPROJECT, environment + "      - scikit-learn==1.9.1\n") == []
