"""Check at import time that the installed dependencies are in the ranges this package declares.

Users upgrade or downgrade transformers, peft or torch by hand (``pip install -U``, ``--no-deps``,
conda...), and pip does not stop them. Without this check the first symptom is a traceback deep inside
transformers minutes later; with it, ``import cmoe_adapters`` fails at once with one error naming every
package that is off, the version found, the range needed and the pip command that fixes it.

The ranges are read from the installed distribution's metadata (written from ``setup.cfg``'s
``install_requires``), so they are never repeated here. Installed versions are read from metadata as
well: the packages themselves are never imported, because an incompatible transformers may already
crash on import. Only the standard library and ``packaging`` are imported, so this runs before anything
heavy and takes a few milliseconds.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, requires, version

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion

DISTRIBUTION = "cmoe-adapters"
PACKAGE = "cmoe_adapters"
SKIP_ENV_VAR = "CMOE_ADAPTERS_SKIP_DEPENDENCY_CHECK"

# Lower bounds first, upper bounds last: ">=5.0,<6" reads better than packaging's sorted "<6,>=5.0".
_OPERATOR_ORDER = {">=": 0, ">": 0, "~=": 1, "==": 1, "===": 1, "!=": 2, "<=": 3, "<": 3}


class DependencyVersionError(ImportError):
    """An installed dependency is missing or outside the range ``cmoe-adapters`` declares.

    A subclass of ``ImportError`` so that code guarding ``import cmoe_adapters`` with
    ``except ImportError`` keeps working.
    """


@dataclass(frozen=True)
class DependencyProblem:
    """One declared requirement that the environment does not satisfy."""

    name: str
    specifier: str
    found: str | None  # None: not installed

    @property
    def requirement(self) -> str:
        """The requirement as pip takes it, e.g. ``transformers>=5.0,<6``."""
        return f"{self.name}{self.specifier}"


def format_specifier(req: Requirement) -> str:
    """The requirement's version range with lower bounds first (``>=5.0,<6``)."""
    specs = sorted(req.specifier, key=lambda s: (_OPERATOR_ORDER.get(s.operator, 1), s.version))
    return ",".join(str(s) for s in specs)


def core_requirements(declared: list[str]) -> list[Requirement]:
    """The requirements that apply to a plain install here: no extras, markers true for this Python.

    Markers are evaluated with an empty ``extra``, so ``extra == "test"`` (alone or combined with other
    markers) is dropped while ``python_version < "3.12"`` and the like are honoured. A line that
    ``packaging`` cannot parse is skipped rather than breaking the import.
    """
    core = []
    for line in declared:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        core.append(req)
    return core


def find_problems(reqs: list[Requirement]) -> list[DependencyProblem]:
    """Every requirement whose package is missing or whose installed version is outside its range.

    Versions come from ``importlib.metadata.version``, never from importing the package. Pre-releases
    and local labels (``2.13.0+cpu``) count as in range when their public version is.
    """
    problems = []
    for req in reqs:
        try:
            found = version(req.name)
        except PackageNotFoundError:
            problems.append(DependencyProblem(req.name, format_specifier(req), None))
            continue
        try:
            ok = req.specifier.contains(found, prereleases=True)
        except InvalidVersion:  # older packaging raises; newer returns False
            ok = False
        if not ok:
            problems.append(DependencyProblem(req.name, format_specifier(req), found))
    return problems


def _pip() -> str:
    """``python -m pip``, spelled with the full interpreter path when ``python`` is another one."""
    on_path = shutil.which("python")
    if on_path and os.path.abspath(on_path) == os.path.abspath(sys.executable):
        return "python -m pip"
    exe = sys.executable or "python"
    return f'"{exe}" -m pip' if " " in exe else f"{exe} -m pip"


def format_problems(problems: list[DependencyProblem], own_version: str) -> str:
    """One line per package (found, needed, fix), then one pip command that fixes them all."""
    pip = _pip()
    lines = []
    for p in problems:
        found = "it is not installed" if p.found is None else f"{p.found} is installed"
        lines.append(
            f"{PACKAGE} {own_version} needs {p.requirement}, but {found}. "
            f'Fix: {pip} install "{p.requirement}"'
        )
    if len(problems) > 1:
        quoted = " ".join(f'"{p.requirement}"' for p in problems)
        lines.append(f"Fix all at once: {pip} install {quoted}")
    lines.append(f"(To import anyway, e.g. to test another version on purpose, set {SKIP_ENV_VAR}=1.)")
    return "\n".join(lines)


def _skip_requested() -> bool:
    return os.environ.get(SKIP_ENV_VAR, "").strip().lower() in {"1", "true", "yes", "on"}


def check_dependencies() -> None:
    """Raise one ``DependencyVersionError`` listing every declared dependency that is missing or off.

    Does nothing when ``cmoe-adapters`` has no installed metadata (e.g. a source tree put on
    ``PYTHONPATH`` without ``pip install``): then there are no declared ranges to check against, and
    guessing them here would duplicate ``setup.cfg``. With ``CMOE_ADAPTERS_SKIP_DEPENDENCY_CHECK=1`` the
    error becomes a ``RuntimeWarning`` with the same text, for people who knowingly run another version.
    Nothing is cached, so each call sees the environment as it is now.
    """
    try:
        declared = requires(DISTRIBUTION)
    except PackageNotFoundError:
        return
    problems = find_problems(core_requirements(declared or []))
    if not problems:
        return
    try:  # only on the error path: each metadata read parses a whole METADATA file
        own_version = version(DISTRIBUTION)
    except PackageNotFoundError:
        own_version = "(unknown version)"
    message = format_problems(problems, own_version)
    if _skip_requested():
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return
    raise DependencyVersionError(message, name=PACKAGE)
