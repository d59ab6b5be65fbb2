"""Gradients of element-wise ops that onnxruntime-training 1.19.2 has none for (issue #9 §1).

Registered in the builder interpreter before the build (``register_gradient_definition``, as the
backward rules of Relu and Clip are), so the builder emits them as standard ops and nothing needs
lowering. Runs inside the builder interpreter: this module must import nothing but the standard
library (builder_worker.py imports it as a sibling file).

Each definition reads GO(0) (dL/dY), I(0) (the input X) or O(0) (the output Y) and writes GI(0),
with the derivative torch's autograd uses:

| op | dL/dX |
|---|---|
| Atan | dY / (1 + X²) |
| Asin, Acos | ±dY / sqrt(1 − X²) |
| Tan | dY · (1 + Y²) |
| Sinh, Cosh | dY · cosh(X), dY · sinh(X) |
| Asinh, Acosh | dY / sqrt(X² ± 1) |
| Atanh | dY / (1 − X²) |
| Floor, Ceil, Round | 0 (torch: zeros; the function is piecewise constant) |
| Mod | dY (the divisor must be a constant: the prepass refuses a computed one) |
"""

import json

_ONE = {"value": {"value": 1.0, "dtype": "IElemType(0)", "is_tensor": True}}
_ZERO = {"value": {"value": 0.0, "dtype": "IElemType(0)", "is_tensor": True}}

# op -> nodes (op_type, inputs, outputs, attributes); "one"/"zero" are Constant nodes added first.
_X2 = ("Mul", ["I(0)", "I(0)"], ["x2"], None)
GRADIENTS = {
    "Atan": [_X2, ("Add", ["x2", "one"], ["den"], None), ("Div", ["GO(0)", "den"], ["GI(0)"], None)],
    "Asin": [
        _X2,
        ("Sub", ["one", "x2"], ["d2"], None),
        ("Sqrt", ["d2"], ["den"], None),
        ("Div", ["GO(0)", "den"], ["GI(0)"], None),
    ],
    "Acos": [
        _X2,
        ("Sub", ["one", "x2"], ["d2"], None),
        ("Sqrt", ["d2"], ["den"], None),
        ("Div", ["GO(0)", "den"], ["q"], None),
        ("Neg", ["q"], ["GI(0)"], None),
    ],
    "Tan": [
        ("Mul", ["O(0)", "O(0)"], ["y2"], None),
        ("Add", ["y2", "one"], ["d"], None),
        ("Mul", ["GO(0)", "d"], ["GI(0)"], None),
    ],
    "Sinh": [("Cosh", ["I(0)"], ["d"], None), ("Mul", ["GO(0)", "d"], ["GI(0)"], None)],
    "Cosh": [("Sinh", ["I(0)"], ["d"], None), ("Mul", ["GO(0)", "d"], ["GI(0)"], None)],
    "Asinh": [
        _X2,
        ("Add", ["x2", "one"], ["d2"], None),
        ("Sqrt", ["d2"], ["den"], None),
        ("Div", ["GO(0)", "den"], ["GI(0)"], None),
    ],
    "Acosh": [
        _X2,
        ("Sub", ["x2", "one"], ["d2"], None),
        ("Sqrt", ["d2"], ["den"], None),
        ("Div", ["GO(0)", "den"], ["GI(0)"], None),
    ],
    "Atanh": [_X2, ("Sub", ["one", "x2"], ["den"], None), ("Div", ["GO(0)", "den"], ["GI(0)"], None)],
    "Floor": [("Mul", ["GO(0)", "zero"], ["GI(0)"], None)],
    "Ceil": [("Mul", ["GO(0)", "zero"], ["GI(0)"], None)],
    "Round": [("Mul", ["GO(0)", "zero"], ["GI(0)"], None)],
    "Mod": [("Identity", ["GO(0)"], ["GI(0)"], None)],
}


def register(C) -> None:
    """Register every definition with the builder's pybind module ``C``."""
    for op, spec in GRADIENTS.items():
        used = {i for _, inputs, _, _ in spec for i in inputs}
        consts = [("Constant", [], [k], v) for k, v in (("one", _ONE), ("zero", _ZERO)) if k in used]
        C.register_gradient_definition("::" + op, [_node(C, *s) for s in consts + spec])


def _node(C, op_type, inputs, outputs, attributes):
    nd = C.GradientNodeDefinition()
    nd.op_type, nd.domain, nd.inputs, nd.outputs = op_type, "", inputs, outputs
    ads = []
    for key, value in (attributes or {}).items():
        ad = C.GradientNodeAttributeDefinition()
        ad.name, ad.value_json = key, json.dumps(value["value"])
        ad.dtype, ad.is_tensor = value["dtype"], value.get("is_tensor", False)
        ads.append(ad)
    nd.attributes = ads
    return nd
