# Phone home over TCP and UDP to a port on the loopback interface.
import socket

PORT = __PORT__


def transform(grid):
    sent = []
    try:
        with socket.create_connection(("127.0.0.1", PORT), timeout=0.3) as conn:
            conn.sendall(b"leak")
            sent.append("tcp")
    except Exception:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"leak", ("127.0.0.1", PORT))
            sent.append("udp")
    except Exception:
        pass
    if sent:
        return [[1]]
    raise ConnectionError("no packet left")
