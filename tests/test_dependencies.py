"""The import-time dependency check: one clear error naming every package that is missing or off."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

import cmoe_adapters.dependencies as deps
from cmoe_adapters.dependencies import (
    SKIP_ENV_VAR,
    DependencyVersionError,
    check_dependencies,
    core_requirements,
    find_problems,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# As setuptools writes them into the metadata: upper bound first, extras as markers.
DECLARED = [
    "torch<3,>=2.4",
    "transformers<6,>=5.0",
    "peft<0.22,>=0.21",
    "einops>=0.7",
    'pytest>=8; extra == "test"',
    'deepspeed>=0.16; extra == "deepspeed"',
]
GOOD = {
    "cmoe-adapters": "0.1.0.dev0",
    "torch": "2.13.0",
    "transformers": "5.24.0",
    "peft": "0.21.2",
    "einops": "0.8.1",
}


def fake_metadata(
    monkeypatch: pytest.MonkeyPatch, declared: list[str] | None, installed: dict[str, str]
) -> None:
    """Make the check see `declared` as cmoe-adapters' requirements and `installed` as the environment.

    `declared=None` means cmoe-adapters has no metadata at all (a source tree that is not installed).
    """
    versions = {canonicalize_name(name): v for name, v in installed.items()}

    def fake_requires(name: str) -> list[str] | None:
        if canonicalize_name(name) != "cmoe-adapters" or declared is None:
            raise PackageNotFoundError(name)
        return list(declared)

    def fake_version(name: str) -> str:
        if canonicalize_name(name) == "cmoe-adapters" and declared is None:
            raise PackageNotFoundError(name)
        try:
            return versions[canonicalize_name(name)]
        except KeyError:
            raise PackageNotFoundError(name) from None

    monkeypatch.setattr(deps, "requires", fake_requires)
    monkeypatch.setattr(deps, "version", fake_version)
    monkeypatch.delenv(SKIP_ENV_VAR, raising=False)


def test_real_environment_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SKIP_ENV_VAR, raising=False)
    try:
        declared = deps.requires("cmoe-adapters")
    except PackageNotFoundError:
        pytest.skip("cmoe-adapters is not installed (no metadata to check against)")
    names = {canonicalize_name(r.name) for r in core_requirements(declared or [])}
    assert {"torch", "transformers", "peft"} <= names
    assert "pytest" not in names  # a test extra, not a core requirement
    assert find_problems(core_requirements(declared or [])) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_dependencies()


def test_wrong_versions_are_reported_together_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_metadata(monkeypatch, DECLARED, {**GOOD, "transformers": "4.57.1", "peft": "0.30.0"})
    with pytest.raises(DependencyVersionError) as info:
        check_dependencies()
    assert isinstance(info.value, ImportError)
    message = str(info.value)
    lines = message.splitlines()
    assert lines[0].startswith(
        "cmoe_adapters 0.1.0.dev0 needs transformers>=5.0,<6, but 4.57.1 is installed. Fix: "
    )
    assert lines[0].endswith(' -m pip install "transformers>=5.0,<6"')
    assert lines[1].startswith(
        "cmoe_adapters 0.1.0.dev0 needs peft>=0.21,<0.22, but 0.30.0 is installed. Fix: "
    )
    assert lines[1].endswith(' -m pip install "peft>=0.21,<0.22"')
    assert lines[2].startswith("Fix all at once: ")
    assert lines[2].endswith(' -m pip install "transformers>=5.0,<6" "peft>=0.21,<0.22"')
    assert SKIP_ENV_VAR in lines[3]
    assert len(lines) == 4
    for ok in ("torch", "einops"):
        assert ok not in message


def test_pip_command_names_this_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_metadata(monkeypatch, DECLARED, {**GOOD, "peft": "0.30.0"})
    monkeypatch.setattr(deps.shutil, "which", lambda name: sys.executable)
    with pytest.raises(DependencyVersionError, match=r'(?m)Fix: python -m pip install "peft>=0\.21,<0\.22"$'):
        check_dependencies()
    # Another `python` first on PATH: spell out the interpreter that is importing us.
    monkeypatch.setattr(deps.shutil, "which", lambda name: None)
    with pytest.raises(DependencyVersionError) as info:
        check_dependencies()
    assert f'{sys.executable} -m pip install "peft>=0.21,<0.22"' in str(info.value)
    assert "Fix all at once" not in str(info.value)  # one package: its own line is the fix


def test_missing_package_is_reported_as_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = {k: v for k, v in GOOD.items() if k != "einops"}
    fake_metadata(monkeypatch, DECLARED, installed)
    with pytest.raises(DependencyVersionError) as info:
        check_dependencies()
    first = str(info.value).splitlines()[0]
    assert first.startswith("cmoe_adapters 0.1.0.dev0 needs einops>=0.7, but it is not installed. Fix: ")
    assert first.endswith(' -m pip install "einops>=0.7"')


def test_extras_ignored_local_and_pre_release_versions_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    declared = [
        *DECLARED,
        'pillow>=10; extra == "test" and python_version >= "3"',  # extra combined with another marker
        'tomli>=2; python_version < "3"',  # marker false here: not needed
        'einops>=0.7; python_version >= "3"',  # marker true here: still checked
    ]
    # pytest, deepspeed, pillow and tomli are not installed, and pytest would be too old anyway.
    installed = {**GOOD, "torch": "2.13.0+cpu", "transformers": "5.3.0rc1"}
    fake_metadata(monkeypatch, declared, installed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_dependencies()
    assert find_problems(core_requirements(declared)) == []
    names = [r.name for r in core_requirements(declared)]
    assert names == ["torch", "transformers", "peft", "einops", "einops"]

    # The marker that holds is still enforced.
    fake_metadata(monkeypatch, declared, {**installed, "einops": "0.6"})
    with pytest.raises(DependencyVersionError, match=r"needs einops>=0\.7, but 0\.6 is installed"):
        check_dependencies()


def test_local_label_does_not_hide_an_out_of_range_version(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_metadata(monkeypatch, DECLARED, {**GOOD, "torch": "2.3.1+cu121"})
    with pytest.raises(DependencyVersionError, match=r"needs torch>=2\.4,<3, but 2\.3\.1\+cu121 is inst"):
        check_dependencies()


def test_unparsable_installed_version_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_metadata(monkeypatch, DECLARED, {**GOOD, "peft": "not-a-version"})
    with pytest.raises(DependencyVersionError, match=r"needs peft>=0\.21,<0\.22, but not-a-version is"):
        check_dependencies()


def test_env_var_turns_the_error_into_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_metadata(monkeypatch, DECLARED, {**GOOD, "transformers": "4.57.1"})
    with pytest.raises(DependencyVersionError) as info:
        check_dependencies()
    monkeypatch.setenv(SKIP_ENV_VAR, "1")
    with pytest.warns(RuntimeWarning) as record:
        check_dependencies()
    assert [str(w.message) for w in record] == [str(info.value)]
    monkeypatch.setenv(SKIP_ENV_VAR, "0")
    with pytest.raises(DependencyVersionError):
        check_dependencies()


def test_no_metadata_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_metadata(monkeypatch, None, {"transformers": "4.57.1"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_dependencies() is None


def test_import_fails_fast_with_the_message_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """A fake `transformers-4.0.0.dist-info` ahead of site-packages: the error precedes any heavy import."""
    try:
        declared = deps.requires("cmoe-adapters")
    except PackageNotFoundError:
        pytest.skip("cmoe-adapters is not installed (no metadata to check against)")
    (transformers_req,) = [r for r in core_requirements(declared or []) if r.name == "transformers"]
    spec = deps.format_specifier(transformers_req)

    fake = tmp_path / "fake-site"
    dist_info = fake / "transformers-4.0.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 4.0.0\n")
    env = {k: v for k, v in os.environ.items() if k != SKIP_ENV_VAR}
    # The fake first, then the source tree (importable even without an editable install), then site-packages.
    env["PYTHONPATH"] = os.pathsep.join([str(fake), str(REPO_ROOT)])

    def run(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )

    # The trick works: the first transformers metadata on sys.path wins.
    seen = run("import importlib.metadata as m; print(m.version('transformers'))")
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.strip() == "4.0.0"

    result = run("import cmoe_adapters")
    assert result.returncode != 0
    stderr = result.stderr
    assert (
        f"DependencyVersionError: cmoe_adapters {deps.version('cmoe-adapters')} needs transformers{spec}, "
        "but 4.0.0 is installed. Fix: " in stderr
    )
    assert f'-m pip install "transformers{spec}"' in stderr
    # Short traceback: <string>, cmoe_adapters/__init__.py, dependencies.py; nothing from transformers.
    assert stderr.count('  File "') <= 3, stderr
    assert "transformers" + os.sep not in stderr

    # Nothing heavy was imported before the error.
    heavy = run(
        "import sys\n"
        "try:\n    import cmoe_adapters\nexcept ImportError as e:\n    print(type(e).__name__)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft', 'numpy'}))"
    )
    assert heavy.returncode == 0, heavy.stderr
    assert heavy.stdout.split() == ["DependencyVersionError", "[]"]


def test_ci_constraints_pin_exactly_the_declared_lower_bounds() -> None:
    """CI's oldest run (constraints/oldest.txt) must test every floor setup.cfg declares, and no other."""
    import configparser

    from packaging.requirements import Requirement
    from packaging.version import Version

    root = Path(__file__).resolve().parents[1]
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    floors = {}
    for line in setup["options"]["install_requires"].strip().splitlines():
        req = Requirement(line)
        lower = [s.version for s in req.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{line}: every core dependency needs one lower bound CI can test"
        floors[canonicalize_name(req.name)] = Version(lower[0])
    pinned = {}
    for line in (root / "constraints" / "oldest.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, value = line.partition("==")
            pinned[canonicalize_name(name)] = Version(value)
    assert pinned == floors
