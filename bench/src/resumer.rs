//! The reconnect-storm client (scenario `storm`): streams that go live, remember the id of the
//! last event they saw, close, and come back with it as `Last-Event-ID`; each resumed stream
//! checks that it then receives exactly the events it missed, once, in order, and notes when it
//! had them all (its catch-up time, from the moment the storm's first request was sent).
//!
//! It reads SSE with a small reader of its own rather than sse.rs, because the check needs what
//! that parser skips for speed: the `id:` as text (Nchan's ids are `time:tag`, not numbers, and
//! go back verbatim in `Last-Event-ID`) and the `data:` (Nchan's ids do not tell the order the
//! bench published in, so its events carry their sequence number in the data). A storm is a few
//! tens of thousands of frames: the reader's cost does not show.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use http_body_util::BodyExt;
use tokio::sync::{Notify, Semaphore, watch};

use crate::client;

/// One complete SSE frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// An event: its `id:` (if any) and its `data:` lines joined with `\n`.
    Event { id: Option<String>, data: String },
    /// A frame with a `retry:` field and no data (event-piper's "you are live").
    Retry,
    /// A comment-only frame (Nchan's `: hi` on subscribe, heartbeats).
    Comment,
}

/// An SSE reader that keeps ids and data as text, across chunk boundaries.
#[derive(Debug, Default)]
pub struct Reader {
    line: Vec<u8>,
    id: Option<String>,
    data: Option<String>,
    retry: bool,
    comment: bool,
}

impl Reader {
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<Frame>) {
        for &byte in chunk {
            if byte == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.end_line(&line, out);
                self.line = line;
                self.line.clear();
            } else {
                self.line.push(byte);
            }
        }
    }

    fn end_line(&mut self, line: &[u8], out: &mut Vec<Frame>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            let id = self.id.take();
            let data = self.data.take();
            let (retry, comment) = (
                std::mem::take(&mut self.retry),
                std::mem::take(&mut self.comment),
            );
            match data {
                Some(data) => out.push(Frame::Event { id, data }),
                None if retry => out.push(Frame::Retry),
                None if id.is_some() => out.push(Frame::Event {
                    id,
                    data: String::new(),
                }),
                None if comment => out.push(Frame::Comment),
                None => {}
            }
            return;
        }
        if line[0] == b':' {
            self.comment = true;
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        let text = String::from_utf8_lossy(value);
        match field {
            b"id" => self.id = Some(text.into_owned()),
            b"data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(&text);
                }
                None => self.data = Some(text.into_owned()),
            },
            b"retry" => self.retry = true,
            _ => {}
        }
    }
}

/// Where a stream is read from.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
    pub headers: Vec<(&'static str, String)>,
}

/// What identifies an event for the check (the expected lists hold the same keys, ascending).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFrom {
    /// The numeric `id:` (event-piper: the row's id).
    Id,
    /// `data: s=N`, the bench's own sequence number (Nchan, whose ids are its own).
    DataSeq,
}

impl KeyFrom {
    fn key(self, id: Option<&str>, data: &str) -> Option<i64> {
        match self {
            KeyFrom::Id => id?.parse().ok(),
            KeyFrom::DataSeq => data.strip_prefix("s=")?.parse().ok(),
        }
    }
}

/// Counts arrivals and wakes one waiter when all `total` have arrived.
pub struct Gate {
    count: AtomicUsize,
    total: usize,
    notify: Notify,
}

impl Gate {
    pub fn new(total: usize) -> Arc<Gate> {
        Arc::new(Gate {
            count: AtomicUsize::new(0),
            total,
            notify: Notify::new(),
        })
    }

    pub fn arrive(&self) {
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.total {
            self.notify.notify_one();
        }
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Waits until every arrival is in, at most `timeout`. True if they all were.
    pub async fn wait(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.count() < self.total {
            if tokio::time::timeout_at(deadline, self.notify.notified())
                .await
                .is_err()
            {
                return self.count() >= self.total;
            }
        }
        true
    }
}

/// The live phase of one stream: opens it (holding a `connecting` permit until it is live),
/// reports it live (`retry:` or a comment, whichever comes first), waits for its first event (the
/// seed), reports that, and holds the stream until `stop`. Returns the seed's id, the
/// `Last-Event-ID` the stream will come back with. Any other event is an error.
pub async fn go_live(
    target: Target,
    connecting: Arc<Semaphore>,
    live: Arc<Gate>,
    seeded: Arc<Gate>,
    mut stop: watch::Receiver<bool>,
    deadline: Instant,
) -> Result<String> {
    let permit = connecting.acquire_owned().await?;
    let headers: Vec<(&str, &str)> = target.headers.iter().map(|(k, v)| (*k, &**v)).collect();
    let timeout = deadline.saturating_duration_since(Instant::now());
    let mut open = tokio::time::timeout(timeout, client::get(target.addr, &target.path, &headers))
        .await
        .map_err(|_| anyhow::anyhow!("no response before the deadline"))??;
    ensure!(
        open.response.status().is_success(),
        "GET {} answered {}",
        target.path,
        open.response.status()
    );
    let mut permit = Some(permit);
    let mut seed: Option<String> = None;
    let (mut reader, mut frames) = (Reader::default(), Vec::new());
    let body = open.response.body_mut();
    let deadline = tokio::time::Instant::from_std(deadline);
    loop {
        let frame = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => break,
            _ = tokio::time::sleep_until(deadline) => bail!("still open at the deadline"),
            frame = body.frame() => frame,
        };
        let Some(frame) = frame else {
            bail!("the server ended the stream in the live phase");
        };
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        reader.feed(&data, &mut frames);
        for frame in frames.drain(..) {
            match frame {
                Frame::Retry | Frame::Comment => {
                    if permit.take().is_some() {
                        live.arrive();
                    }
                }
                Frame::Event { id, data } => {
                    if seed.is_some() {
                        bail!("a second event before the storm: {data:?}");
                    }
                    let Some(id) = id else {
                        bail!("the seed event has no id");
                    };
                    if permit.take().is_some() {
                        live.arrive();
                    }
                    seed = Some(id);
                    seeded.arrive();
                }
            }
        }
    }
    seed.ok_or_else(|| anyhow::anyhow!("stopped before the seed event arrived"))
}

/// What one resumed stream got.
#[derive(Debug, Default, Clone)]
pub struct Resumed {
    /// When its request started being sent (connect), after the storm's start.
    pub sent: Duration,
    /// When its response head was in.
    pub head: Option<Duration>,
    /// When it had every missed event.
    pub caught_up: Option<Duration>,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Events not among the missed ones (or without a readable key).
    pub unexpected: u64,
    pub error: Option<String>,
}

/// The storm phase of one stream: reconnects with `Last-Event-ID: resume_from` (the header is
/// added here), checks each event against `expected` (ascending keys) and records when the last
/// of them arrived, relative to `start`. Reads on until `stop`, to catch anything extra.
///
/// With `connecting`, the request waits for a permit first and holds it until its response head
/// is in: the storm is then at most that many reconnects in flight instead of all at once.
#[allow(clippy::too_many_arguments)]
pub async fn resume(
    target: Target,
    resume_from: String,
    key: KeyFrom,
    expected: Arc<[i64]>,
    start: Instant,
    caught_up: Arc<Gate>,
    connecting: Option<Arc<Semaphore>>,
    stop: watch::Receiver<bool>,
    deadline: Instant,
) -> Resumed {
    let permit = match connecting {
        Some(connecting) => connecting.acquire_owned().await.ok(),
        None => None,
    };
    let mut out = Resumed {
        sent: start.elapsed(),
        ..Resumed::default()
    };
    let mut check = Check::new(expected.len());
    let result = resumed(
        &target,
        &resume_from,
        key,
        &expected,
        start,
        &caught_up,
        stop,
        deadline,
        &mut out,
        &mut check,
        permit,
    )
    .await;
    if let Err(error) = result {
        out.error = Some(format!("{error:#}"));
    }
    out.lost = (expected.len() - check.distinct) as u64;
    out
}

#[allow(clippy::too_many_arguments)]
async fn resumed(
    target: &Target,
    resume_from: &str,
    key: KeyFrom,
    expected: &[i64],
    start: Instant,
    caught_up: &Gate,
    mut stop: watch::Receiver<bool>,
    deadline: Instant,
    out: &mut Resumed,
    check: &mut Check,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<()> {
    let mut headers: Vec<(&str, &str)> = target.headers.iter().map(|(k, v)| (*k, &**v)).collect();
    headers.push(("last-event-id", resume_from));
    let timeout = deadline.saturating_duration_since(Instant::now());
    let mut open = tokio::time::timeout(timeout, client::get(target.addr, &target.path, &headers))
        .await
        .map_err(|_| anyhow::anyhow!("no response before the deadline"))??;
    out.head = Some(start.elapsed());
    drop(permit);
    ensure!(
        open.response.status().is_success(),
        "GET {} answered {}",
        target.path,
        open.response.status()
    );
    let (mut reader, mut frames) = (Reader::default(), Vec::new());
    let body = open.response.body_mut();
    let deadline = tokio::time::Instant::from_std(deadline);
    loop {
        let frame = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => return Ok(()),
            _ = tokio::time::sleep_until(deadline) => return Ok(()),
            frame = body.frame() => frame,
        };
        let Some(frame) = frame else {
            bail!("the server ended the resumed stream");
        };
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        reader.feed(&data, &mut frames);
        for frame in frames.drain(..) {
            let Frame::Event { id, data } = frame else {
                continue;
            };
            out.received += 1;
            match key
                .key(id.as_deref(), &data)
                .map(|k| expected.binary_search(&k))
            {
                Some(Ok(index)) => check.observe(index, out),
                _ => out.unexpected += 1,
            }
            if check.distinct == expected.len() && out.caught_up.is_none() {
                out.caught_up = Some(start.elapsed());
                caught_up.arrive();
            }
        }
    }
}

/// Which of the expected events a stream has had, and the highest it had in order.
struct Check {
    seen: Vec<bool>,
    distinct: usize,
    highest: Option<usize>,
}

impl Check {
    fn new(expected: usize) -> Check {
        Check {
            seen: vec![false; expected],
            distinct: 0,
            highest: None,
        }
    }

    fn observe(&mut self, index: usize, out: &mut Resumed) {
        if std::mem::replace(&mut self.seen[index], true) {
            out.duplicates += 1;
            return;
        }
        self.distinct += 1;
        match self.highest {
            Some(highest) if index < highest => out.out_of_order += 1,
            _ => self.highest = Some(index),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ids_and_data_split_anywhere() {
        let text = ": hi\n\nretry: 2000\n\nid: 1796298460:0\ndata: s=0\n\nid: 7\r\nevent: x\r\ndata: a\r\ndata: b\r\n\r\n";
        for piece in 1..text.len() {
            let (mut reader, mut frames) = (Reader::default(), Vec::new());
            for chunk in text.as_bytes().chunks(piece) {
                reader.feed(chunk, &mut frames);
            }
            assert_eq!(
                frames,
                vec![
                    Frame::Comment,
                    Frame::Retry,
                    Frame::Event {
                        id: Some("1796298460:0".into()),
                        data: "s=0".into()
                    },
                    Frame::Event {
                        id: Some("7".into()),
                        data: "a\nb".into()
                    },
                ],
                "piece size {piece}"
            );
        }
    }

    #[test]
    fn counts_repeats_and_late_arrivals() {
        let mut out = Resumed::default();
        let mut check = Check::new(4);
        for index in [0, 2, 1, 2, 3] {
            check.observe(index, &mut out);
        }
        assert_eq!(
            (check.distinct, out.duplicates, out.out_of_order),
            (4, 1, 1)
        );
        assert_eq!(KeyFrom::DataSeq.key(Some("1:2"), "s=12"), Some(12));
        assert_eq!(KeyFrom::Id.key(Some("42"), "{}"), Some(42));
        assert_eq!(KeyFrom::Id.key(None, "{}"), None);
    }
}
