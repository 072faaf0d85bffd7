"""Sends a datagram to HOST:PORT every INTERVAL seconds for SECONDS seconds, whether or
not the sender's interface exists: a VM that sends from the moment its tap appears.
Prints how many went out."""
import socket, sys, time

host, port, seconds, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
sent = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"spray", (host, port))
        sent += 1
    except OSError:
        pass
    time.sleep(interval)
print(sent)
