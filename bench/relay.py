"""A bare asyncio byte relay: the floor of what any Python proxy adds to a request on this machine.

    python bench/relay.py LISTEN_PORT UPSTREAM_PORT

Reads one request (head and ``Content-Length`` body), writes it to the
upstream on a connection opened ahead of need, and copies the answer back
byte for byte until the upstream closes. No routing, no checks, no metrics:
``bench/daemon.py`` runs it next to the daemon so that the daemon's time to
first token can be read against what any relay written in Python costs here.
"""

from __future__ import annotations

import asyncio
import sys

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def main(listen: int, upstream: int) -> None:
    spare: list[Conn] = [await asyncio.open_connection("127.0.0.1", upstream)]
    refills: set[asyncio.Task[None]] = set()

    async def refill() -> None:
        if not spare:
            spare.append(await asyncio.open_connection("127.0.0.1", upstream))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        up_reader, up_writer = spare.pop() if spare else await asyncio.open_connection("127.0.0.1", upstream)
        up_writer.write(head + body)
        task = asyncio.create_task(refill())
        refills.add(task)
        task.add_done_callback(refills.discard)
        while data := await up_reader.read(65536):
            writer.write(data)
        up_writer.close()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    print("ready", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
