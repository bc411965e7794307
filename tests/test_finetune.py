"""`ktmoe finetune` end to end on the built-in tiny model (in-process, a few steps each).

- the default job (fewer steps) runs, writes adapter / log / plot / summary / checkpoints,
  and its loss falls well below the start;
- the adapter loads with PeftModel.from_pretrained on plain transformers and gives the same
  logits as the ktmoe model with that adapter (design.md 6 tolerance: rel <= 1e-2);
- --resume after --stop-after continues exactly: the same losses, bit for bit, and the
  same adapter as an uninterrupted run;
- --targets router trains the routers and saves them with the adapter;
- --grad-checkpointing gives the same losses;
- every bad-input rule ends with a clear message and exit status 2;
- Ctrl-C (KeyboardInterrupt, or SIGINT in the middle of an optimizer step) leaves --out
  continuable: a checkpoint of the last complete step that --resume continues exactly, or,
  before any step, nothing that stops a plain rerun; the printed advice is what works;
- the adapter names its base model by absolute path (it loads from another directory) and
  carries a model card (base model, data file and sha256, steps, final loss);
- counts are spelled right ("1 step (1 epoch)"); only ktmoe's own warnings are relayed as
  "ktmoe finetune: warning: ...", third-party deprecation notices are not;
- a Qwen3.5-MoE checkpoint saved from the vision-language class fine-tunes (experts per
  expert or fused), and its adapter loads on plain transformers' AutoModelForCausalLM.
"""
import json
import shutil
import signal
import warnings

import pytest
import torch

import ktmoe.cli
from ktmoe.finetune import tiny

FAST = ["--quiet", "--lr", "3e-3", "--batch-tokens", "1024", "--torch-threads", "1"]


def finetune(*argv):
    return ktmoe.cli.main(["finetune", *map(str, argv)])


def losses(out):
    return [json.loads(line)["loss"] for line in open(out / "log.jsonl")]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The built-in tiny checkpoint, built once."""
    return tiny.ensure(tmp_path_factory.mktemp("tiny") / "base-model")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default job with no flags but fewer steps (and --quiet)."""
    out = tmp_path_factory.mktemp("default") / "out"
    assert finetune("--out", out, "--steps", 60, "--quiet") == 0
    return out


def test_default_job_learns(default_run):
    out = default_run
    log = losses(out)
    assert len(log) == 60
    first, last = log[0], sum(log[-5:]) / 5
    assert first > 5.0                       # random init: about ln(512) + the logit spread
    assert last < 0.6 * first, f"loss {first:.3f} -> {last:.3f} did not fall well below its start"
    adapter = out / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 60 and summary["peak_host_bytes"] > 0
    assert summary["experts_packed_bytes"] == 4 * 3 * 8 * 128 * 128 * 2    # layers x (gate, up, down) x E x I x H x bf16
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000050", "step-000060"]
    assert not list(out.glob(".tmp-*"))


def test_adapter_loads_in_plain_peft(default_run):
    """The adapter ktmoe wrote is a standard PEFT adapter: plain PEFT on plain transformers
    (no ktmoe) loads it and its loss on a training example is well below the base model's.

    Every layer's experts, given the same hidden states and routing, agree with ktmoe's
    (design.md 6, 1e-2). Whole-model logits are not compared: the fp32 eager model and the bf16
    kernel differ by ~0.3 % per layer, enough to flip a near-tied top-k choice of a later
    router, after which the two models legitimately route a token to different experts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ktmoe.torch.checkpoint import loading, reader as checkpoint
    out = default_run
    tok = AutoTokenizer.from_pretrained(out / "adapter")
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Italy?"},
                                    {"role": "assistant", "content": "The capital of Italy is Rome."}], tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    plain_base = AutoModelForCausalLM.from_pretrained(out / "base-model", dtype=torch.float32).eval()
    with torch.no_grad():
        before = plain_base(ids, labels=ids).loss.item()
    plain = PeftModel.from_pretrained(plain_base, out / "adapter").eval()   # no ktmoe in this model
    kt, _ = loading.load(checkpoint.Checkpoint(out / "base-model"), device=torch.device("cpu"),
                         dtype=torch.float32, max_tokens=1024)
    kt = PeftModel.from_pretrained(kt, out / "adapter").eval()

    def experts(model):
        return [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    seen = []
    hooks = [m.register_forward_hook(lambda m, args, y: seen.append((args, y))) for m in experts(plain)]
    with torch.no_grad():
        a = plain(ids, labels=ids)
    for h in hooks:
        h.remove()
    assert len(seen) == len(experts(kt)) == 4
    with torch.no_grad():
        for layer, ((args, y_plain), kt_experts) in enumerate(zip(seen, experts(kt))):
            y_kt = kt_experts(*args)
            rel = ((y_kt - y_plain).norm() / y_plain.norm()).item()
            assert rel <= 1e-2, f"layer {layer}: plain PEFT vs ktmoe experts: relative error {rel:.2e} > 1e-2 (design.md 6)"
    assert a.loss.item() < 0.7 * before      # the adapter is what learned: loss on a training example fell


def eight_steps(base):
    return ["--model", base, "--data", tiny.dataset_path(), *FAST, "--steps", 8, "--save-every", 3]


@pytest.fixture(scope="module")
def uninterrupted(base, tmp_path_factory):
    """8 steps in one go: what every interrupted and resumed run must reproduce exactly."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    assert finetune(*eight_steps(base), "--out", out) == 0
    return out


def same_as(out, ref):
    want, got = losses(ref), losses(out)
    assert len(got) == 8 and got == want, f"resumed {got} vs uninterrupted {want} (exact)"
    from safetensors.torch import load_file
    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (ref, out))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)   # exact


def test_resume_continues_exactly(base, uninterrupted, tmp_path):
    common = eight_steps(base)
    assert finetune(*common, "--out", tmp_path / "b", "--stop-after", 5) == 0
    b = tmp_path / "b"
    assert not (b / "adapter").exists()                       # stopped early: no adapter yet
    assert [p.name for p in sorted((b / "checkpoints").iterdir())] == ["step-000003", "step-000005"]
    shutil.rmtree(b / "checkpoints" / "step-000005")          # resume from an older checkpoint than the log
    assert finetune(*common, "--out", b, "--resume") == 0
    same_as(b, uninterrupted)


def interrupt_collate(monkeypatch, at_call):
    """data.collate raises KeyboardInterrupt on its `at_call`-th call (Ctrl-C between steps)."""
    from ktmoe.finetune import data
    real, calls = data.collate, []

    def collate(*a, **kw):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(data, "collate", collate)


def test_ctrl_c_leaves_out_continuable(base, uninterrupted, tmp_path, capsys, monkeypatch):
    """SIGINT inside step 2's optimizer update (before the first checkpoint, due at step 3):
    the step completes, a checkpoint of step 2 is written, the advice says --resume, and it is
    true: a plain rerun refuses (pass --resume), --resume continues. A second Ctrl-C (between
    steps 4 and 5 of the resumed run) again leaves a checkpoint; the run then finishes with
    the same losses and adapter as an uninterrupted one, bit for bit."""
    # Python's own Ctrl-C handler, as in a terminal (a shell's background job, `pytest &`, starts
    # with SIGINT ignored, and the job rightly leaves an ignored SIGINT alone)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ctrl_c_run(base, uninterrupted, tmp_path, capsys, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, previous)


def ctrl_c_run(base, uninterrupted, tmp_path, capsys, monkeypatch):
    common, out = eight_steps(base), tmp_path / "out"
    real_step, calls = torch.optim.AdamW.step, []

    def step(self, *a, **kw):
        result = real_step(self, *a, **kw)
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)     # Ctrl-C right after the parameters changed
        return result
    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", step)
        assert finetune(*common, "--out", out) == 130
    err = capsys.readouterr().err
    assert f"interrupted: stopped after step 2 of 8; {out / 'checkpoints' / 'step-000002'} holds it: continue " \
           "with the same flags plus --resume" in err, err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert len(losses(out)) == 2 and not list(out.glob(".tmp-*"))
    assert finetune(*common, "--out", out) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "pass --resume to continue it" in err, err
    with monkeypatch.context() as m:
        interrupt_collate(m, at_call=3)            # steps 3, 4 done, Ctrl-C before step 5
        assert finetune(*common, "--out", out, "--resume") == 130
    assert "stopped after step 4 of 8" in capsys.readouterr().err
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000003", "step-000004"]
    assert finetune(*common, "--out", out, "--resume") == 0
    same_as(out, uninterrupted)


def test_ctrl_c_before_the_first_step_leaves_out_rerunnable(base, tmp_path, capsys, monkeypatch):
    argv = ["--model", base, "--data", tiny.dataset_path(), *FAST, "--steps", 1, "--out", tmp_path / "out"]
    with monkeypatch.context() as m:
        interrupt_collate(m, at_call=1)
        assert finetune(*argv) == 130
    err = capsys.readouterr().err
    assert "interrupted: nothing was trained yet" in err and "run the same command again" in err, err
    assert finetune(*argv) == 0                    # as advised: the same command, no --resume / --overwrite
    assert len(losses(tmp_path / "out")) == 1


@pytest.mark.parametrize("fmt", [["--weights", "int8"], ["--weights", "int4", "--group-size", "32"],
                                 ["--weights", "int8", "--activations", "int8"]], ids=["int8", "int4-g32", "w8a8"])
def test_quantized_expert_weights_learn(base, tmp_path, capsys, fmt):
    assert finetune("--model", base, "--data", tiny.dataset_path(), *FAST, "--steps", 12, *fmt,
                    "--out", tmp_path) == 0
    out = capsys.readouterr().out
    want = {"int8": "int8 weights, weight-only", "32": "int4 group 32 weights, weight-only", "int8-a": "int8 weights, W8A8"}
    key = "int8-a" if "--activations" in fmt else fmt[-1]
    assert want[key] in out, out
    loss = losses(tmp_path)
    assert len(loss) == 12 and sum(loss[-3:]) / 3 < 0.8 * loss[0], f"loss did not fall: {loss}"
    settings = json.loads((tmp_path / "summary.json").read_text())["settings"]
    assert settings["weights"] == fmt[1] and settings["activations"] == ("int8" if "--activations" in fmt else "bf16")


def test_router_target_and_grad_checkpointing(base, tmp_path):
    common = ["--model", base, "--data", tiny.dataset_path(), *FAST, "--steps", 3]
    assert finetune(*common, "--out", tmp_path / "plain", "--targets", "attention,experts,router") == 0
    assert finetune(*common, "--out", tmp_path / "ckpt", "--targets", "attention,experts,router",
                    "--grad-checkpointing") == 0
    want, got = losses(tmp_path / "plain"), losses(tmp_path / "ckpt")
    for w, g in zip(want, got):
        assert abs(w - g) <= 1e-4 * abs(w), f"checkpointed losses {got} vs {want} (rel <= 1e-4)"
    from safetensors import safe_open
    with safe_open(tmp_path / "plain" / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert sum(k.endswith("mlp.gate.weight") for k in keys) == 4      # one router per MoE layer
    assert any("experts" in k and "lora_A" in k for k in keys)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "plain" / "adapter")
    assert any("modules_to_save" in n for n, _ in plain.named_parameters())


def test_adapter_card_absolute_base_path_and_plurals(base, tmp_path, capsys, monkeypatch):
    """--model given relative to the working directory; the adapter then loads from another
    directory through adapter_config.json's base_model_name_or_path (absolute), and its
    README.md says what it was trained from. One epoch of two examples is one step: the
    summary says "1 step (1 epoch)" and "done: 1 step"."""
    import hashlib
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(base, work / "m")
    data_file = _write(work / "d.jsonl", json.dumps({"prompt": "Say hi.", "response": "hi"}) + "\n"
                       + json.dumps({"prompt": "Say bye.", "response": "bye"}) + "\n")
    monkeypatch.chdir(work)
    assert finetune("--model", "m", "--data", "d.jsonl", *FAST, "--epochs", 1, "--out", "o") == 0
    out = capsys.readouterr().out
    assert "; 1 step (1 epoch), batches" in out and "done: 1 step in" in out, out
    assert "loss " in out and "(step 1)\n" in out and "1 steps" not in out and "1 epochs" not in out, out
    adapter = (work / "o" / "adapter").resolve()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((work / "m").resolve())
    card = (adapter / "README.md").read_text()
    loss = losses(work / "o")[0]
    sha = hashlib.sha256(data_file.read_bytes()).hexdigest()
    for want in (f"Base model: `{(work / 'm').resolve()}`", f"`{data_file.resolve()}`, 2 examples, sha256 `{sha}`",
                 "Training: 1 step of 1", f"{loss:.4f} at the end", "r = 16, alpha = 32, on attention, experts"):
        assert want in card, f"{want!r} not in the model card:\n{card}"
    assert "[More Information Needed]" not in card          # not PEFT's empty template
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)                             # "m" does not exist here: only the absolute path works
    from peft import AutoPeftModelForCausalLM
    model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert model.get_base_model().name_or_path == str((work / "m").resolve())


def test_only_ktmoe_warnings_are_relayed(capsys):
    """Inside the job's warning relay: ktmoe's own warnings print as "ktmoe finetune: warning:",
    a third-party FutureWarning / DeprecationWarning is dropped, and any other third-party
    warning is shown as Python shows it (with its file), not under ktmoe's name."""
    import peft
    import transformers

    from ktmoe.finetune import data, train
    with warnings.catch_warnings(record=True) as passed_on:   # what reaches Python's own display
        with train.relayed_warnings():
            warnings.simplefilter("always")
            warnings.warn_explicit("ktmoe says so", UserWarning, data.__file__, 150)
            warnings.warn_explicit("old transformers API", FutureWarning, transformers.__file__, 1)
            warnings.warn_explicit("old peft API", DeprecationWarning, peft.__file__, 1)
            warnings.warn_explicit("peft note", UserWarning, peft.__file__, 2)
    err = capsys.readouterr().err
    assert err == "ktmoe finetune: warning: ktmoe says so\n", err
    assert [(str(w.message), w.category, w.filename) for w in passed_on] == [("peft note", UserWarning, peft.__file__)]


def test_train_count_spelling():
    from ktmoe.finetune import train
    assert [train._count(n, "step") for n in (0, 1, 2, 1000)] == ["0 steps", "1 step", "2 steps", "1,000 steps"]


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_qwen3_5_moe_vision_language_checkpoint_fine_tunes(layout, base, tmp_path, capsys):
    """A Qwen3.5-MoE saved from Qwen3_5MoeForConditionalGeneration (model.language_model.*):
    fine-tuned as the text-only causal LM that AutoModelForCausalLM builds for it, the vision
    tower left out (said once, not as a warning); the adapter loads with plain transformers +
    PEFT on AutoModelForCausalLM.from_pretrained of the same directory."""
    from test_finetune_loading import make_vlm, save_vlm
    d = save_vlm(make_vlm(vocab_size=512, max_position_embeddings=512), tmp_path / "vlm", layout)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(base / f, d / f)
    out = tmp_path / "out"
    assert finetune("--model", d, "--data", tiny.dataset_path(), *FAST, "--steps", 2,
                    "--targets", "attention,experts,router", "--out", out) == 0
    cap = capsys.readouterr()
    assert f"experts ({layout} in the checkpoint)" in cap.out, cap.out
    assert "built as Qwen3_5MoeForCausalLM (text only)" in cap.out and "model.visual.*" in cap.out, cap.out
    assert "not used by the model" not in cap.err, cap.err
    from safetensors import safe_open
    with safe_open(out / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(".model.layers.1.mlp.experts." in k and "lora_A" in k for k in keys), keys
    assert any(".model.layers.1.self_attn.q_proj.lora_A" in k for k in keys), keys
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(d)
    plain = PeftModel.from_pretrained(plain, out / "adapter")
    assert sum("lora_A" in n for n, _ in plain.named_parameters()) == sum("lora_A" in k for k in keys)


# ---- bad input: one clear message, exit status 2 ----
def _write(path, text):
    path.write_text(text)
    return path


def _copy_base(base, dst):
    shutil.copytree(base, dst)
    return dst


def _dense_model(base, tmp):
    import transformers
    cfg = transformers.Qwen3Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    d = tmp / "dense"
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(base / f, d / f)
    return d


def _truncated_shard(base, tmp):
    d = _copy_base(base, tmp / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return d


def _missing_shard(base, tmp):
    d = _copy_base(base, tmp / "m")
    _write(d / "model.safetensors.index.json", json.dumps({"weight_map": {"lm_head.weight": "model-00002.safetensors"}}))
    return d


def _config_edit(base, tmp, **changes):
    d = _copy_base(base, tmp / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    _write(d / "config.json", json.dumps(cfg))
    return d


DATA = "DATA"   # replaced by the shipped data file
BAD = {
    "missing model dir": (lambda b, t: ["--model", t / "nope", "--data", DATA], "no such directory"),
    "no config.json": (lambda b, t: ["--model", t, "--data", DATA], "no config.json"),
    "malformed config.json": (lambda b, t: ["--model", _write(t / "config.json", "{oops").parent, "--data", DATA],
                              "config.json: malformed JSON"),
    "unknown architecture": (lambda b, t: ["--model", _config_edit(b, t, model_type="no_such_moe"), "--data", DATA],
                             "unsupported architecture"),
    "dense architecture": (lambda b, t: ["--model", _dense_model(b, t), "--data", DATA],
                           "unsupported architecture Qwen3ForCausalLM"),
    "truncated safetensors": (lambda b, t: ["--model", _truncated_shard(b, t), "--data", DATA],
                              "not a valid safetensors file"),
    "index names a missing shard": (lambda b, t: ["--model", _missing_shard(b, t), "--data", DATA],
                                    "missing: model-00002.safetensors"),
    "model without data": (lambda b, t: ["--model", b], "--data FILE is required"),
    "missing data file": (lambda b, t: ["--model", b, "--data", t / "none.jsonl"], "no such file"),
    "bad JSON line": (lambda b, t: ["--model", b, "--data", _write(t / "d.jsonl", '{"prompt": "a", "response": "b"}\n\n'
                                                                   '{"prompt": "a", "response": }\n')],
                      "d.jsonl:3: invalid JSON"),
    "bad record": (lambda b, t: ["--model", b, "--data", _write(t / "d.jsonl", '{"prompt": "a", "response": "b"}\n'
                                                                '{"messages": [{"role": "user", "content": "hi"}]}\n')],
                   "d.jsonl:2: the last message must be the assistant's"),
    "empty data set": (lambda b, t: ["--model", b, "--data", _write(t / "d.jsonl", "\n  \n")], "the data set is empty"),
    "max-seq-len above the model's": (lambda b, t: ["--model", b, "--data", DATA, "--max-seq-len", 100000],
                                      "longer than the model's maximum of 512"),
    "unwritable out": (lambda b, t: ["--out", _write(t / "file", "x") / "sub"], "cannot write there"),
    "group size without int4": (lambda b, t: ["--weights", "int8", "--group-size", "64"],
                                "--group-size: applies to --weights int4 / int4bs only"),
    "W8A8 with bf16 weights": (lambda b, t: ["--activations", "int8"], "needs quantized expert weights"),
    "resume without checkpoint": (lambda b, t: ["--model", b, "--data", DATA, "--resume"], "--resume: no checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, base, tmp_path, capsys):
    make, message = BAD[case]
    argv = [tiny.dataset_path() if a == DATA else a for a in make(base, tmp_path)]
    if "--out" not in argv:
        argv += ["--out", tmp_path / "out"]
    assert finetune(*argv, *FAST, "--steps", 1) == 2
    err = capsys.readouterr().err
    assert "ktmoe finetune: error:" in err and message in err, err
    out = tmp_path / "out"
    assert not (out / "adapter").exists()


def test_earlier_run_needs_resume_or_overwrite_and_resume_checks_flags(base, tmp_path, capsys):
    common = ["--model", base, "--data", tiny.dataset_path(), *FAST, "--out", tmp_path]
    assert finetune(*common, "--steps", 2) == 0
    capsys.readouterr()
    assert finetune(*common, "--steps", 2) == 2
    assert "holds an earlier run" in capsys.readouterr().err
    assert finetune(*common, "--steps", 2, "--lr", "1e-3", "--resume") == 2
    assert "was made with other settings (lr: 0.003 then, 0.001 now)" in capsys.readouterr().err
    bad = _write(tmp_path.parent / f"{tmp_path.name}-bad.jsonl", "{")
    assert finetune(*common[:2], "--data", bad, *common[4:], "--steps", 2, "--overwrite") == 2
    assert (tmp_path / "adapter").is_dir()     # --overwrite removes the earlier run only once the inputs are good
    assert finetune(*common, "--steps", 2, "--overwrite") == 0
    assert len(losses(tmp_path)) == 2


def test_long_examples_are_truncated_with_a_warning(base, tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", json.dumps({"prompt": "What is 2 + 2? " * 30, "response": "4"}) + "\n"
                  + json.dumps({"prompt": "Say hi.", "response": "hi " * 40}) + "\n")
    assert finetune("--model", base, "--data", data, "--max-seq-len", 32, *FAST, "--steps", 1,
                    "--out", tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "2 example(s) longer than --max-seq-len 32 tokens were truncated (first at line 1)" in err
    assert "1 example(s) have no assistant token to train on after truncation and were dropped" in err


def test_disk_full_while_writing_the_summary(tmp_path, monkeypatch, capsys):
    """A write that fails outside a checkpoint (here the summary, as a full disk would make it)
    ends with one error line naming the file, exit 2, not a traceback."""
    import errno

    from ktmoe.finetune import output

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(output, "write_json_atomic", full)
    out = tmp_path / "run"
    assert finetune("--out", out, "--steps", 2, *FAST) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"ktmoe finetune: error: {out / 'summary.json'}: No space left on device; is the disk full?"
    assert sum(line.startswith("ktmoe finetune: error:") for line in err) == 1


@pytest.mark.parametrize("value", ["auto", "2"])
def test_gpu_experts_without_a_gpu_says_so(value, base, tmp_path, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # as on CI, also where a GPU is present
    argv = ["--model", base, "--data", tiny.dataset_path(), "--out", tmp_path / "out", "--gpu-experts", value]
    assert finetune(*argv, *FAST, "--steps", 1) == 2
    err = capsys.readouterr().err
    assert f"ktmoe finetune: error: --gpu-experts {value}: there is no GPU" in err, err
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.parametrize("value,why", [("-1", "must be auto or >= 0"), ("most", "expected auto, 0 or a number")])
def test_gpu_experts_flag_values(value, why, capsys):
    with pytest.raises(SystemExit) as e:
        finetune("--gpu-experts", value)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--gpu-experts" in err and why in err, err
