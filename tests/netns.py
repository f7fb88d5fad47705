"""Hosts on a real (virtual) network for multi-host tests: Linux network
namespaces joined by veth pairs on a bridge, and faults made by the kernel's
own packet filter in a host's namespace.

    with NamespaceNetwork(hosts=3) as net:        # needs root, `ip`, and nft or iptables
        net.address(1)                             # '10.213.x.1': host 1's own address
        net.exec_prefix(1)                         # ['ip', 'netns', 'exec', <its namespace>]
        net.cut_both(2)                            # host 2 neither sends nor receives
        net.cut_inbound(2)                         # host 2 receives nothing, still sends
        net.flaky(2, loss_percent=20)              # host 2 loses 20% of packets each way
        net.heal(2)                                # (or net.heal(): every host)

Layout: one bridge in the root namespace with address 10.213.<x>.254/24, so
processes there (the test's clients) reach every host; host i is a namespace
whose veth (the other end enslaved to the bridge) has 10.213.<x>.<i>/24 and
which has its own loopback. <x> is a /24 no address or route of the root
namespace already overlaps, checked before and after taking it (another
run taking the same one at the same moment makes this one move on).
Namespaces, veths and the bridge are named after this process's PID and a
per-process letter (`raftka-<pid><a>-<i>`, `rk<pid><a>...`; a name already
taken moves it to the next letter), so concurrent runs never share one;
`__exit__` deletes them all, also when setup or the test failed. Nothing
else is changed: no sysctl, no root-namespace firewall rule.

Faults are rules in a table (nft: `inet raftka_fault`) or the INPUT/OUTPUT
chains (iptables) of the host's own namespace; loopback is never filtered.
A dropped packet just vanishes: peers see silence, not a reset, as when a
cable is pulled or a switch port dies (only the host's own sends that its
OUTPUT drops fail at once, with EPERM; TCP retransmits them). Each fault
replaces the host's previous one; `heal` removes it.
"""
from __future__ import annotations

import ctypes
import ipaddress
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

SUBNETS = ipaddress.ip_network("10.213.0.0/16")
ROOT_HOST = 254                 # the root namespace's address on the bridge: 10.213.<x>.254
NFT_TABLE = "raftka_fault"
FIREWALLS = ("nft", "iptables")
FIREWALL_ENV = "RAFTKA_NETNS_FIREWALL"   # force one ("nft" or "iptables"); by default nft if installed
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
COMMAND_TIMEOUT_S = 20.0

_counter = itertools.count()


class NetnsUnavailable(RuntimeError):
    """This machine cannot host the namespaces (not root, no `ip`, no firewall tool, ...)."""


class NetnsError(RuntimeError):
    """A command setting up, changing or removing the network failed."""


def firewall_tool() -> str | None:
    """"nft" or "iptables": the packet filter the faults use (FIREWALL_ENV picks one), or None."""
    wanted = os.environ.get(FIREWALL_ENV)
    for tool in ([wanted] if wanted else FIREWALLS):
        if tool in FIREWALLS and shutil.which(tool):
            return tool
    return None


def unavailable_reason() -> str | None:
    """Why NamespaceNetwork cannot work here, or None when it can: tried for real
    (a throwaway namespace with a bridge-less veth and a filter table in it)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux only (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces, veths and packet filters need root"
    if not shutil.which("ip"):
        return "no `ip` command (Debian package iproute2)"
    tool = firewall_tool()
    if tool is None:
        wanted = os.environ.get(FIREWALL_ENV)
        return (f"{FIREWALL_ENV}={wanted} is not installed" if wanted
                else "neither nft nor iptables is installed (Debian packages nftables, iptables)")
    probe = f"raftka-{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", probe])
    except NetnsError as error:
        return f"cannot create a network namespace: {error}"
    try:
        veth = f"rk{os.getpid()}pv"
        _run(["ip", "-n", probe, "link", "add", veth, "type", "veth", "peer", "name", veth + "x"])
        _run(["ip", "-n", probe, "link", "add", f"rk{os.getpid()}pb", "type", "bridge"])
        _fault_commands(tool, probe, "both", 100)
    except NetnsError as error:
        return f"cannot set up veths, bridges or {tool} rules in a namespace: {error}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=COMMAND_TIMEOUT_S)
    return None


class NamespaceNetwork:
    """`hosts` network namespaces on one bridge; see the module docstring."""

    def __init__(self, hosts: int = 3, firewall: str | None = None) -> None:
        if not 1 <= hosts < ROOT_HOST:
            raise ValueError(f"1 to {ROOT_HOST - 1} hosts, not {hosts}")
        self.hosts = hosts
        self.firewall = firewall or firewall_tool()
        if self.firewall not in FIREWALLS:
            raise NetnsUnavailable("neither nft nor iptables is installed")
        self._new_tag()
        self.subnet: ipaddress.IPv4Network | None = None
        self.faults: dict[int, str] = {}        # host -> the fault in force
        self._created_namespaces: list[str] = []
        self._bridge_created = False
        if len(self.bridge) > 15 or len(self.veth(hosts) + "i") > 15:
            raise ValueError(f"interface names too long for tag {self.tag}")

    # ---- names and addresses -------------------------------------------------

    def _new_tag(self) -> None:
        self.tag = f"{os.getpid()}{chr(ord('a') + next(_counter) % 26)}"   # the letter ends the PID
        self.bridge = f"rk{self.tag}br"

    def _names_free(self) -> bool:
        """No interface or namespace already has one of this network's names (the same PID
        in another PID namespace sharing this network namespace, or a killed run's leftovers)."""
        return not _link_exists(self.bridge) and not any(
            _link_exists(self.veth(h)) or os.path.exists(os.path.join(NETNS_DIR, self.namespace(h)))
            for h in self.host_ids)

    @property
    def host_ids(self) -> list[int]:
        return list(range(1, self.hosts + 1))

    def namespace(self, host: int) -> str:
        self._check(host)
        return f"raftka-{self.tag}-{host}"

    def veth(self, host: int) -> str:
        """The root-namespace end of host's veth (on the bridge); its namespace end is veth + "i"."""
        return f"rk{self.tag}v{host}"

    def address(self, host: int) -> str:
        self._check(host)
        assert self.subnet is not None, "enter the network first"
        return str(self.subnet.network_address + host)

    @property
    def root_address(self) -> str:
        """The root namespace's address on the bridge (where the test's clients are)."""
        assert self.subnet is not None, "enter the network first"
        return str(self.subnet.network_address + ROOT_HOST)

    def exec_prefix(self, host: int) -> list[str]:
        """Put before a command to run it in host's namespace (ip execs it: the PID is the command's)."""
        return ["ip", "netns", "exec", self.namespace(host)]

    def run(self, host: int, argv: list[str], timeout_s: float = COMMAND_TIMEOUT_S) -> str:
        """Run a command in host's namespace; its stdout (NetnsError if it fails)."""
        return _run([*self.exec_prefix(host), *argv], timeout_s)

    def socket(self, host: int, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket of host's namespace, made in this process (setns in a throwaway thread)."""
        return socket_in(self.namespace(host), family, kind)

    def _check(self, host: int) -> None:
        if not 1 <= host <= self.hosts:
            raise ValueError(f"no host {host}; hosts are 1..{self.hosts}")

    # ---- lifecycle -----------------------------------------------------------

    def __enter__(self) -> "NamespaceNetwork":
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        for _ in range(26):
            if self._names_free():
                break
            self._new_tag()
        else:
            raise NetnsError(f"no free names for this network (rk{os.getpid()}<a-z>br taken)")
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        self._bridge_created = True
        _run(["ip", "link", "set", self.bridge, "up"])
        self._take_subnet()
        for host in self.host_ids:
            ns, outer = self.namespace(host), self.veth(host)
            _run(["ip", "netns", "add", ns])
            self._created_namespaces.append(ns)
            _run(["ip", "link", "add", outer, "type", "veth", "peer", "name", outer + "i", "netns", ns])
            _run(["ip", "link", "set", outer, "master", self.bridge, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.address(host)}/{self.subnet.prefixlen}", "dev", outer + "i"])
            _run(["ip", "-n", ns, "link", "set", outer + "i", "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        self.check_connectivity()

    def _take_subnet(self) -> None:
        """The first /24 of SUBNETS (starting at one this PID picks) nothing of the root namespace overlaps."""
        candidates = list(SUBNETS.subnets(new_prefix=24))[1:-1]   # neither 10.213.0.x nor 10.213.255.x
        start = os.getpid() % len(candidates)
        for subnet in candidates[start:] + candidates[:start]:
            if _root_overlaps(subnet):
                continue
            address = f"{subnet.network_address + ROOT_HOST}/{subnet.prefixlen}"
            _run(["ip", "addr", "add", address, "dev", self.bridge])
            if _root_overlaps(subnet, ignore_device=self.bridge):   # someone else took it meanwhile
                _run(["ip", "addr", "del", address, "dev", self.bridge])
                continue
            self.subnet = subnet
            return
        raise NetnsUnavailable(f"every /24 of {SUBNETS} overlaps an address or route of this host")

    def check_connectivity(self, timeout_s: float = 10.0) -> None:
        """Every host reaches the root namespace and every other host over TCP (the bridge forwards);
        NetnsError naming the first pair that cannot."""
        pairs = [(a, b) for a in [0, *self.host_ids] for b in self.host_ids if a != b]
        listeners = {}
        try:
            for host in self.host_ids:
                listener = self.socket(host)
                listener.bind((self.address(host), 0))
                listener.listen(len(pairs))
                listeners[host] = listener
            deadline = time.monotonic() + timeout_s
            for source, target in pairs:
                address = listeners[target].getsockname()
                while True:   # the veths may take a moment to come up
                    client = self.socket(source) if source else socket.socket()
                    client.settimeout(1.0)
                    try:
                        client.connect(address)
                        break
                    except OSError as error:
                        if time.monotonic() > deadline:
                            raise NetnsError(f"{'root' if not source else f'host {source}'} cannot reach host "
                                             f"{target} at {address[0]}:{address[1]}: {error} (a bridge netfilter "
                                             "rule of the root namespace, perhaps)") from None
                        time.sleep(0.1)
                    finally:
                        client.close()
        finally:
            for listener in listeners.values():
                listener.close()

    def close(self) -> None:
        """Delete every namespace (and so its veth pair) and the bridge this network created.
        Safe to call twice; raises NetnsError after trying everything if something remains."""
        problems = []
        for ns in self._created_namespaces:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            if pids:   # its processes would keep the namespace alive after its name is gone
                problems.append(f"processes {pids} still run in {ns}")
            result = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if result.returncode != 0:
                problems.append(f"ip netns del {ns}: {result.stderr.strip()}")
        self._created_namespaces = []
        if self._bridge_created:
            for host in self.host_ids:   # gone with their namespace, unless it did not get there
                if _link_exists(self.veth(host)):
                    subprocess.run(["ip", "link", "del", self.veth(host)], capture_output=True)
            result = subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, text=True)
            if result.returncode != 0:
                problems.append(f"ip link del {self.bridge}: {result.stderr.strip()}")
            self._bridge_created = False
        self.faults.clear()
        if problems:
            raise NetnsError("; ".join(problems))

    # ---- faults --------------------------------------------------------------

    def cut_both(self, host: int) -> None:
        """Host neither receives nor sends a packet (other than on its loopback)."""
        self._fault(host, "both", 100)

    def cut_inbound(self, host: int) -> None:
        """Every packet to host is dropped as it arrives; what it sends still goes out."""
        self._fault(host, "inbound", 100)

    def cut_outbound(self, host: int) -> None:
        """Every packet host sends is dropped; what it is sent still arrives."""
        self._fault(host, "outbound", 100)

    def flaky(self, host: int, loss_percent: int = 20) -> None:
        """Each packet to or from host is dropped with probability loss_percent/100, independently."""
        if not 0 < loss_percent <= 100:
            raise ValueError(f"loss_percent must be in 1..100, not {loss_percent}")
        self._fault(host, "both", loss_percent)

    def heal(self, host: int | None = None) -> None:
        """Remove host's fault (every host's without an argument)."""
        for target in [host] if host is not None else self.host_ids:
            _clear_fault(self.firewall, self.namespace(target))
            self.faults.pop(target, None)

    def _fault(self, host: int, direction: str, loss_percent: int) -> None:
        _fault_commands(self.firewall, self.namespace(host), direction, loss_percent)
        self.faults[host] = f"{direction} {loss_percent}%"

    def rules(self, host: int) -> str:
        """The packet filter rules in force in host's namespace, as the tool lists them (for reports)."""
        if self.firewall == "nft":
            return self.run(host, ["nft", "list", "ruleset"])
        return self.run(host, ["iptables", "-S"])


def _fault_commands(tool: str, ns: str, direction: str, loss_percent: int) -> None:
    """Replace ns's fault: drop `loss_percent`% of its non-loopback packets in `direction`
    ("inbound", "outbound" or "both")."""
    chains = {"inbound": ["input"], "outbound": ["output"], "both": ["input", "output"]}[direction]
    if tool == "nft":
        verdict = "drop" if loss_percent >= 100 else f"numgen random mod 100 < {loss_percent} drop"
        body = []
        for chain in ("input", "output"):
            rules = [f'{"iifname" if chain == "input" else "oifname"} "lo" accept']
            if chain in chains:
                rules.append(verdict)
            body.append(f"  chain {chain} {{\n    type filter hook {chain} priority 0; policy accept;\n"
                        + "".join(f"    {rule}\n" for rule in rules) + "  }\n")
        # declaring the table first makes the delete valid when there is none: one atomic replacement
        script = (f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"
                  f"table inet {NFT_TABLE} {{\n{''.join(body)}}}\n")
        _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], stdin=script)
        return
    _clear_fault(tool, ns)
    match = [] if loss_percent >= 100 else ["-m", "statistic", "--mode", "random",
                                            "--probability", f"{loss_percent / 100:.4f}"]
    for chain in chains:
        name, interface = ("INPUT", "-i") if chain == "input" else ("OUTPUT", "-o")
        _run(["ip", "netns", "exec", ns, "iptables", "-w", "-A", name, "!", interface, "lo", *match, "-j", "DROP"])


def _clear_fault(tool: str, ns: str) -> None:
    if tool == "nft":
        _run(["ip", "netns", "exec", ns, "nft", "-f", "-"],
             stdin=f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")
    else:   # the namespace's own chains: nothing but our rules are ever in them
        _run(["ip", "netns", "exec", ns, "iptables", "-w", "-F", "INPUT"])
        _run(["ip", "netns", "exec", ns, "iptables", "-w", "-F", "OUTPUT"])


def socket_in(netns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket created in the named network namespace. A socket belongs to the
    namespace it was made in for its whole life, so a thread joins the
    namespace (setns affects only the calling thread), makes it, and exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    outcome: list[object] = []

    def make() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"setns({netns}): {os.strerror(error)}")
                outcome.append(socket.socket(family, kind))
            finally:
                os.close(fd)
        except BaseException as error:   # handed to the caller's thread
            outcome.append(error)
    thread = threading.Thread(target=make, name=f"setns-{netns}")
    thread.start()
    thread.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]  # type: ignore[return-value]


def _run(argv: list[str], timeout_s: float = COMMAND_TIMEOUT_S, stdin: str | None = None) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, input=stdin)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NetnsError(f"{' '.join(argv)}: {error}") from None
    if result.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited with {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def _root_overlaps(subnet: ipaddress.IPv4Network, ignore_device: str | None = None) -> bool:
    """Whether an IPv4 address or a (non-default) route of the root namespace, on another
    device than `ignore_device`, overlaps `subnet`."""
    addresses = json.loads(_run(["ip", "-j", "-4", "addr", "show"]) or "[]")
    for link in addresses:
        if link.get("ifname") == ignore_device:
            continue
        for info in link.get("addr_info", []):
            if ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network.overlaps(subnet):
                return True
    routes = json.loads(_run(["ip", "-j", "-4", "route", "show", "table", "all"]) or "[]")
    for route in routes:
        destination = route.get("dst", "default")
        if destination == "default" or route.get("dev") == ignore_device:
            continue
        try:
            network = ipaddress.ip_network(destination, strict=False)
        except ValueError:
            continue
        if network.overlaps(subnet):
            return True
    return False
