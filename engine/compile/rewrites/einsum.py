"""Einsum (no builder gradient) by its definition: aligned operands, a broadcast product, a sum."""

from __future__ import annotations

import numpy as np
from onnx import helper

from ...errors import UnsupportedModelError
from ..graph import attrs
from .registry import rewrite


@rewrite("Einsum")
def _einsum(node, ctx, where):
    """Einsum (no builder gradient) by its definition: every operand transposed and unsqueezed onto
    one axis per index letter (in a common order), multiplied with broadcasting, summed over the
    letters not in the output, transposed to the output order. Exact; the broadcast product holds
    every index combination at once, so a large contraction (attention scores written as einsum)
    needs that much memory. Repeated letters within one operand (diagonals) are refused."""
    eq = attrs(node)["equation"]
    eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    refuse = lambda why: UnsupportedModelError(  # noqa: E731
        f"{where}: node {node.name!r} (Einsum {eq!r}) cannot be differentiated: {why}"
    )
    if len(terms) != len(node.input):
        raise refuse("the equation does not match the inputs")
    used = set(eq) - set(".,->")
    spare = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used)
    ellipsis = []
    if "..." in eq:  # broadcast dims: right-aligned letters shared by every operand that has them
        widths = []
        for term, x in zip(terms, node.input):
            rank = ctx.rank(x)
            if rank is None:
                raise refuse(f"the rank of {x!r} is unknown")
            widths.append(rank - len(term.replace("...", "")) if "..." in term else 0)
        ellipsis = [next(spare) for _ in range(max(widths))]
        terms = [
            t.replace("...", "".join(ellipsis[len(ellipsis) - w :])) if "..." in t else t
            for t, w in zip(terms, widths)
        ]
        rhs = rhs.replace("...", "".join(ellipsis))
    if not arrow:  # implicit output: ellipsis dims, then the letters used once, alphabetically
        counts = {c: sum(t.count(c) for t in terms) for c in set("".join(terms))}
        rhs = "".join(ellipsis) + "".join(
            sorted(c for c, k in counts.items() if k == 1 and c not in ellipsis)
        )
    if any(len(set(t)) != len(t) for t in terms):
        raise refuse("a letter repeats within one operand (a diagonal)")
    order = list(dict.fromkeys("".join(terms) + rhs))
    f = ctx.fresh
    nodes, aligned = [], []
    for term, x in zip(terms, node.input):
        present = [c for c in order if c in term]
        cur = x
        perm = [term.index(c) for c in present]
        if perm != list(range(len(perm))):
            cur_t = f("einsum_t")
            nodes.append(helper.make_node("Transpose", [cur], [cur_t], perm=perm))
            cur = cur_t
        missing = [i for i, c in enumerate(order) if c not in term]
        if missing:
            cur_u = f("einsum_u")
            nodes.append(
                helper.make_node("Unsqueeze", [cur, ctx.const(np.array(missing, np.int64), "axes")], [cur_u])
            )
            cur = cur_u
        aligned.append(cur)
    prod = aligned[0]
    for other in aligned[1:]:
        nxt = f("einsum_mul")
        nodes.append(helper.make_node("Mul", [prod, other], [nxt]))
        prod = nxt
    summed = [i for i, c in enumerate(order) if c not in rhs]
    kept = [c for c in order if c in rhs]
    if summed:
        red = f("einsum_sum")
        nodes.append(
            helper.make_node(
                "ReduceSum", [prod, ctx.const(np.array(summed, np.int64), "axes")], [red], keepdims=0
            )
        )
        prod = red
    perm = [kept.index(c) for c in rhs]
    if len(set(rhs)) != len(rhs):
        raise refuse("a letter repeats in the output")
    nodes.append(helper.make_node("Transpose", [prod], [node.output[0]], perm=perm))
    return nodes
