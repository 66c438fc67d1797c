# A deploy, checked from outside: N streams on instance A (one consumer each), producers writing
# throughout, SIGTERM to A; every stream that A ends resumes on instance B with its last id.
# Prints how A's stream ends spread over time, and whether every consumer got exactly its events
# (its own and the broadcasts after the start), once, in order.
# usage: python3 scripts/drain.py A_PID A_PORT B_PORT N   (services: see BENCHMARKS.md, "Deploys")
import asyncio, os, resource, signal, subprocess, sys, time
_s, _h = resource.getrlimit(resource.RLIMIT_NOFILE); resource.setrlimit(resource.RLIMIT_NOFILE, (_h, _h))
PSQL = ["psql", "-h", "/tmp/pc", "-p", "55432", "-U", "postgres", "-d", "storm", "-qAt", "-c"]
def sql(q): return subprocess.run(PSQL + [q], capture_output=True, text=True, check=True).stdout.strip()
A_PID, A, B, N = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ends, got, marker = [], {}, asyncio.Event()
last_id = [None]

async def stream(port, consumer, after):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET /events HTTP/1.1\r\nHost: x\r\nX-Consumer-Id: {consumer}\r\nLast-Event-ID: {after}\r\n\r\n".encode())
    await w.drain()
    return r, w

async def client(consumer, base, opened):
    ids = got.setdefault(consumer, [])
    r, w = await stream(A, consumer, base)
    opened.append(1)
    port, buf = A, b""
    while True:
        chunk = await r.read(65536)
        if not chunk:
            if port == B: raise RuntimeError(f"{consumer}: B ended the stream")
            ends.append(time.monotonic())
            w.close()
            r, w = await stream(B, consumer, ids[-1] if ids else base)
            port, buf = B, b""
            continue
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.startswith(b"id: "):
                ids.append(int(line[4:]))
                if last_id[0] is not None and ids[-1] >= last_id[0]:
                    w.close(); return

async def produce(stop):
    while not stop.is_set():
        await asyncio.to_thread(sql, f"INSERT INTO events (type, subscriber, payload) SELECT 'deploy', 'd-' || (random() * {N - 1})::int, '{{}}' FROM generate_series(1, 50)")
        await asyncio.sleep(0.1)

async def main():
    base = int(sql("SELECT coalesce(max(id), 0) FROM events"))
    opened = []
    tasks = [asyncio.create_task(client(f"d-{i}", base, opened)) for i in range(N)]
    while len(opened) < N: await asyncio.sleep(0.1)
    await asyncio.sleep(1)
    stop = asyncio.Event(); producer = asyncio.create_task(produce(stop))
    await asyncio.sleep(2)
    t0 = time.monotonic(); os.kill(A_PID, signal.SIGTERM)
    while len(ends) < N: await asyncio.sleep(0.1)
    await asyncio.sleep(2)
    stop.set(); await producer
    last_id[0] = int(sql("INSERT INTO events (type, payload) VALUES ('last', '{}') RETURNING id"))
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    rel = sorted(e - t0 for e in ends)
    per_s = {}
    for e in rel: per_s[int(e)] = per_s.get(int(e), 0) + 1
    wrong = 0
    for consumer, ids in got.items():
        want = [int(x) for x in sql(f"SELECT id FROM events WHERE id > {base} AND (subscriber = '{consumer}' OR (subscriber IS NULL AND topics IS NULL)) ORDER BY id").split()]
        wrong += ids != want
    total = int(sql(f"SELECT count(*) FROM events WHERE id > {base}"))
    print(f"{N} streams on A; SIGTERM; first end {rel[0]*1000:.0f} ms, last {rel[-1]*1000:.0f} ms after it; ends per second: {dict(sorted(per_s.items()))}")
    print(f"events written meanwhile {total}; consumers with other than exactly their events in order: {wrong}")
asyncio.run(main())
