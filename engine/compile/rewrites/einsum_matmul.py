"""Einsum as Transpose/Reshape/MatMul (issue #9 §1: a memory-lean Einsum).

The prepass's definition-based rewrite (rewrites/einsum.py) multiplies every operand broadcast onto
one axis per index letter, so an attention contraction "bhid,bhjd->bhij" holds b·h·i·j·d numbers at
once. Here the operands are contracted pairwise, left to right, as a batched matrix product: for
each pair the letters are grouped into batch (in both, still needed), contracted (in both, not
needed any more), and the free letters of each side; each operand is transposed to
(batch, free, contracted) or (batch, contracted, free), the groups flattened with Reshape, one
MatMul, and the free groups unflattened. Letters in one operand only and not needed later are
summed first. Memory is that of the operands and the result, as numpy's and torch's own einsum.
The builder differentiates all of these ops.

Falls back to the definition-based rewrite for one operand (a transpose and a sum, nothing
large), for diagonals (which it refuses with the reason) and where static sizes show a contracted
or free letter broadcast between operands (size 1 against n), which a MatMul cannot express.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from ..graph import attrs

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def parse(eq: str, ranks: list[int | None]) -> tuple[list[str], str] | None:
    """Terms and output with ellipses replaced by spare letters (right-aligned) and an implicit
    output made explicit, as numpy defines them; None when a rank needed for "..." is unknown."""
    eq = eq.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    used = set(eq) - set(".,->")
    spare = iter(c for c in _LETTERS if c not in used)
    ellipsis: list[str] = []
    if "..." in eq:
        widths = []
        for term, rank in zip(terms, ranks):
            if "..." in term and rank is None:
                return None
            widths.append(rank - len(term.replace("...", "")) if "..." in term else 0)
        ellipsis = [next(spare) for _ in range(max(widths))]
        terms = [
            t.replace("...", "".join(ellipsis[len(ellipsis) - w :])) if "..." in t else t
            for t, w in zip(terms, widths)
        ]
        rhs = rhs.replace("...", "".join(ellipsis))
    if not arrow:
        counts = {c: sum(t.count(c) for t in terms) for c in set("".join(terms))}
        once = sorted(c for c, k in counts.items() if k == 1 and c not in ellipsis)
        rhs = "".join(ellipsis) + "".join(once)
    return terms, rhs


def einsum(node, ctx, where):
    from .einsum import _einsum

    eq = attrs(node)["equation"]
    eq = eq.decode() if isinstance(eq, bytes) else eq
    parsed = parse(eq, [ctx.rank(x) for x in node.input])
    if parsed is None or len(node.input) < 2 or len(parsed[0]) != len(node.input):
        return _einsum(node, ctx, where)
    terms, rhs = parsed
    if any(len(set(t)) != len(t) for t in [*terms, rhs]):
        return _einsum(node, ctx, where)
    sizes: dict[str, set] = {}
    for term, x in zip(terms, node.input):
        dims = ctx.shapes.get(x) or [None] * len(term)
        for c, d in zip(term, dims):
            sizes.setdefault(c, set()).add(d if isinstance(d, int) else None)
    dim = {c: next(iter(s)) if len(s) == 1 else None for c, s in sizes.items()}
    nodes: list = []
    cur, cur_t = node.input[0], terms[0]
    for k in range(1, len(terms)):
        later = set(rhs).union(*terms[k + 1 :])
        other, other_t = node.input[k], terms[k]
        both = [c for c in cur_t if c in other_t]
        if any(len({d for d in sizes[c] if d is not None}) > 1 for c in both if c not in later):
            return _einsum(node, ctx, where)  # a contracted letter broadcast (1 against n)
        cur, cur_t = _pair(ctx, nodes, cur, cur_t, other, other_t, later, dim)
    # what is left: sum letters not in the output, then transpose to the output order
    cur, cur_t = _sum_out(ctx, nodes, cur, cur_t, set(rhs))
    perm = [cur_t.index(c) for c in rhs]
    nodes.append(helper.make_node("Transpose", [cur], [node.output[0]], perm=perm))
    return nodes


def _sum_out(ctx, nodes, x, term, keep) -> tuple[str, str]:
    gone = [i for i, c in enumerate(term) if c not in keep]
    if not gone:
        return x, term
    out = ctx.fresh("einsum_sum")
    axes = ctx.const(np.array(gone, np.int64), "axes")
    nodes.append(helper.make_node("ReduceSum", [x, axes], [out], keepdims=0))
    return out, "".join(c for c in term if c in keep)


def _transpose(ctx, nodes, x, term, order) -> str:
    perm = [term.index(c) for c in order]
    if perm == list(range(len(perm))):
        return x
    out = ctx.fresh("einsum_t")
    nodes.append(helper.make_node("Transpose", [x], [out], perm=perm))
    return out


def _pair(ctx, nodes, a, ta, b, tb, later, dim) -> tuple[str, str]:
    """Contract operands a (letters ta) and b (tb), keeping the letters in ``later``."""
    a, ta = _sum_out(ctx, nodes, a, ta, later | set(tb))
    b, tb = _sum_out(ctx, nodes, b, tb, later | set(ta))
    batch = [c for c in ta if c in tb and c in later]
    contract = [c for c in ta if c in tb and c not in later]
    free_a = [c for c in ta if c not in tb]
    free_b = [c for c in tb if c not in ta]
    at = _transpose(ctx, nodes, a, ta, batch + free_a + contract)
    bt = _transpose(ctx, nodes, b, tb, batch + contract + free_b)
    at = _flatten(ctx, nodes, at, len(batch), [free_a, contract], dim)
    bt = _flatten(ctx, nodes, bt, len(batch), [contract, free_b], dim)
    mm = ctx.fresh("einsum_mm")
    nodes.append(helper.make_node("MatMul", [at, bt], [mm]))
    letters = "".join(batch + free_a + free_b)
    if len(free_a) == 1 and len(free_b) == 1:
        return mm, letters
    out = ctx.fresh("einsum_out")
    shape = _target(ctx, nodes, len(batch), [[c] for c in free_a + free_b], dim, (a, ta, b, tb))
    nodes.append(helper.make_node("Reshape", [mm, shape], [out]))
    return out, letters


def _flatten(ctx, nodes, x, n_batch, groups, dim) -> str:
    """Reshape x (batch dims, then the letters of ``groups`` in order) to (batch dims, one dim per
    group); nothing to do when every group is one letter."""
    if all(len(g) == 1 for g in groups):
        return x
    out = ctx.fresh("einsum_flat")
    letters = "".join(c for g in groups for c in g)
    prefix = "".join(chr(0x100 + i) for i in range(n_batch))  # placeholders for the batch dims
    shape = _target(ctx, nodes, n_batch, groups, dim, (x, prefix + letters))
    nodes.append(helper.make_node("Reshape", [x, shape], [out]))
    return out


def _target(ctx, nodes, n_batch, groups, dim, sources) -> str:
    """A Reshape target: 0 (copy) for each batch dim, then the product of each group's sizes,
    constant when the sizes are static, else read from the Shape of the tensors holding them."""
    static = [int(np.prod([dim[c] for c in g])) if all(dim.get(c) for c in g) else None for g in groups]
    unknown = [i for i, s in enumerate(static) if s is None]
    if len(unknown) <= 1:
        vals = [0] * n_batch + [-1 if s is None else s for s in static]
        return ctx.const(np.array(vals, np.int64), "shape")
    parts = [ctx.const(np.zeros(n_batch, np.int64), "zeros")] if n_batch else []
    for g in groups:
        prod = None
        for c in g:
            d = _letter_dim(ctx, nodes, c, sources)
            if prod is None:
                prod = d
            else:
                nxt = ctx.fresh("einsum_dim")
                nodes.append(helper.make_node("Mul", [prod, d], [nxt]))
                prod = nxt
        parts.append(prod if prod is not None else ctx.const(np.array([1], np.int64), "one"))
    shape = ctx.fresh("einsum_shape")
    nodes.append(helper.make_node("Concat", parts, [shape], axis=0))
    return shape


def _letter_dim(ctx, nodes, c, sources) -> str:
    """The size of letter ``c`` at run time, (1,) int64, from the first source tensor holding it."""
    pairs = list(zip(sources[::2], sources[1::2]))
    x, term = next((x, t) for x, t in pairs if c in t)
    shape, out = ctx.fresh("einsum_shape_of"), ctx.fresh("einsum_dim")
    idx = ctx.const(np.array([term.index(c)], np.int64), "index")
    nodes.append(helper.make_node("Shape", [x], [shape]))
    nodes.append(helper.make_node("Gather", [shape, idx], [out], axis=0))
    return out


REWRITES = {"Einsum": einsum}
