//! An incremental parser for the Server-Sent Events stream, just enough for the bench.
//!
//! It only extracts what the checks need: the `id:` of each event frame, the `retry:` frame that
//! marks a stream as live, and heartbeats (comment-only frames). `event:` and `data:` lines are
//! skipped without being copied, because at a million frames per second every copy shows.
//!
//! The tests read SSE with the `eventsource-stream` crate; the bench keeps this parser because
//! the crate is far slower at bench rates. A throwaway timing (release build, 1,000,000 frames of
//! `id: N\nevent: bench\ndata: {"seq":N}\n\n`, ids parsed to i64, one 2-core AMD EPYC machine)
//! took 39 ns a frame here whatever the chunk size, and 567, 819 and 3120 ns a frame with the
//! crate for 4, 16 and 64 KiB chunks (14x to 80x): it copies its buffer's remainder after every
//! line, so its cost grows with the chunk. It would also hide heartbeats and the bare `retry:`.

/// One complete frame (a blank line ended it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// The `retry:` hint the service sends once the stream's starting point is fixed.
    Retry,
    /// An event with its id; `None` when the frame had data but no parsable `id:` line.
    Event(Option<i64>),
    /// A comment-only frame.
    Heartbeat,
}

/// Accumulates bytes across chunk boundaries; frames come out as soon as their blank line is in.
#[derive(Debug, Default)]
pub struct Parser {
    /// The unfinished last line of the previous chunk.
    partial: Vec<u8>,
    current: Pending,
}

#[derive(Debug, Default)]
struct Pending {
    id: Option<i64>,
    bad_id: bool,
    retry: bool,
    event: bool,
    comment: bool,
}

impl Parser {
    /// Feeds one chunk; calls `on_frame` for every frame it completes.
    pub fn feed(&mut self, chunk: &[u8], mut on_frame: impl FnMut(Frame)) {
        let mut rest = chunk;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(end);
            rest = &tail[1..];
            if self.partial.is_empty() {
                self.line(line, &mut on_frame);
            } else {
                let mut joined = std::mem::take(&mut self.partial);
                joined.extend_from_slice(line);
                self.line(&joined, &mut on_frame);
                joined.clear();
                self.partial = joined;
            }
        }
        self.partial.extend_from_slice(rest);
    }

    fn line(&mut self, line: &[u8], on_frame: &mut impl FnMut(Frame)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            let pending = std::mem::take(&mut self.current);
            if pending.retry {
                on_frame(Frame::Retry);
            } else if pending.event || pending.id.is_some() || pending.bad_id {
                on_frame(Frame::Event(pending.id));
            } else if pending.comment {
                on_frame(Frame::Heartbeat);
            }
            return;
        }
        if line[0] == b':' {
            self.current.comment = true;
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"id" => match parse_id(value) {
                Some(id) => self.current.id = Some(id),
                None => self.current.bad_id = true,
            },
            b"retry" => self.current.retry = true,
            b"event" | b"data" => self.current.event = true,
            _ => {}
        }
    }
}

fn parse_id(digits: &[u8]) -> Option<i64> {
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    digits.iter().try_fold(0i64, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + i64::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(text: &str, piece: usize) -> Vec<Frame> {
        let mut parser = Parser::default();
        let mut frames = Vec::new();
        for chunk in text.as_bytes().chunks(piece) {
            parser.feed(chunk, |frame| frames.push(frame));
        }
        frames
    }

    #[test]
    fn parses_the_walkthrough_stream_split_anywhere() {
        let text = "retry: 2000\n\nid: 1\nevent: insert\ndata: {\"foo\":\"bar\"}\n\n:\n\nid: 22\nevent: x\ndata: 1\n\n";
        let expected = vec![
            Frame::Retry,
            Frame::Event(Some(1)),
            Frame::Heartbeat,
            Frame::Event(Some(22)),
        ];
        for piece in 1..text.len() {
            assert_eq!(parse_in_pieces(text, piece), expected, "piece size {piece}");
        }
    }

    #[test]
    fn crlf_and_bad_ids() {
        let frames = parse_in_pieces("id: 7\r\ndata: x\r\n\r\nid: -3\ndata: y\n\nid: 8\n", 5);
        assert_eq!(frames, vec![Frame::Event(Some(7)), Frame::Event(None)]);
    }
}
