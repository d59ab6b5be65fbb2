"""The backward rules as data: the gradient definitions of Relu and Clip that the builder worker
registers before the build (``register_gradient_definition`` overrides the builder's own), one
entry per rule. The rest of the graph is differentiated by the builder's own gradients under
every rule.

A definition is a list of nodes ``(op_type, inputs, outputs, attributes)`` in the builder's
notation: GO(0) is dL/dY, I(k) the forward inputs, O(0) the forward output, GI(0) dL/dX; an
attribute is ``{"value": ..., "dtype": ..., "is_tensor": ...}``. Clip's bounds are made explicit
by the Clip rewrite, so I(1) and I(2) always exist.

- gradient: dY · 1[x inside the active range]. torch treats Clip's bounds as exclusive
  (hardtanh_backward), the builder's own gradient as inclusive: this one is exclusive too.
- guided_backprop (Springenberg et al. 2015): dY⁺ · 1[x inside] (only positive gradients pass).
- deconvnet (Zeiler & Fergus 2014): dY⁺, whatever the forward value.

Masks read the forward OUTPUT: clip(x) lies strictly inside (min, max) exactly when x does, and
leaving the pre-activation with a single consumer keeps onnxruntime's Conv+Clip fusion (and its
NCHWc layout) intact in the forward half of the gradient graph. (The builder's own ReluGrad is
right but reads the pre-activation, which breaks Conv+Relu fusion; so the gradient rule
overrides Relu too.) Masks multiply as floats: Mul(GO, Cast(mask)) runs ~20% faster than
Where(mask, GO, 0) on EfficientNet-Lite0 (onnxruntime's Where takes a slow broadcasting path).
"""

from __future__ import annotations

_ZERO = ("Constant", [], ["zero"], {"value": {"value": 0.0, "dtype": "IElemType(0)", "is_tensor": True}})
_TO_FLOAT = ("Cast", ["mask"], ["mask_f"], {"to": {"value": 1, "dtype": "int"}})
_RELU_MASK = [_ZERO, ("Greater", ["O(0)", "zero"], ["mask"], None), _TO_FLOAT]
_CLIP_MASK = [
    ("Greater", ["O(0)", "I(1)"], ["above_min"], None),
    ("Less", ["O(0)", "I(2)"], ["below_max"], None),
    ("And", ["above_min", "below_max"], ["mask"], None),
    _TO_FLOAT,
]
_MASKED = ("Mul", ["GO(0)", "mask_f"], ["GI(0)"], None)
_GUIDED = [("Relu", ["GO(0)"], ["go_positive"], None), ("Mul", ["go_positive", "mask_f"], ["GI(0)"], None)]
_DECONV = [("Relu", ["GO(0)"], ["GI(0)"], None)]

# rule -> forward op (ai.onnx domain) -> its gradient definition
BACKWARD_RULES: dict[str, dict[str, list]] = {
    "gradient": {"Relu": [*_RELU_MASK, _MASKED], "Clip": [*_CLIP_MASK, _MASKED]},
    "guided_backprop": {"Relu": [*_RELU_MASK, *_GUIDED], "Clip": [*_CLIP_MASK, *_GUIDED]},
    "deconvnet": {"Relu": list(_DECONV), "Clip": list(_DECONV)},
}


def gradient_definitions(rule: str) -> dict[str, list]:
    """The definitions the builder worker registers for ``rule`` (JSON-ready)."""
    if rule not in BACKWARD_RULES:
        raise ValueError(f"unknown backward rule {rule!r}; use one of {tuple(BACKWARD_RULES)}")
    return BACKWARD_RULES[rule]
