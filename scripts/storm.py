# A reconnect storm, checked from outside: N streams resume at once with Last-Event-ID, each 10
# events behind; prints when the last caught up (timed by this Python client, so not a service
# figure), how many streams got other than exactly their events in order, and the statements the
# database ran meanwhile (pg_stat_statements). Stand-in until the bench has a storm scenario.
# usage: python3 scripts/storm.py PORT many|one N   (cluster and service: scripts/storm-service.sh)
import asyncio, subprocess, sys, time, resource
_s,_h=resource.getrlimit(resource.RLIMIT_NOFILE); resource.setrlimit(resource.RLIMIT_NOFILE, (_h, _h))
import os
PSQL = ["psql", "-h", "/tmp/pc", "-p", "55432", "-U", "postgres", "-d", "storm", "-At", "-c"]
def sql(q): return subprocess.run(PSQL + [q], capture_output=True, text=True, check=True).stdout.strip()
PORT = int(sys.argv[1]); MODE = sys.argv[2]; N = int(sys.argv[3]); BEHIND = 10

async def resume(consumer, last, want):
    r, w = await asyncio.open_connection("127.0.0.1", PORT)
    w.write(f"GET /events HTTP/1.1\r\nHost: x\r\nX-Consumer-Id: {consumer}\r\nLast-Event-ID: {last}\r\n\r\n".encode())
    await w.drain()
    ids = []
    buf = b""
    while len(ids) < want:
        chunk = await r.read(65536)
        if not chunk: raise RuntimeError("ended")
        buf += chunk
        *lines, buf = buf.split(b"\n")
        ids += [int(l[4:]) for l in lines if l.startswith(b"id: ")]
    w.close()
    return ids

async def main():
    base = int(sql("SELECT coalesce(max(id),0) FROM events"))
    if MODE == "many":
        consumers = [f"s-{i}" for i in range(N)]
        sql(f"INSERT INTO events (type, subscriber, payload) SELECT 'storm', 's-' || (g % {N}), '{{}}' FROM generate_series(0, {N*BEHIND}-1) g")
    else:
        consumers = ["one"] * N
        sql(f"INSERT INTO events (type, subscriber, payload) SELECT 'storm', 'one', '{{}}' FROM generate_series(1, {BEHIND})")
    await asyncio.sleep(1.5)
    if os.environ.get("RESTART"):
        subprocess.run(os.environ["RESTART"], shell=True, check=True)
    sql("SELECT pg_stat_statements_reset()")
    t0 = time.monotonic()
    results = await asyncio.gather(*(resume(c, base, BEHIND) for c in consumers))
    elapsed = time.monotonic() - t0
    time.sleep(0.5)
    stats = sql("SELECT coalesce(sum(calls),0) FROM pg_stat_statements WHERE query NOT ILIKE '%pg_stat_statements%'")
    top = sql("SELECT calls, left(regexp_replace(query, '\\s+', ' ', 'g'), 90) FROM pg_stat_statements WHERE query NOT ILIKE '%pg_stat_statements%' ORDER BY calls DESC LIMIT 4")
    bad = sum(1 for ids in results if len(ids) != BEHIND or ids != sorted(set(ids)) or min(ids) <= base)
    print(f"{MODE} {N} resumes x {BEHIND} behind: last caught up after {elapsed*1000:.0f} ms (python client), statements {stats}, bad streams {bad}")
    print(top)
asyncio.run(main())
