"""A fault-injecting TCP proxy for tests that run two real node daemons.

The proxy stands on the link between node A and node B.  Every TCP
connection it accepts is relayed to a target, and each byte stream can be
delayed, blackholed, cut with a reset, or refused, per direction.

Naming: "a->b" is the direction from node A to node B, "b->a" the other
way.  The main route carries connections that A opens towards B (A
connects to ``listen``, the proxy connects to ``target`` = B).  An
optional ``reverse`` route carries connections that B opens towards A; its
bytes are still counted and faulted in node terms, so ``partition("a->b")``
blocks A's data whichever node opened the connection.

Two ways to run it:

* in-process, inside a trio test::

      async with FaultProxy(listen=("127.0.0.3", 0), target=b_addr) as proxy:
          proxy.delay("a->b", 50)
          ...

  or ``proxy = await nursery.start(FaultProxy(...).run)``.

* as its own process, for tests that drive synchronous daemons::

      python -m tests.harness.proxy --listen 127.0.0.3:7000 \\
          --target 127.0.0.2:7789 --control /tmp/p.sock

  It prints one line ``READY {json}`` on stdout once it listens, and is
  driven with ``ProxyControl(path)`` over a Unix socket line protocol:

      request:  one line, words separated by spaces
      reply:    "ok" [json] | "err" message

      ping                              -> ok
      delay DIR MS [JITTER_MS]          -> ok     (0 ms: no delay)
      drop DIR                          -> ok     (blackhole from now on)
      cut [refuse]                      -> ok     (RST every connection)
      partition DIR                     -> ok     (blackhole + refuse new)
      refuse on|off                     -> ok
      heal [DIR] [keep-damaged]         -> ok
      stats                             -> ok {"a->b": {...}, "b->a": {...}, ...}
      addresses                         -> ok {"listen": [...], "reverse": [...]}

  DIR is one of a->b, b->a, both (also ab, ba).

Dropping bytes inside a live TCP stream is something a real network never
does (TCP would retransmit after the partition heals), so ``heal`` by
default resets every connection that lost bytes while it was blackholed:
the daemons then see a broken connection, as they would after a long
partition, rather than a stream with a hole.  ``heal(cut_damaged=False)``
keeps them, for tests of how a peer copes with garbage.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import random
import signal
import socket
import struct
import sys
from typing import Any

import trio

DIRECTIONS = ("a->b", "b->a")
_DIRECTION_ALIASES = {
    "a->b": ("a->b",), "ab": ("a->b",), "a2b": ("a->b",),
    "b->a": ("b->a",), "ba": ("b->a",), "b2a": ("b->a",),
    "both": DIRECTIONS, "*": DIRECTIONS,
}
_CHUNK = 64 * 1024
# Chunks in flight per direction of one connection; bounds the memory a
# delayed link can hold and gives the sender TCP backpressure.
_QUEUE_CHUNKS = 256

# Errors that mean "this connection is gone"; none of them may escape a
# connection task.
_CONN_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def parse_direction(text: str) -> tuple[str, ...]:
    try:
        return _DIRECTION_ALIASES[text.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown direction {text!r}; use a->b, b->a or both") from None


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


@dataclasses.dataclass
class DirectionState:
    """Faults and counters for one direction, shared by all connections."""
    delay: float = 0.0          # seconds added to every chunk
    jitter: float = 0.0         # up to this many seconds more, at random
    blackhole: bool = False
    bytes_in: int = 0           # read from the sending node
    bytes_out: int = 0          # delivered to the receiving node
    bytes_dropped: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "delay_ms": self.delay * 1000, "jitter_ms": self.jitter * 1000,
            "blackhole": self.blackhole, "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out, "bytes_dropped": self.bytes_dropped,
        }


def _reset_on_close(stream: trio.SocketStream) -> None:
    """Make the next close send RST instead of FIN (SO_LINGER with 0 s)."""
    with contextlib.suppress(OSError, AttributeError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                 struct.pack("ii", 1, 0))


async def _close_quietly(stream: trio.abc.AsyncResource) -> None:
    with trio.CancelScope(shield=True), contextlib.suppress(Exception):
        await stream.aclose()


class _Connection:
    """One relayed TCP connection: two pumps, each with a delivery task."""

    def __init__(self, proxy: FaultProxy, a_stream: trio.SocketStream,
                 b_stream: trio.SocketStream):
        self.proxy = proxy
        self.streams = {"a": a_stream, "b": b_stream}
        self.cancel_scope = trio.CancelScope()
        self.damaged = False            # lost bytes to a blackhole
        self._last_due = {d: 0.0 for d in DIRECTIONS}

    def abort(self) -> None:
        """Drop the connection with RST on both sides."""
        for stream in self.streams.values():
            _reset_on_close(stream)
        self.cancel_scope.cancel()

    async def run(self) -> None:
        self.proxy._connections.add(self)
        try:
            with self.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, "a->b", self.streams["a"], self.streams["b"])
                    nursery.start_soon(self._pump, "b->a", self.streams["b"], self.streams["a"])
        finally:
            self.proxy._connections.discard(self)
            for stream in self.streams.values():
                await _close_quietly(stream)

    async def _pump(self, direction: str, src: trio.SocketStream,
                    dst: trio.SocketStream) -> None:
        state = self.proxy.state[direction]
        send_chan, recv_chan = trio.open_memory_channel(_QUEUE_CHUNKS)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver, direction, recv_chan, dst)
            async with send_chan:
                while True:
                    try:
                        data = await src.receive_some(_CHUNK)
                    except _CONN_ERRORS:
                        # The sender reset or vanished: pass the reset on.
                        self.abort()
                        return
                    if not data:
                        break           # EOF: the delivery task forwards it
                    state.bytes_in += len(data)
                    if state.blackhole:
                        state.bytes_dropped += len(data)
                        self.damaged = True
                        continue
                    await send_chan.send((self._due_time(direction, state), data))

    def _due_time(self, direction: str, state: DirectionState) -> float:
        extra = state.delay
        if state.jitter:
            extra += self.proxy._rng.uniform(0, state.jitter)
        # A TCP stream never reorders, so jitter may only stretch gaps.
        due = max(self._last_due[direction], trio.current_time() + extra)
        self._last_due[direction] = due
        return due

    async def _deliver(self, direction: str, recv_chan: trio.MemoryReceiveChannel,
                       dst: trio.SocketStream) -> None:
        state = self.proxy.state[direction]
        async with recv_chan:
            async for due, data in recv_chan:
                await trio.sleep_until(due)
                if state.blackhole:
                    state.bytes_dropped += len(data)
                    self.damaged = True
                    continue
                try:
                    await dst.send_all(data)
                except _CONN_ERRORS:
                    self.abort()
                    return
                state.bytes_out += len(data)
        if state.blackhole:
            return                      # a blackhole swallows the FIN too
        try:
            await dst.send_eof()
        except _CONN_ERRORS:
            pass


class FaultProxy:
    """A TCP relay with per-direction faults; see the module docstring."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], *,
                 reverse: tuple[tuple[str, int], tuple[str, int]] | None = None,
                 source: str | None = None, reverse_source: str | None = None,
                 seed: int | None = None):
        self._routes: list[tuple[str, tuple[str, int], tuple[str, int], str | None]] = [
            ("forward", tuple(listen), tuple(target), source)]
        if reverse is not None:
            r_listen, r_target = reverse
            self._routes.append(("reverse", tuple(r_listen), tuple(r_target), reverse_source))
        self.state = {d: DirectionState() for d in DIRECTIONS}
        self.refuse_new = False
        self.accepted = 0
        self.refused = 0
        self.addresses: dict[str, list[tuple[str, int]]] = {}
        self._connections: set[_Connection] = set()
        self._rng = random.Random(seed)
        self._cancel_scope: trio.CancelScope | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    # -- lifecycle ---------------------------------------------------------

    @property
    def listen_address(self) -> tuple[str, int]:
        """Where the forward route listens (the port is real even if 0 was asked)."""
        return self.addresses["forward"][0]

    @property
    def reverse_address(self) -> tuple[str, int]:
        return self.addresses["reverse"][0]

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners: list[tuple[str, trio.SocketListener, tuple[str, int], str | None]] = []
        try:
            for name, (host, port), target, source in self._routes:
                for listener in await trio.open_tcp_listeners(port, host=host):
                    listeners.append((name, listener, target, source))
                    addr = listener.socket.getsockname()[:2]
                    self.addresses.setdefault(name, []).append((addr[0], addr[1]))
            with trio.CancelScope() as self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    for name, listener, target, source in listeners:
                        nursery.start_soon(self._accept_loop, nursery, name, listener,
                                           target, source)
                    task_status.started(self)
        finally:
            for _, listener, _, _ in listeners:
                await _close_quietly(listener)

    def stop(self) -> None:
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def __aenter__(self) -> FaultProxy:
        self._stack = contextlib.AsyncExitStack()
        try:
            nursery = await self._stack.enter_async_context(trio.open_nursery())
            await nursery.start(self.run)
        except BaseException:
            await self._stack.__aexit__(*sys.exc_info())
            raise
        return self

    async def __aexit__(self, *exc_info) -> bool:
        self.stop()
        assert self._stack is not None
        return await self._stack.__aexit__(*exc_info)

    async def _accept_loop(self, nursery: trio.Nursery, route: str,
                           listener: trio.SocketListener, target: tuple[str, int],
                           source: str | None) -> None:
        while True:
            try:
                client = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    await trio.sleep(0.05)   # out of descriptors: let some close
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            if self.refuse_new:
                self.refused += 1
                _reset_on_close(client)
                await _close_quietly(client)
                continue
            self.accepted += 1
            nursery.start_soon(self._relay, route, client, target, source)

    async def _relay(self, route: str, client: trio.SocketStream,
                     target: tuple[str, int], source: str | None) -> None:
        try:
            server = await trio.open_tcp_stream(*target, local_address=source)
        except OSError:
            # The target refuses: so do we, the way the target would.
            _reset_on_close(client)
            await _close_quietly(client)
            return
        for stream in (client, server):
            with contextlib.suppress(OSError):
                stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        if route == "forward":
            conn = _Connection(self, a_stream=client, b_stream=server)
        else:
            conn = _Connection(self, a_stream=server, b_stream=client)
        await conn.run()

    # -- faults --------------------------------------------------------------

    def delay(self, direction: str, ms: float, jitter_ms: float = 0.0) -> None:
        for d in parse_direction(direction):
            self.state[d].delay = max(0.0, ms) / 1000
            self.state[d].jitter = max(0.0, jitter_ms) / 1000

    def drop(self, direction: str = "both") -> None:
        for d in parse_direction(direction):
            self.state[d].blackhole = True

    def cut(self, *, refuse: bool = False) -> None:
        """Reset every current connection; with refuse=True also refuse new ones."""
        if refuse:
            self.refuse_new = True
        for conn in list(self._connections):
            conn.abort()

    def refuse(self, on: bool = True) -> None:
        self.refuse_new = on

    def partition(self, direction: str = "both") -> None:
        self.drop(direction)
        self.refuse_new = True

    def heal(self, direction: str = "both", *, cut_damaged: bool = True) -> None:
        """Undo every fault in ``direction``; new connections are accepted again."""
        for d in parse_direction(direction):
            state = self.state[d]
            state.delay = state.jitter = 0.0
            state.blackhole = False
        if not any(s.blackhole for s in self.state.values()):
            self.refuse_new = False
        if cut_damaged:
            for conn in list(self._connections):
                if conn.damaged:
                    conn.abort()

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = {d: self.state[d].as_dict() for d in DIRECTIONS}
        result.update(connections=len(self._connections), accepted=self.accepted,
                      refused=self.refused, refuse_new=self.refuse_new)
        return result

    # -- control socket ------------------------------------------------------

    def handle_command(self, line: str) -> str:
        """Execute one control-protocol line; returns the reply line."""
        words = line.split()
        if not words:
            return "err empty command"
        verb, args = words[0].lower(), words[1:]
        try:
            if verb == "ping":
                return "ok"
            if verb == "delay":
                if len(args) not in (2, 3):
                    return "err usage: delay DIR MS [JITTER_MS]"
                self.delay(args[0], float(args[1]), float(args[2]) if len(args) == 3 else 0.0)
            elif verb == "drop":
                self.drop(args[0] if args else "both")
            elif verb == "cut":
                if args not in ([], ["refuse"]):
                    return "err usage: cut [refuse]"
                self.cut(refuse=bool(args))
            elif verb == "partition":
                self.partition(args[0] if args else "both")
            elif verb == "refuse":
                if args not in (["on"], ["off"]):
                    return "err usage: refuse on|off"
                self.refuse(args[0] == "on")
            elif verb == "heal":
                keep = "keep-damaged" in args
                rest = [a for a in args if a != "keep-damaged"]
                self.heal(rest[0] if rest else "both", cut_damaged=not keep)
            elif verb == "stats":
                return "ok " + json.dumps(self.stats())
            elif verb == "addresses":
                return "ok " + json.dumps(self.addresses)
            else:
                return f"err unknown command {verb!r}"
        except (ValueError, IndexError) as exc:
            return f"err {exc}"
        return "ok"

    async def serve_control(self, path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve the line protocol on a Unix socket at ``path`` (mode 0600)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(16)
            listener = trio.SocketListener(sock)
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._control_client, [listener],
                                           handler_nursery=nursery)
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def _control_client(self, stream: trio.SocketStream) -> None:
        buf = b""
        try:
            async with stream:
                while True:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    buf += data
                    if len(buf) > 65536:
                        await stream.send_all(b"err line too long\n")
                        return
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        reply = self.handle_command(line.decode("utf-8", "replace"))
                        await stream.send_all(reply.encode() + b"\n")
        except _CONN_ERRORS:
            pass


class ProxyError(Exception):
    """The proxy answered a control command with an error."""


class ProxyControl:
    """Synchronous client of a proxy process's control socket."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self.timeout = timeout

    def command(self, line: str) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            sock.sendall(line.encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                data = sock.recv(65536)
                if not data:
                    raise ProxyError(f"proxy closed the control socket during {line!r}")
                reply += data
        text = reply.decode().strip()
        status, _, rest = text.partition(" ")
        if status != "ok":
            raise ProxyError(f"proxy refused {line!r}: {rest}")
        return json.loads(rest) if rest else None

    def ping(self) -> None:
        self.command("ping")

    def delay(self, direction: str, ms: float, jitter_ms: float = 0.0) -> None:
        self.command(f"delay {direction} {ms} {jitter_ms}")

    def drop(self, direction: str = "both") -> None:
        self.command(f"drop {direction}")

    def cut(self, refuse: bool = False) -> None:
        self.command("cut refuse" if refuse else "cut")

    def partition(self, direction: str = "both") -> None:
        self.command(f"partition {direction}")

    def refuse(self, on: bool = True) -> None:
        self.command(f"refuse {'on' if on else 'off'}")

    def heal(self, direction: str = "both", cut_damaged: bool = True) -> None:
        self.command(f"heal {direction}" + ("" if cut_damaged else " keep-damaged"))

    def stats(self) -> dict[str, Any]:
        return self.command("stats")

    def addresses(self) -> dict[str, list[list[Any]]]:
        return self.command("addresses")


def spawn_proxy(listen: str, target: str, control: str, *,
                reverse: tuple[str, str] | None = None, timeout: float = 10.0,
                python: str = sys.executable):
    """Start a proxy process; returns (Popen, ProxyControl, ready-info) once it listens."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv = [python, "-m", "tests.harness.proxy", "--listen", listen, "--target", target,
            "--control", control]
    if reverse is not None:
        argv += ["--reverse-listen", reverse[0], "--reverse-target", reverse[1]]
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE, text=True)
    import selectors
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            proc.wait()
            raise TimeoutError(f"proxy did not report READY within {timeout}s")
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"proxy failed to start (exit {proc.poll()}): {line!r}")
    return proc, ProxyControl(control), json.loads(line[len("READY "):])


async def _main_async(args: argparse.Namespace) -> None:
    reverse = None
    if args.reverse_listen:
        reverse = (parse_hostport(args.reverse_listen), parse_hostport(args.reverse_target))
    proxy = FaultProxy(parse_hostport(args.listen), parse_hostport(args.target),
                       reverse=reverse, source=args.source,
                       reverse_source=args.reverse_source, seed=args.seed)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        await nursery.start(proxy.serve_control, args.control)
        print("READY " + json.dumps(proxy.addresses), flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.proxy",
                                     description="fault-injecting TCP proxy for replfs tests")
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on (port 0: any)")
    parser.add_argument("--target", required=True, help="HOST:PORT to relay to")
    parser.add_argument("--control", required=True, help="Unix socket path for commands")
    parser.add_argument("--reverse-listen", help="HOST:PORT for connections from b to a")
    parser.add_argument("--reverse-target", help="HOST:PORT of a, for the reverse route")
    parser.add_argument("--source", help="local address for connections to --target")
    parser.add_argument("--reverse-source", help="local address for connections to a")
    parser.add_argument("--seed", type=int, help="seed for delay jitter")
    args = parser.parse_args(argv)
    if bool(args.reverse_listen) != bool(args.reverse_target):
        parser.error("--reverse-listen and --reverse-target go together")
    try:
        trio.run(_main_async, args)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
