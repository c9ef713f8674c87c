"""What listens on a port of this machine: how serving tests tell HAProxy from Serve's proxy."""

import psutil


def listener(port: int) -> str:
    """The name of the process listening on TCP `port` here ("" when none does), e.g.
    "haproxy" or "ray::ProxyActor" (Linux keeps the first 15 characters of a process title)."""
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            return psutil.Process(c.pid).name()
    return ""
