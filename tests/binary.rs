//! The binary as a user runs it: no database configured (it manages its own PostgreSQL), then
//! SIGTERM: open streams end, the managed PostgreSQL stops, the process exits 0.

mod common;

use std::ffi::OsStr;
use std::process::Command;

use common::PATIENCE;
use common::process::ServiceProcess;
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_with_its_own_postgres_and_shuts_down_cleanly_on_sigterm() {
    let data_dir = std::env::temp_dir().join(format!("event-piper-binary-{}", std::process::id()));
    let mut process = ServiceProcess::start(None, [OsStr::new("--data-dir"), data_dir.as_os_str()]);
    // The psql command goes to stdout, the bound address to the log on stderr.
    let psql = process.printed(|line| line.trim().strip_prefix("psql ").map(str::to_owned));
    let app_base = process.base.clone();

    // The printed command works as a producer's connection string.
    let producer = common::connect(&psql).await;
    process.wait_until_ready().await;
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

    process.terminate();
    let end = tokio::time::timeout(PATIENCE, async {
        while let Some(chunk) = body.next().await {
            chunk.expect("the stream ends cleanly");
        }
    });
    end.await.expect("the open stream ends on shutdown");

    let status = process.wait_for_exit();
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
