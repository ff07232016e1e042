"""The wheel as a user installs it: built, installed into a fresh venv, run from an empty folder.

The editable install of the test run reads files beside the checkout; a wheel has only what
pyproject.toml ships, so this is where a missing package-data file shows (the default config
was looked up in ``config/`` beside the checkout, and ``b24sms plugins`` could not start).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> str:
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh venv with the freshly built wheel installed (dependencies from the index,
    which pip's cache usually answers), and an environment without this checkout in it."""
    base = tmp_path_factory.mktemp("wheel")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("B24SMS_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    dist = base / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
        cwd=base,
        env=env,
        timeout=300,
    )
    (wheel,) = dist.glob("b24sms-*.whl")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=base, env=env, timeout=120)
    _run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        cwd=base,
        env=env,
        timeout=600,
    )
    return venv, env


@pytest.fixture
def empty_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_the_wheel_is_imported_from_the_venv_not_the_checkout(installed, empty_dir):
    venv, env = installed
    where = _run(
        [str(venv / "bin" / "python"), "-c", "import b24sms; print(b24sms.__file__)"],
        cwd=empty_dir,
        env=env,
        timeout=60,
    )
    assert Path(where.strip()).is_relative_to(venv)


def test_plugins_runs_from_an_empty_folder_without_a_config(installed, empty_dir):
    venv, env = installed
    out = _run([str(venv / "bin" / "b24sms"), "plugins"], cwd=empty_dir, env=env, timeout=120)
    # the built-in default config: one log-only provider, every built-in gateway discovered
    assert "log  b24sms 0.1.0  gateways: log (codes: b24sms_log)" in out
    for name in ("http", "twilio", "email"):
        assert f"{name}  b24sms 0.1.0  gateways: {name} " in out
    # start-up made the instance folder and the generated key, owner-only
    instance = empty_dir / "instance"
    assert stat.S_IMODE(instance.stat().st_mode) == 0o700
    assert stat.S_IMODE((instance / "secret_key").stat().st_mode) == 0o600


def test_demo_runs_from_an_empty_folder_without_a_config(installed, empty_dir):
    venv, env = installed
    out = _run([str(venv / "bin" / "b24sms"), "demo"], cwd=empty_dir, env=env, timeout=180)
    assert "done: the portal shows the message as delivered" in out


def test_every_package_folder_is_listed_for_the_wheel():
    """pyproject.toml lists the packages by hand (core/ installs as b24sms): a new package folder
    missing there works in the editable install and is absent from the wheel."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"b24sms": root / "core", "b24sms.default_plugins": root / "plugins"}
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            found.add(".".join((name, *relative)))
    assert found == set(setup["packages"])
