"""Write docs/api.md, the API reference, from the docstrings of nmsparse's public names.

    python scripts/gen_api.py            # rewrite docs/api.md
    python scripts/gen_api.py --check    # exit 1 when docs/api.md differs from what would be written

The public names are those of ``nmsparse.__all__`` (the top level) and the ``__all__`` of
nmsparse.models, .data, .prune and .compile, plus the entry points of the training package listed
in TRAIN below (it re-exports nothing). The output depends only on the source: names in
``__all__`` order, no addresses, no dates, no versions.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"
COMMAND = "python scripts/gen_api.py"

PACKAGES = [
    ("nmsparse", "The top level: masks, compressed formats, sparse training (re-exported from patterns, formats, nn)."),
    ("nmsparse.models", "Models, the model registry, checkpoints that rebuild their model, evaluation."),
    ("nmsparse.data", "Dataset readers and the seeded in-memory loader."),
    ("nmsparse.prune", "One-shot pruning of a trained model: magnitude to a pattern, AdaPrune, Wanda, SparseGPT."),
    ("nmsparse.compile", "Deployment: compact files, per-layer plans and estimates on hardware profiles, CPU execution."),
]
# The training package's entry points (module, names): nmsparse.train re-exports nothing.
TRAIN = [
    ("nmsparse.train.config", ["TrainConfig", "load_config", "config_from_dict", "apply_overrides"]),
    ("nmsparse.train.loop", ["train", "read_run"]),
    ("nmsparse.train.compare", ["run_compare", "expand_sweeps"]),
    ("nmsparse.train.evaluate", ["evaluate_checkpoint", "report_run"]),
    ("nmsparse.train.plots", ["plot_curves", "plot_masks"]),
]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _clean(text: str) -> str:
    return _ADDRESS.sub("", text)


class _Raw:
    """An annotation written as text (``from __future__ import annotations``), shown without quotes."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _raw(annotation):
    return _Raw(annotation) if isinstance(annotation, str) else annotation


def _signature(obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    sig = sig.replace(parameters=[p.replace(annotation=_raw(p.annotation)) for p in sig.parameters.values()],
                      return_annotation=_raw(sig.return_annotation))
    return _clean(str(sig))


def _doc(obj) -> str:
    doc = inspect.getdoc(obj)
    return doc.strip() if doc else "*(no docstring)*"


def _own_doc(obj) -> str | None:
    """The object's own docstring (None when it only inherits one)."""
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
    return inspect.cleandoc(doc) if doc else None


def _members(cls) -> list[tuple[str, object]]:
    """Public methods and properties defined in the class itself, in source order."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            out.append((name, value))
    return out


def _value_summary(value) -> str:
    if isinstance(value, dict):
        keys = ", ".join(f"`{k}`" for k in sorted(map(str, value)))
        return f"dict with keys {keys}" if keys else "empty dict"
    if isinstance(value, (list, tuple, frozenset, set)):
        return f"{type(value).__name__} of {len(value)}"
    if isinstance(value, (int, float, str, bool)):
        return f"`{value!r}`"
    return type(value).__name__


def _entry(qualname: str, obj, level: int = 3) -> list[str]:
    head = "#" * level
    if inspect.isclass(obj):
        if issubclass(obj, enum.Enum):
            lines = [f"{head} class `{qualname}`", "", _doc(obj), ""]
            return lines + ["Members: " + ", ".join(f"`{m.name}`" for m in obj), ""]
        kind = "exception" if issubclass(obj, BaseException) else "class"
        sig = _signature(obj).removesuffix(" -> None") if kind == "class" else ""
        lines = [f"{head} {kind} `{qualname}{sig}`", "", _doc(obj), ""]
        for name, member in _members(obj):
            if isinstance(member, property):
                doc = _own_doc(member)
                lines += [f"* property `{name}`" + (f": {doc.splitlines()[0]}" if doc else "")]
            else:
                doc = _own_doc(member)
                text = f"* `{name}{_signature(member)}`"
                if doc:
                    first, *rest = doc.split("\n\n", 1)
                    text += ": " + " ".join(first.split())
                lines.append(text)
        if lines[-1] != "":
            lines.append("")
        return lines
    if callable(obj):
        return [f"{head} `{qualname}{_signature(obj)}`", "", _doc(obj), ""]
    return [f"{head} `{qualname}`", "", _value_summary(obj), ""]


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def generate() -> str:
    """The text of docs/api.md."""
    sections = []
    for modname, blurb in PACKAGES:
        mod = importlib.import_module(modname)
        names = list(mod.__all__)
        body = [f"## `{modname}`", "", blurb, ""]
        for name in names:
            body += _entry(f"{modname}.{name}", getattr(mod, name))
        sections.append((modname, body))
    body = ["## `nmsparse.train`", "",
            "Training runs from configs (what `nmsparse train` and `nmsparse compare` call); the package re-exports "
            "nothing, so each name is given with its module.", ""]
    for modname, names in TRAIN:
        mod = importlib.import_module(modname)
        for name in names:
            body += _entry(f"{modname}.{name}", getattr(mod, name))
    sections.append(("nmsparse.train", body))
    toc = [f"* [`{m}`](#{_anchor(m)})" for m, _ in sections]
    head = ["# API reference", "",
            f"Generated from the docstrings by `{COMMAND}`; do not edit by hand (a test fails when this file is out "
            "of date). Usage and examples: [README](../README.md); where each package sits: "
            "[architecture.md](architecture.md).", ""] + toc + [""]
    lines = head + [line for _, body in sections for line in body]
    text = "\n".join(line.rstrip() for line in lines).rstrip() + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare with docs/api.md; exit 1 when it differs")
    args = p.parse_args(argv)
    text = generate()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
