"""Several processes on one host under torch.distributed: one copy of the packed experts per
host, and each process's share of the cores.

Data-parallel training (torchrun, DDP, FSDP2, HF Trainer / accelerate) runs one process per
GPU, or several on the CPU. Every rank needs every layer's experts, but they are frozen and
identical, so the ranks of one host share one packed copy:

- `host_group()` (collective over the default process group, cached): the ranks of this host
  (same hostname and boot id), a gloo group over them for ktmoe's own coordination, and this
  rank's place in it. It also tells ktmoe._cpu how many of those ranks may run on this
  process's cores (affinity masks that overlap), which sets the default kernel thread count:
  the cores of the affinity mask divided by that number.
- `HostRegion(group, nbytes)` (collective over the host's ranks): one anonymous shared-memory
  file (memfd) created by the host's first rank (the leader), mapped read-only by every rank of
  the host, and read-write by the leader while it packs. The others open it through
  /proc/<leader pid>/fd/<fd> (same user, same host; nothing is ever named in /dev/shm, so two
  runs cannot collide and nothing is left behind: the memory goes back to the OS when the last
  process that maps it exits, however it exits). Its pages are allocated up front
  (posix_fallocate), so memory that runs out does so at creation (an error naming the size),
  not as a SIGBUS in the middle of packing. A memfd is not bound by the size of /dev/shm
  (64 MiB in a default Docker container); it counts against host memory / the memory cgroup.
- `convert_shared(items, group, ...)`: the leader packs each layer into its slice of one
  HostRegion (MoEExperts.pack_region), then every rank builds its layers over the read-only
  mapping (MoEExperts.attach) without reading any expert weight. Host memory for the experts:
  the packed bytes once (plus a header page per layer), whatever the number of ranks.

What each rank computes is its own: the experts kernel runs on that rank's tokens with its
share of the cores; the LoRA factors (ordinary parameters) get their gradients reduced by the
engine (DDP all-reduce, FSDP2 reduce-scatter) like every other parameter.
"""
from __future__ import annotations

import mmap
import os
import socket
from dataclasses import dataclass

import torch.distributed as dist

PAGE = 4096


@dataclass
class HostGroup:
    ranks: list          # global ranks of this host, ascending; ranks[0] is the leader
    group: object        # a gloo process group over `ranks`
    local_rank: int      # index of this process in `ranks`

    @property
    def leader(self) -> bool:
        return self.local_rank == 0

    @property
    def size(self) -> int:
        return len(self.ranks)

    def broadcast(self, obj, src_local: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=self.ranks[src_local], group=self.group)
        return box[0]

    def gather(self, obj) -> list:
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


_HOST_GROUP: dict = {}


def host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def host_group() -> HostGroup:
    """This host's ranks of the default process group (collective: every rank must call it)."""
    if not dist.is_initialized():
        raise RuntimeError("ktmoe.torch.distributed: torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group() first)")
    key = id(dist.group.WORLD)
    if key in _HOST_GROUP:
        return _HOST_GROUP[key]
    everyone = dist.new_group(backend="gloo")   # CPU objects, whatever the default backend
    me = (host_id(), os.getpid(), sorted(os.sched_getaffinity(0)))
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, me, group=everyone)
    hosts = {}
    for rank, (host, _, _) in enumerate(seen):
        hosts.setdefault(host, []).append(rank)
    mine = None
    for host in sorted(hosts):   # every rank creates every host's group, in the same order
        g = dist.new_group(hosts[host], backend="gloo")
        if host == me[0]:
            mine = HostGroup(hosts[host], g, hosts[host].index(dist.get_rank()))
    cores = set(me[2])
    from .. import _cpu
    _cpu.set_core_sharers(sum(1 for r in mine.ranks if cores & set(seen[r][2])))
    _HOST_GROUP[key] = mine
    return mine


class HostRegion:
    """One shared-memory file for the ranks of a host (see the module docstring)."""

    def __init__(self, host: HostGroup, nbytes: int, tag: str = "experts"):
        self.host, self.nbytes = host, int(nbytes)
        self.rw = None
        err, where = None, None
        if host.leader:
            try:
                fd = os.memfd_create(f"ktmoe-{tag}", os.MFD_CLOEXEC)
                try:
                    os.ftruncate(fd, self.nbytes)
                    os.posix_fallocate(fd, 0, self.nbytes)
                except OSError:
                    os.close(fd)
                    raise
                self._fd = fd
                where = (os.getpid(), fd)
            except OSError as e:
                err = (f"ktmoe: cannot create a {self.nbytes / 2**20:.1f} MiB shared-memory region for the packed "
                       f"experts on rank {host.ranks[0]} ({e.strerror or e}; host memory or the memory cgroup "
                       f"limit is too small?)")
        where = host.broadcast((where, err))
        if where[1] is not None:
            if host.leader:
                raise MemoryError(where[1])
            raise RuntimeError(f"ktmoe: rank {host.ranks[0]} could not create the shared experts region: {where[1]}")
        pid, fd = where[0]
        opened = None
        try:
            path = f"/proc/{pid}/fd/{fd}"
            rfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if os.fstat(rfd).st_size != self.nbytes:
                    raise OSError(0, f"{path} has {os.fstat(rfd).st_size} bytes, expected {self.nbytes}")
                self.ro = mmap.mmap(rfd, self.nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
                self.inode = os.fstat(rfd).st_ino
            finally:
                os.close(rfd)
        except OSError as e:
            opened = (f"rank {dist.get_rank()} cannot map the shared experts region of rank {host.ranks[0]} "
                      f"({path}: {e.strerror or e}); the ranks of a host must run as the same user in one "
                      f"process namespace")
        problems = [p for p in host.gather(opened) if p]
        if problems:
            raise RuntimeError("ktmoe: " + "; ".join(problems))
        if host.leader:
            self.rw = mmap.mmap(self._fd, self.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if host.leader:
            os.close(self._fd)   # every rank has its mapping: the file lives as long as they do

    def writable(self, offset: int, nbytes: int):
        """The leader's writable view of [offset, offset + nbytes)."""
        return memoryview(self.rw)[offset:offset + nbytes]

    def readable(self, offset: int, nbytes: int):
        return memoryview(self.ro)[offset:offset + nbytes]

    def done_writing(self) -> None:
        """Drops the leader's writable mapping (the layers use the read-only one)."""
        if self.rw is not None:
            self.rw.close()
            self.rw = None


def convert_shared(items: list, host: HostGroup, progress=None, **options) -> HostRegion:
    """Converts the experts modules of `items` [(name, module, weights)] with one packed copy per
    host: `weights()` returns (gate_up, down) tensors and is only called on the leader, one
    layer at a time. options: ktmoe.torch.experts.convert's kernel options. Collective over
    the host's ranks (all must pass the same modules in the same order)."""
    import ktmoe

    from .experts import _kernel_copy, convert
    opts = {k: options.get(k) for k in ("isa", "weights", "group_size")}
    opts["weights"] = opts["weights"] or "bf16"
    sizes = []
    for _, m, _ in items:
        E, H, I = m.down_proj.shape
        sizes.append(ktmoe.MoEExperts.region_bytes(E, H, I, **opts))
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    region = HostRegion(host, max(PAGE, sum(sizes)))
    failure = None
    if host.leader:
        try:
            for i, (name, m, weights) in enumerate(items):
                gu, dn = weights()
                ktmoe.MoEExperts.pack_region(region.writable(offsets[i], sizes[i]), gate_up=_kernel_copy(gu),
                                             down=_kernel_copy(dn), **opts)
                del gu, dn
                if progress is not None:
                    progress(i + 1, len(items))
        except BaseException as e:
            failure = f"{type(e).__name__}: {e}"
            host.broadcast(failure)
            raise
        region.done_writing()
    failure = host.broadcast(failure)
    if failure is not None:
        raise RuntimeError(f"ktmoe: rank {host.ranks[0]} failed packing the shared experts: {failure}")
    for i, (name, m, _) in enumerate(items):
        convert(m, name, region=region.readable(offsets[i], sizes[i]), **options)
        if progress is not None and not host.leader:
            progress(i + 1, len(items))
    return region
