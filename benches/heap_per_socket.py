#!/usr/bin/env python3
"""Live heap per socket, by call stack, from a heaptrack recording (BENCHMARKS.md, *Memory per socket*).

Record a node holding N idle sockets and kill it while they are open, so every allocation still live
is reported as leaked with its stack (heaptrack 1.4 here; `apt-get install heaptrack`):

    heaptrack -o /tmp/node target/release/herald serve   # then join N sockets, then kill -9 the node
    heaptrack_print -f /tmp/node.zst -m 0 --print-leaks 1 --print-peaks 0 \\
        --print-allocators 0 --print-temporary 0 -n 80 > /tmp/leaks.txt
    benches/heap_per_socket.py /tmp/leaks.txt 10000

Prints, per stack, the bytes per socket, the allocations and their size, and the first frames that
are not the standard library: the sizes say what each one is (4,096: a read buffer; the task's size
in -Zprint-type-sizes: a connection task).
"""
import re
import sys


def size(text):
    number, unit = re.match(r"([\d.]+)([KMG]?)", text).groups()
    return float(number) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[unit]


def main():
    path, sockets = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    entries = re.split(r"\n(?=\S[^\n]* leaked over \d+ calls from)", open(path).read())
    rows = []
    for entry in entries:
        head = re.match(r"(\S+) leaked over (\d+) calls from", entry)
        if not head:
            continue
        frames = []
        for name, at in re.findall(r"\n  (\S[^\n]*)\n    at ([^\n]+)", entry):
            at = re.sub(r".*/registry/src/index\.crates\.io-[0-9a-f]+/", "", at)
            if at.startswith(("/rustc/", "library/")):
                continue
            frames.append(f"{name.split('<')[0][:30]}@{at}")
        rows.append((size(head.group(1)), int(head.group(2)), frames))
    total = sum(r[0] for r in rows)
    print(f"live heap {total / 1e6:.1f} MB, the node's own included: {total / sockets:.0f} bytes per socket")
    for live, calls, frames in rows[:top]:
        print(f"{live / sockets:8.1f} B/socket {calls:7d} allocations of {live / calls:7.0f} B | "
              + " < ".join(frames[:6]))


if __name__ == "__main__":
    main()
