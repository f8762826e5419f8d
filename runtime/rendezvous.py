"""Where the ranks meet: the address rank 0 offers for torch.distributed's rendezvous, and the network interface each
rank's gloo and NCCL sockets bind. Torch-free, over MPI (mpi4py); distributed.py calls rendezvous() once, then
bind_interface() with the interface it returned.

Why this is not just `gethostbyname(gethostname())`: on many Debian/Ubuntu nodes /etc/hosts maps the host's name to
a loopback address (127.0.1.1), and gloo and NCCL pick their own address the same way unless GLOO_SOCKET_IFNAME /
NCCL_SOCKET_IFNAME name an interface. On one host that works; across hosts every rank would dial its own loopback
and wait. So, when the ranks span hosts:

    1. rank 0 lists the addresses it could offer: MASTER_ADDR if set, else the address of --iface, else every
       non-loopback IPv4 address it has (its hostname's first, if that is not a loopback address);
    2. rank 0 listens on a probe port; every rank tries a TCP connection to each candidate (a few seconds each,
       in parallel) and notes the local interface its connection left from;
    3. the first candidate every rank reached is the rendezvous address; each rank's gloo/NCCL interface is --iface
       if given, else the interface its probe left from (unless the user set GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME);
    4. no candidate reached by every rank: a clear error naming the address(es), the ranks and their hosts.
"""
import concurrent.futures
import fcntl
import os
import socket
import struct
import threading

from runtime.errors import UserError

PROBE_TIMEOUT_S = 5.0  # per candidate address, every candidate probed at once
SIOCGIFADDR = 0x8915  # Linux ioctl: the IPv4 address of an interface


def ipv4_interfaces():
    """{interface name: IPv4 address} for this host's interfaces that have one (lo included)."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            found[name] = socket.inet_ntoa(packed[20:24])
    return found


def is_loopback(addr):
    return addr.startswith("127.") or addr in ("::1", "localhost")


def free_port():
    with socket.socket() as s:  # a free port on this host; freed again for torch to bind
        s.bind(("", 0))
        return s.getsockname()[1]


def candidates(iface):
    """Addresses rank 0 could offer, best first (step 1 above)."""
    if os.environ.get("MASTER_ADDR"):
        return [os.environ["MASTER_ADDR"]]
    mine = ipv4_interfaces()
    if iface:
        if iface not in mine:
            raise UserError(f"--iface {iface}: rank 0's host ({socket.gethostname()}) has no interface of that name "
                            f"with an IPv4 address; it has {', '.join(f'{n} ({a})' for n, a in mine.items())}.\n"
                            f"HINT: name the interface of the network the hosts share (`ip -4 addr` on a node), or "
                            f"set MASTER_ADDR to rank 0's address on it.")
        return [mine[iface]]
    try:
        named = [socket.gethostbyname(socket.gethostname())]
    except OSError:
        named = []
    out = [a for a in named + list(mine.values()) if not is_loopback(a)]
    return list(dict.fromkeys(out))  # keep the order, drop repeats


def probe(addr, port, timeout_s, here):
    """(reached, local interface the connection left from, or the error). here: ipv4_interfaces()."""
    try:
        with socket.create_connection((addr, port), timeout=timeout_s) as s:
            local = s.getsockname()[0]
    except OSError as e:
        return False, f"{type(e).__name__}: {e}"
    names = [n for n, a in here.items() if a == local]
    return True, names[0] if names else ""


def unreached(addrs, everyone):
    """For the error: each candidate address, and which ranks (on which hosts) failed to reach it, and how."""
    lines = []
    for i, addr in enumerate(addrs):
        why = {}
        for r, (host, results, _) in enumerate(everyone):
            if not results[i][0]:
                why.setdefault(results[i][1], []).append(f"{r} ({host})")
        lines += [f"  {addr}: {error}: rank(s) {', '.join(ranks)}" for error, ranks in why.items()]
    return "\n".join(lines)


def serve_probes(listener, stop):
    """Rank 0: accept the probes' connections and close them (the connection is the answer)."""
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            listener.accept()[0].close()
        except OSError:  # the timeout that lets the loop see `stop`
            pass


def rendezvous(comm, spans_hosts, iface="", timeout_s=PROBE_TIMEOUT_S):
    """The rendezvous (addr, port) every rank uses, and this rank's interface for gloo/NCCL ('' = the backend's own
    choice). Collective over comm: every rank calls it, every rank gets the same address or the same error (raised
    after at most timeout_s of probing)."""
    rank, here = comm.Get_rank(), ipv4_interfaces()
    if iface and not spans_hosts and iface not in here:
        raise UserError(f"--iface {iface}: this host ({socket.gethostname()}) has no interface of that name with an "
                        f"IPv4 address; it has {', '.join(here)}.\nHINT: leave --iface out on one host, "
                        f"or name one of these.", shared=True)
    if not spans_hosts:  # one host: loopback reaches every rank and needs no name lookup
        addr = (os.environ.get("MASTER_ADDR") or "127.0.0.1") if rank == 0 else None
        port = int(os.environ.get("MASTER_PORT") or free_port()) if rank == 0 else None
        addr, port = comm.bcast((addr, port), root=0)
        loopback = [name for name, a in here.items() if is_loopback(a)] if is_loopback(addr) else []
        return addr, port, iface or (loopback[0] if loopback else "")
    listener, stop, offer, error = None, threading.Event(), None, None
    if rank == 0:
        try:
            offer = candidates(iface)
            if not offer:
                raise UserError(f"rank 0's host ({socket.gethostname()}) has no IPv4 address but loopback, and the "
                                f"job spans hosts.\nHINT: set MASTER_ADDR to an address of rank 0's host that the "
                                f"other hosts can reach.")
            listener = socket.create_server(("", 0), backlog=128)
            threading.Thread(target=serve_probes, args=(listener, stop), daemon=True).start()
            offer = (offer, listener.getsockname()[1], int(os.environ.get("MASTER_PORT") or free_port()))
        except UserError as e:
            error = str(e)
    offer, error = comm.bcast((offer, error), root=0)
    if error:
        raise UserError(error, shared=True)
    addrs, probe_port, port = offer
    with concurrent.futures.ThreadPoolExecutor(len(addrs)) as pool:
        mine = list(pool.map(lambda a: probe(a, probe_port, timeout_s, here), addrs))
    everyone = comm.allgather((socket.gethostname(), mine, here))
    if rank == 0:
        stop.set()
        listener.close()
    for i, addr in enumerate(addrs):
        if all(results[i][0] for _, results, _ in everyone):
            break
    else:
        raise UserError(f"the job spans hosts, and no address of rank 0's host ({everyone[0][0]}) was reached by "
                        f"every rank within {timeout_s:g} s:\n{unreached(addrs, everyone)}\nHINT: set MASTER_ADDR "
                        f"to an address of rank 0's host on the network the hosts share, or --iface to that "
                        f"network's interface name; check that no firewall blocks TCP between the hosts.", shared=True)
    if iface:
        missing = [f"rank {r} on {host}" for r, (host, _, have) in enumerate(everyone) if iface not in have]
        if missing:
            raise UserError(f"--iface {iface}: no such interface with an IPv4 address at {', '.join(missing)}.\n"
                            f"HINT: every host needs the interface under the same name; otherwise leave --iface "
                            f"out and the interface that reaches rank 0 is used on each host.", shared=True)
        return addr, port, iface
    return addr, port, mine[i][1]


def bind_interface(ifname, spans_hosts):
    """Point gloo's sockets (and NCCL's, across hosts) at ifname, rendezvous()'s interface for this rank, unless the
    user set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME: then a note for each variable kept."""
    notes = []
    if ifname:  # '' = the backend's own choice
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")[:2 if spans_hosts else 1]:
            if os.environ.setdefault(var, ifname) != ifname:
                notes.append(f"note: {var}={os.environ[var]} from the environment is kept (the interface that "
                             f"reaches rank 0 is {ifname})")
    return notes
