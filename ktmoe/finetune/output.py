"""Writing into --out without ever leaving a half-written result there.

Every file or directory is first written under a temporary name in the same directory and
then renamed into place (`os.replace`, atomic on one file system); a directory that already
exists under the final name is moved aside first and removed only after the new one is in
place. A crash therefore leaves either the old complete result or the new one, plus at
worst a `.tmp-*` entry that the next run removes.

Permissions: the temporary names are made owner-only (mkdtemp 0700, mkstemp 0600, and
safetensors writes its files 0600), so the result gets the modes a plain write would give
(0777 / 0666 less the umask, as `save_pretrained` gives) before it is renamed into place:
under umask 022 other users can read the adapter, checkpoints, plot and summary.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from . import FinetuneError

TMP_PREFIX = ".tmp-"


def umask() -> int:
    """The process's umask, read without changing it (Linux >= 4.7: /proc/self/status); else
    set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def plain_modes(root: Path) -> None:
    """Gives `root` and everything under it the modes a plain write gives: directories (and
    files with an execute bit) 0777, other files 0666, less the umask."""
    mask = umask()
    os.chmod(root, 0o777 & ~mask)
    for d, dirs, files in os.walk(root):
        for n in dirs:
            os.chmod(os.path.join(d, n), 0o777 & ~mask)
        for n in files:
            p = os.path.join(d, n)
            if not os.path.islink(p):
                os.chmod(p, (0o777 if os.stat(p).st_mode & 0o111 else 0o666) & ~mask)


def check_writable(out: Path) -> None:
    """Creates `out` if needed and proves a file can be written and renamed there."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=out)
        os.close(fd)
        os.replace(name, name + "-probe")
        os.unlink(name + "-probe")
    except OSError as e:
        raise FinetuneError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def remove_stale_temporaries(out: Path) -> None:
    """Removes `.tmp-*` leftovers of an interrupted run (in out/ and out/checkpoints/)."""
    for d in (out, out / "checkpoints"):
        if d.is_dir():
            for p in d.glob(TMP_PREFIX + "*"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: Path):
    """`with atomic_dir(path) as tmp:` write into tmp; on success tmp becomes `path`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + "-", dir=final.parent))
    try:
        yield tmp
        plain_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + "-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())   # mkstemp's 0600 -> a plain write's mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def plot_loss(path: Path, steps: list, losses: list, title: str) -> None:
    """The loss curve (raw per-step loss and a moving average) as a PNG, written atomically.
    Up to 100 steps every step is also drawn as a marker (one step is a single point: no line)."""
    import io

    import matplotlib
    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    few = len(losses) <= 100
    ax.plot(steps, losses, lw=0.8, alpha=0.8 if few else 0.45, marker="o" if few else None,
            ms=4 if len(losses) <= 20 else 2, label="loss per step")
    w = max(1, len(losses) // 20)
    if len(losses) > w > 1:
        avg = [sum(losses[i - w + 1:i + 1]) / w for i in range(w - 1, len(losses))]
        ax.plot(steps[w - 1:], avg, lw=1.8, label=f"moving average ({w} steps)")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # steps are whole numbers
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy, assistant tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())
