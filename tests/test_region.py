"""Packed weights in caller memory: MoEExperts.region_bytes / pack_region / attach (moe_region.c).

On every ISA path and weight format: the region is the layer's packed weight bytes plus a
header page and page rounding; a layer attached to a packed region (a read-only mapping)
computes exactly what a layer with its own packed copy computes (forward and backward, bit for
bit) and never writes the region; bad regions raise ValueError naming `region` before any
kernel runs.
"""
import mmap

import ml_dtypes
import numpy as np
import pytest

import ktmoe

E, H, I, T, K = 4, 64, 96, 9, 2
PAGE = 4096
FORMATS = [("bf16", None, False), ("bf16", None, True), ("int8", None, False), ("int4", 32, False),
           ("int4bs", 32, False)]


def weights(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((E, 2 * I, H)).astype(np.float32) * 0.1,
            rng.standard_normal((E, H, I)).astype(np.float32) * 0.1)


def packed(isa, fmt, group, transposed, seed=0):
    gu, dn = weights(seed)
    kw = dict(isa=isa, weights=fmt, group_size=group, transposed_weights=transposed)
    n = ktmoe.MoEExperts.region_bytes(E, H, I, **kw)
    mm = mmap.mmap(-1, n)
    ktmoe.MoEExperts.pack_region(mm, gate_up=gu, down=dn, **kw)
    return mm, n, kw


@pytest.mark.parametrize("fmt,group,transposed", FORMATS)
def test_attached_layer_equals_own_copy(isa, fmt, group, transposed):
    mm, n, kw = packed(isa, fmt, group, transposed)
    own = ktmoe.MoEExperts(*weights(), **kw)
    assert own.weight_bytes + PAGE <= n <= own.weight_bytes + PAGE * 7   # header + page rounding of <= 6 arrays
    assert n % PAGE == 0
    ro = mmap.mmap(-1, n)   # a copy of the packed region in a mapping the layer can only read
    ro.write(bytes(mm))
    ro = memoryview(ro).toreadonly()
    before = bytes(ro)
    att = ktmoe.MoEExperts.attach(ro, E, H, I, **kw)
    assert att.weight_bytes == own.weight_bytes
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, H)).astype(ml_dtypes.bfloat16)
    ids = rng.integers(-1, E, (T, K)).astype(np.int32)
    w = rng.random((T, K)).astype(np.float32)
    dy = rng.standard_normal((T, H)).astype(ml_dtypes.bfloat16)
    out = []
    for layer in (own, att):
        y = layer.forward(x, ids, w, keep_for_backward=True)
        dx, dw = layer.backward(dy)
        out.append((y, dx, dw))
    for a, b in zip(*out):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), "bit for bit"   # exact: same packed weights
    assert bytes(ro) == before, "the attached layer never writes its region"


def test_int4bs_region_holds_bf16_scales(isa):
    """The int4bs region holds the scales as bf16, bit-equal to the reference quantizer's (the
    scale rounded to bf16 first): the down projection's [E, H, I / 32] bf16 scales appear in the
    region as one array, and the region is 2 bytes per scale smaller than int4's."""
    from ktmoe import reference
    mm, n, kw = packed(isa, "int4bs", 32, False)
    _, dn = weights()
    want = reference.quantize(dn, "int4bs", 32)
    assert want.scale.dtype == ml_dtypes.bfloat16
    assert bytes(mm).find(want.scale.tobytes()) >= 0, "the bf16 scales as they are"
    att = ktmoe.MoEExperts.attach(mm, E, H, I, **kw)
    q, s = att.quantized_weights("down")
    assert np.array_equal(q, want.q) and np.array_equal(s.view(np.uint16), want.scale.view(np.uint16))
    own4 = ktmoe.MoEExperts(*weights(), isa=isa, weights="int4", group_size=32)
    assert own4.weight_bytes - att.weight_bytes == 2 * E * (2 * I * H + H * I) // 32
    with pytest.raises(ValueError, match="region: smaller than"):   # int4's layout: fp32 scales, more bytes
        ktmoe.MoEExperts.attach(mm, E, H, I, **dict(kw, weights="int4"))
    mm4, _, kw4 = packed(isa, "int4", 32, False)
    with pytest.raises(ValueError, match="region: was packed for other"):
        ktmoe.MoEExperts.attach(mm4, E, H, I, **dict(kw4, weights="int4bs"))


def test_bad_regions_raise(isa):
    mm, n, kw = packed(isa, "bf16", None, False)
    with pytest.raises(ValueError, match="region: smaller"):
        ktmoe.MoEExperts.attach(memoryview(mm)[:n - PAGE], E, H, I, **kw)
    with pytest.raises(ValueError, match="region: was packed for other"):
        ktmoe.MoEExperts.attach(mm, E, H, I, **dict(kw, weights="int8"))
    with pytest.raises(ValueError, match="region: was packed for other"):
        ktmoe.MoEExperts.attach(mm, E, I, H, **kw)   # same bytes, other shapes
    with pytest.raises(ValueError, match="region: holds no packed weights"):
        ktmoe.MoEExperts.attach(mmap.mmap(-1, n), E, H, I, **kw)
    with pytest.raises(ValueError, match="region: is read-only"):
        ktmoe.MoEExperts.pack_region(memoryview(mm).toreadonly(), *weights(), **kw)
    with pytest.raises(ValueError, match="region: must start on a page boundary"):
        ktmoe.MoEExperts.attach(memoryview(mm)[64:], E, H, I, **kw)
    with pytest.raises(ValueError, match="region: must be a contiguous 1-D uint8"):
        ktmoe.MoEExperts.attach(np.zeros(n // 4, np.float32), E, H, I, **kw)
    small = mmap.mmap(-1, n - PAGE)
    with pytest.raises(ValueError, match="region: smaller"):
        ktmoe.MoEExperts.pack_region(small, *weights(), **kw)
    assert bytes(small) == bytes(n - PAGE), "nothing written into a region that is too small"
    gu, dn = weights()
    gu[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="gate_up: contains NaN"):
        ktmoe.MoEExperts.pack_region(mmap.mmap(-1, n), gate_up=gu, down=dn, **dict(kw, weights="int8"))
