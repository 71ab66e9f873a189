#!/usr/bin/env python3
"""lockbytes.py FILE: the byte-range locks anyone holds on FILE, as "100-101 103 201 203".

Asked byte by byte with F_OFD_GETLK from a fresh open file description, as QEMU's
raw_check_lock_bytes asks. Not read from /proc/locks: that seq_file is walked by index
across read() calls, so an entry can be skipped while other processes release locks.
Every lock found must be a shared (read) lock, as QEMU's are.
"""
import fcntl
import os
import struct
import sys

FLOCK = "hhqqi4x"  # struct flock on Linux x86-64/aarch64: type, whence, start, len, pid


def main():
    fd = os.open(sys.argv[1], os.O_RDONLY)
    held = []
    for byte in range(512):
        req = struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
        typ = struct.unpack(FLOCK, fcntl.fcntl(fd, fcntl.F_OFD_GETLK, req))[0]
        if typ == fcntl.F_UNLCK:
            continue
        if typ != fcntl.F_RDLCK:
            sys.exit(f"lockbytes: byte {byte} holds an exclusive lock")
        if held and held[-1][1] + 1 == byte:
            held[-1][1] = byte
        else:
            held.append([byte, byte])
    print(" ".join(str(a) if a == b else f"{a}-{b}" for a, b in held))


main()
