"""Receives uploads: every TCP connection's stream, up to the sender's close, is summed
with SHA-256 and one line "tcp SHA256 BYTES FROM" is printed per upload. Listens on IPv4
and IPv6; stops after the given number of seconds."""
import hashlib, socket, sys, threading

port, seconds = int(sys.argv[1]), float(sys.argv[2])


def receive(conn, addr):
    h, n = hashlib.sha256(), 0
    with conn:
        while True:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
    print("tcp", h.hexdigest(), n, addr[0], flush=True)


def serve():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(8)
    while True:
        conn, addr = s.accept()
        threading.Thread(target=receive, args=(conn, addr), daemon=True).start()


threading.Thread(target=serve, daemon=True).start()
threading.Event().wait(seconds)
