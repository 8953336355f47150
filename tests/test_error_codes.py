"""Every error code the gateway raises has its OpenAI ``type`` in the table.

An unmapped code would still answer (as ``server_error``), but with the
wrong type for a client error: the test reads the code strings out of the
gateway's source (the dev mock answers for itself) so a new code cannot be
added without its type.
"""

from __future__ import annotations

import ast
from pathlib import Path

from proxy import errors

PROXY = Path(errors.__file__).resolve().parent
# Calls whose second positional argument is an error code, and keyword ``code=``.
_CODE_SECOND = {"GatewayError", "error_bytes", "QuotaRejected"}
_CODE_FIRST_AFTER_MESSAGE = {"error_body"}


def _codes_in(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
        args = node.args
        if name in _CODE_SECOND and len(args) >= 2 and isinstance(args[1], ast.Constant) and isinstance(args[1].value, str):
            found.add(args[1].value)
        if name in _CODE_FIRST_AFTER_MESSAGE and len(args) >= 2 and isinstance(args[1], ast.Constant):
            found.add(args[1].value)
        if name in _CODE_SECOND | _CODE_FIRST_AFTER_MESSAGE:
            for kw in node.keywords:
                if kw.arg == "code" and isinstance(kw.value, ast.Constant):
                    found.add(kw.value.value)
    return found


def gateway_codes() -> set[str]:
    codes: set[str] = set()
    for path in PROXY.rglob("*.py"):
        if "devtools" in path.parts:
            continue
        codes |= _codes_in(ast.parse(path.read_text(encoding="utf-8")))
    return codes


def test_the_source_scan_finds_the_codes_it_should():
    codes = gateway_codes()
    assert {"request_timeout", "server_busy", "invalid_api_key", "invalid_request"} <= codes


def test_every_code_the_gateway_raises_has_its_type():
    unmapped = sorted(code for code in gateway_codes() if code not in errors._TYPE_BY_CODE)
    assert unmapped == []


def test_timeouts_and_a_full_house_answer_with_their_types():
    assert errors.error_body("late", "request_timeout")["error"]["type"] == "invalid_request_error"
    assert errors.error_body("busy", "server_busy")["error"]["type"] == "server_error"
