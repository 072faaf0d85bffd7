"""In the VM: one TCP connection, one line every INTERVAL seconds, COUNT lines; prints
JSON with the address the far end saw for each answered line and how it ended."""
import json
import socket
import sys
import time

host, port, count, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
seen, ended, t0 = [], "done", time.monotonic()
s = socket.create_connection((host, port), timeout=5)
s.settimeout(2)
f = s.makefile("rwb", buffering=0)
try:
    for i in range(count):
        f.write(b"line %d\n" % i)
        reply = f.readline()
        if not reply:
            ended = "closed"
            break
        seen.append(reply.split()[0].decode())
        time.sleep(interval)
except (ConnectionResetError, BrokenPipeError):
    ended = "reset"
except socket.timeout:
    ended = "timeout"
at = time.monotonic() - t0
try:
    s.close()
except OSError:
    pass
print(json.dumps({"seen": seen, "ended": ended, "at": at}))
