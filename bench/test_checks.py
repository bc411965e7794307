"""Checks that make the benchmark numbers meaningful (cheap; they run with timing disabled too):
the roofline probes return sane values, the FLOP/byte formulas count what they say, and the
three implementations compute the same layer (a small shape, every output and gradient)."""
import pytest
import torch

from ktmoe import bench
from ktmoe.testing import TOLERANCE, rel_error
from perf_targets import TARGET_PACKED

SMALL = bench.Shape("small", "qwen3_moe", 8, 256, 128, 2, 64)
TOL = TOLERANCE["rel"]   # design.md 6: relative Frobenius error allowed for bf16 kernels


def test_roofline_probes(roofline):
    import ktmoe
    assert roofline.read_bw > 1e8, "streaming read below 0.1 GB/s: the probe is broken"
    from ktmoe._kernels import _roofline
    assert roofline.bf16_probe == bench.bf16_probe_for()
    if roofline.bf16_probe == "amx":
        # a 2-core AMX machine measured ~6.9 TFLOP/s bf16; anything below 0.1 is broken
        assert roofline.bf16_flops > 1e11 and roofline.int8_ops > roofline.bf16_flops * 0.9
    elif roofline.bf16_probe is not None:
        # the slowest probe, AVX2 FMA on one 2-vCPU Zen core, measured ~39 GFLOP/s
        assert roofline.bf16_flops > 5e9 and roofline.int8_ops is None
    else:
        assert not _roofline.has_avx2_fma() and "avx512" not in ktmoe.available_isas()
    # every machine with AVX2 gets a compute bound now
    bound, t_c, t_m = bench.bound_seconds(roofline, 1e12, 1e6)
    assert (t_c > 0) == (roofline.bf16_flops is not None) and bound == max(t_c, t_m)


def test_amx_peak_rejects_bad_arguments():
    from ktmoe._kernels import _roofline
    with pytest.raises(ValueError, match="threads"):
        _roofline.amx_peak(0, 0.1)
    with pytest.raises(ValueError, match="kind"):
        _roofline.amx_peak(1, 0.1, "fp8")
    with pytest.raises(ValueError, match="nbytes"):
        _roofline.read_bandwidth(2, 100)
    with pytest.raises(ValueError, match="width"):
        _roofline.fma_peak(1, 0.1, 128)
    with pytest.raises(ValueError, match="seconds"):
        _roofline.fma_peak(1, 0)
    with pytest.raises(ValueError, match="threads"):
        _roofline.avx512_bf16_peak(0, 0.1)


def test_formulas_count_by_hand():
    s = bench.SHAPES["qwen3-4096"]
    H, I, r = s.H, s.I, bench.LORA_R
    fwd = bench.layer_flops(s, 1, "fwd")
    assert fwd == 2 * (H * 2 * I + I * H) + 2 * (H * r + r * 2 * I + I * r + r * H)
    assert bench.layer_flops(s, 10, "fwdbwd") == 10 * (fwd + 6 * H * I + 2 * r * (4 * H + 6 * I) + 2 * H)
    # weights: each hit expert's gate_up + down in bf16, once per pass
    one = bench.layer_bytes(s, 1, "fwd") - bench.layer_bytes(s, 0, "fwd")
    assert one == 3 * H * I * 2 + r * (3 * H + 3 * I) * 4
    # quantized formats: codes + one fp32 scale per row (int8) or per 128-column group (int4);
    # int4bs: one bf16 scale per 128-column group
    assert bench.format_bytes_ratio(s, "int8") * 6 * H * I == 3 * H * I + 4 * (2 * I + H)
    assert bench.format_bytes_ratio(s, "int4") * 6 * H * I == 3 * H * I / 2 + 4 * 3 * H * I / 128
    assert bench.format_bytes_ratio(s, "int4bs") * 6 * H * I == 3 * H * I / 2 + 2 * 3 * H * I / 128


def test_problem_routing():
    p = bench.Problem(SMALL)
    ids = p.ids
    assert ids.shape == (SMALL.T, SMALL.k)
    assert all(len(set(row.tolist())) == SMALL.k for row in ids), "top-k must be without replacement"
    assert torch.allclose(p.weights.sum(1), torch.ones(SMALL.T))
    assert p.hit == len(set(ids.flatten().tolist())) and p.pairs == SMALL.T * SMALL.k
    assert all(float(b.abs().max()) > 0 for _, b in p.lora.values()), "LoRA B must be nonzero"


def test_implementations_agree(threads):
    p = bench.Problem(SMALL)
    runs = {i: bench.make_runner(i, p, threads) for i in bench.IMPLS if i not in bench.QUANTIZED}
    k = runs["ktmoe"]
    y_fwd = {i: r.fwd().float().clone() for i, r in runs.items()}
    y_bwd = {i: r.fwdbwd().float().clone() for i, r in runs.items()}
    for impl in bench.BASELINES:
        r = runs[impl]
        errs = {"y fwd": rel_error(y_fwd[impl], y_fwd["ktmoe"]),
                "y fwdbwd": rel_error(y_bwd[impl], y_bwd["ktmoe"]),
                "dx": rel_error(r.x.grad.float(), k.dx.float()),
                "dw": rel_error(r.w.grad.float(), k.dw.float())}
        for name, (da, db) in _lora_grads(r).items():
            errs[f"d{name} A"] = rel_error(da, k.grads[name][0])
            errs[f"d{name} B"] = rel_error(db, k.grads[name][1])
        assert len(errs) == 8
        bad = {n: e for n, e in errs.items() if not e <= TOL}
        assert not bad, f"{impl} differs from ktmoe beyond {TOL}: {bad}"


def _lora_grads(runner):
    """name -> (dA, dB) of a torch baseline, in PEFT layout."""
    if isinstance(runner, bench.GroupedRunner):
        return {n: (a.grad, b.grad) for n, (a, b) in runner.params.items()}
    out = {}
    for name, param in runner.model.named_parameters():
        if "lora_" in name:
            which = "gate_up" if ".base_layer.lora_" in name else "down"
            out.setdefault(which, [None, None])[0 if "lora_A" in name else 1] = param.grad
    return {n: tuple(v) for n, v in out.items()}


def test_weight_rows():
    """`ktmoe bench --weights`: the bf16 ktmoe row always runs; each format adds its rows."""
    assert bench.selected_rows(None) == bench.OURS and bench.selected_rows([]) == bench.OURS
    assert bench.selected_rows(["fp8"]) == ("ktmoe", "ktmoe-fp8")
    assert bench.selected_rows(["int4", "bf16"]) == ("ktmoe", "ktmoe-int4", "ktmoe-w4a8", "ktmoe-wT")
    assert bench.selected_rows(["int4bs"]) == ("ktmoe", "ktmoe-int4bs")


def test_fp8_runner_matches_ktmoe(threads):
    """ktmoe-fp8 runs the problem's weights as e4m3 codes with 128 x 128 block scales: its packed
    bytes are 1.031x the format's (codes + block scales), and y is within fp8's quantization error
    of bf16 ktmoe's (about 4-5 %, bench/quant_error.md: < 8 % here)."""
    shape = bench.Shape("fp8-small", "qwen3_moe", 4, 256, 128, 2, 16)
    p = bench.Problem(shape)
    fp8, bf16 = bench.make_runner("ktmoe-fp8", p, threads), bench.make_runner("ktmoe", p, threads)
    ratio = fp8.weight_bytes / p.raw_weight_bytes / bench.format_bytes_ratio(shape, "fp8")
    assert abs(ratio - (1 + 4 / 128) / (1 + 4 * (1 / 128 ** 2))) < 1e-3 and ratio <= TARGET_PACKED
    assert rel_error(fp8.fwdbwd().float(), bf16.fwdbwd().float()) < 0.08
