"""``b24sms new-plugin``: the package it writes installs, its tests pass unmodified, and the
contract suite they run (``b24sms.testing``) fails when the gateway is broken on purpose."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from b24sms.cli import cli
from b24sms.scaffold import plugin_names


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """A command's result, output captured; the caller checks the return code."""
    env = {k: v for k, v in os.environ.items() if k != "B24SMS_LOAD_PLUGINS"}
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.parametrize("name", ["bad name", "-acme", "acme-", "acme!", "ac/me", "b24sms"])
def test_a_name_that_is_no_distribution_name_is_refused(tmp_path, name):
    result = CliRunner().invoke(cli, ["new-plugin", "--directory", str(tmp_path), "--", name])
    assert result.exit_code == 2
    assert "Invalid value for NAME" in result.output
    assert list(tmp_path.iterdir()) == []


def test_an_existing_directory_is_refused_and_left_alone(tmp_path):
    existing = tmp_path / "b24sms-acme"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep")
    result = CliRunner().invoke(cli, ["new-plugin", "acme", "-d", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{existing} already exists" in result.output
    assert [p.name for p in existing.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize(
    ("name", "plugin", "distribution", "module", "cls"),
    [
        ("acme", "acme", "b24sms-acme", "b24sms_acme", "Acme"),
        ("b24sms-acme", "acme", "b24sms-acme", "b24sms_acme", "Acme"),
        ("Acme_SMS", "acme-sms", "b24sms-acme-sms", "b24sms_acme_sms", "AcmeSms"),
        ("3com", "3com", "b24sms-3com", "b24sms_3com", "Gw3com"),
    ],
)
def test_names_follow_from_the_one_given(name, plugin, distribution, module, cls):
    names = plugin_names(name)
    assert (names.plugin, names.distribution, names.module) == (plugin, distribution, module)
    assert names.class_prefix == cls and names.module.isidentifier()


def _install(package: Path, *, editable: bool = True) -> None:
    """``pip install [-e]`` like an author; without build isolation when the venv can build
    offline, else with it."""
    base = [sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q"]
    target = ["-e", str(package)] if editable else [str(package)]
    for extra in (["--no-build-isolation"], []):
        done = run([*base, *extra, *target], package.parent)
        if done.returncode == 0:
            return
    pytest.fail(f"pip install -e {package} failed:\n{done.stdout}\n{done.stderr}")


def _pytest(package: Path) -> subprocess.CompletedProcess[str]:
    return run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"],
        package,
    )


#: mistakes made on purpose in the generated gateway: (what, text, replaced by, tests that
#: must fail — each named in pytest's summary)
MISTAKES = [
    (
        "a wrong status map: the carrier's DELIVRD read as a failure",
        '"DELIVRD": "delivered"',
        '"DELIVRD": "failed"',
        [
            "test_documented_statuses_map_as_documented",
            "test_a_message_reaches_its_final_status_at_the_portal",
        ],
    ),
    (
        "a status map naming a status that does not exist",
        '"SENT": "sent"',
        '"SENT": "dispatched"',
        ["test_status_map_speaks_only_the_five_statuses"],
    ),
    (
        "a 5xx (worth a retry) raised as a permanent error",
        'raise RetryableGatewayError(\n                f"Acme answered',
        'raise PermanentGatewayError(\n                f"Acme answered',
        ["test_failures_raise_the_right_error_class[retryable]"],
    ),
    (
        "an unreachable carrier (a network error) raised as a permanent error",
        "except (requests.ConnectionError, requests.Timeout) as exc:",
        "except requests.Timeout as exc:",
        ["test_send_answers_a_result_or_raises_only_gateway_errors"],
    ),
    (
        "a send letting an exception that is no GatewayError out",
        "raise RetryableGatewayError(\n"
        '                f"Acme unreachable: {type(exc).__name__}", code="network"\n'
        "            )",
        'raise ConnectionError(f"Acme unreachable: {type(exc).__name__}")',
        ["test_send_answers_a_result_or_raises_only_gateway_errors"],
    ),
]


@pytest.mark.slow
def test_the_generated_plugin_passes_its_tests_and_its_contract_catches_mistakes(tmp_path):
    # the console script a user runs, installed beside this interpreter
    script = shutil.which("b24sms", path=str(Path(sys.executable).parent))
    assert script, "the b24sms console script is not installed beside this Python"
    made = run([script, "new-plugin", "acme"], tmp_path)
    assert made.returncode == 0, made.stderr
    package = tmp_path / "b24sms-acme"
    gateway = package / "b24sms_acme" / "__init__.py"
    original = gateway.read_text()
    _install(package)
    try:
        passed = _pytest(package)
        assert passed.returncode == 0, passed.stdout + passed.stderr
        assert " passed" in passed.stdout and "skipped" not in passed.stdout

        for what, old, new, failing in MISTAKES:
            assert old in original, f"{old!r} is not in the generated gateway"
            gateway.write_text(original.replace(old, new, 1))
            broken = _pytest(package)
            gateway.write_text(original)
            assert broken.returncode == 1, f"{what}: the tests passed\n{broken.stdout}"
            for test in failing:
                assert f"{test} " in broken.stdout or f"{test}\n" in broken.stdout, (
                    f"{what}: {test} did not fail\n{broken.stdout}"
                )

        again = _pytest(package)
        assert again.returncode == 0, again.stdout  # restored: the mistakes were the cause
    finally:
        run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "b24sms-acme"], tmp_path)


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "b24sms-example-gateway"


@pytest.mark.slow
def test_the_example_plugin_passes_its_tests_with_the_kit(tmp_path):
    import importlib.metadata

    try:
        importlib.metadata.distribution("b24sms-example-gateway")
        # another test installed it: leave it installed after, as a copy in site-packages
        # (not an editable install pointing into this test's temporary directory)
        installed_before = True
    except importlib.metadata.PackageNotFoundError:
        installed_before = False
    # from a copy, so the work tree gets no build/ or *.egg-info
    package = tmp_path / "b24sms-example-gateway"
    shutil.copytree(EXAMPLE, package, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    _install(package, editable=False)
    try:
        result = _pytest(package)
        assert result.returncode == 0, result.stdout + result.stderr
        # every contract test ran: the example drives all of them
        assert " passed" in result.stdout and "skipped" not in result.stdout
    finally:
        if not installed_before:
            run(
                [sys.executable, "-m", "pip", "uninstall", "-y", "-q", "b24sms-example-gateway"],
                tmp_path,
            )
