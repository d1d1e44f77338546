#!/usr/bin/env python
"""Run l0-python's own test suite against ``sparselens.l0``.

Fetches the ``l0-python`` sdist from PyPI (``pip download --no-deps --no-binary :all:``) into a
cache directory (default ``.cache/l0-upstream`` in the repository, git-ignored) or uses
``--sdist PATH``, extracts only its ``tests/`` folder into a temporary directory, and runs pytest
there in a subprocess. A pytest plugin written next to the tests maps ``l0`` and
``l0.{distributions, layers, gates, penalties, sparse, calibration}`` onto the ``sparselens.l0``
modules before any test is imported, and refuses to run if ``l0`` resolves anywhere else. The real
``l0`` package is never imported. If scikit-learn is not installed, the plugin supplies a numpy
least-squares ``sklearn.linear_model.LinearRegression`` (test_sparse.py uses it for an OLS
baseline).

Options not listed below go to pytest unchanged (``-k EXPR``, ``--deselect NODEID``, ``-x``,
``-v`` ...). Node ids are relative to the extracted tree, e.g.
``--deselect tests/test_gates.py::TestHybridGate::test_reproducibility``. The exit code is
pytest's.

Examples::

    python scripts/run_l0_upstream_tests.py                      # the whole suite (minutes)
    python scripts/run_l0_upstream_tests.py --files test_gates.py test_layers.py -q
    python scripts/run_l0_upstream_tests.py --sdist l0_python-0.6.2.tar.gz -k "not ground_truth"
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VERSION = "0.6.2"
KNOWN_SHA256 = {
    "0.6.2": "256e8e6e9973fd49c5cd801e84116a449dfd85242c68e2a14c085d56f836ad10",
}
UPSTREAM_FILES = (
    "test_distributions.py",
    "test_layers.py",
    "test_gates.py",
    "test_penalties.py",
    "test_sparse.py",
    "test_calibration.py",
)
PLUGIN_NAME = "_sparselens_l0_alias"

PLUGIN_SOURCE = '''
"""pytest plugin: make ``import l0`` mean ``sparselens.l0`` (written by run_l0_upstream_tests)."""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

SUBMODULES = ("distributions", "layers", "gates", "penalties", "sparse", "calibration")
_FAILED = {}


class _BlockRealL0(importlib.abc.MetaPathFinder):
    """Any ``l0`` / ``l0.*`` import that is not an alias fails loudly instead of loading a copy."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "l0" or fullname.startswith("l0."):
            why = _FAILED.get(fullname, "it is not part of the sparselens.l0 alias")
            raise ImportError(f"{fullname} is aliased to sparselens.l0 but unavailable: {why}")
        return None


def _install():
    pkg = importlib.import_module("sparselens.l0")
    sys.modules["l0"] = pkg
    for name in SUBMODULES:
        try:
            sys.modules["l0." + name] = importlib.import_module("sparselens.l0." + name)
        except Exception as exc:  # reported per test via the import hook
            _FAILED["l0." + name] = f"{type(exc).__name__}: {exc}"
    sys.meta_path.insert(0, _BlockRealL0())
    _check()


def _check():
    import l0

    pkg_dir = os.path.dirname(os.path.abspath(importlib.import_module("sparselens").__file__))
    where = os.path.abspath(l0.__file__)
    assert where.startswith(pkg_dir + os.sep), f"l0 resolves to {where}, not sparselens"
    assert l0.__name__ == "sparselens.l0", l0.__name__


def _sklearn_fallback():
    """test_sparse.py fits an OLS baseline with sklearn; without scikit-learn, stand in numpy
    least squares (same estimator) so the test can run."""
    if importlib.util.find_spec("sklearn") is not None:
        return False
    import numpy as np

    class LinearRegression:
        def __init__(self, fit_intercept=True):
            self.fit_intercept = fit_intercept

        def _design(self, X):
            X = np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float64)
            return np.hstack([X, np.ones((X.shape[0], 1))]) if self.fit_intercept else X

        def fit(self, X, y):
            beta = np.linalg.lstsq(self._design(X), np.asarray(y, np.float64), rcond=None)[0]
            self.coef_ = beta[:-1] if self.fit_intercept else beta
            self.intercept_ = float(beta[-1]) if self.fit_intercept else 0.0
            return self

        def predict(self, X):
            X = np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float64)
            return X @ self.coef_ + self.intercept_

    sk = types.ModuleType("sklearn")
    lm = types.ModuleType("sklearn.linear_model")
    sk.__spec__ = importlib.machinery.ModuleSpec("sklearn", None, is_package=True)
    sk.__path__ = []
    lm.__spec__ = importlib.machinery.ModuleSpec("sklearn.linear_model", None)
    lm.LinearRegression = LinearRegression
    sk.linear_model = lm
    sys.modules["sklearn"] = sk
    sys.modules["sklearn.linear_model"] = lm
    return True


_install()
_SKLEARN_SHIM = _sklearn_fallback()


def pytest_report_header(config):
    import l0

    lines = [f"l0 -> {l0.__name__} ({l0.__file__})"]
    lines += [f"l0 alias missing: {k}: {v}" for k, v in sorted(_FAILED.items())]
    if _SKLEARN_SHIM:
        lines.append("scikit-learn not installed: LinearRegression is a numpy lstsq stand-in")
    return lines


def pytest_sessionstart(session):
    _check()
'''

PYTEST_INI = """\
[pytest]
testpaths = tests
python_files = test_*.py
"""


DOWNLOAD_FAILED = 3
"""Exit code when the sdist cannot be downloaded (no network)."""


def fetch_sdist(version: str, cache_dir: Path) -> Path:
    """The cached sdist for ``version``, downloaded with pip if absent."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob(f"l0[-_]python-{version}.tar.gz"))
    if not found:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"l0-python=={version}",
            "-d",
            str(cache_dir),
        ]
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"could not download l0-python {version} from PyPI", file=sys.stderr)
            raise SystemExit(DOWNLOAD_FAILED)
        found = sorted(cache_dir.glob(f"l0[-_]python-{version}.tar.gz"))
    if not found:
        raise SystemExit(f"no l0-python {version} sdist in {cache_dir} after pip download")
    return found[0]


def verify(sdist: Path, version: str) -> None:
    """Compare the sdist's sha256 with the known one (warn when the version is unknown)."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    expected = KNOWN_SHA256.get(version)
    if expected is None:
        print(f"note: no known sha256 for l0-python {version}; got {digest}", flush=True)
    elif digest != expected:
        raise SystemExit(f"{sdist}: sha256 {digest} differs from the known {expected}")


def extract_tests(sdist: Path, dest: Path) -> Path:
    """Write only the regular files under ``<top>/tests/`` of ``sdist`` into ``dest/tests``."""
    out = dest / "tests"
    out.mkdir(parents=True)
    n = 0
    with tarfile.open(sdist, "r:*") as tar:
        for member in tar.getmembers():
            parts = PurePosixPath(member.name).parts
            if len(parts) < 3 or parts[1] != "tests" or not member.isfile():
                continue
            rel = parts[2:]
            if any(p in ("..", "") or p.startswith("/") for p in rel):
                raise SystemExit(f"unsafe path in sdist: {member.name}")
            target = out.joinpath(*rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            target.write_bytes(src.read())
            n += 1
    if n == 0:
        raise SystemExit(f"{sdist} has no tests/ folder")
    return out


def _node_id(case: ET.Element) -> str:
    """The node id ``tests/test_x.py::TestY::test_z`` of a JUnit testcase."""
    parts = case.get("classname", "").split(".")
    mod = next((i for i, p in enumerate(parts) if p.startswith("test_")), len(parts) - 1)
    node = "/".join(parts[: mod + 1]) + ".py"
    return "::".join([node, *parts[mod + 1 :], case.get("name", "")]).rstrip(":")


def summarize(junit: Path) -> None:
    """Print counts and the failing node ids from pytest's JUnit XML."""
    if not junit.exists():
        print("no JUnit report (pytest did not get to run tests)")
        return
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
    totals["skipped"] = sum(int(s.get("skipped", 0)) for s in suites)
    passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    print("=" * 72)
    print(
        f"sparselens.l0 vs l0-python upstream tests: {passed} passed, "
        f"{totals['failures']} failed, {totals['errors']} errors, {totals['skipped']} skipped"
    )
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                msg = (node.get("message") or "").splitlines()[:1]
                print(f"  {kind.upper()}: {_node_id(case)}  {' '.join(msg)[:150]}")
    print("=" * 72)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        epilog="Unrecognised options are passed to pytest.",
    )
    parser.add_argument("--sdist", type=Path, help="use this l0-python sdist (.tar.gz)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=REPO / ".cache" / "l0-upstream",
        help="where the downloaded sdist is kept (default: %(default)s)",
    )
    parser.add_argument("--version", default=DEFAULT_VERSION, help="l0-python version")
    parser.add_argument(
        "--files",
        nargs="+",
        choices=UPSTREAM_FILES,
        metavar="FILE",
        help=f"upstream test files to run (default: all of {', '.join(UPSTREAM_FILES)})",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args, pytest_args = parser.parse_known_args(argv)

    sdist = args.sdist if args.sdist else fetch_sdist(args.version, args.cache_dir)
    if not sdist.is_file():
        parser.error(f"--sdist {sdist} is not a file")
    verify(sdist, args.version)

    tmp = Path(tempfile.mkdtemp(prefix="l0-upstream-"))
    try:
        extract_tests(sdist, tmp)
        (tmp / f"{PLUGIN_NAME}.py").write_text(textwrap.dedent(PLUGIN_SOURCE).lstrip())
        (tmp / "pytest.ini").write_text(PYTEST_INI)
        junit = tmp / "junit.xml"
        targets = [f"tests/{f}" for f in args.files] if args.files else ["tests"]
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(tmp / "pytest.ini"),
            "--rootdir",
            str(tmp),
            "-p",
            PLUGIN_NAME,
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
            *targets,
            *pytest_args,
        ]
        env = dict(os.environ)
        path = [str(tmp), str(REPO / "src"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        print(f"sdist: {sdist}\ntests: {tmp / 'tests'}\n+ {' '.join(cmd)}", flush=True)
        code = subprocess.call(cmd, cwd=tmp, env=env)
        summarize(junit)
        print(f"pytest exit code: {code}")
        return code
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
