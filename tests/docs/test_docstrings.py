"""Public names keep short docstrings: a summary, Args, Raises and an example; design essays live in docs/design."""

from __future__ import annotations

import inspect

import lightning_gp
import lightning_gp.functional
import lightning_gp.gan

MAX_LINES = 35
PACKAGES = (lightning_gp, lightning_gp.functional, lightning_gp.gan)


def _own_function(member: object) -> object | None:
    """The function behind a class attribute (method, static/class method, property), or None."""
    if isinstance(member, property):
        member = member.fget
    member = getattr(member, "__func__", member)
    return member if inspect.isfunction(member) else None


def public_objects() -> list[tuple[str, object]]:
    """Every class and function in the packages' ``__all__``, and the public methods their classes define
    in this package (``__init__`` is documented by the class's Args)."""
    out = []
    for package in PACKAGES:
        for name in package.__all__:
            obj = getattr(package, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue  # modules, constants, __version__
            qualified = f"{package.__name__}.{name}"
            out.append((qualified, obj))
            if not inspect.isclass(obj):
                continue
            for attr, member in vars(obj).items():
                function = _own_function(member)
                if attr.startswith("_") or function is None:
                    continue
                if function.__module__.startswith("lightning_gp"):
                    out.append((f"{qualified}.{attr}", function))
    return out


def docstring_problems(objects: list[tuple[str, object]]) -> dict[str, str]:
    """What is wrong with each object's docstring: missing, too long, or (for a class or function in ``__all__``
    that does something, not a NamedTuple of results) without a runnable ``>>>`` example."""
    problems = {}
    for name, obj in objects:
        doc = inspect.getdoc(obj)
        top_level = name.count(".") == (2 if name.startswith(("lightning_gp.functional.", "lightning_gp.gan.")) else 1)
        result_type = inspect.isclass(obj) and issubclass(obj, tuple)
        if not doc:
            problems[name] = "no docstring"
        elif len(doc.splitlines()) > MAX_LINES:
            problems[name] = f"{len(doc.splitlines())} lines"
        elif top_level and not result_type and ">>>" not in doc:
            problems[name] = "no runnable example (doctests run them: `--doctest-modules`)"
    return problems


def test_public_docstrings_exist_and_are_short():
    problems = docstring_problems(public_objects())
    listing = "\n".join(f"  {name}: {why}" for name, why in sorted(problems.items()))
    assert not problems, (
        f"Public docstrings must exist and have at most {MAX_LINES} lines (move essays to docs/design/):\n{listing}"
    )


def test_the_check_finds_each_kind_of_problem():
    def undocumented():
        pass

    def essay():
        pass

    def no_example():
        """Does something."""

    def documented():
        """Does something.

        Example:

            >>> 1 + 1
            2
        """

    essay.__doc__ = "Summary.\n" + "more\n" * MAX_LINES
    functions = (undocumented, essay, no_example, documented)
    found = docstring_problems([(f"lightning_gp.{f.__name__}", f) for f in functions])
    assert found == {"lightning_gp.undocumented": "no docstring", "lightning_gp.essay": f"{MAX_LINES + 1} lines",
                     "lightning_gp.no_example": "no runnable example (doctests run them: `--doctest-modules`)"}


def test_public_docstrings_link_the_pages_they_name():
    """A page named in a public docstring is a link in the API reference (``[Monitors](../monitors.md)``), not a
    plain path the reader must copy."""
    import re

    plain = {name: found for name, obj in public_objects()
             if (found := re.findall(r"(?<![(/])docs/[\w/.-]+\.md", inspect.getdoc(obj) or ""))}
    assert not plain, plain
