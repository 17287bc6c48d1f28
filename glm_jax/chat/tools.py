"""Python functions a chat model may call: described to it as JSON, called with the JSON arguments it writes.

    python -m glm_jax.chat --run_dir RUN --tools my_tools.py

loads my_tools.py (your own code, run as a module) and offers its public functions:
the ones listed in a module-level `TOOLS = [f, g]` if it has one, else every
function defined in the file whose name does not start with '_'. Each is described
by its name, the first paragraph of its docstring and its parameters (JSON types
from the annotations). A call the model makes is checked against the signature and
run; whatever goes wrong (unknown tool, bad arguments, an exception inside the tool)
comes back as an error text for the model to read, never as a crash of the chat.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
from pathlib import Path
from typing import Callable

JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}


@dataclasses.dataclass
class ToolResult:
    text: str  # what the model reads as the observation
    ok: bool


class ToolBox:
    """Named functions, their descriptions for the model, and safe calls."""

    def __init__(self, functions: list[Callable]):
        self.functions = {f.__name__: f for f in functions}

    @property
    def descriptions(self) -> tuple[dict, ...]:
        return tuple(describe(f) for f in self.functions.values())

    def call(self, name: str, arguments: dict) -> ToolResult:
        function = self.functions.get(name)
        if function is None:
            return ToolResult(f"error: there is no tool named {name!r}; the tools are {sorted(self.functions)}", False)
        try:
            inspect.signature(function).bind(**arguments)
        except TypeError as error:
            return ToolResult(f"error: {name} cannot take these arguments ({error})", False)
        try:
            value = function(**arguments)
        except Exception as error:  # the tool's own failure is the model's observation, not a crash
            return ToolResult(f"error: {name} raised {type(error).__name__}: {error}", False)
        return ToolResult(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str), True)


def describe(function: Callable) -> dict:
    """{'name', 'description', 'parameters': JSON schema of the keyword arguments}."""
    try:
        signature = inspect.signature(function, eval_str=True)  # annotations written as strings (PEP 563)
    except (NameError, TypeError, SyntaxError):
        signature = inspect.signature(function)
    properties, required = {}, []
    for name, parameter in signature.parameters.items():
        schema = {}
        if parameter.annotation in JSON_TYPES:
            schema["type"] = JSON_TYPES[parameter.annotation]
        properties[name] = schema
        if parameter.default is inspect.Parameter.empty:
            required.append(name)
    doc = (inspect.getdoc(function) or "").split("\n\n")[0].replace("\n", " ")
    return {"name": function.__name__, "description": doc,
            "parameters": {"type": "object", "properties": properties, "required": required}}


def load_tools(path: str | Path) -> ToolBox:
    """The tools of a Python file (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"tool module {path} does not exist; pass a Python file that defines the functions "
                                "the model may call (--tools my_tools.py)")
    spec = importlib.util.spec_from_file_location(f"glm_jax_tools_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the user's own tool code, named on the command line
    listed = getattr(module, "TOOLS", None)
    functions = list(listed) if listed is not None else [
        f for name, f in vars(module).items()
        if inspect.isfunction(f) and f.__module__ == module.__name__ and not name.startswith("_")]
    if not functions or not all(callable(f) for f in functions):
        raise ValueError(f"{path} offers no tools: define public functions (or TOOLS = [f, ...]) for the model to "
                         "call")
    return ToolBox(functions)
