"""The kernel's thread count: default from the affinity mask or $KTMOE_NUM_THREADS, and
ktmoe.torch's automatic choice (every core when torch computes on the CPU)."""
import copy
import os

import numpy as np
import pytest

import ktmoe
from ktmoe.testing import make_weights
from ktmoe import _cpu


def test_default_is_the_affinity_mask(monkeypatch):
    monkeypatch.delenv("KTMOE_NUM_THREADS", raising=False)
    n = len(os.sched_getaffinity(0))
    assert _cpu.default_num_threads() == n
    assert _cpu.default_num_threads(reserve=1) == max(1, n - 1)
    assert _cpu.default_num_threads(reserve=10**6) == 1
    layer = ktmoe.MoEExperts(**make_weights(np.random.default_rng(0), 2, 32, 16))
    assert layer.num_threads == n


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("KTMOE_NUM_THREADS", "3")
    assert _cpu.default_num_threads() == 3 and _cpu.default_num_threads(reserve=1) == 3
    assert ktmoe.MoEExperts(**make_weights(np.random.default_rng(0), 2, 32, 16)).num_threads == 3
    for bad in ("0", "many", "300"):
        monkeypatch.setenv("KTMOE_NUM_THREADS", bad)
        with pytest.raises(ValueError, match="KTMOE_NUM_THREADS: must be an integer in"):
            _cpu.default_num_threads()


def test_torch_patch_threads(monkeypatch):
    monkeypatch.delenv("KTMOE_NUM_THREADS", raising=False)
    import torch
    import torch_models as tm
    import ktmoe.torch
    model = tm.make_model("qwen3_moe")
    auto = ktmoe.torch.patch(copy.deepcopy(model))
    fixed = ktmoe.torch.patch(copy.deepcopy(model), num_threads=1)
    for m in tm.experts_modules(auto):
        m._ktmoe.layer.num_threads = 1        # the automatic choice is made again at each call
    b = tm.batch()
    with torch.no_grad():
        auto(**b), fixed(**b)
    n = len(os.sched_getaffinity(0))
    assert all(m._ktmoe.layer.num_threads == n for m in tm.experts_modules(auto)), "CPU model: every core"
    assert all(m._ktmoe.layer.num_threads == 1 for m in tm.experts_modules(fixed)), "explicit count kept"
