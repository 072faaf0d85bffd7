"""Outside: answers each line of a TCP connection with the address the connection
came from and the line, so a client can see which address a long-lived connection
used at each moment."""
import socket
import sys
import threading


def serve(conn, peer):
    with conn, conn.makefile("rwb", buffering=0) as f:
        for line in f:
            f.write(peer.encode() + b" " + line)


def main():
    port = int(sys.argv[1])
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)
    while True:
        conn, (peer, _) = srv.accept()
        threading.Thread(target=serve, args=(conn, peer), daemon=True).start()


main()
