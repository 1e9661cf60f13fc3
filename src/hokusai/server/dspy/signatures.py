"""Signature strings ("recipient, subject: str -> generated_email"), parsed and checked here before DSPy sees them.

DSPy's own parser resolves an unknown type name by importing it as a module (`"x: this -> y"` runs `import this`),
so declared programs never reach it: the string is parsed with `ast` into an allow-listed set of types (str, int,
float, bool, list[...], dict / dict[..., ...], Optional[...], Literal[...] of plain constants), and DSPy is given
the finished field table (`make_signature` with a dict), never the string.
"""

from __future__ import annotations

import ast
import keyword
from dataclasses import dataclass
from typing import Any, Literal, Optional

from hokusai.server.errors import InvalidRequest

SIMPLE_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list}
MAX_FIELDS = 50
# Names DSPy cannot take as fields: attributes of Signature (refused by DSPy) or keyword arguments Predict takes for
# itself (`demos` would silently become the demos, `config` and `lm` fail at call time).
RESERVED_FIELD_NAMES = frozenset(
    {
        "signature",
        "instructions",
        "fields",
        "input_fields",
        "output_fields",
        "model_config",
        "config",
        "lm",
        "demos",
        "prediction",
        "new_signature",
    }
)
MAX_TYPE_DEPTH = 5


class InvalidSignature(InvalidRequest):
    def __init__(self, signature: str, problem: str) -> None:
        super().__init__(f"Invalid signature {signature!r}: {problem}")


@dataclass(frozen=True)
class SignatureField:
    name: str
    annotation: Any  # a Python type built from the allow-list
    type_name: str  # as written (normalised), for display


@dataclass(frozen=True)
class ParsedSignature:
    text: str
    inputs: tuple[SignatureField, ...]
    outputs: tuple[SignatureField, ...]

    @property
    def input_names(self) -> list[str]:
        return [field.name for field in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [field.name for field in self.outputs]


def parse_signature(text: str) -> ParsedSignature:
    if not isinstance(text, str) or text.count("->") != 1:
        raise InvalidSignature(str(text), "expected exactly one '->' between input and output fields")
    left, right = text.split("->")
    inputs, outputs = _fields(text, left), _fields(text, right)
    if not inputs or not outputs:
        raise InvalidSignature(text, "needs at least one input and one output field")
    names = [field.name for field in (*inputs, *outputs)]
    if len(names) > MAX_FIELDS:
        raise InvalidSignature(text, f"at most {MAX_FIELDS} fields")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidSignature(text, f"field names must be unique: {', '.join(duplicates)}")
    return ParsedSignature(text.strip(), tuple(inputs), tuple(outputs))


def _fields(signature: str, side: str) -> list[SignatureField]:
    fields = []
    for part in _split_top_level(signature, side):
        name, colon, type_text = part.partition(":")
        name = name.strip()
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
            raise InvalidSignature(signature, f"{name!r} is not a valid field name")
        if name in RESERVED_FIELD_NAMES:
            raise InvalidSignature(signature, f"{name!r} is reserved by DSPy and cannot name a field")
        if not colon:
            fields.append(SignatureField(name, str, "str"))
            continue
        try:
            node = ast.parse(type_text.strip(), mode="eval").body
        except SyntaxError:
            raise InvalidSignature(signature, f"type of {name!r} cannot be read: {type_text.strip()!r}") from None
        annotation = _annotation(signature, node, depth=0)
        fields.append(SignatureField(name, annotation, ast.unparse(node)))
    return fields


def _split_top_level(signature: str, side: str) -> list[str]:
    """Comma-separated parts, ignoring commas inside brackets (`dict[str, int]`, `Literal['a', 'b']`)."""
    parts, depth, current = [], 0, []
    for char in side:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
            if depth < 0:
                raise InvalidSignature(signature, "unbalanced brackets")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise InvalidSignature(signature, "unbalanced brackets")
    parts.append("".join(current))
    stripped = [part.strip() for part in parts]
    if any(not part for part in stripped) and any(stripped):
        raise InvalidSignature(signature, "empty field between commas")
    return [part for part in stripped if part]


def _annotation(signature: str, node: ast.expr, depth: int) -> Any:
    if depth > MAX_TYPE_DEPTH:
        raise InvalidSignature(signature, "types nested too deeply")
    if isinstance(node, ast.Name) and node.id in SIMPLE_TYPES:
        return SIMPLE_TYPES[node.id]
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        kind = node.value.id
        arguments = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        if kind == "list" and len(arguments) == 1:
            return list[_annotation(signature, arguments[0], depth + 1)]
        if kind == "dict" and len(arguments) == 2:
            key, value = (_annotation(signature, argument, depth + 1) for argument in arguments)
            return dict[key, value]
        if kind == "Optional" and len(arguments) == 1:
            return Optional[_annotation(signature, arguments[0], depth + 1)]  # noqa: UP045 - built, not written
        if kind == "Literal" and arguments:
            values = []
            for argument in arguments:
                if not isinstance(argument, ast.Constant) or not isinstance(argument.value, str | int | bool):
                    raise InvalidSignature(signature, "Literal takes only string, integer or boolean constants")
                values.append(argument.value)
            return Literal.__getitem__(tuple(values))
    shown = ast.unparse(node)
    raise InvalidSignature(
        signature,
        f"type {shown!r} is not allowed (allowed: str, int, float, bool, list[...], dict, dict[..., ...], "
        "Optional[...], Literal[...])",
    )
