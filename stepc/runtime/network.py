"""Multi-node networking, checked before torchrun starts (torch-free: the stage script's preflight).

Across nodes two libraries open sockets: NCCL (the GPU collectives) and gloo (the CPU side: the
stop-flag all-reduce every step, the object collectives of checkpointing). Each binds to the
interface named by NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME, or else to the address the node's host
name resolves to. On a node whose host name resolves to a loopback address (Debian's default
/etc/hosts maps it to 127.0.1.1) the other nodes cannot reach that address, and
init_process_group hangs until the collective timeout with no hint why. `[launch]
network_interface` names the interface instead (the stage script exports both variables); without
it, a loopback-resolving host name or rendezvous endpoint is refused here, with the fix.
"""

from __future__ import annotations

import ipaddress
import socket

from stepc.errors import UserError


def _resolves_to(host: str) -> str | None:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def interfaces() -> list[str]:
    return sorted(name for _, name in socket.if_nameindex())


def check_multi_node(nnodes: int, interface: str | None, endpoint: str | None, hostname: str | None = None) -> None:
    """Raise UserError (exit 2) when a job of `nnodes` > 1 would bind where other nodes cannot reach.

    `interface`: GLOO_SOCKET_IFNAME as the workers will see it (from [launch] network_interface or the
    environment); `endpoint`: RDZV_ENDPOINT (host:port) when the launch has one.
    """
    if nnodes <= 1:
        return
    fix_iface = ("set [launch] network_interface to the interface that carries this node's address (one of: "
                 f"{', '.join(interfaces())}; `ip -br addr` shows which) and recompile, or export GLOO_SOCKET_IFNAME "
                 "and NCCL_SOCKET_IFNAME")
    if interface:  # gloo takes exact names (a comma-separated list), unlike NCCL's prefixes
        missing = [name for name in interface.split(",") if name not in interfaces()]
        if missing:
            raise UserError(f"network interface {', '.join(missing)} (GLOO_SOCKET_IFNAME) does not exist on "
                            f"{socket.gethostname()}", key="launch.network_interface", fix=fix_iface)
        return
    host = hostname or socket.gethostname()
    address = _resolves_to(host)
    if _is_loopback(address):
        raise UserError(f"this node's host name {host!r} resolves to {address}, a loopback address: gloo and NCCL would "
                        f"listen where the other {nnodes - 1} node(s) cannot connect, and the job would hang in "
                        "init_process_group", key="launch.network_interface",
                        fix=f"{fix_iface}; or map {host} to the node's own address in /etc/hosts")
    if endpoint:
        head = endpoint.rsplit(":", 1)[0].strip("[]")
        if _is_loopback(_resolves_to(head)):
            raise UserError(f"the rendezvous endpoint {endpoint} is a loopback address, which the other node(s) of a "
                            f"{nnodes}-node job cannot reach", key="launch.network_interface",
                            fix="give RDZV_ENDPOINT the head node's address (run.sbatch does), or, for several "
                                "launches on one machine, set [launch] network_interface = \"lo\"")
