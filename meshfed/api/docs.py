"""``/docs``: the OpenAPI document as one HTML page, made on the server.

FastAPI's default page loads Swagger UI from a CDN, and no Swagger UI files ship with our
dependencies: this page has no script and no external resource, so it works offline.
"""

from __future__ import annotations

import html
import json
from typing import Any

__all__ = ["docs_page"]

_STYLE = """body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}
h2{border-bottom:1px solid #ccc}code,pre{background:#f4f4f4}pre{padding:.5em;overflow:auto}
.get{color:#05a}.post{color:#080}td,th{text-align:left;padding:0 1em 0 0;vertical-align:top}"""


def _schema_name(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if schema.get("type") == "array":
        return f"list of {_schema_name(schema.get('items', {}))}"
    if "anyOf" in schema:
        return " or ".join(_schema_name(option) for option in schema["anyOf"])
    return str(schema.get("type", "any"))


def _json_schema(answer: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = answer.get("content", {}).get("application/json", {}).get("schema", {})
    return schema


def docs_page(openapi: dict[str, Any]) -> str:
    """The whole API on one page: each operation, its parameters, body and answers, then
    every schema as JSON."""
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>"
        f"{html.escape(openapi['info']['title'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(openapi['info']['title'])} API</h1>",
        "<p>The machine-readable document: <a href='/openapi.json'>/openapi.json</a>. "
        "Requests that change state need <code>Authorization: Bearer &lt;token&gt;</code> "
        "(the file <code>api.token</code> in the node's data directory).</p>",
    ]
    for path, operations in openapi.get("paths", {}).items():
        for method, operation in operations.items():
            out.append(
                f"<h2><span class='{method}'>{method.upper()}</span> "
                f"<code>{html.escape(path)}</code></h2>"
            )
            text = operation.get("description") or operation.get("summary", "")
            out.append(f"<p>{html.escape(text)}</p>")
            parameters = operation.get("parameters", [])
            if parameters:
                out.append("<table><tr><th>parameter</th><th>in</th><th>type</th></tr>")
                for parameter in parameters:
                    out.append(
                        f"<tr><td><code>{html.escape(parameter['name'])}</code></td>"
                        f"<td>{parameter['in']}</td><td>"
                        f"{html.escape(_schema_name(parameter.get('schema', {})))}</td></tr>"
                    )
                out.append("</table>")
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body:
                name = html.escape(_schema_name(body["schema"]))
                out.append(f"<p>body: <code>{name}</code></p>")
            answers = ", ".join(
                f"{code} {html.escape(_schema_name(_json_schema(answer)))}"
                for code, answer in operation.get("responses", {}).items()
            )
            out.append(f"<p>answers: {answers}</p>")
    out.append("<h2>Schemas</h2>")
    for name, schema in openapi.get("components", {}).get("schemas", {}).items():
        out.append(
            f"<h3 id='{html.escape(name)}'>{html.escape(name)}</h3>"
            f"<pre>{html.escape(json.dumps(schema, indent=2))}</pre>"
        )
    out.append("</body></html>")
    return "\n".join(out)
