"""Lowering of LayerNormalizationGrad (input gradient only)."""

from __future__ import annotations

from ...errors import LoweringError
from ..graph import attrs
from .registry import lowering, make, reduction


@lowering("LayerNormalizationGrad")
def layer_norm_grad(node, ctx):
    """dX = σ⁻¹ (g − mean(g) − x̂ mean(g x̂)), g = dY γ, x̂ = (X − μ) σ⁻¹, means over the normalised axes."""
    dy, x, gamma, mean, inv_std = node.input[:5]
    if any(o for o in node.output[1:]):
        needed = [o for o in node.output[1:] if o and _is_consumed(ctx, o)]
        if needed:
            raise LoweringError(f"node {node.name!r}: scale/bias gradients requested ({needed})")
    axis = attrs(node).get("axis", -1)
    rank = ctx.rank(x)
    if rank is None:
        raise LoweringError(f"node {node.name!r}: LayerNormalization gradient needs the rank of {x!r}")
    axes = list(range(axis % rank, rank))
    n = ctx.fresh
    xc, xh, g, mg, gx, mgx, t1, t2, t3 = (
        n(k) for k in ("xc", "xhat", "g", "mg", "gx", "mgx", "t1", "t2", "t3")
    )
    return [
        make("Sub", [x, mean], [xc]),
        make("Mul", [xc, inv_std], [xh]),
        make("Mul", [dy, gamma], [g]),
        reduction(ctx, "ReduceMean", g, axes, mg),
        make("Mul", [g, xh], [gx]),
        reduction(ctx, "ReduceMean", gx, axes, mgx),
        make("Sub", [g, mg], [t1]),
        make("Mul", [xh, mgx], [t2]),
        make("Sub", [t1, t2], [t3]),
        make("Mul", [t3, inv_std], [node.output[0]]),
    ]


def _is_consumed(ctx, name):
    return any(name in n.input for n in ctx.graph.node) or any(o.name == name for o in ctx.graph.output)
