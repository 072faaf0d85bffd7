"""Answers every datagram with its payload and the address it came from."""
import socket, sys

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, (addr, port) = sock.recvfrom(2048)
    sock.sendto(data + b" " + addr.encode(), (addr, port))
