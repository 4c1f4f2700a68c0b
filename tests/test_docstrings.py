"""Public names keep short docstrings: a summary, Args, Raises and an example; design essays live in docs/design."""

from __future__ import annotations

import inspect

import lightning_gp
import lightning_gp.functional
import lightning_gp.gan

MAX_LINES = 35
PACKAGES = (lightning_gp, lightning_gp.functional, lightning_gp.gan)

#: Names exempt from the check (none now; add one only with a reason next to it).
EXCLUDED: set[str] = set()

#: Names whose docstring a pending change will shorten or add (none now); a fixed name must leave the set.
PENDING: set[str] = set()


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


def docstring_problems() -> dict[str, str]:
    problems = {}
    for name, obj in public_objects():
        if name in EXCLUDED or name in PENDING:
            continue
        doc = inspect.getdoc(obj)
        if not doc:
            problems[name] = "no docstring"
        elif len(doc.splitlines()) > MAX_LINES:
            problems[name] = f"{len(doc.splitlines())} lines"
    return problems


def test_public_docstrings_exist_and_are_short():
    problems = docstring_problems()
    listing = "\n".join(f"  {name}: {why}" for name, why in sorted(problems.items()))
    assert not problems, (
        f"Public docstrings must exist and have at most {MAX_LINES} lines (move essays to docs/design/):\n{listing}"
    )


def test_the_lists_name_real_objects():
    names = {name for name, _ in public_objects()}
    assert (EXCLUDED | PENDING) <= names, sorted((EXCLUDED | PENDING) - names)


def test_pending_names_still_need_the_rewrite():
    """A PENDING entry whose docstring has become fine must be dropped from the set."""
    objects = dict(public_objects())
    fixed = [n for n in PENDING if (doc := inspect.getdoc(objects[n])) and len(doc.splitlines()) <= MAX_LINES]
    assert not fixed, f"Docstrings now within {MAX_LINES} lines; remove them from PENDING: {fixed}"
