"""Sends COUNT TCP SYNs to DST, each from another source in 198.19.0.0/16 (the
benchmarking range) and to another port from 1000 up: a scan from spoofed, rotating
sources. Prints how many were sent."""
import socket, struct, sys

dst, count = sys.argv[1], int(sys.argv[2])


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
daddr = socket.inet_aton(dst)
sent = 0
for i in range(count):
    saddr = socket.inet_aton("198.19.%d.%d" % (i // 250, i % 250 + 1))
    sport, dport = 40000 + i % 20000, 1000 + i % 1000
    tcp = struct.pack("!HHIIBBHHH", sport, dport, i, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = saddr + daddr + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), i & 0xFFFF, 0, 64, 6, 0, saddr, daddr)
    sock.sendto(ip + tcp, (dst, 0))
    sent += 1
print(sent)
