"""Test hosts in Linux network namespaces: a process on another "machine" whose link a test can cut.

`Host` (or `netns_host()`) makes a network namespace joined to this one by a veth pair on a /30 of
198.18.0.0/15, the range set aside for network test beds (RFC 2544, RFC 5735): it is not routed
anywhere, so traffic stays on this machine. Inside the namespace there is only that link and
``lo``, no default route: a process started with `Host.popen` reaches this namespace at
`Host.host_address`, and this namespace reaches it at `Host.address`.

`Host.cut` makes the link drop everything, both ways, without a word: an established TCP
connection hangs (no reset, no error on either side) and a new connection is never answered.
It sets the namespace's end of the veth down; the host's end stays up. Measured with a TCP pair
across the link (tests/integration/test_netns.py keeps checking it):

* namespace end down: the namespace loses its route, so what the process inside sends fails
  locally and is retried by TCP; the host keeps its connected route (the kernel uses a route over
  a link without carrier, and we pin that per device with ``ignore_routes_with_linkdown=0``),
  so what the host sends goes into the veth, which drops it because its peer is down. A blocked
  ``recv`` on either side keeps waiting; a new ``connect`` fails with "No route to host" once
  ARP gives up (about 3 s) or times out. `Host.restore` sets it up again and the connection
  resumes where it was, as after a real network blip (TCP retransmits what was lost).
* host end down (not used): the host loses its connected route and sends by its default route,
  out of the machine. Here a connect then even succeeded, to something beyond the gateway.
* ``tc ... netem loss 100%``: not in this kernel (no ``sch_netem``, no modules).
* blackhole routes on both sides also hang a connection silently, but make ``connect`` fail at
  once with EINVAL, unlike any real network.
* nftables/iptables DROP rules would need a package that this machine kind does not have.

Names carry this process's pid (``lptest-PID-N`` for the namespace, ``lpPIDHEX-N{h,n}`` for the
veth ends, within the 15-character limit of interface names), so parallel test runs on one machine
never share one; the /30 starts at a place derived from the pid and skips any network that an
address or route of this namespace already covers. Leftovers of a run that was killed (its pid
gone) are removed when the next `Host` is made. On exit every process in the namespace is killed,
the veth pair and the namespace are deleted, and the exit waits until the kernel has removed them.

Needs root and iproute2's ``ip``: use `require_netns()` in a test to skip where they are missing
(and fail under CI, which has them).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from support import require

#: Where the test links' /30 subnets come from (RFC 2544's network test bed range).
POOL = ipaddress.IPv4Network("198.18.0.0/15")
#: Every namespace made here is named PREFIX-PID-N.
PREFIX = "lptest"
_NAME = re.compile(rf"^{PREFIX}-(\d+)-\d+$")
_VETH = re.compile(r"^lp([0-9a-f]+)-[0-9a-f]+[hn]$")
_counter = itertools.count()
_SAFETY = 15.0  # seconds: an upper bound for the kernel to finish a step, never a measure of speed


class NetnsError(RuntimeError):
    """A namespace step failed, or cleanup left something behind."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["ip", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=_SAFETY, check=False
    )
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done


@functools.cache
def netns_problem() -> str | None:
    """Why network namespaces cannot be used here, or None when they can (found out once, by trying)."""
    if not hasattr(os, "geteuid") or not os.path.isdir("/proc/self/ns"):
        return "not Linux"
    if shutil.which("ip") is None:
        return "no `ip` command (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "not root"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` failed: {made.stderr.strip()}"
        _ip("netns", "del", probe, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns add` failed: {exc}"
    return None


def netns_usable() -> bool:
    """Whether this process can make network namespaces (Linux, root, iproute2, a kernel that lets it)."""
    return netns_problem() is None


def require_netns() -> None:
    """Skip the calling test where namespaces cannot be used, saying why; fail instead under CI."""
    problem = netns_problem()
    require("network namespaces", problem is None, f"{problem}; they need root and iproute2")


@functools.cache
def _setpriv() -> str | None:
    """``setpriv``, when it can give a child the parent-death signal here (tried once)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    trial = subprocess.run([setpriv, "--pdeathsig", "KILL", "--", "true"], capture_output=True, check=False)
    return setpriv if trial.returncode == 0 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(name: str) -> list[int]:
    done = _ip("netns", "pids", name, check=False)
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def _kill_all_in(name: str) -> None:
    """SIGKILL every process in namespace ``name`` until none is left (they may fork meanwhile)."""
    deadline = time.monotonic() + _SAFETY
    while pids := _netns_pids(name):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise NetnsError(f"processes still running in namespace {name}: {pids}")
        time.sleep(0.02)


def namespaces() -> list[str]:
    """The names of the network namespaces that ``ip netns`` knows."""
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def links() -> list[str]:
    """The names of the network interfaces of this namespace."""
    return [entry["ifname"] for entry in json.loads(_ip("-j", "link", "show").stdout or "[]")]


def _sweep_stale() -> None:
    """Remove the namespaces and veth ends of test runs whose process is gone (killed before cleanup)."""
    for name in namespaces():
        match = _NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(NetnsError):
                _kill_all_in(name)
            _ip("netns", "del", name, check=False)
    for link in links():
        match = _VETH.match(link.split("@")[0])
        if match and not _pid_alive(int(match.group(1), 16)):
            _ip("link", "del", link.split("@")[0], check=False)


def _taken(*, besides: str | None = None) -> list[ipaddress.IPv4Network]:
    """The IPv4 networks that this namespace's addresses and routes (default routes aside) cover.

    Those of the interface ``besides`` are left out.
    """
    taken: list[ipaddress.IPv4Network] = []
    for entry in json.loads(_ip("-j", "-4", "addr", "show").stdout or "[]"):
        if entry.get("ifname") == besides:
            continue
        for info in entry.get("addr_info", []):
            taken.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = route.get("dst", "default")
        if dst != "default" and route.get("dev") != besides:
            with contextlib.suppress(ValueError):
                taken.append(ipaddress.IPv4Network(dst, strict=False))
    return taken


def _candidates(n: int) -> Iterator[ipaddress.IPv4Network]:
    """The pool's /30s, from a place that differs by pid and by Host, each once."""
    count = POOL.num_addresses // 4
    start = (os.getpid() * 7919 + n * 4) % count
    for i in range(count):
        yield ipaddress.IPv4Network((int(POOL.network_address) + ((start + i) % count) * 4, 30))


class Host:
    """A network namespace joined to this one by a veth pair: a stand-in for another machine.

    Use it as a context manager (``with Host() as host:``): entering makes the namespace and
    the link, leaving kills every process in it and deletes it all. See the module docstring.
    """

    def __init__(self) -> None:
        self._n = next(_counter)
        pid = os.getpid()
        self.name = f"{PREFIX}-{pid}-{self._n}"
        #: The veth end in this namespace, and the one inside the test host's.
        self.host_device = f"lp{pid:x}-{self._n:x}h"
        self.device = f"lp{pid:x}-{self._n:x}n"
        self.address = ""
        self.host_address = ""
        self._procs: list[subprocess.Popen[Any]] = []
        self._cut = False
        self._entered = False

    def __repr__(self) -> str:
        return f"Host({self.name!r}, address={self.address!r}, host_address={self.host_address!r})"

    # -- set-up ---------------------------------------------------------------------------------

    def __enter__(self) -> Host:
        if self._entered:
            raise NetnsError(f"{self.name} was already used")
        self._entered = True
        if problem := netns_problem():
            raise NetnsError(f"network namespaces cannot be used here: {problem}")
        try:
            _sweep_stale()
            _ip("netns", "add", self.name)
            _ip("link", "add", self.host_device, "type", "veth", "peer", "name", self.device)
            _ip("link", "set", self.device, "netns", self.name)
            # Keep using the connected route while the namespace end is down (see cut()).
            Path(f"/proc/sys/net/ipv4/conf/{self.host_device}/ignore_routes_with_linkdown").write_text("0\n")
            self._address_link()
            _ip("link", "set", self.host_device, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
            _ip("-n", self.name, "link", "set", self.device, "up")
        except BaseException:
            self.close()
            raise
        return self

    def _address_link(self) -> None:
        """Give the link the first free /30 of the pool; a network someone took meanwhile is skipped."""
        for net in _candidates(self._n):
            taken = _taken()
            if any(net.overlaps(other) for other in taken):
                continue
            host_ip, ns_ip = (str(a) for a in net.hosts())
            added = _ip("addr", "add", f"{host_ip}/30", "dev", self.host_device, check=False)
            if added.returncode != 0:
                continue
            # Another run may have picked the same /30 in the same instant: then both move on.
            if any(net.overlaps(other) for other in _taken(besides=self.host_device)):
                _ip("addr", "del", f"{host_ip}/30", "dev", self.host_device, check=False)
                continue
            _ip("-n", self.name, "addr", "add", f"{ns_ip}/30", "dev", self.device)
            self.host_address, self.address = host_ip, ns_ip
            return
        raise NetnsError(f"no free /30 left in {POOL}")

    # -- processes ------------------------------------------------------------------------------

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace (``ip netns exec``); keyword arguments go to Popen.

        ``ip netns exec`` execs the program in place, so the Popen's pid is the program's. It gets
        the parent-death signal (SIGKILL) where ``setpriv`` can set it, and is killed when the
        Host exits in any case. Returns once the process is inside the namespace (or has exited).
        """
        if not self.address:
            raise NetnsError(f"{self.name} is not set up: use it in a `with` block")
        command = ["ip", "netns", "exec", self.name, *(os.fspath(a) for a in argv)]
        if setpriv := _setpriv():
            command = [setpriv, "--pdeathsig", "KILL", "--", *command]
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(command, **kwargs)
        self._procs.append(proc)
        inside = os.stat(f"/run/netns/{self.name}").st_ino
        deadline = time.monotonic() + _SAFETY
        while proc.poll() is None:
            try:
                if os.stat(f"/proc/{proc.pid}/ns/net").st_ino == inside:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise NetnsError(f"pid {proc.pid} did not enter namespace {self.name}")
            time.sleep(0.005)
        return proc

    spawn = popen

    def pids(self) -> list[int]:
        """The processes running inside the namespace now."""
        return _netns_pids(self.name)

    # -- the link -------------------------------------------------------------------------------

    @property
    def is_cut(self) -> bool:
        return self._cut

    def cut(self) -> None:
        """Make the link drop all traffic both ways, silently: connections hang, nothing is reset."""
        _ip("-n", self.name, "link", "set", self.device, "down")
        self._cut = True
        # What the host sends to the namespace must still go into the (now dead) veth, never out
        # by the default route.
        route = json.loads(_ip("-j", "route", "get", self.address).stdout)
        if not route or route[0].get("dev") != self.host_device:
            raise NetnsError(f"after the cut, {self.address} is routed by {route}, not by {self.host_device}")

    def restore(self) -> None:
        """Bring the link back; connections that hung resume (the kernel restores the routes).

        A connection resumes at TCP's next retransmission, whose interval doubles while the link
        is cut: after a cut of a few seconds that is a few seconds more, after minutes up to 2 minutes.
        """
        _ip("-n", self.name, "link", "set", self.device, "up")
        self._cut = False

    # -- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process in the namespace, delete the veth pair and the namespace, wait until gone.

        Every step runs even when one before it failed (or set-up stopped half way); what is
        still there at the end is raised as a NetnsError.
        """
        errors: list[str] = []
        for proc in self._procs:
            try:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=_SAFETY)
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"pid {proc.pid}: {exc}")
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._procs.clear()
        present = self.name in namespaces()
        if present:
            try:
                _kill_all_in(self.name)
            except NetnsError as exc:
                errors.append(str(exc))
        _ip("link", "del", self.host_device, check=False)  # takes its peer with it
        if present:
            _ip("netns", "del", self.name, check=False)
        # Deleting a namespace finishes in the kernel after `ip` returns: wait for it.
        deadline = time.monotonic() + _SAFETY
        while True:
            left = [n for n in (self.host_device,) if Path("/sys/class/net", n).exists()]
            left += [n for n in (self.name,) if n in namespaces()]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if left:
            errors.append(f"still there: {left}")
        if errors:
            raise NetnsError(f"cleaning up {self.name}: {'; '.join(errors)}")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@contextlib.contextmanager
def netns_host() -> Iterator[Host]:
    """A `Host` for one ``with`` block (the same as ``with Host() as host``)."""
    with Host() as host:
        yield host
