# Starts (or stops) the service for scripts/storm.py on a scratch cluster at /tmp/pc, port 55432,
# with pg_stat_statements loaded and a database "storm" (see BENCHMARKS.md, "Reconnect storms").
# usage: scripts/storm-service.sh start RECENT_BYTES | stop   (EVENT_PIPER: the binary)
U="postgres://postgres@localhost:55432/storm?host=/tmp/pc"
BIN=$(realpath "${EVENT_PIPER:-target/release/event-piper}")
mkdir -p /tmp/storm && cd /tmp/storm
if [ "$1" = start ]; then
  setsid "$BIN" --database-url "$U" --listen 127.0.0.1:4600 --recent-bytes $2 --drain-period 0 --max-streams-per-consumer 5000 > svc.log 2>&1 < /dev/null &
  echo $! > svc.pid; for i in $(seq 100); do curl -sf localhost:4600/ready >/dev/null && break; sleep 0.1; done
else
  kill $(cat svc.pid); while kill -0 $(cat svc.pid) 2>/dev/null; do sleep 0.1; done
fi
