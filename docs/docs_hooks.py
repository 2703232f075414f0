"""Build-time helpers of the documentation site (``docs/mkdocs.yml`` loads this file twice).

* As an MkDocs hook (``hooks:``), :func:`on_files` publishes the pictures in ``docs/*.png`` at
  ``docs/<name>.png`` in the built site, so the README's image links (``docs/...png``), which
  ``results.md`` includes verbatim, resolve without a copy of the pictures under ``docs/site/``.
* As a griffe extension (mkdocstrings' ``extensions:``), :class:`SphinxDocstrings` adapts the
  docstrings before they are parsed: an ``Example:`` section (doctests) is read as griffe's
  ``Examples:`` section, so it is shown as code; the ``Returns:`` section of a class docstring (what
  calling the module returns) is shown as a note titled "Calling returns", since griffe would
  otherwise look for the return annotation of the class itself; and Sphinx roles such as
  ``:func:`~pkg.mod.f``` become links when the target is documented on the site and inline code
  otherwise.

Nothing here changes the Python sources.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

EXAMPLE_HEADING = re.compile(r"^Example:[ \t]*$", re.MULTILINE)
RETURNS_HEADING = re.compile(r"^Returns:[ \t]*$", re.MULTILINE)
SPHINX_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|obj|exc):`(?P<tilde>~?)(?P<target>[\w.]+)`")


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add ``docs/*.png`` (next to ``mkdocs.yml``) to the site as ``docs/<name>.png``."""
    pictures = Path(config.config_file_path).parent
    for picture in sorted(pictures.glob("*.png")):
        files.append(File.generated(config, f"docs/{picture.name}", abs_src_path=str(picture)))
    return files


def _autoref(match: re.Match[str], scope: str) -> str:
    target = match["target"]
    title = target.rsplit(".", 1)[-1] if match["tilde"] else target
    identifier = target if "." in target else f"{scope}.{target}"
    # optional: no warning when the target is not rendered on any page (it then stays inline code)
    return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'


class SphinxDocstrings(griffe.Extension):
    """Read ``Example:`` as ``Examples:`` and turn Sphinx roles into optional cross-references."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None:
            return
        # unqualified targets are looked up next to the object: a class's own methods, else its module
        scope = obj.path if obj.is_class else (obj.parent.path if obj.parent is not None else obj.path)
        value = EXAMPLE_HEADING.sub("Examples:", docstring.value)
        if obj.is_class:
            # a class's "Returns:" describes calling an instance (nn.Module.forward); griffe reads it as
            # the class's own return value, which has no annotation: show it as a titled note instead
            value = RETURNS_HEADING.sub("Calling returns:", value)
        docstring.value = SPHINX_ROLE.sub(lambda m: _autoref(m, scope), value)
