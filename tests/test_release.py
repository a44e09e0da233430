"""The release: one version, and a wheel that works away from the checkout.

``python -m build`` makes the sdist and, from it, the wheel; ``twine check
--strict`` passes both; the wheel carries the distribution name, the licence
and the ``clipjax`` command. Installed into a fresh virtual environment and
run from an empty folder, it imports from that environment (no module comes
from the checkout), clips, answers ``clipjax --version`` and passes the
doctests of two of its modules under the suite's pytest settings and conftest.

The environment is clean of the checkout but not of the dependencies: it sees
this interpreter's site-packages through a folder of links to every entry but
clipjax's (its editable install, its metadata, any ``.pth``). Installing jax
and optax from the index on each run would take minutes and the network. The
build runs on a copy of the sources (it writes ``*.egg-info`` beside them) and
without isolation, with the ``dev`` extra's setuptools: offline.
"""

import importlib.metadata
import json
import os
import re
import shutil
import site
import sys
import tarfile
import tomllib
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import _run
import pytest

import clipjax

ROOT = Path(__file__).resolve().parents[1]
DIST_NAME = "optax-clipjax"
# What the build needs from the checkout; the rest of the sdist is derived.
SOURCES = (
  "pyproject.toml",
  "README.md",
  "LICENSE",
  "CHANGELOG.md",
  "MANIFEST.in",
  "clipjax",
)
# Modules whose doctests run from the installed wheel (all run from the checkout).
INSTALLED_DOCTESTS = ("_clipping.py", "compression/_transform.py")
NOT_DEPENDENCIES = ("clipjax", "optax_clipjax", "__editable__", "__pycache__")

SMOKE = """
import importlib.metadata, json, pathlib, sys
import jax.numpy as jnp, optax, clipjax

root = pathlib.Path(sys.argv[1])
files = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())}
sources = root / "clipjax"
from_checkout = sorted(
  n for n, f in files.items() if f and sources in pathlib.Path(f).resolve().parents
) + [p for p in sys.path if pathlib.Path(p or ".").resolve() == root]
tx = optax.chain(clipjax.clip_by_global_norm(1.0), optax.sgd(1.0))
g = {"w": jnp.array([3.0, 4.0])}
u, state = tx.update(g, tx.init(g), g)
print(json.dumps({
  "file": clipjax.__file__,
  "prefix": sys.prefix,
  "version": clipjax.__version__,
  "metadata_version": importlib.metadata.version("optax-clipjax"),
  "from_checkout": from_checkout,
  "update": u["w"].tolist(),
  "norm": float(clipjax.clip_stats(state)["clip_by_global_norm/norm"]),
}))
"""


def run(args: list[str | Path], cwd: Path, timeout: float = 300) -> str:
  """``args``' stdout, run in ``cwd`` with no PYTHON* variables (no PYTHONPATH)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
  env |= {"PYTHONNOUSERSITE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
  return _run.run(*args, cwd=cwd, env=env, timeout=timeout)


def copy_sources(to: Path) -> Path:
  to.mkdir()
  for name in SOURCES:
    source = ROOT / name
    if source.is_dir():
      shutil.copytree(source, to / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy2(source, to / name)
  return to


def clean_env(where: Path) -> tuple[Path, Path]:
  """A virtual environment that sees the dependencies but not the checkout."""
  env, deps = where / "env", where / "deps"
  venv.EnvBuilder(with_pip=False, symlinks=True).create(env)
  deps.mkdir()
  for site_dir in {Path(p) for p in site.getsitepackages()}:
    for entry in site_dir.iterdir():
      name = entry.name.lower().replace("-", "_")
      if not name.startswith(NOT_DEPENDENCIES) and entry.suffix != ".pth":
        (deps / entry.name).symlink_to(entry)
  where_is = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
  purelib = Path(run([env / "bin" / "python", "-c", where_is], where).strip())
  # A .pth line appends the folder after the environment's own site-packages:
  # the installed wheel is found first, and no .pth inside deps/ is processed.
  (purelib / "_release_test_deps.pth").write_text(f"{deps}\n")
  return env, purelib


def pytest_ini(to: Path) -> None:
  """The suite's pytest settings, for the installed package's doctests."""
  config = tomllib.loads((ROOT / "pyproject.toml").read_text())
  options = config["tool"]["pytest"]["ini_options"]
  lines = ["[pytest]"]
  for key in ("addopts", "doctest_optionflags", "filterwarnings"):
    values = options[key] if isinstance(options[key], list) else [options[key]]
    lines += [f"{key} =", *(f"  {v}" for v in values)]
  (to / "pytest.ini").write_text("\n".join(lines) + "\n")
  shutil.copy2(ROOT / "conftest.py", to / "conftest.py")


def test_version_has_one_source():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert project["project"]["name"] == DIST_NAME
  assert "version" not in project["project"]
  assert "version" in project["project"]["dynamic"]
  assert project["tool"]["setuptools"]["dynamic"]["version"] == {
    "attr": "clipjax.__version__"
  }
  assert importlib.metadata.version(DIST_NAME) == clipjax.__version__, (
    "the installed metadata is stale: pip install -e . again"
  )
  changelog = (ROOT / "CHANGELOG.md").read_text()
  assert f"## {clipjax.__version__}" in changelog, "CHANGELOG.md: no entry for it"


def test_release_builds_checks_installs_and_runs(tmp_path: Path):
  pytest.importorskip("build", reason="needs the dev extra (build)")
  pytest.importorskip("twine", reason="needs the dev extra (twine)")
  version = clipjax.__version__

  # Build: the sdist, then the wheel from the unpacked sdist.
  src, dist = copy_sources(tmp_path / "src"), tmp_path / "dist"
  run(
    [sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, src], tmp_path
  )
  stem = f"{DIST_NAME.replace('-', '_')}-{version}"
  sdist, wheel = dist / f"{stem}.tar.gz", dist / f"{stem}-py3-none-any.whl"
  assert set(dist.iterdir()) == {sdist, wheel}
  run([sys.executable, "-m", "twine", "check", "--strict", sdist, wheel], tmp_path)

  licence = (ROOT / "LICENSE").read_text()
  with zipfile.ZipFile(wheel) as whl:
    names = whl.namelist()
    info = f"{stem}.dist-info"
    meta = Parser().parsestr(whl.read(f"{info}/METADATA").decode())
    assert whl.read(f"{info}/licenses/LICENSE").decode() == licence
    scripts = whl.read(f"{info}/entry_points.txt").decode()
  assert (meta["Name"], meta["Version"]) == (DIST_NAME, version)
  assert meta["License-Expression"] == "Apache-2.0"
  assert meta.get_all("License-File") == ["LICENSE"]
  assert "clipjax = clipjax.cli:main" in scripts
  assert "clipjax/py.typed" in names
  assert {n.split("/")[0] for n in names} == {"clipjax", info}
  with tarfile.open(sdist) as tar:
    in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert tar.extractfile(f"{stem}/LICENSE").read().decode() == licence
  shipped = {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml"}
  assert shipped | {"clipjax/__init__.py"} <= in_sdist

  # Install into a fresh environment and use it from an empty folder.
  env, purelib = clean_env(tmp_path)
  run(
    [
      sys.executable,
      "-m",
      "pip",
      "--python",
      env / "bin" / "python",
      "install",
      "--quiet",
      "--no-deps",
      "--no-index",
      wheel,
    ],
    tmp_path,
  )
  work = tmp_path / "work"
  work.mkdir()
  smoke = json.loads(run([env / "bin" / "python", "-c", SMOKE, ROOT], work))
  assert Path(smoke["file"]) == purelib / "clipjax" / "__init__.py", smoke
  assert Path(smoke["prefix"]) == env, smoke
  assert smoke["from_checkout"] == [], smoke
  assert smoke["version"] == smoke["metadata_version"] == version
  assert smoke["norm"] == pytest.approx(5.0)
  assert smoke["update"] == pytest.approx([-0.6, -0.8])

  command = env / "bin" / "clipjax"
  assert command.read_text().splitlines()[0] == f"#!{env / 'bin' / 'python'}"
  assert run([command, "--version"], work).strip() == f"clipjax {version}"
  assert "demo" in run([command, "--help"], work)

  # Doctests of the installed modules, with the suite's settings: the drop-ins'
  # and the compressors' entry point. The suite runs every module's doctests
  # from the checkout; here they show that the wheel's modules run as shipped.
  pytest_ini(tmp_path)
  installed = purelib / "clipjax"
  out = run(
    [
      env / "bin" / "python",
      "-m",
      "pytest",
      "-q",
      "--rootdir",
      tmp_path,
      "-c",
      tmp_path / "pytest.ini",
      *(installed / m for m in INSTALLED_DOCTESTS),
    ],
    work,
    timeout=600,
  )
  summary = out.strip().splitlines()[-1]
  match = re.fullmatch(r"(\d+) passed in .*", summary)
  assert match and int(match[1]) >= 10, out[-3000:]
