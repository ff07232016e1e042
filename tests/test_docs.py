"""docs/plugins.md keeps up with the code: every hook, every built-in option (datasette's habit)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from b24sms import hookspecs
from b24sms.plugins import gateway_types, make_plugin_manager

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
BUILT_INS = ("log", "http", "twilio", "email")


@pytest.fixture(scope="module")
def docs() -> str:
    return DOCS.read_text(encoding="utf-8")


def hook_specs() -> list[tuple[str, list[str]]]:
    specs = []
    for name, function in inspect.getmembers(hookspecs, inspect.isfunction):
        if hasattr(function, "b24sms_spec"):
            specs.append((name, list(inspect.signature(function).parameters)))
    return sorted(specs)


def test_there_are_hooks_to_document():
    assert ("b24sms_register_gateways", ["register"]) in hook_specs()


@pytest.mark.parametrize(("name", "params"), hook_specs(), ids=[n for n, _ in hook_specs()])
def test_every_hook_is_documented_with_its_parameters(docs, name, params):
    signature = f"{name}({', '.join(params)})"
    assert f"### `{signature}`" in docs, f"docs/plugins.md lacks a heading for {signature}"
    section = docs.split(f"### `{signature}`", 1)[1].split("\n### ", 1)[0]
    for param in params:
        assert f"`{param}`" in section, f"{name}: parameter {param} is not described"


def test_no_documented_hook_is_gone(docs):
    known = {name for name, _ in hook_specs()}
    documented = set(re.findall(r"^### `(b24sms_\w+)\(", docs, flags=re.MULTILINE))
    assert documented <= known, f"documented but not in hookspecs: {documented - known}"


def option_names(cls) -> list[str]:
    schema = cls.options_schema()
    return sorted(field.data_key or name for name, field in schema.fields.items())


TYPES = gateway_types(make_plugin_manager({"B24SMS_LOAD_PLUGINS": ",".join(BUILT_INS)}))
OPTIONS = [(plugin, option) for plugin in BUILT_INS for option in option_names(TYPES[plugin].cls)]


def test_every_built_in_is_loaded():
    assert set(TYPES) == set(BUILT_INS)


@pytest.mark.parametrize(("plugin", "option"), OPTIONS, ids=[f"{p}.{o}" for p, o in OPTIONS])
def test_every_built_in_option_is_documented(docs, plugin, option):
    heading = f"### `{plugin}`"
    assert heading in docs, f"docs/plugins.md has no section {heading}"
    section = docs.split(heading, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    assert f"| `{option}` |" in section, f"option {option} of {plugin} is not in its table"


def test_the_python_examples_are_valid_python(docs):
    blocks = re.findall(r"```python\n(.*?)```", docs, flags=re.DOTALL)
    assert blocks
    for block in blocks:
        ast.parse(block)


def test_the_example_plugin_is_where_the_docs_say(docs):
    assert "examples/b24sms-example-gateway" in docs
    root = DOCS.parent.parent / "examples" / "b24sms-example-gateway"
    assert (root / "pyproject.toml").is_file() and (root / "README.md").is_file()
    assert "[project.entry-points.b24sms]" in (root / "pyproject.toml").read_text()


# -- CONTRIBUTING.md names paths that exist ------------------------------------------------------

ROOT = DOCS.parent.parent
CONTRIBUTING = ROOT / "CONTRIBUTING.md"
#: a path from the repository's root: a top-level folder, then anything a path holds
#: (``<name>`` stands for any name); not part of a URL or of a longer path
_TOP_FOLDERS = (".ci", "bench", "config", "core", "docs", "examples", "plugins", "tests")
_PATH = re.compile(
    r"(?<![\w/.:-])((?:"
    + "|".join(re.escape(top) for top in (*_TOP_FOLDERS, "typecheck"))
    + r")/[\w./<>-]*)"
)
#: a file named on its own inside backticks (``flush.py``, beside the folder named before it)
_BARE_FILE = re.compile(r"`([\w-]+\.(?:py|md|toml|html))`")


def missing_paths(text: str, root: Path) -> list[str]:
    """The paths ``text`` names that are not in ``root``: a path from the root must exist
    (``<name>`` matching at least one name), a bare file name must exist somewhere below it."""
    missing = []
    for path in sorted(set(_PATH.findall(text))):
        path = path.rstrip(".")
        pattern = re.sub(r"<[^<>/]*>", "*", path.rstrip("/"))
        if not any(root.glob(pattern)):
            missing.append(path)
    for name in sorted(set(_BARE_FILE.findall(text))):
        # Looked for in the project's own folders only (not in .venv, where any name exists).
        if not any(any(root.glob(f"{top}/**/{name}")) for top in _TOP_FOLDERS):
            missing.append(name)
    return missing


def test_contributing_names_only_paths_that_exist():
    text = CONTRIBUTING.read_text(encoding="utf-8")
    assert "core/web/app_page.py" in text  # the check reads the paths it is meant to read
    missing = missing_paths(text, ROOT)
    assert not missing, f"CONTRIBUTING.md names paths that do not exist: {missing}"


def test_the_path_check_sees_a_renamed_module(tmp_path):
    (tmp_path / "core" / "outbox").mkdir(parents=True)
    (tmp_path / "core" / "outbox" / "pacing.py").write_text("")
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "log.py").write_text("")
    text = (
        "`core/outbox/pacing.py`, `core/outbox/` (`pacing.py`), `plugins/<name>.py`; gone: "
        "`core/outbox.py`, `core/ratelimit.py`, `core/web/` (`ratelimit.py`), "
        "see https://example.com/core/nothing.py"
    )
    assert missing_paths(text, tmp_path) == [
        "core/outbox.py",
        "core/ratelimit.py",
        "core/web/",
        "ratelimit.py",
    ]


# -- test modules stand alone --------------------------------------------------------------------


def imports_of_test_modules(path: Path) -> list[str]:
    """What ``path`` imports from a test module (``tests.test_*``, or ``.test_*`` relatively)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("tests.test_")]
        elif isinstance(node, ast.ImportFrom):
            package = "." * node.level if node.level else "tests."
            module = node.module or ""
            if module.startswith("test_" if node.level else "tests.test_"):
                found.append(("." * node.level) + module)
            elif module == ("" if node.level else "tests"):
                found += [package + a.name for a in node.names if a.name.startswith("test_")]
    return found


def test_no_test_module_imports_another():
    offenders = {
        str(path.relative_to(ROOT)): imports
        for path in sorted((ROOT / "tests").rglob("*.py"))
        if (imports := imports_of_test_modules(path))
    }
    assert not offenders, f"share these through tests/helpers.py instead: {offenders}"


def test_the_import_check_sees_an_import_of_a_test_module(tmp_path):
    module = tmp_path / "test_example.py"
    module.write_text(
        "from tests.test_cli import b24sms\nimport tests.test_app_page\n"
        "from . import test_secrets\nfrom .test_growth import x\n"
        "from tests.helpers import open_page\nfrom tests import helpers, test_docs\n"
    )
    assert imports_of_test_modules(module) == [
        "tests.test_cli",
        "tests.test_app_page",
        ".test_secrets",
        ".test_growth",
        "tests.test_docs",
    ]
