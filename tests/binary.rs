//! The binary as a user runs it: no database configured (it manages its own PostgreSQL), then
//! SIGTERM: open streams end, the managed PostgreSQL stops, the process exits 0.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::PATIENCE;
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_with_its_own_postgres_and_shuts_down_cleanly_on_sigterm() {
    let data_dir = std::env::temp_dir().join(format!("event-piper-binary-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_event-piper"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data_dir)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting event-piper");

    // The psql command goes to stdout, the bound address to the log on stderr.
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let psql = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.trim().strip_prefix("psql ").map(str::to_owned))
        .expect("the psql command is printed");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let address = loop {
        let line = lines_rx
            .recv_timeout(PATIENCE)
            .expect("the service logs its address");
        if let Some(rest) = line.split("address=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let app_base = format!("http://{address}");

    // The printed command works as a producer's connection string.
    let producer = common::connect(&psql).await;
    let ready = async {
        while !reqwest::get(format!("{app_base}/ready"))
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(PATIENCE, ready).await.expect("ready");
    let response = reqwest::Client::new()
        .get(format!("{app_base}/events"))
        .header("X-Consumer-Id", "toto")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    producer
        .batch_execute(
            "insert into events (type, timestamp, subscriber, payload) \
             values ('insert', now(), 'toto', '{\"foo\": \"bar\"}');",
        )
        .await
        .unwrap();

    let mut body = response.bytes_stream();
    let mut received = String::new();
    let frame = "id: 1\nevent: insert\ndata: {\"foo\":\"bar\"}\n\n";
    while !received.contains(frame) {
        let chunk = tokio::time::timeout(PATIENCE, body.next())
            .await
            .expect("the event arrives")
            .expect("the stream is open")
            .unwrap();
        received.push_str(std::str::from_utf8(&chunk).unwrap());
    }

    // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let end = tokio::time::timeout(PATIENCE, async {
        while let Some(chunk) = body.next().await {
            chunk.expect("the stream ends cleanly");
        }
    });
    end.await.expect("the open stream ends on shutdown");

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < PATIENCE, "event-piper did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    assert!(
        !data_dir.join("postmaster.pid").exists(),
        "the managed PostgreSQL was stopped"
    );
    assert!(data_dir.join("PG_VERSION").exists(), "its data is kept");
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// `--dump-config` prints the effective configuration as JSON and exits without starting
/// anything: secrets from the environment and the command line masked, durations in
/// milliseconds.
#[test]
fn dump_config_prints_the_configuration_with_secrets_masked() {
    let output = Command::new(env!("CARGO_BIN_EXE_event-piper"))
        .args(["--dump-config", "--retention", "7d", "--heartbeat", "1.5s"])
        .env("DATABASE_URL", "postgres://u:hunter2@db:5432/x")
        .env("EVENT_PIPER_JWT_SECRET", "0123456789abcdef0123456789abcdef")
        .output()
        .expect("running event-piper --dump-config");
    assert!(output.status.success(), "exit status {}", output.status);
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(!text.contains("hunter2") && !text.contains("0123456789abcdef"));
    let dump: serde_json::Value = serde_json::from_str(&text).expect("the dump is JSON");
    assert_eq!(dump["database_url"], "postgres://u:***@db:5432/x");
    assert_eq!(dump["jwt_secret"], "***");
    assert_eq!(dump["retention"], "604800000ms");
    assert_eq!(dump["heartbeat"], "1500ms");
    assert_eq!(dump["listen"], "127.0.0.1:4000");
    assert!(dump.get("dump_config").is_none() && dump.get("command").is_none());
}
