"""Python threads and ktmoe layers: serialised or refused with a clear error, never a wrong result.

- one MoEExperts shared by two threads: blocking calls wait their turn; a thread whose kept
  forward was replaced by another thread's forward is refused in backward; every result
  that comes back matches reference/ (ktmoe.testing.assert_matches_reference, design.md 6 limits);
- two layers in two threads: both correct;
- submit_* twice before wait() raises; wait() from another thread raises; another thread's
  submit waits until the call in flight is waited for;
- ktmoe.torch: two threads running forward + backward through the same experts module get
  the gradients of a run on one thread.
"""
import threading

import numpy as np
import pytest

import ktmoe
from ktmoe.testing import BF16, assert_matches_reference, check, make_lora, make_routing, make_weights, to64
from ktmoe import reference

REPLACED = "this thread's kept forward was replaced by a forward from another thread"


def problem(seed, E=6, H=48, I=32, T=13, k=2, r=3, lora=True):
    rng = np.random.default_rng(seed)
    weights = make_weights(rng, E, H, I)
    ids, w = make_routing(rng, T, k, E, minus_one=0.1)
    x = rng.standard_normal((T, H)).astype(BF16)
    lo = make_lora(rng, "peft", E, H, I, {"gate_up": r, "down": r}) if lora else None
    return weights, x, ids, w, lo


def run_threads(fns, timeout=120):
    """Runs each fn in its own thread; returns their exceptions (None where it returned)."""
    errors = [None] * len(fns)
    start = threading.Barrier(len(fns))

    def body(i):
        try:
            start.wait()
            fns[i]()
        except BaseException as e:   # noqa: BLE001 - reported to the test
            errors[i] = e
    threads = [threading.Thread(target=body, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a thread hung (deadlock?)"
    return errors


def test_shared_layer_forward_only_is_serialised(isa):
    """Blocking forwards (no keep) from two threads on one layer: every y matches reference."""
    weights, *_ = problem(0)
    layer = ktmoe.MoEExperts(**weights, isa=isa, num_threads=2)
    inputs = [problem(s)[1:] for s in (1, 2)]   # same weights (seed 0), different x/ids/w/lora
    wanted = []
    for x, ids, w, lo in inputs:
        y_ref, _ = reference.moe_forward(x, ids, w, *_ref_weights(weights), lo)
        wanted.append(y_ref)

    def worker(i):
        x, ids, w, lo = inputs[i]
        for _ in range(25):
            y = layer.forward(x, ids, w, lora=_kt(lo))
            check("y (threaded)", y, wanted[i], isa)
    assert run_threads([lambda: worker(0), lambda: worker(1)]) == [None, None]


def test_shared_layer_forward_backward_correct_or_refused(isa):
    """forward(keep) + backward from two threads on one layer: each pair either matches the
    reference or its backward is refused with the 'replaced by another thread' error."""
    weights, *_ = problem(0)
    layer = ktmoe.MoEExperts(**weights, isa=isa, num_threads=2)
    inputs = [problem(s)[1:] for s in (3, 4)]
    outcome = {0: [0, 0], 1: [0, 0]}   # thread -> [correct, refused]

    def worker(i):
        x, ids, w, lo = inputs[i]
        for it in range(20):
            try:
                assert_matches_reference(weights, x, ids, w, lo, layer=layer, seed=it)
                outcome[i][0] += 1
            except RuntimeError as e:
                assert REPLACED in str(e), f"unexpected error: {e}"
                outcome[i][1] += 1
    assert run_threads([lambda: worker(0), lambda: worker(1)]) == [None, None]
    assert all(sum(v) == 20 for v in outcome.values())
    assert sum(v[0] for v in outcome.values()) > 0, f"no pair succeeded: {outcome}"


def test_replaced_kept_forward_is_refused_not_mixed(isa):
    """A: forward(keep); B: forward(keep); A: backward -> refused; B: backward -> B's correct grads."""
    weights, *_ = problem(0, lora=False)
    layer = ktmoe.MoEExperts(**weights, isa=isa)
    (xa, ia, wa, _), (xb, ib, wb, _) = problem(5, lora=False)[1:], problem(6, lora=False)[1:]
    rng = np.random.default_rng(7)
    dy = rng.standard_normal(xa.shape).astype(BF16)
    a_forward, b_forward, a_done = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        layer.forward(xa, ia, wa, keep_for_backward=True)
        a_forward.set()
        b_forward.wait(30)
        with pytest.raises(RuntimeError, match=REPLACED):
            layer.backward(dy)
        a_done.set()

    def thread_b():
        a_forward.wait(30)
        layer.forward(xb, ib, wb, keep_for_backward=True)
        b_forward.set()
        a_done.wait(30)
        seen["b"] = layer.backward(dy)
    assert run_threads([thread_a, thread_b]) == [None, None]
    _, cache = reference.moe_forward(xb, ib, wb, *_ref_weights(weights), None)
    dx_ref, dw_ref, _ = reference.moe_backward(dy, cache)
    check("dx (B after A refused)", seen["b"][0], dx_ref, isa)
    check("dw (B after A refused)", seen["b"][1], dw_ref, isa)
    # the refusal does not poison the layer: A can run a fresh pair
    assert_matches_reference(weights, xa, ia, wa, None, layer=layer)


def test_backward_on_another_thread_is_a_handoff(isa):
    """Forward(keep) on one thread, backward on a thread that kept nothing (torch's autograd
    threads do this): the kept forward is used."""
    weights, x, ids, w, _ = problem(8, lora=False)
    layer = ktmoe.MoEExperts(**weights, isa=isa)
    dy = np.random.default_rng(9).standard_normal(x.shape).astype(BF16)
    layer.forward(x, ids, w, keep_for_backward=True)
    got = {}
    assert run_threads([lambda: got.setdefault("g", layer.backward(dy))]) == [None]
    _, cache = reference.moe_forward(x, ids, w, *_ref_weights(weights), None)
    dx_ref, dw_ref, _ = reference.moe_backward(dy, cache)
    check("dx (handoff)", got["g"][0], dx_ref, isa)
    check("dw (handoff)", got["g"][1], dw_ref, isa)


def test_two_layers_two_threads(isa):
    probs = [problem(s) for s in (10, 11)]
    layers = [ktmoe.MoEExperts(**p[0], isa=isa, num_threads=2) for p in probs]

    def worker(i):
        weights, x, ids, w, lo = probs[i]
        for it in range(15):
            assert_matches_reference(weights, x, ids, w, lo, layer=layers[i], seed=it)
    assert run_threads([lambda: worker(0), lambda: worker(1)]) == [None, None]


def test_second_submit_before_wait_raises(isa):
    weights, x, ids, w, _ = problem(12, lora=False)
    layer = ktmoe.MoEExperts(**weights, isa=isa)
    layer.submit_forward(x, ids, w, keep_for_backward=True)
    for call in (lambda: layer.submit_forward(x, ids, w), lambda: layer.submit_backward(x),
                 lambda: layer.forward(x, ids, w), lambda: setattr(layer, "num_threads", 1), layer.profile):
        with pytest.raises(RuntimeError, match=r"submitted call in flight: call wait\(\) first"):
            call()
    y = layer.wait()
    y_ref, _ = reference.moe_forward(x, ids, w, *_ref_weights(weights), None)
    check("y after refused submits", y, y_ref, isa)
    with pytest.raises(RuntimeError, match="wait: nothing was submitted"):
        layer.wait()
    layer.backward(x)   # the refused calls left the kept forward intact


def test_other_threads_wait_or_submit_while_in_flight(isa):
    """wait() from another thread is refused; another thread's forward waits for this one's wait()."""
    weights, x, ids, w, _ = problem(13, lora=False)
    layer = ktmoe.MoEExperts(**weights, isa=isa)
    y_ref, _ = reference.moe_forward(x, ids, w, *_ref_weights(weights), None)
    layer.submit_forward(x, ids, w)
    got, started = {}, threading.Event()

    def other_wait():
        with pytest.raises(RuntimeError, match="submitted by another thread"):
            layer.wait()
    assert run_threads([other_wait]) == [None]

    def other_forward():
        started.set()
        got["y"] = layer.forward(x, ids, w)
    t = threading.Thread(target=other_forward)
    t.start()
    started.wait(30)
    t.join(0.3)
    assert t.is_alive() and "y" not in got, "the other thread's forward ran while this thread's call was in flight"
    check("y (first)", layer.wait(), y_ref, isa)
    t.join(60)
    assert not t.is_alive()
    check("y (second thread)", got["y"], y_ref, isa)


def test_torch_shared_experts_module_two_threads():
    """Forward + backward through one patched experts module from two threads at once: the
    gradients equal the ones computed on one thread."""
    torch = pytest.importorskip("torch")
    import torch_models as tm
    _, kt = tm.peft_pair("qwen3_moe")
    wrapper = next(m for m in kt.modules() if type(m).__name__ == "ParamWrapper" and
                   type(m.base_layer).__name__ == "ParamWrapper")   # outer wrapper: both LoRA factors
    g = torch.Generator().manual_seed(0)
    cases = []
    for _ in range(2):
        x = torch.randn(10, 32, generator=g)
        ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(10)])
        w = torch.rand(10, 2, generator=g)
        cases.append((x, ids, w))

    def grads_of(case):
        x, ids, w = case
        x = x.clone().requires_grad_(True)
        w = w.clone().requires_grad_(True)
        y = wrapper(x, ids, w)
        gx, gw = torch.autograd.grad(y.square().sum(), [x, w])
        return gx, gw
    want = [grads_of(c) for c in cases]
    got = {0: [], 1: []}

    def worker(i):
        for _ in range(8):
            got[i].append(grads_of(cases[i]))
    assert run_threads([lambda: worker(0), lambda: worker(1)]) == [None, None]
    for i in (0, 1):
        for gx, gw in got[i]:
            assert torch.allclose(gx, want[i][0], rtol=1e-5, atol=1e-6), "dx differs from the one-thread run"
            assert torch.allclose(gw, want[i][1], rtol=1e-5, atol=1e-6), "dw differs from the one-thread run"


def _ref_weights(weights):
    gu, down = weights["gate_up"], weights["down"]
    I = gu.shape[1] // 2
    return gu[:, :I], gu[:, I:], down


def _kt(lo):
    from ktmoe.testing import ktmoe_lora
    return ktmoe_lora(lo) if lo is not None else None
