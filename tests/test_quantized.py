"""INT8 / INT4 / INT4BS expert weights (design.md 5): kernel vs the quantized reference on every ISA path.

The reference (reference/quant.py) quantizes the same weights with the same rounding; the
kernel's stored values and scales must equal it bit for bit (checked inside
ktmoe.testing.assert_matches_reference), and y, dx, dw and every LoRA gradient must match the
quantized reference at the design.md 6 limits (relative error <= 1e-2, cosine >= 0.9999), in
weight-only mode and in W8A8 mode (each format's activation modes, ktmoe/formats.py). Plus the
option checks and the packed memory.
"""
import numpy as np
import pytest

import ktmoe
from ktmoe import formats
from ktmoe.testing import BF16, QUANTIZED_CASES, assert_matches_reference, make_lora, make_routing, make_weights

# every format ktmoe's quantizer makes (formats.py), grouped ones at the smallest and largest group
FORMATS = [(n, g) for n, f in formats.WEIGHT_FORMATS.items() if f.quantized_here and f.bits < 16
           for g in ((f.group_sizes[0], f.group_sizes[-1]) if f.group_sizes else (None,))]


CASES = list(QUANTIZED_CASES)
SIZES = {c: (QUANTIZED_CASES[c].H, QUANTIZED_CASES[c].I) for c in CASES}
PARAMS = [(c, f, g, a) for c in CASES for f, g in FORMATS for a in formats.WEIGHT_FORMATS[f].activations
          if g is None or all(n % g == 0 for n in SIZES[c])]


@pytest.mark.parametrize("case,fmt,group,activations", PARAMS,
                         ids=[f"{c}-{f}{'' if g is None else '-g%d' % g}-{a}" for c, f, g, a in PARAMS])
def test_matches_quantized_reference(case, fmt, group, activations, isa):
    rng = np.random.default_rng(CASES.index(case))
    c = QUANTIZED_CASES[case]
    ids, w = c.route(rng)
    weights = make_weights(rng, c.E, c.H, c.I, fused=c.fused)
    x = rng.standard_normal((ids.shape[0], c.H)).astype(BF16)
    lora = make_lora(rng, c.layout, c.E, c.H, c.I, c.ranks())
    kwargs = dict(weights, weights=fmt, group_size=group, activations=activations)
    assert_matches_reference(kwargs, x, ids, w, lora, isa=isa)


@pytest.mark.parametrize("fmt,group", FORMATS)
def test_frozen_experts_and_fp32_weights(fmt, group, isa):
    """No LoRA, fp32 caller weights, fp32 x: the same quantized values (from fp32) and results."""
    rng = np.random.default_rng(7)
    E, H, I = 4, 128, 128
    weights = make_weights(rng, E, H, I, dtype=np.float32)
    ids, w = make_routing(rng, 12, 2, E)
    x = rng.standard_normal((12, H)).astype(np.float32)
    for activations in formats.WEIGHT_FORMATS[fmt].activations:
        assert_matches_reference(dict(weights, weights=fmt, group_size=group, activations=activations),
                                 x, ids, w, None, isa=isa)


def test_packed_memory():
    """Packed bytes = quantized values + fp32 scales exactly (int4bs: + bf16 scales; <= 1.05x, design.md 5)."""
    rng = np.random.default_rng(0)
    E, H, I = 4, 256, 128
    weights = make_weights(rng, E, H, I)
    raw = 3 * E * H * I
    rows = E * (2 * I + H)
    assert ktmoe.MoEExperts(**weights).weight_bytes == 2 * raw
    assert ktmoe.MoEExperts(**weights, weights="int8").weight_bytes == raw + 4 * rows
    for g in (32, 64, 128):
        want = raw // 2 + 4 * (E * 2 * I * H // g + E * H * I // g)
        assert ktmoe.MoEExperts(**weights, weights="int4", group_size=g).weight_bytes == want
        want = raw // 2 + 2 * (E * 2 * I * H // g + E * H * I // g)
        assert ktmoe.MoEExperts(**weights, weights="int4bs", group_size=g).weight_bytes == want


def test_quantized_weights_export():
    rng = np.random.default_rng(0)
    weights = make_weights(rng, 2, 64, 64)
    layer = ktmoe.MoEExperts(**weights, weights="int4", group_size=32)
    q, s = layer.quantized_weights("down")
    assert q.shape == (2, 64, 64) and q.dtype == np.int8 and s.shape == (2, 64, 2) and s.dtype == np.float32
    assert q.min() >= -7 and q.max() <= 7
    with pytest.raises(ValueError, match="proj"):
        layer.quantized_weights("gate_up")
    with pytest.raises(ValueError, match="bf16"):
        ktmoe.MoEExperts(**weights).quantized_weights("gate")


def test_int4bs_quantizer_rounds_the_scale_first():
    """int4bs: the stored scales are bf16 (the scale rounded to bf16 before the codes are made),
    the codes then round-half-even(w / scale) in [-7, 7]; equal to reference.quantize bit for bit.
    Where the rounding took the scale below amax / 7, the group's largest weight is clipped to 7."""
    from ktmoe import reference
    rng = np.random.default_rng(4)
    weights = make_weights(rng, 2, 128, 64)
    layer = ktmoe.MoEExperts(**weights, weights="int4bs", group_size=32)
    q, s = layer.quantized_weights("down")
    want = reference.quantize(weights["down"], "int4bs", 32)
    assert s.dtype == BF16 and want.scale.dtype == BF16
    assert np.array_equal(s.view(np.uint16), want.scale.view(np.uint16)) and np.array_equal(q, want.q)
    assert q.min() >= -7 and q.max() <= 7
    fp32 = reference.quantize(weights["down"], "int4", 32)
    assert not np.array_equal(fp32.scale, want.scale.astype(np.float32))   # the rounding is real here


BAD = {
    "unknown format": (dict(weights="int5"), ValueError, "weights: must be one of"),
    "format not a string": (dict(weights=8), ValueError, "weights: must be one of"),
    "unknown activations": (dict(weights="int8", activations="fp8"), ValueError, "activations: must be one of"),
    "W8A8 on bf16 weights": (dict(activations="int8"), ValueError, "activations: 'int8' .* needs quantized"),
    "W8A8 on int4bs": (dict(weights="int4bs", activations="int8"), ValueError,
                       "activations: 'int8' .* not available for weights='int4bs'.*use weights='int4'"),
    "int4bs group does not divide I": (dict(weights="int4bs", group_size=64), ValueError, "group_size: 64 does not divide I"),
    "group size not allowed": (dict(weights="int4", group_size=48), ValueError, r"group_size: must be one of \[32, 64, 128\]"),
    "group size bool": (dict(weights="int4", group_size=True), ValueError, "group_size: must be one of"),
    "group size with int8": (dict(weights="int8", group_size=32), ValueError, "group_size: applies to weights='int4' or 'int4bs' only"),
    "group does not divide I": (dict(weights="int4", group_size=64), ValueError, "group_size: 64 does not divide I"),
    "group does not divide H": (dict(weights="int4", group_size=128), ValueError, "group_size: 128 does not divide H"),
    "transposed copy of int8": (dict(weights="int8", transposed_weights=True), ValueError, "transposed_weights: .* bf16 weights only"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_options(case):
    kw, exc, msg = BAD[case]
    rng = np.random.default_rng(0)
    H, I = (96, 128) if "divide H" in case else (128, 96)
    weights = make_weights(rng, 2, H, I)
    before = {k: v.copy() for k, v in weights.items()}
    with pytest.raises(exc, match=msg):
        ktmoe.MoEExperts(**weights, **kw)
    assert all(np.array_equal(before[k].view(np.uint16), weights[k].view(np.uint16)) for k in weights)


@pytest.mark.parametrize("where", ["gate_up", "down"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_cannot_be_quantized(where, value):
    rng = np.random.default_rng(0)
    weights = make_weights(rng, 3, 64, 64)
    weights[where][2, 5, 7] = value
    for fmt in ("int8", "int4bs"):
        with pytest.raises(ValueError, match=f"{where}: contains NaN or Inf"):
            ktmoe.MoEExperts(**weights, weights=fmt, **({"group_size": 32} if fmt == "int4bs" else {}))
    ktmoe.MoEExperts(**weights)   # bf16 weights are copied as they are (NaN propagates, design.md 7)


@pytest.mark.parametrize("weights", ["int8", "int4/g32", "w8a8", "int4bs/g32", "int4bs-ckpt/g32"])
def test_cli_verify_quantized(weights, capsys):
    """`ktmoe verify --weights ...` checks the quantized formats against the quantized reference."""
    from ktmoe import cli
    assert cli.main(["verify", "--weights", weights]) == 0
    out = capsys.readouterr().out
    assert out.count(f" {weights} ") >= len(ktmoe.available_isas()) and "PASS" in out, out
