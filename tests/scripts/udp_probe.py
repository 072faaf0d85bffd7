"""Sends COUNT numbered datagrams, one every INTERVAL seconds, to HOST:PORT from one
socket and reports, as JSON, which came back and with which source address the server
saw each. Bounded: it stops by itself once every reply is in or two seconds pass."""
import json, socket, sys, time

host, port, count, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
seen = {}

def drain():
    while True:
        try:
            data, _ = sock.recvfrom(2048, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        seq, addr = data.decode().split(" ")
        if int(seq) >= 0:
            seen[int(seq)] = addr

# One round trip first, so the flow and the neighbours on the way are established.
# Up to 30 tries: the probe may start while the datapath is still being loaded and
# verified, which on a busy machine takes seconds.
sock.settimeout(1)
for attempt in range(30):
    sock.sendto(b"-1", (host, port))
    try:
        sock.recvfrom(2048)
        break
    except TimeoutError:
        if attempt == 29:
            raise
sock.settimeout(None)

start = time.monotonic()
for seq in range(count):
    sock.sendto(str(seq).encode(), (host, port))
    drain()
    next_at = start + (seq + 1) * interval
    while time.monotonic() < next_at:
        drain()
deadline = time.monotonic() + 2
while len(seen) < count and time.monotonic() < deadline:
    drain()
    time.sleep(0.01)
by_addr = {}
for addr in seen.values():
    by_addr[addr] = by_addr.get(addr, 0) + 1
missing = [s for s in range(count) if s not in seen]
print(json.dumps({"sent": count, "received": len(seen), "by_addr": by_addr, "missing": missing[:20]}))
