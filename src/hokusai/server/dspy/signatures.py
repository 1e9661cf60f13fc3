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
# Python's parser recurses on nested expressions (`1+1+...`, `-(-(...))`, `a.b.c...`): a long enough type string
# ends in RecursionError or MemoryError inside `ast.parse`, whatever the depth check below says. No allowed type
# needs more than a few hundred characters, so longer ones are refused before they are parsed.
MAX_TYPE_LENGTH = 300
MAX_SIGNATURE_LENGTH = 5000
SHOWN_SIGNATURE_CHARS = 200


class InvalidSignature(InvalidRequest):
    def __init__(self, signature: str, problem: str) -> None:
        shown = signature if len(signature) <= SHOWN_SIGNATURE_CHARS else signature[:SHOWN_SIGNATURE_CHARS] + "..."
        super().__init__(f"Invalid signature {shown!r}: {problem}")


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
    if len(text) > MAX_SIGNATURE_LENGTH:
        raise InvalidSignature(text, f"longer than {MAX_SIGNATURE_LENGTH} characters")
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
        type_text = type_text.strip()
        if len(type_text) > MAX_TYPE_LENGTH:
            raise InvalidSignature(signature, f"type of {name!r} is longer than {MAX_TYPE_LENGTH} characters")
        try:
            node = ast.parse(type_text, mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a NUL byte
            raise InvalidSignature(signature, f"type of {name!r} cannot be read: {type_text[:100]!r}") from None
        annotation = _annotation(signature, node, depth=0, written=type_text)
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


def _annotation(signature: str, node: ast.expr, depth: int, written: str) -> Any:
    """The Python type of `node`, from the allow-list only; `written` is the field's type as given, for errors."""
    if depth > MAX_TYPE_DEPTH:
        raise InvalidSignature(signature, "types nested too deeply")
    if isinstance(node, ast.Name) and node.id in SIMPLE_TYPES:
        return SIMPLE_TYPES[node.id]
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        kind = node.value.id
        arguments = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        if kind == "list" and len(arguments) == 1:
            return list[_annotation(signature, arguments[0], depth + 1, written)]
        if kind == "dict" and len(arguments) == 2:
            key, value = (_annotation(signature, argument, depth + 1, written) for argument in arguments)
            return dict[key, value]
        if kind == "Optional" and len(arguments) == 1:
            return Optional[_annotation(signature, arguments[0], depth + 1, written)]  # noqa: UP045 - built, not written
        if kind == "Literal" and arguments:
            values = []
            for argument in arguments:
                if not isinstance(argument, ast.Constant) or not isinstance(argument.value, str | int | bool):
                    raise InvalidSignature(signature, "Literal takes only string, integer or boolean constants")
                values.append(argument.value)
            return Literal.__getitem__(tuple(values))
    # The type as written, not ast.unparse(node): unparsing a deep disallowed expression recurses too.
    shown = ast.get_source_segment(written, node) or written
    raise InvalidSignature(
        signature,
        f"type {shown[:100]!r} is not allowed (allowed: str, int, float, bool, list[...], dict, dict[..., ...], "
        "Optional[...], Literal[...])",
    )
