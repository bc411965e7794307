"""What `ktmoe finetune` and `ktmoe merge` write gets the umask's modes (issue 22 item 3), as
`save_pretrained` gives them, so another user of a shared server can load the adapter and the
merged model: under umask 022 directories 0755 and files 0644, under 027 0750 and 0640. The
temporary names the results are written under are owner-only; their modes are fixed before
the rename. Both commands run as real subprocesses with the umask set.
"""
import os
import stat

import cli_subprocess


def modes(root):
    """{path relative to root: permission bits} of root and everything under it."""
    found = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            found[os.path.relpath(p, root)] = stat.S_IMODE(os.lstat(p).st_mode)
    return found


def wrong_modes(root, mask):
    want_dir, want_file = 0o777 & ~mask, 0o666 & ~mask
    return {p: oct(m) for p, m in modes(root).items()
            if m != (want_dir if os.path.isdir(os.path.join(root, p)) else want_file)}


def test_finetune_and_merge_outputs_follow_the_umask(tmp_path):
    out = tmp_path / "out"
    res = cli_subprocess.run(["finetune", "--out", out, "--steps", 2, "--quiet", "--torch-threads", "1"], tmp_path,
                             umask=0o022)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("adapter/adapter_model.safetensors", "base-model/model.safetensors", "loss.png", "summary.json",
                 "log.jsonl", "checkpoints/step-000002/trainable.safetensors"):
        assert (out / name).is_file(), name
    assert wrong_modes(out, 0o022) == {}

    merged = tmp_path / "merged"
    res = cli_subprocess.run(["merge", "--model", out / "base-model", "--adapter", out / "adapter", "--out", merged,
                              "--quiet"], tmp_path, umask=0o027)
    assert res.returncode == 0, res.stderr[-3000:]
    assert any(p.suffix == ".safetensors" for p in merged.iterdir())
    assert wrong_modes(merged, 0o027) == {}

