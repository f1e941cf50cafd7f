#!/usr/bin/env python3
"""Per-role costs for docs/CAPACITY.md: CPU, bytes and PostgreSQL WAL per event, per node role.

Starts three release nodes in cluster mode on a scratch database and queue prefix (api; worker;
socket with SOCKETS joined clients), posts EVENTS events at RATE/s in batches of 100 to those
connected users (uniform, so a user run is ~1 event), waits until every event is delivered and the
outbox is empty, and prints, per event: each node's CPU time (/proc/<pid>/stat), its bytes read and
written (/proc/<pid>/io rchar/wchar: sockets to clients, PostgreSQL and RabbitMQ), and the WAL the
scratch database wrote (pg_waldump over the window, records of that database only, so other
sessions on the shared PostgreSQL do not count; plus transaction-commit records of the window
shared out by the database's share of the rest). Drops the database and the queues afterwards.

    HERALD=/path/to/release/herald python3 benches/capacity_costs.py [EVENTS] [RATE] [SOCKETS]

Standard library only. Needs PostgreSQL (127.0.0.1:5432, user postgres, trust), RabbitMQ
(guest/guest) and pg_waldump, run as a user that can read PostgreSQL's pg_wal (root).
"""
import base64, http.client, json, os, random, selectors, shutil, socket, subprocess, sys, threading, time

HERALD = os.environ.get("HERALD", "/work/tgt-main/release/herald")
EVENTS = int(sys.argv[1]) if len(sys.argv) > 1 else 60_000
RATE = int(sys.argv[2]) if len(sys.argv) > 2 else 3_000
SOCKETS = int(sys.argv[3]) if len(sys.argv) > 3 else 2_000
TAG = f"cap{os.getpid()}"
DB = f"herald_{TAG}"
PG = "postgres://postgres@127.0.0.1:5432"
WALDUMP = "/usr/lib/postgresql/15/bin/pg_waldump"
PGWAL = "/var/lib/postgresql/15/main/pg_wal"
PORTS = {"api": 4711, "worker": 4712, "socket": 4713}


def psql(sql, db="postgres"):
    return subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-Atc", sql],
                          check=True, capture_output=True, text=True).stdout.strip()


def env(role):
    e = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    e.update({
        "HERALD_DATABASE_URL": f"{PG}/{DB}", "HERALD_AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/%2f",
        "HERALD_QUEUE__PREFIX": TAG, "HERALD_PUBSUB__MODE": "cluster", "HERALD_NODE__ROLES": role,
        "HERALD_NODE__NAME": f"{TAG}-{role}", "HERALD_HTTP_ADDR": f"127.0.0.1:{PORTS[role]}",
        "HERALD_METRICS__PROMETHEUS_ADDR": "", "HERALD_SECRET": SECRET, "HERALD_LOG": "warn",
    })
    return e


def cpu_io(pid):
    stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    ticks = int(stat[11]) + int(stat[12])  # utime + stime
    io = dict(line.split(": ") for line in open(f"/proc/{pid}/io").read().splitlines())
    return ticks / os.sysconf("SC_CLK_TCK"), int(io["rchar"]), int(io["wchar"])


def tcp_bytes(pids):
    """Bytes sent and received per (node pid, peer kind) over its open TCP connections (ss)."""
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True).stdout.splitlines()
    totals = {}
    for head, info in zip(out[::2], out[1::2]):
        pid = next((p for p in pids if f"pid={p}," in head), None)
        if pid is None:
            continue
        local, peer = head.split()[3], head.split()[4]
        kind = {"5432": "postgres", "5672": "rabbitmq"}.get(peer.rsplit(":", 1)[1], "clients")
        fields = dict(f.split(":", 1) for f in info.split() if f.startswith(("bytes_sent:", "bytes_received:")))
        key = (pid, kind, local, peer)
        totals[key] = (int(fields.get("bytes_sent", 0)), int(fields.get("bytes_received", 0)))
    return totals


CONN = {}


def post(path, body, key):
    c = CONN.get(threading.get_ident()) or http.client.HTTPConnection("127.0.0.1", PORTS["api"], timeout=30)
    CONN[threading.get_ident()] = c
    c.request("POST", path, json.dumps(body), {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    if r.status >= 300:
        raise RuntimeError(f"{path}: {r.status} {data[:200]!r}")
    return json.loads(data)


def ws_join(user, token):
    s = socket.create_connection(("127.0.0.1", PORTS["socket"]))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /socket/websocket?token={token}&vsn=2.0.0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert b" 101 " in head.split(b"\r\n")[0], head[:100]
    ws_send(s, json.dumps(["1", "1", f"user:{user}", "phx_join", {}]))
    s.setblocking(False)
    return s


def ws_send(s, text):
    data, mask = text.encode(), os.urandom(4)
    n = len(data)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


def main():
    global SECRET
    work = f"/tmp/{TAG}"
    os.makedirs(work)
    binary = shutil.copy(HERALD, f"{work}/herald")
    SECRET = subprocess.run([binary, "secret"], check=True, capture_output=True, text=True).stdout.strip()
    procs, sockets = [], []
    try:
        subprocess.run([binary, "migrate"], env=env("api"), check=True, capture_output=True)
        out = subprocess.run([binary, "producers", "add", "capacity"], env=env("api"), check=True,
                             capture_output=True, text=True).stdout
        key = next(w for w in out.split() if len(w) > 30)
        for role in ("api", "worker", "socket"):
            procs.append(subprocess.Popen([binary, "serve"], env=env(role), stdout=open(f"{work}/{role}.log", "w"),
                                          stderr=subprocess.STDOUT))
            for _ in range(100):
                try:
                    c = http.client.HTTPConnection("127.0.0.1", PORTS[role], timeout=2)
                    c.request("GET", "/readyz")
                    if c.getresponse().status == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
        users = [f"c{i}" for i in range(SOCKETS)]
        for u in users:
            sockets.append(ws_join(u, post("/api/v1/tokens", {"user_id": u}, key)["token"]))
        stop = threading.Event()
        received = [0]

        def drain():
            hb, sel = time.time(), selectors.DefaultSelector()
            for s in sockets:
                sel.register(s, selectors.EVENT_READ)
            while not stop.is_set():
                for k, _ in sel.select(0.2):
                    s = k.fileobj
                    try:
                        received[0] += len(s.recv(65536))
                    except BlockingIOError:
                        pass
                if time.time() - hb > 20:
                    hb = time.time()
                    for s in sockets:
                        try:
                            ws_send(s, '[null,"hb","phoenix","heartbeat",{}]')
                        except OSError:
                            pass

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        time.sleep(3)  # joins answered and bound
        dboid = psql(f"SELECT oid FROM pg_database WHERE datname = '{DB}'")
        pids = {role: p.pid for role, p in zip(("api", "worker", "socket"), procs)}
        before = {r: cpu_io(pid) for r, pid in pids.items()}
        net0 = tcp_bytes(pids.values())
        # a physical slot keeps the window's WAL from being recycled by a checkpoint (other sessions'
        # CREATE DATABASE forces them) before pg_waldump has read it
        psql(f"SELECT pg_create_physical_replication_slot('{TAG}', true)")
        lsn0, t0 = psql("SELECT pg_current_wal_lsn()"), time.time()
        body = "x" * 100
        sent = 0
        while sent < EVENTS:
            due = min(EVENTS, int((time.time() - t0) * RATE) + 100)
            while sent + 100 <= due:
                post("/api/v1/events/batch", {"events": [
                    {"user_id": random.choice(users), "data": {"title": "capacity", "body": body}}
                    for _ in range(100)]}, key)
                sent += 100
            time.sleep(0.01)
        t_sent = time.time()
        while True:
            left = psql("SELECT (SELECT count(*) FROM events WHERE status NOT IN ('delivered','failed'))"
                        " + (SELECT count(*) FROM outbox)", DB)
            if left == "0":
                break
            time.sleep(0.2)
        t1 = time.time()
        lsn1 = psql("SELECT pg_current_wal_lsn()")
        after = {r: cpu_io(pid) for r, pid in pids.items()}
        net1 = tcp_bytes(pids.values())
        net = {}
        for k, (sent1, recv1) in net1.items():
            sent0, recv0 = net0.get(k, (0, 0))
            role = next(r for r, p in pids.items() if p == k[0])
            t = net.setdefault((role, k[1]), [0, 0])
            t[0] += sent1 - sent0
            t[1] += recv1 - recv0
        stop.set()
        time.sleep(1)  # the end of the window flushed
        dumped = subprocess.run([WALDUMP, "-p", PGWAL, "-s", lsn0, "-e", lsn1], capture_output=True, text=True)
        dump = dumped.stdout
        if not dump:
            print("pg_waldump:", dumped.stderr.strip()[:300])
        ours = other = commits = 0
        for line in dump.splitlines():
            if "tot):" not in line:
                continue
            size = int(line.split("tot):")[1].split("/")[1].split(",")[0])
            if f"/{dboid}/" in line:
                ours += size
            elif line.lstrip().startswith("rmgr: Transaction"):
                commits += size
            else:
                other += size
        psql(f"SELECT pg_drop_replication_slot('{TAG}')")
        wal = ours + commits * ours / max(1, ours + other)
        stats = psql("SELECT count(*), sum(push_count), pg_total_relation_size('events') FROM events", DB).split("|")
        print(f"events {EVENTS} at {RATE}/s to {SOCKETS} joined users; posted in {t_sent - t0:.1f} s, "
              f"all delivered after {t1 - t0:.1f} s; pushes {stats[1]}; client bytes received {received[0]:,}")
        for role in pids:
            (c0, r0, w0), (c1, r1, w1) = before[role], after[role]
            flows = ", ".join(f"{kind} {net[(r, kind)][0] / EVENTS:.0f} out / {net[(r, kind)][1] / EVENTS:.0f} in"
                              for r, kind in sorted(net) if r == role)
            print(f"  {role:6} CPU {1e6 * (c1 - c0) / EVENTS:6.1f} us/event; TCP bytes/event: {flows}")
        print(f"  WAL of {DB}: {wal / EVENTS:.0f} B/event ({ours:,} B of its records + {commits * ours / max(1, ours + other):,.0f} B "
              f"commit records pro rata; the rest of the cluster wrote {other:,} B meanwhile)")
        print(f"  events table with indexes and TOAST: {int(stats[2]) / EVENTS:.0f} B/event")
    finally:
        for s in sockets:
            s.close()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        subprocess.run([binary, "destroy", "--yes"], env=env("api"), capture_output=True)
        psql(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{TAG}'")
        psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
