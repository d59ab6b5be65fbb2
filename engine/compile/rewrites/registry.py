"""The rewrite registry: forward-graph rewrites for what GradientGraphBuilder 1.19.2 cannot
differentiate or gets wrong (design/lowering.md, "Builder pitfalls"), one function per op type.

A rewrite takes the node, a GraphContext and the model's name for messages, and returns the
nodes that replace it (``[node]`` to keep it). Register one with the decorator::

    @rewrite("Resize")
    def _resize(node, ctx, where): ...

in a module that ``engine/compile/rewrites/__init__.py`` imports (or ``REWRITES[op] = fn``).
"""

from __future__ import annotations

from collections.abc import Callable

REWRITES: dict[str, Callable] = {}


def rewrite(op_type: str):
    def register(fn):
        REWRITES[op_type] = fn
        return fn

    return register
