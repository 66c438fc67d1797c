//! Following one selection (a consumer, topics, or both: [`crate::selection`]): every event it
//! selects and may read, in id order, each exactly once, first from the table and then live from
//! the hub. SSE streams follow their selections this way; anything else that delivers a
//! consumer's events should too.
//!
//! The hand-over never loses or repeats an event:
//! 1. subscribe to the selection's live channel (from now on its frames queue there);
//! 2. read the hub's published id P: every event at or below it is final in the table;
//! 3. replay `(cursor, P]` from the table in keyset pages, one page per call, so that a slow
//!    client holds one page at a time whatever the history;
//! 4. go live, dropping every frame at or below the cursor (the replay covered it).
//!
//! A lag (the live channel overwrote frames the follower had not taken) goes back to step 2 from
//! the cursor. [`Position`] is that walk without I/O, unit-tested transition by transition;
//! [`Follower`] drives it with the table and the channel.

use std::sync::Arc;

use tokio::sync::watch;

use crate::channel::RecvError;
use crate::event::{EventId, EventRow};
use crate::hub::Published;
use crate::recent::Recent;
use crate::replay_reads::ReplayReads;
use crate::router::{Refused, Router, Subscription};
use crate::selection::Reader;
use crate::sse::Frame;
use crate::store::{Store, StoreError};

/// Where a follower stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Every event at or below it was handed out, or came before the start.
    cursor: EventId,
    /// While replaying: the end of the replay, the hub's published id when it began.
    replay_upto: Option<EventId>,
}

impl Position {
    /// Starts after `after` (a resume point), or live from `published` when there is none.
    pub fn new(after: Option<EventId>, published: EventId) -> Position {
        let mut position = Position {
            cursor: after.unwrap_or(published),
            replay_upto: None,
        };
        position.replay_to(published);
        position
    }

    pub fn cursor(&self) -> EventId {
        self.cursor
    }

    pub fn is_live(&self) -> bool {
        self.replay_upto.is_none()
    }

    /// The next page to read from the table, `(after, upto]`; None when live.
    pub fn page(&self) -> Option<(EventId, EventId)> {
        self.replay_upto.map(|upto| (self.cursor, upto))
    }

    /// A replay page came back: `last` is its last id, and `complete` says it was shorter than
    /// asked for, so nothing is left up to the end of the replay.
    pub fn replayed(&mut self, last: Option<EventId>, complete: bool) {
        let Some(upto) = self.replay_upto else {
            return;
        };
        if let Some(last) = last {
            self.cursor = self.cursor.max(last);
        }
        if complete || self.cursor >= upto {
            self.cursor = self.cursor.max(upto);
            self.replay_upto = None;
        }
    }

    /// A live frame: whether to hand it out (false when a replay already did).
    pub fn live(&mut self, id: EventId) -> bool {
        if id <= self.cursor {
            return false;
        }
        self.cursor = id;
        true
    }

    /// The live channel lost frames this follower had not taken: replay from the cursor to what
    /// is published now. Also right in the middle of a replay: it just reaches further.
    pub fn lagged(&mut self, published: EventId) {
        self.replay_to(published.max(self.replay_upto.unwrap_or(published)));
    }

    fn replay_to(&mut self, upto: EventId) {
        self.replay_upto = (self.cursor < upto).then_some(upto);
    }
}

/// A page of a replay, in id order, never empty.
#[derive(Debug)]
pub enum Replayed {
    /// Rows read from the table.
    Table(Vec<EventRow>),
    /// Frames the hub published recently, served from memory ([`crate::recent`]).
    Recent(Vec<Frame>),
}

impl Replayed {
    pub fn len(&self) -> usize {
        match self {
            Replayed::Table(rows) => rows.len(),
            Replayed::Recent(frames) => frames.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a follower hands out next.
#[derive(Debug)]
pub enum Next {
    /// A page of the selection's events from the recent tail or the table.
    Page(Replayed),
    /// A live frame, as the hub rendered it.
    Live(Frame),
    /// Reading a page failed; the next call retries it.
    Failed(StoreError),
    /// The live channel is gone (the service is stopping).
    Closed,
}

/// Where followers take events from; one per instance, shared by all its followers.
#[derive(Clone)]
pub struct Sources {
    pub router: Arc<Router>,
    /// The tail of recent events, which serves replays it covers without a read.
    pub recent: Arc<Recent>,
    /// The hub's published id: every event at or below it is final in the table.
    pub published: watch::Receiver<Published>,
    pub store: Store,
    /// Reads replay pages from the table, merging those asked for together.
    pub reads: ReplayReads,
    /// Rows per replay page.
    pub page_size: i64,
}

/// Follows one selection from a resume point.
pub struct Follower {
    /// What it follows and may read; events it does not want still move the position.
    reader: Reader,
    subscription: Subscription,
    sources: Sources,
    position: Position,
    /// Lag recoveries so far (for metrics).
    lags: u64,
    /// How far retention had deleted, as the last page read from the table saw it, when that
    /// read told.
    deleted_upto: Option<EventId>,
}

/// Why a follower could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("not ready: the service has not yet reached the database")]
    NotReady,
    #[error(transparent)]
    Refused(#[from] Refused),
}

impl Follower {
    /// Subscribes to the reader's selection and places the follower after `after`, or live when
    /// None. Waits until the hub has a published id (it has none just after start-up).
    pub async fn start(
        sources: &Sources,
        reader: Reader,
        after: Option<EventId>,
        ready_wait: std::time::Duration,
    ) -> Result<Follower, StartError> {
        // Subscribe before reading the published id, so that no frame published after it is
        // missed.
        let subscription = sources.router.subscribe(&reader.selection)?;
        let mut published = sources.published.clone();
        let start = tokio::time::timeout(ready_wait, published.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|ready| ready.ok().and_then(|published| *published))
            .ok_or(StartError::NotReady)?;
        Ok(Follower {
            reader,
            subscription,
            sources: sources.clone(),
            position: Position::new(after, start),
            lags: 0,
            deleted_upto: None,
        })
    }

    pub fn reader(&self) -> &Reader {
        &self.reader
    }

    pub fn position(&self) -> Position {
        self.position
    }

    pub fn lags(&self) -> u64 {
        self.lags
    }

    /// How far retention had deleted when the last page was read from the table, if that read
    /// told (it spares a resume a statement of its own to find out).
    pub fn deleted_upto(&self) -> Option<EventId> {
        self.deleted_upto
    }

    /// The next page or live frame. Cancel-safe: the position moves only when something is
    /// handed out, so a dropped call is simply made again.
    pub async fn next(&mut self) -> Next {
        loop {
            match self.next_page().await {
                Some(Ok(rows)) => return Next::Page(rows),
                Some(Err(error)) => return Next::Failed(error),
                None => {}
            }
            match self.subscription.receiver().recv().await {
                Ok(frame) => {
                    if self.position.live(frame.id) && self.wants(&frame) {
                        return Next::Live(frame);
                    }
                }
                Err(RecvError::Lagged(_)) => self.recover(),
                Err(RecvError::Closed) => return Next::Closed,
            }
        }
    }

    /// The next page of the replay; None once the follower is live, which an empty last page
    /// makes it without handing anything out. Never waits for live events. What the recent tail
    /// covers is served from it; the rest is read from the table.
    pub async fn next_page(&mut self) -> Option<Result<Replayed, StoreError>> {
        while let Some((after, upto)) = self.position.page() {
            let limit = self.sources.page_size;
            if let Some(page) =
                self.sources
                    .recent
                    .read(&self.reader.selection, (after, upto), limit as usize)
            {
                self.position
                    .replayed(Some(page.covered), page.covered >= upto);
                let mut frames = page.frames;
                frames.retain(|frame| self.reader.wants(&frame.address(), frame.event_type()));
                if !frames.is_empty() {
                    return Some(Ok(Replayed::Recent(frames)));
                }
                continue;
            }
            // Boxed: a query future is large, and every idle follower would carry its space all
            // its life.
            let read = Box::pin(self.sources.reads.read(&self.reader, (after, upto), limit)).await;
            let page = match read {
                Ok(read) => {
                    self.deleted_upto = read.deleted_upto.or(self.deleted_upto);
                    read.page
                }
                Err(error) => return Some(Err(error)),
            };
            self.position
                .replayed(Some(page.covered), page.covered >= upto);
            let mut rows = page.rows;
            rows.retain(|row| self.reader.wants(&row.address(), &row.event_type));
            if !rows.is_empty() {
                return Some(Ok(Replayed::Table(rows)));
            }
        }
        None
    }

    /// A live frame already queued, if any: lets a caller gather what is waiting into one write.
    /// None when nothing is queued, or when the channel lagged (the next [`Follower::next`]
    /// replays what was lost).
    pub fn try_next_live(&mut self) -> Option<Frame> {
        while self.position.is_live() {
            match self.subscription.receiver().try_recv()? {
                Ok(frame) if self.position.live(frame.id) && self.wants(&frame) => {
                    return Some(frame);
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => self.recover(),
                Err(RecvError::Closed) => return None,
            }
        }
        None
    }

    fn wants(&self, frame: &Frame) -> bool {
        self.reader
            .wants_routed(&frame.address(), frame.event_type())
    }

    fn recover(&mut self) {
        let published = (*self.sources.published.borrow()).unwrap_or(self.position.cursor());
        self.lags += 1;
        tracing::debug!(
            selection = ?self.reader.selection,
            after = %self.position.cursor(),
            upto = %published,
            "lagging follower recovers from the table"
        );
        self.position.lagged(published);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: i64) -> EventId {
        EventId(n)
    }

    #[test]
    fn without_a_resume_point_it_starts_live_at_the_published_id() {
        let mut position = Position::new(None, id(10));
        assert!(position.is_live());
        assert_eq!(position.page(), None);
        assert!(!position.live(id(10)), "published before the start");
        assert!(position.live(id(11)));
    }

    #[test]
    fn a_resume_point_at_or_past_the_published_id_is_live_at_once() {
        assert!(Position::new(Some(id(10)), id(10)).is_live());
        let mut ahead = Position::new(Some(id(12)), id(10));
        assert!(ahead.is_live());
        assert!(!ahead.live(id(11)), "at or below the resume point");
        assert!(ahead.live(id(13)));
    }

    #[test]
    fn replay_goes_page_by_page_then_live_dropping_what_it_covered() {
        let mut position = Position::new(Some(id(0)), id(10));
        assert_eq!(position.page(), Some((id(0), id(10))));
        position.replayed(Some(id(4)), false);
        assert_eq!(position.page(), Some((id(4), id(10))));
        // A short page ends the replay even if its last id is below the end (the rest were
        // other consumers' events).
        position.replayed(Some(id(7)), true);
        assert!(position.is_live());
        assert_eq!(position.cursor(), id(10));
        assert!(!position.live(id(9)));
        assert!(!position.live(id(10)));
        assert!(position.live(id(11)));
    }

    #[test]
    fn an_empty_last_page_ends_the_replay() {
        let mut position = Position::new(Some(id(3)), id(8));
        position.replayed(None, true);
        assert!(position.is_live());
        assert_eq!(position.cursor(), id(8));
    }

    #[test]
    fn a_full_page_that_reaches_the_end_ends_the_replay() {
        let mut position = Position::new(Some(id(3)), id(8));
        position.replayed(Some(id(8)), false);
        assert!(position.is_live());
    }

    #[test]
    fn a_lag_while_live_replays_from_the_cursor_to_what_is_published_now() {
        let mut position = Position::new(None, id(5));
        assert!(position.live(id(6)));
        position.lagged(id(20));
        assert_eq!(position.page(), Some((id(6), id(20))));
        position.replayed(Some(id(20)), false);
        assert!(position.is_live());
        assert!(!position.live(id(19)), "covered by the replay");
        assert!(position.live(id(21)));
    }

    #[test]
    fn a_lag_in_the_middle_of_a_replay_reaches_further_from_where_the_replay_is() {
        let mut position = Position::new(Some(id(0)), id(10));
        position.replayed(Some(id(4)), false);
        position.lagged(id(30));
        assert_eq!(position.page(), Some((id(4), id(30))));
        // A published id older than the replay's end (it cannot go back) keeps the end.
        position.lagged(id(25));
        assert_eq!(position.page(), Some((id(4), id(30))));
    }

    #[test]
    fn a_lag_with_nothing_new_published_stays_live() {
        let mut position = Position::new(None, id(5));
        assert!(position.live(id(7)));
        position.lagged(id(7));
        assert!(position.is_live());
    }
}
