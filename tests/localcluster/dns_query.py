"""Ask a DNS server one question over UDP, as up.sh and smoke.sh check the cluster's CoreDNS (so
that neither needs dig). Standard library only.

    python3 dns_query.py SERVER NAME [TYPE]     TYPE: A (default), AAAA or PTR

Prints the answer's rcode and its records' data, e.g. `NOERROR 10.96.0.1` or `NXDOMAIN`; exits 0
when the server answered NOERROR with at least one record of TYPE, 1 on any other answer, 2 when
none came within 2 s.
"""

from __future__ import annotations

import random
import socket
import struct
import sys

TYPES = {"A": 1, "PTR": 12, "AAAA": 28}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def read_name(message: bytes, pos: int) -> tuple[str, int]:
    """The (possibly compressed) name at `pos`, and the position after it."""
    labels: list[str] = []
    end = None
    while message[pos]:
        if message[pos] >= 0xC0:  # a pointer to the rest of the name
            end = end or pos + 2
            pos = struct.unpack(">H", message[pos : pos + 2])[0] & 0x3FFF
            continue
        labels.append(message[pos + 1 : pos + 1 + message[pos]].decode())
        pos += message[pos] + 1
    return ".".join(labels) + ".", end or pos + 1


def ask(server: str, name: str, qtype: int) -> tuple[str, list[str]]:
    """The rcode of the server's answer and the data of its records of type `qtype`."""
    qid = random.randrange(1 << 16)
    query = struct.pack(">6H", qid, 0x0100, 1, 0, 0, 0)  # recursion desired, one question
    query += b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split("."))
    query += b"\0" + struct.pack(">2H", qtype, 1)  # class IN
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(query, (server, 53))
        while True:
            reply = sock.recv(4096)
            if reply[:2] == query[:2]:
                break
    flags, questions, answers = struct.unpack(">3H", reply[2:8])
    pos = 12
    for _ in range(questions):
        pos = read_name(reply, pos)[1] + 4
    records = []
    for _ in range(answers):
        pos = read_name(reply, pos)[1]
        rtype, _, _, length = struct.unpack(">HHIH", reply[pos : pos + 10])
        pos += 10
        if rtype == qtype == 1:
            records.append(socket.inet_ntop(socket.AF_INET, reply[pos : pos + length]))
        elif rtype == qtype == 28:
            records.append(socket.inet_ntop(socket.AF_INET6, reply[pos : pos + length]))
        elif rtype == qtype == 12:
            records.append(read_name(reply, pos)[0])
        pos += length
    return RCODES.get(flags & 0xF, str(flags & 0xF)), records


def main() -> int:
    if len(sys.argv) not in (3, 4) or (len(sys.argv) == 4 and sys.argv[3] not in TYPES):
        print(__doc__, file=sys.stderr)
        return 2
    server, name = sys.argv[1], sys.argv[2]
    qtype = TYPES[sys.argv[3] if len(sys.argv) == 4 else "A"]
    try:
        rcode, records = ask(server, name, qtype)
    except OSError as error:  # a timeout, or nothing listening
        print(f"no answer from {server}: {error}", file=sys.stderr)
        return 2
    print(" ".join([rcode, *records]))
    return 0 if rcode == "NOERROR" and records else 1


if __name__ == "__main__":
    sys.exit(main())
