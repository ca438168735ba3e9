"""A serial device simulator at the far end of a pseudo-terminal pair.

The code under test opens ``device.path`` (the pty's slave side, or a symlink to it, like
``/dev/serial/by-id/...``) exactly as it would open a USB adapter; the simulator holds the
master side: what it writes arrives at the port, what the port sends is recorded in
``received``. ``unplug()`` closes the master (the port hangs up and its device node vanishes, as
when a USB adapter is pulled) and removes the symlink; ``plug()`` makes a new pty and points the
symlink at it.

    async with SerialDevice(link=tmp_path / "ttyGPS") as dev:
        reader = SerialReader("gps", SerialSource(port=str(dev.path)), emit)
        ...
        await dev.send(b"$GPGGA,...*47\\r\\n")            # as one write
        await dev.send(frame, chunk=3, gap=0.001)          # a few bytes at a time
        assert await dev.wait_received(5) == b"hello"

Use it inside a running event loop (it registers its fd with the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from pathlib import Path


class SerialDevice:
    def __init__(self, *, link: Path | None = None) -> None:
        self.link = link
        self.received = bytearray()
        self.plugs = 0  # how many times a pty was made
        self._master: int | None = None
        self._slave: int | None = None
        self._slave_name = ""
        self._got_data = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """What the code under test opens: the symlink if there is one, else the slave."""
        return self.link if self.link is not None else Path(self._slave_name)

    @property
    def slave_name(self) -> str:
        return self._slave_name

    @property
    def plugged(self) -> bool:
        return self._master is not None

    def plug(self) -> None:
        """Create the pty (raw mode, no echo) and, with ``link``, the symlink to it."""
        if self._master is not None:
            return
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no line editing, no CR/LF translation until the port opens
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        # Keep the slave open: the pty lives on while the code under test closes and reopens it.
        self._slave_name = os.ttyname(slave)
        asyncio.get_running_loop().add_reader(master, self._on_readable)
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()
            self.link.symlink_to(self._slave_name)
        self.plugs += 1

    def unplug(self) -> None:
        """Remove the symlink and close the pty: the port hangs up, its node disappears."""
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()
        master, slave = self._master, self._slave
        self._master = self._slave = None
        if master is not None:
            asyncio.get_running_loop().remove_reader(master)
            os.close(master)
        if slave is not None:
            os.close(slave)

    async def __aenter__(self) -> SerialDevice:
        self.plug()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.unplug()

    # -- device -> port ---------------------------------------------------------------------------

    async def send(self, data: bytes, *, chunk: int | None = None, gap: float = 0.0) -> None:
        """Write ``data`` to the port, ``chunk`` bytes at a time with ``gap`` seconds between
        the chunks (default: one write). Waits while the pty's buffer is full."""
        size = chunk or max(len(data), 1)
        for k in range(0, len(data), size):
            if k and gap:
                await asyncio.sleep(gap)
            await self._write_all(data[k : k + size])

    async def _write_all(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            master = self._master
            if master is None:
                raise RuntimeError("the simulated device is unplugged")
            try:
                n = os.write(master, view)
            except BlockingIOError:
                await _writable(loop, master)
                continue
            view = view[n:]

    # -- port -> device ---------------------------------------------------------------------------

    def _on_readable(self) -> None:
        master = self._master
        if master is None:
            return
        try:
            data = os.read(master, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: nobody has the port open at the moment
            return
        self.received += data
        self._got_data.set()

    async def wait_received(self, n: int, within: float = 5.0) -> bytes:
        """Wait until at least ``n`` bytes have arrived from the port; return them all."""
        async with asyncio.timeout(within):
            while len(self.received) < n:
                self._got_data.clear()
                await self._got_data.wait()
        return bytes(self.received)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)
