"""A small Sphinx extension for the kltune docs.

1. **API completeness.** After all pages are read (``env-check-consistency``),
   every public name of the kltune modules listed in :data:`PUBLIC_MODULES` must
   be documented as a Python object on an ``api/`` page; each missing one is a
   warning, so ``sphinx-build -W`` fails. A module's public names are its
   ``__all__`` when it has one, else the names its source defines at top level
   (functions, classes, assignments) without a leading underscore.

   A name re-exported from another *public* module (``kltune.Policy`` is
   ``kltune.policy.Policy``) is documented once, where it is defined; the check
   looks for it there. A name defined in a private module
   (``kltune.functional.kl_k3`` lives in ``kltune.functional._kl``) is
   documented under the public path.

2. **Links to re-exports.** ``:class:`kltune.Policy``` and
   ``:meth:`kltune.Policy.rollout``` resolve to the object's documented home.

3. **The export table.** The directive ``.. kltune-exports::`` renders one table
   per defining module of every name in ``kltune.__all__``, linking each to its
   entry, with the first line of its docstring.
"""

import ast
import importlib
import inspect
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

#: Modules whose public names must all appear in the API reference.
PUBLIC_MODULES = (
    "kltune",
    "kltune.functional",
    "kltune.rollout",
    "kltune.policy",
    "kltune.sampler",
    "kltune.reference",
    "kltune.loading",
    "kltune.accel",
    "kltune.rewards",
    "kltune.kl_control",
    "kltune.kl_gradients",
    "kltune.baselines",
    "kltune.objective",
    "kltune.loop",
    "kltune.driver",
    "kltune.checkpoint",
    "kltune.diagnostics",
    "kltune.fluency",
    "kltune.preferences",
    "kltune.plots",
)

API_FOLDER = "api/"


def _defined_names(module: Any) -> list[str]:
    """Names a module's source binds at top level, without a leading underscore."""
    source = Path(inspect.getsourcefile(module) or "").read_text(encoding="utf-8")
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return [n for n in dict.fromkeys(names) if not n.startswith("_")]


def public_names(module_name: str) -> list[str]:
    """The public names of ``module_name``: ``__all__``, else its top-level definitions."""
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    return list(exported) if exported is not None else _defined_names(module)


def documented_target(module_name: str, name: str) -> str:
    """The full name under which ``module_name.name`` is documented."""
    obj = getattr(importlib.import_module(module_name), name)
    home = getattr(obj, "__module__", None)
    if (
        isinstance(home, str)
        and home != module_name
        and home in PUBLIC_MODULES
        and name in public_names(home)
    ):
        return f"{home}.{name}"
    return f"{module_name}.{name}"


def check_api_complete(app: Sphinx, env: BuildEnvironment) -> None:
    objects = env.get_domain("py").objects  # type: ignore[attr-defined]
    for module_name in PUBLIC_MODULES:
        for name in public_names(module_name):
            target = documented_target(module_name, name)
            entry = objects.get(target)
            if entry is None:
                logger.warning(
                    "public name %s.%s is not documented: add an entry for %s to an API page "
                    "under docs/%s",
                    module_name,
                    name,
                    target,
                    API_FOLDER,
                    type="kltune",
                    subtype="api",
                )
            elif not entry.docname.startswith(API_FOLDER):
                logger.warning(
                    "public name %s is documented on %s, outside the API pages (docs/%s); "
                    "document it there and use :no-index: elsewhere",
                    target,
                    entry.docname,
                    API_FOLDER,
                    type="kltune",
                    subtype="api",
                )


def resolve_reexport(
    app: Sphinx, env: BuildEnvironment, node: nodes.Element, contnode: nodes.TextElement
) -> nodes.reference | None:
    """Resolve ``kltune.Name[.attr]`` to where ``Name`` is documented."""
    if node.get("refdomain") != "py":
        return None
    parts = str(node.get("reftarget", "")).split(".")
    if len(parts) < 2 or parts[0] != "kltune" or parts[1] not in public_names("kltune"):
        return None
    home = documented_target("kltune", parts[1])
    target = ".".join([home, *parts[2:]])
    domain = env.get_domain("py")
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], target, node, contnode
    )


def _summary(obj: Any) -> str:
    """The first paragraph of the docstring, on one line."""
    doc = (inspect.getdoc(obj) or "").strip()
    paragraph = doc.split("\n\n", 1)[0]
    return " ".join(line.strip() for line in paragraph.splitlines()).replace("|", "\\|")


class ExportsTable(SphinxDirective):
    """``.. kltune-exports::``: every name of ``kltune.__all__``, grouped by module."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        kltune = importlib.import_module("kltune")
        groups: dict[str, list[str]] = {}
        for name in kltune.__all__:
            home = documented_target("kltune", name).rsplit(".", 1)[0]
            groups.setdefault(home, []).append(name)
        lines: list[str] = []
        for home in sorted(groups, key=PUBLIC_MODULES.index):
            # Summaries may hold relative references (":meth:`Policy.score`"):
            # resolve them in the defining module.
            lines += [
                f".. currentmodule:: {home}",
                "",
                f".. rubric:: From :mod:`{home}`",
                "",
                ".. list-table::",
                "   :widths: 30 70",
                "   :class: kltune-exports",
                "",
            ]
            for name in groups[home]:
                obj = getattr(kltune, name)
                lines += [
                    f"   * - :py:obj:`kltune.{name} <{home}.{name}>`",
                    f"     - {_summary(obj)}",
                ]
            lines.append("")
        lines.append(f".. currentmodule:: {self.env.ref_context.get('py:module', 'kltune')}")
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="kltune-exports"), 0, container)
        return container.children


def drop_protocol_signature(
    app: Sphinx,
    what: str,
    name: str,
    obj: Any,
    options: Any,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str, str | None] | None:
    """A Protocol is not instantiated: show ``class RewardFn``, not ``RewardFn(*args, **kwargs)``."""
    if what == "class" and getattr(obj, "_is_protocol", False):
        return "", return_annotation
    return None


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("env-check-consistency", check_api_complete)
    app.connect("autodoc-process-signature", drop_protocol_signature)
    app.connect("missing-reference", resolve_reexport)
    app.add_directive("kltune-exports", ExportsTable)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
