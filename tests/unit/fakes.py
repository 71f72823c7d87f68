"""Fake llama-server programs for the process tests.

Each is a small Python script, run as ``sys.executable -c SCRIPT ARGS...``.
``ServerProcess.start`` appends ``--port 0 --host 127.0.0.1``; the script
binds that port itself and prints llama-server's ``listening on`` line.
"""

from __future__ import annotations

import sys

# Options (all optional):
#   --tag T            ignored; lets a test find the process by its command line
#   --pidfile P        write the pid there first thing
#   --ignore-term      SIGTERM is ignored
#   --usr1-exits N     SIGUSR1 makes it exit with code N (at once)
#   --print-env NAME   print "env NAME=VALUE"
#   --grandchild       spawn `sleep 30` (sharing the output pipe), print "grandchild PID"
#   --grandchild-ignores-term   ... with SIGTERM ignored in the grandchild
#   --say LINE         print LINE (repeatable)
#   --exit N           after the lines above, exit with code N
#   --progress S       print a progress line every 0.1 s for S seconds before listening, then "progress done"
#   --never-listen     never open a port (after the progress lines, go silent)
#   --loading S        answer /health with 503 "Loading model" for S seconds after listening
#   --quiet            do not print the "listening on" line
FAKE_SERVER = r"""
import argparse, http.server, json, os, signal, subprocess, sys, time

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, default=0)
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--tag")
p.add_argument("--pidfile")
p.add_argument("--ignore-term", action="store_true")
p.add_argument("--usr1-exits", type=int)
p.add_argument("--print-env")
p.add_argument("--say", action="append", default=[])
p.add_argument("--exit", type=int)
p.add_argument("--grandchild", action="store_true")
p.add_argument("--grandchild-ignores-term", action="store_true")
p.add_argument("--progress", type=float, default=0.0)
p.add_argument("--never-listen", action="store_true")
p.add_argument("--loading", type=float, default=0.0)
p.add_argument("--quiet", action="store_true")
a = p.parse_args()

def say(line):
    print(line, file=sys.stderr, flush=True)

if a.pidfile:
    with open(a.pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(a.pidfile + ".tmp", a.pidfile)
if a.ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if a.usr1_exits is not None:
    signal.signal(signal.SIGUSR1, lambda signum, frame: os._exit(a.usr1_exits))
if a.print_env:
    say(f"env {a.print_env}={os.environ.get(a.print_env, '<unset>')}")
if a.grandchild:
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN if a.grandchild_ignores_term else signal.SIG_DFL)
    g = subprocess.Popen(["sleep", "30"])  # inherits the output pipe and the SIGTERM disposition
    signal.signal(signal.SIGTERM, old)
    say(f"grandchild {g.pid}")
for line in a.say:
    say(line)
if a.exit is not None:
    sys.exit(a.exit)
end = time.monotonic() + a.progress
i = 0
while time.monotonic() < end:
    say(f"0.00.{i:03d}.000 I srv  load_tensors: loading tensor {i}")
    i += 1
    time.sleep(0.1)
if a.progress:
    say("progress done")
if a.never_listen:
    while True:
        time.sleep(1)

ready_at = None

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/health":
            code, body = 404, {"error": {"code": 404, "message": "File Not Found"}}
        elif time.monotonic() < ready_at:
            code, body = 503, {"error": {"code": 503, "message": "Loading model"}}
        else:
            code, body = 200, {"status": "ok"}
        say(f"request {self.path} {code}")
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer((a.host, a.port), Handler)
ready_at = time.monotonic() + a.loading
if not a.quiet:
    say(f"0.00.100.000 I srv  llama_server: listening on http://{a.host}:{server.server_address[1]}")
server.serve_forever()
"""

# A parent process that starts a fake server, prints the child's pid, then sleeps:
# argv[1] is the fake server script, the rest are its arguments.
PARENT = r"""
import sys, anyio
from llamaproc.process import ServerProcess

async def main():
    proc = await ServerProcess.start(sys.executable, ["-c", *sys.argv[1:]], startup_timeout=10)
    print(proc.pid, flush=True)
    await anyio.sleep(60)

anyio.run(main)
"""


def fake_args(*options: str) -> list[str]:
    """``args`` for ``ServerProcess.start(sys.executable, args)`` that run the fake server."""
    return ["-c", FAKE_SERVER, *options]


PYTHON = sys.executable
