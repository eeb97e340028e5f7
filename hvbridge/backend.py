"""The Backend: the socket layer's and the relay's process state, in one object passed in.

What used to hide in module globals (the VM-name resolver, the Hyper-V I/O model and its probe
lock, the per-route thread limiters, the relay's buffer pools, the splice switch) lives here, made once by the
composition root (cli.run_daemon) and handed to the supervisor, the listener pool and the
metrics server. Tests pass their own, e.g.
`Backend(vm_lookup=FakeLookup(), hvsock_io="threads", splice=False)`, instead of patching.

The splice reactor stays per trio run (relay/splice.py): its thread and epoll set belong to
one run, and the Backend only decides whether connections are spliced at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, final

import attrs

from hvbridge import transports
from hvbridge.hyperv.vms import VmLookup, VmResolver
from hvbridge.relay import pump, splice
from hvbridge.transports import base
from hvbridge.transports.hvsock import HyperVSockets, IoModel

if TYPE_CHECKING:
    import trio

    from hvbridge.addresses import Address
    from hvbridge.routes import RouteOptions


def _hyperv_sockets(backend: Backend) -> HyperVSockets:
    if backend.vm_lookup is None:
        return HyperVSockets(io_model=backend.hvsock_io)
    return HyperVSockets(VmResolver(backend.vm_lookup), io_model=backend.hvsock_io)


def _splice_default() -> bool:
    return splice.enabled


@final
@attrs.define(eq=False)
class Backend:
    """How hvbridge opens, inspects and closes streams; one per process.

    Args:
        vm_lookup: Where VM names come from (default: PowerShell and the WSL tools).
        hvsock_io: Force the Hyper-V socket I/O model (default: HVBRIDGE_HVSOCK_IO, else probe).
        splice: Splice two TCP/Unix sockets in the kernel (default: where Linux can).
        hvsock: The Hyper-V socket state (default: made from vm_lookup and hvsock_io).
    """

    vm_lookup: VmLookup | None = None
    hvsock_io: IoModel | None = None
    splice: bool = attrs.field(factory=_splice_default)
    hvsock: HyperVSockets = attrs.field(default=attrs.Factory(_hyperv_sockets, takes_self=True))
    _pools: dict[int, pump.BufferPool] = attrs.field(factory=dict, init=False)

    def buffer_pool(self, size: int = pump.DEFAULT_BUFFER_SIZE) -> pump.BufferPool:
        """The relay's buffer pool for buffers of `size` bytes (one per size, shared by routes)."""
        pool = self._pools.get(size)
        if pool is None:
            pool = self._pools[size] = pump.BufferPool(size)
        return pool

    async def open_listeners(self, address: Address, options: RouteOptions) -> list[base.Listener]:
        """Bind and listen on `address` (transports.open_listeners)."""
        return await transports.open_listeners(address, options, self.hvsock)

    async def connect(self, address: Address, options: RouteOptions) -> base.Stream:
        """Open a stream to `address` (transports.connect); the caller bounds the wait."""
        return await transports.connect(address, options, self.hvsock)

    def peer_address(self, stream: trio.abc.Stream) -> tuple[int, object] | None:
        """The (family, sockaddr) of a socket stream's peer, or None for other streams."""
        return base.peer_address(stream)

    async def abort(self, stream: trio.abc.AsyncResource) -> None:
        """Close `stream` so that its peer sees a reset (RST) rather than a clean EOF."""
        await base.abort(stream)
