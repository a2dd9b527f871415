"""The config reference of `python -m pipeline.train --help`, generated from the dataclasses.

Each key is listed with its default and its attribute docstring (the string literal after the
field, read from the class's source with `ast`), grouped by section: the top-level keys, then
`model.*` (model.TokenizerConfig), `data.*` (pipeline.data.loader.DataConfig), and the
TrainConfig sections (`generator_optim.*`, `losses.*`, `health.*`, ...).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from typing import Any

import yaml

from model.config import DiscriminatorConfig, TokenizerConfig
from pipeline.data.loader import DataConfig
from pipeline.train.config import DERIVED_DATA_FIELDS, TrainConfig

__all__ = ["OVERRIDE_EXAMPLES", "config_reference", "field_docs", "section_keys"]

# Shown in --help; tests/test_cli.py runs each with --print-config.
OVERRIDE_EXAMPLES = (
    "num_steps=20",
    "generator_optim.lr=2e-4",
    "data.num_workers=4",
    "model.discriminator.dim=16",
)
WIDTH = 96
# Data fields the config does not take: the trainer derives them, or the section fixes them.
NOT_IN_DATA = (*DERIVED_DATA_FIELDS, "mode")
# Sections documented by another line (the same keys as `data.*`).
SAME_AS = {"eval_data": "data"}
TITLES = {
    "model": "the tokenizer's architecture and losses (model.TokenizerConfig)",
    "data": "the training data loader (pipeline.data.loader.DataConfig); its micro_batch_size "
    "and time_compression come from the top level and the model",
}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring, whitespace collapsed ('' where it has none)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, [*body[1:], None], strict=True):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = ""
        if (
            isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            text = " ".join(following.value.value.split())
        docs[node.target.id] = text
    return docs


def _plain(value: Any) -> Any:
    """YAML-representable: tuples as lists, layer specs in their reference form."""
    if hasattr(value, "to_reference"):
        return value.to_reference()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _show(value: Any) -> str:
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10**6)
    return text.strip().removesuffix("...").strip()


def _default(f: dataclasses.Field) -> str | None:
    if f.default is not dataclasses.MISSING:
        return _show(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return None if dataclasses.is_dataclass(f.default_factory) else _show(f.default_factory())
    return None


def _nested(cls: type, name: str) -> type | None:
    """The dataclass a field holds, if it is a section (typed by its class)."""
    sections = {
        "model": TokenizerConfig,
        "data": DataConfig,
        "eval_data": DataConfig,
        "discriminator": DiscriminatorConfig,
    }
    if name in sections and (cls is TrainConfig or name == "discriminator"):
        return sections[name]
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    factory = f.default_factory
    return factory if dataclasses.is_dataclass(factory) else None  # type: ignore[return-value]


def section_keys(cls: type = TrainConfig, prefix: str = "") -> dict[str, list[str]]:
    """Section name ('' for the top level) -> the dotted keys it takes, in field order."""
    out: dict[str, list[str]] = {prefix.rstrip("."): []}
    for f in dataclasses.fields(cls):
        if cls is DataConfig and f.name in NOT_IN_DATA:
            continue
        nested = _nested(cls, f.name)
        if nested is None:
            out[prefix.rstrip(".")].append(prefix + f.name)
        elif f.name not in SAME_AS:
            out.update(section_keys(nested, f"{prefix}{f.name}."))
    return out


def _entry(cls: type, f: dataclasses.Field, key: str) -> list[str]:
    default = _default(f)
    head = f"  {key} = {default}" if default is not None else f"  {key} (required)"
    if f.default_factory is not dataclasses.MISSING and default is None:
        head = f"  {key}"
    doc = field_docs(cls).get(f.name, "")
    if not doc:
        return [head]
    return [head, *textwrap.wrap(doc, WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)]


def _header(cls: type, f: dataclasses.Field, prefix: str) -> list[str]:
    """`section.*: what it is`, from TITLES, the class docstring or the field's docstring."""
    nested = _nested(cls, f.name)
    doc = " ".join((inspect.getdoc(nested) or "").split("\n\n")[0].split())
    title = TITLES.get(prefix + f.name) or doc
    if f.default is None:
        title = f"{title.rstrip('.')}. Default null; {field_docs(cls).get(f.name) or 'off'}"
    return textwrap.wrap(f"{prefix}{f.name}.*: {title}", WIDTH, subsequent_indent="    ")


def _section_lines(cls: type, prefix: str) -> list[str]:
    lines, nested_sections = [], []
    for f in dataclasses.fields(cls):
        if cls is DataConfig and f.name in NOT_IN_DATA:
            continue
        nested = _nested(cls, f.name)
        if nested is None:
            lines += _entry(cls, f, prefix + f.name)
        elif f.name in SAME_AS:
            doc = field_docs(cls).get(f.name, "")
            text = f"{prefix}{f.name}.*: the {SAME_AS[f.name]}.* keys (default null). {doc}"
            nested_sections.append([*textwrap.wrap(text, WIDTH, subsequent_indent="    "), ""])
        else:
            nested_sections.append(
                [*_header(cls, f, prefix), *_section_lines(nested, prefix + f.name + ".")]
            )
    out = [*lines, ""]
    for section in nested_sections:
        out += section
    return out


def config_reference() -> str:
    """The epilog: every config key by section, with its default and its docstring."""
    examples = " ".join(OVERRIDE_EXAMPLES)
    intro = [
        "Overrides: dotted KEY=VALUE after the options, values parsed as YAML (numbers, true/",
        "false, null, [lists]); they replace the --config file's values. For example:",
        "  python -m pipeline.train --config launch/configs/tiny_cpu.yaml \\",
        f"      {examples}",
        "  python -m pipeline.train --config launch/configs/tiny_cpu.yaml --print-config "
        "num_steps=20",
        "",
        "Config keys (KEY = default; `model` and `data` have no defaults: the file sets them):",
        "",
        "top-level keys:",
    ]
    return "\n".join([*intro, *_section_lines(TrainConfig, "")]).rstrip() + "\n"
