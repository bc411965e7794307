"""The kernel targets (ISAs): one list from the build, every target this CPU can run enumerated,
forced and tested, and the built code of each target free of the instructions it must not use.

- The targets ktmoe reports are the build's (ktmoe/_kernels/meson.build, through kt_isas.h): each
  is available exactly when the CPU has the features it declares, and each available one can be
  forced with isa= and $KTMOE_ISA (the `isa` fixture of conftest.py runs the kernel grid,
  quantized grid, property and bad-input tests on every one of them).
- The int8 GEMMs of gemm_int8.h (the W8A8 products) against exact numpy integer products, on every
  target, over tails of every blocking.
- A model-level LoRA fine-tune step (tiny Qwen3-MoE, PEFT, AdamW) forced to each target, against
  the eager transformers + PEFT model.
- Instruction-set check: `objdump -d` of the built extensions; from each target's entry points
  (kt_forward_<isa>, kt_backward_<isa>, kt_gemm_*_<isa>, kt_igemm_*_<isa>) every function they can
  reach (direct calls and jumps, PLT calls resolved by name, function addresses taken with lea) is
  scanned: the avx2 target must contain no AVX-512 register or instruction, no F16C, no BF16 /
  VNNI / AMX; the avx512f target no AVX-512-BF16, VNNI (AVX-512 or AVX) or AMX instruction. The same
  scan must find the BF16 and VNNI instructions in the avx512 target (the check can fail). Skipped
  with a message where objdump is absent or the extension has no symbol table.
"""
import bisect
import os
import re
import shutil
import subprocess

import ml_dtypes
import numpy as np
import pytest

import ktmoe
import ktmoe._cpu as cpu

BF16 = ml_dtypes.bfloat16


# ---------------------------------------------------------------- enumeration and forcing

def test_targets_come_from_the_build_and_match_the_cpu():
    from ktmoe._kernels import _core
    targets = _core.isa_targets()
    names = [t[0] for t in targets]
    assert names == ["portable", "avx2", "avx512f", "avx512", "amx"], names   # worst first, as meson.build lists them
    assert cpu.ISAS == tuple(reversed(names))
    flags = _core.cpu_features()
    for name, cflags, needs in targets:
        usable = all(flags[f] for f in needs)
        assert (name in ktmoe.available_isas()) == usable, (name, needs, flags)
        if not usable:
            assert cpu.unavailable_reasons()[name].startswith("this CPU or OS lacks")
    # the avx512f objects are built without the BF16 / VNNI flags, the avx2 ones without any AVX-512 flag
    by_name = {t[0]: t for t in targets}
    assert "bf16" not in by_name["avx512f"][1] and "vnni" not in by_name["avx512f"][1]
    assert "512" not in by_name["avx2"][1] and "f16c" not in by_name["avx2"][1]
    assert by_name["avx2"][2] == ["avx2", "fma"]


def test_this_machine_runs_every_non_amx_target_it_has():
    """Where the CPU has AVX2 + FMA, AVX-512 and AVX-512-BF16/VNNI (as the development machine
    does), every one of those targets must be available, so the test grid runs each."""
    f = cpu._probe()[2]
    want = {"portable"}
    if f["avx2"] and f["fma"]:
        want.add("avx2")
    if f["avx512"]:
        want.add("avx512f")
    if f["avx512"] and f["avx512_bf16"] and f["avx512_vnni"]:
        want.add("avx512")
    assert want <= set(ktmoe.available_isas())


def test_info_lists_every_target():
    info = ktmoe.cpu_info()
    assert [t["name"] for t in info["targets"]] == list(cpu.ISAS)
    for t in info["targets"]:
        assert t["usable"] == (t["name"] in info["available_isas"])
        assert t["usable"] or t["why"]


def test_force_each_target(isa, monkeypatch):
    from ktmoe.testing import make_weights
    rng = np.random.default_rng(1)
    weights = make_weights(rng, 2, 32, 16)
    assert ktmoe.MoEExperts(**weights, isa=isa).isa == isa
    monkeypatch.setenv(cpu.ENV_VAR, isa)
    assert ktmoe.MoEExperts(**weights).isa == isa
    assert cpu.select_isa() == (isa, f"forced by ${cpu.ENV_VAR}")


# ---------------------------------------------------------------- int8 GEMMs

IGEMM_SHAPES = [(1, 1, 1), (1, 37, 300), (3, 5, 7), (5, 64, 64), (6, 17, 33), (17, 33, 65), (33, 17, 31),
                (64, 128, 512), (65, 130, 257), (7, 520, 129), (2, 300, 1030), (0, 5, 7), (4, 0, 7), (5, 6, 0)]


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("kind", ["nt", "nn"])
@pytest.mark.parametrize("M,N,K", IGEMM_SHAPES)
def test_igemm_exact(isa, kind, M, N, K, accumulate):
    from ktmoe._kernels import _gemm
    rng = np.random.default_rng(M * 7919 + N * 104729 + K + (kind == "nn"))
    A = rng.integers(-127, 128, (M, K + 3), dtype=np.int8)[:, :K]
    W_full = rng.integers(-127, 128, (N, K + 5) if kind == "nt" else (K, N + 5), dtype=np.int8)
    W = W_full[:, :K] if kind == "nt" else W_full[:, :N]
    C_full = rng.integers(-1000, 1000, (M, N + 2), dtype=np.int32)
    C = C_full[:, :N]
    C0 = C.copy()
    guard = C_full[:, N:].copy()
    Wm = W.astype(np.int64).T if kind == "nt" else W.astype(np.int64)
    ref = A.astype(np.int64) @ Wm + (C0 if accumulate else 0)
    assert _gemm.igemm(kind, isa, A, W, C, accumulate) is C
    np.testing.assert_array_equal(C_full[:, N:], guard, err_msg="wrote outside C")
    np.testing.assert_array_equal(C, ref, err_msg=f"{isa} {kind} M={M} N={N} K={K}")


def test_igemm_extremes(isa):
    """All +-127: the largest int32 sums, no saturation (vpmaddubsw would saturate)."""
    from ktmoe._kernels import _gemm
    for kind in ("nt", "nn"):
        A = np.full((5, 4099), -127, np.int8)
        W = np.full((19, 4099) if kind == "nt" else (4099, 19), -127, np.int8)
        C = np.zeros((5, 19), np.int32)
        _gemm.igemm(kind, isa, A, W, C)
        assert (C == 127 * 127 * 4099).all(), kind


# ---------------------------------------------------------------- model-level fine-tune step

def test_finetune_step_forced_to_each_target(isa, monkeypatch):
    """LoRA fine-tune steps of a tiny Qwen3-MoE (PEFT on attention and experts, AdamW) with the
    experts forced to `isa`: loss and gradients match eager transformers + PEFT (rel <= 1e-2) and
    the steps change the model."""
    import torch
    import torch_models as tm
    monkeypatch.setenv(cpu.ENV_VAR, isa)
    ref, kt = tm.peft_pair("qwen3_moe")
    convs = tm.experts_modules(kt)
    assert convs and all(f"isa={isa}," in m.extra_repr() for m in convs), [m.extra_repr() for m in convs]
    losses = []
    for model in (ref, kt):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        traj = []
        for step in range(2):
            out = model(**tm.batch(seed=step))
            out.loss.backward()
            if step == 0:
                grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
                if model is ref:
                    ref_grads = grads
                else:
                    kt_grads = grads
            opt.step()
            opt.zero_grad(set_to_none=True)
            traj.append(out.loss.item())
        losses.append(traj)
    for lr, lk in zip(*losses):
        assert abs(lk - lr) <= 1e-2 * abs(lr), f"{isa}: losses {losses[1]} vs eager {losses[0]}"
    assert set(kt_grads) == set(ref_grads)
    for name, g in ref_grads.items():
        err = float((kt_grads[name] - g).norm() / max(float(g.norm()), 1e-30))
        assert err <= 1e-2, f"{isa}: gradient of {name}: rel {err:.2e}"
    assert losses[1][0] != losses[1][1]


# ---------------------------------------------------------------- instruction-set check

BF16_VNNI_AMX = re.compile(r"^(vdpbf16ps|vcvtne2ps2bf16|vcvtneps2bf16|vpdpbusds?|vpdpwssds?|tdp\w*|tileloadd\w*|"
                           r"tilestored|tilezero|tilerelease|ldtilecfg|sttilecfg)$")
AVX512_REG = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|\{%k|\{1to")
F16C = re.compile(r"^(vcvtph2ps|vcvtps2ph)$")
FUNC = re.compile(r"^([0-9a-f]+) <(.+)>:$")
INSN = re.compile(r"^\s+([0-9a-f]+):\s+(?:\{vex\}\s+|\{evex\}\s+)?([a-z][a-z0-9.]*)\s*(.*)$")
REF = re.compile(r"\b([0-9a-f]+) <([^>+]+)(?:\+0x[0-9a-f]+)?>")


def _disassemble(path):
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-M", "att", str(path)],
                         capture_output=True, text=True, check=True).stdout
    funcs = {}   # start address -> (name, [(mnemonic, operands)], [referenced addresses / plt names])
    cur = None
    for line in out.splitlines():
        m = FUNC.match(line)
        if m:
            cur = [m.group(2), [], []]
            funcs[int(m.group(1), 16)] = cur
            continue
        m = INSN.match(line)
        if m and cur is not None:
            mnem, ops = m.group(2), m.group(3)
            cur[1].append((mnem, ops, line))
            for addr, name in REF.findall(ops):
                cur[2].append((int(addr, 16), name))
    return funcs


def _reachable(funcs, roots):
    starts = sorted(funcs)
    by_name = {}
    for a in starts:
        by_name.setdefault(funcs[a][0], []).append(a)
    def owner(addr):
        i = bisect.bisect_right(starts, addr) - 1
        return starts[i] if i >= 0 else None
    seen, todo = set(), [a for a in starts if funcs[a][0] in roots]
    while todo:
        a = todo.pop()
        if a in seen:
            continue
        seen.add(a)
        for addr, name in funcs[a][2]:
            if name.endswith("@plt"):   # a call through the PLT: the function of that name in this file
                todo.extend(by_name.get(name[:-4], []))
                continue
            o = owner(addr)
            if o is not None and o not in seen and (o == addr or funcs[o][0] == name):
                todo.append(o)
    return seen


def _entry_points(isa):
    return {f"kt_forward_{isa}", f"kt_backward_{isa}", f"kt_gemm_nt_{isa}", f"kt_gemm_nn_{isa}",
            f"kt_igemm_nt_{isa}", f"kt_igemm_nn_{isa}"}


def _scan(isa):
    """{mnemonic or register class: example line} of everything reachable from isa's entry points
    in the extensions that hold them (_core, _gemm), and the number of functions scanned."""
    if shutil.which("objdump") is None:
        pytest.skip("objdump is not installed (binutils): the instruction-set check cannot run")
    from ktmoe._kernels import _core, _gemm
    found, nfunc = {}, 0
    for mod in (_core, _gemm):
        funcs = _disassemble(mod.__file__)
        names = {f[0] for f in funcs.values()}
        roots = _entry_points(isa) if mod is _core else {n for n in _entry_points(isa) if "gemm" in n}
        if not roots <= names:
            pytest.skip(f"{os.path.basename(mod.__file__)} has no symbol table entries for the {isa} entry points "
                        "(stripped build): the instruction-set check cannot run")
        seen = _reachable(funcs, roots)
        nfunc += len(seen)
        for a in seen:
            for mnem, ops, line in funcs[a][1]:
                if BF16_VNNI_AMX.match(mnem):
                    found.setdefault(mnem, f"{funcs[a][0]}: {line.strip()}")
                if F16C.match(mnem):
                    found.setdefault("f16c", f"{funcs[a][0]}: {line.strip()}")
                if AVX512_REG.search(ops):
                    found.setdefault("avx512-register", f"{funcs[a][0]}: {line.strip()}")
    return found, nfunc


def test_isa_check_finds_bf16_and_vnni_in_the_avx512_target():
    """Positive control: the same scan sees the avx512 target's BF16 and VNNI instructions."""
    found, nfunc = _scan("avx512")
    assert nfunc > 10
    assert "vdpbf16ps" in found and "vpdpbusd" in found and "avx512-register" in found, sorted(found)


def test_avx2_target_has_no_avx512_f16c_bf16_vnni_amx():
    found, nfunc = _scan("avx2")
    assert nfunc > 10
    print(f"\n    avx2 target: {nfunc} functions scanned; AVX-512 / F16C / BF16 / VNNI / AMX found: {sorted(found) or 'none'}")
    assert not found, f"avx2 target code uses instructions it must not: {found}"


def test_avx512f_target_has_no_bf16_vnni_amx():
    found, nfunc = _scan("avx512f")
    assert nfunc > 10
    bad = {k: v for k, v in found.items() if k not in ("avx512-register", "f16c")}
    print(f"\n    avx512f target: {nfunc} functions scanned; BF16 / VNNI / AMX found: {sorted(bad) or 'none'}")
    assert not bad, f"avx512f target code uses instructions it must not: {bad}"
    assert "avx512-register" in found   # it is AVX-512 code (the scan sees it)
