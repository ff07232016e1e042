"""``b24sms new-plugin NAME``: a new gateway plugin package whose tests pass before its author
writes a line.

The files come from the templates in ``plugin_template/`` (package data, ``string.Template``
placeholders such as ``$module``); nothing is fetched from the network. For ``NAME`` = ``acme``
the package is::

    b24sms-acme/
        pyproject.toml                the entry point in the group ``b24sms``
        README.md                     developing, configuring and publishing it
        b24sms_acme/__init__.py       options schema, gateway type, status map, the hook
        b24sms_acme/fake.py           a fake of the carrier's API (standard library only)
        tests/test_plugin.py          b24sms.testing's gateway contract against the fake
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from . import __version__

#: a valid distribution (project) name, PEP 508 — the rule pip and PyPI apply
DISTRIBUTION_NAME = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$", re.IGNORECASE)
PREFIX = "b24sms-"


class ScaffoldError(Exception):
    """The package cannot be written as asked; the message says why."""


@dataclass(frozen=True)
class PluginNames:
    """Every name a new plugin needs, derived from the one its author gave."""

    #: the entry point's and the gateway type's name (``plugin = "acme"``)
    plugin: str
    #: the distribution, also the directory written (``b24sms-acme``)
    distribution: str
    #: the import package (``b24sms_acme``)
    module: str
    #: class names start with it (``AcmeGateway``)
    class_prefix: str
    #: for prose (``Acme``)
    title: str
    #: environment variables in the README's config start with it (``ACME``)
    env_prefix: str


def plugin_names(name: str) -> PluginNames:
    """The names for ``name`` (``acme`` or ``b24sms-acme``).

    :raises ScaffoldError: when ``name`` is not a valid distribution name.
    """
    if not DISTRIBUTION_NAME.match(name):
        raise ScaffoldError(
            f"{name!r} is not a valid distribution name: use letters, digits, '-', '_' and '.', "
            "starting and ending with a letter or digit (e.g. 'acme' or 'acme-sms')"
        )
    # PEP 503 normalisation: one spelling for "Acme_SMS", "acme.sms" and "acme-sms"
    normal = re.sub(r"[-_.]+", "-", name).lower()
    plugin = normal.removeprefix(PREFIX) or normal
    if plugin == "b24sms":
        raise ScaffoldError("name the plugin after its carrier, not 'b24sms'")
    parts = plugin.split("-")
    class_prefix = "".join(part[:1].upper() + part[1:] for part in parts)
    if class_prefix[0].isdigit():
        class_prefix = f"Gw{class_prefix}"  # a class name cannot start with a digit
    return PluginNames(
        plugin=plugin,
        distribution=f"{PREFIX}{plugin}",
        module=f"b24sms_{plugin.replace('-', '_')}",
        class_prefix=class_prefix,
        title=" ".join(part[:1].upper() + part[1:] for part in parts),
        env_prefix=plugin.replace("-", "_").upper(),
    )


#: template file → path in the new package ("{module}" is the import package's directory)
FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "package/__init__.py.tmpl": "{module}/__init__.py",
    "package/fake.py.tmpl": "{module}/fake.py",
    "tests/test_plugin.py.tmpl": "tests/test_plugin.py",
}


def render(names: PluginNames) -> dict[str, str]:
    """Relative path → content of every file of the new package."""
    templates = resources.files("b24sms").joinpath("plugin_template")
    values = {
        **names.__dict__,
        # the release this package is written by: its API is the one the templates use
        "b24sms_version": __version__,
    }
    files: dict[str, str] = {}
    for source, target in FILES.items():
        text = templates.joinpath(source).read_text(encoding="utf-8")
        files[target.format(module=names.module)] = Template(text).substitute(values)
    return files


def write_plugin(name: str, parent: Path) -> Path:
    """Write the package for ``name`` into ``parent/b24sms-<name>``; returns that directory.

    :raises ScaffoldError: for a bad name, a missing ``parent`` or a directory that exists
        (nothing is written then).
    """
    names = plugin_names(name)
    if not parent.is_dir():
        raise ScaffoldError(f"{parent}: no such directory")
    root = parent / names.distribution
    if root.exists():
        raise ScaffoldError(f"{root} already exists: choose another name or directory")
    files = render(names)  # every template renders before the first file is written
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root
