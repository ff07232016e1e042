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
