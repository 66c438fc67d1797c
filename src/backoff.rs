//! Doubling delays between attempts: the one retry policy of every reconnect and retry loop
//! (the listener, the hub, replay pages, the first connection to the database, webhook
//! deliveries).

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub const fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay to wait now; the next one is twice as long, up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(self.max);
        delay
    }

    /// [`Backoff::next_delay`], cut to a random 50 to 100 % of it: receivers that failed
    /// together (one outage) are not all retried at the same instants.
    pub fn next_jittered(&mut self) -> Duration {
        self.next_delay().mul_f64(rand::random_range(0.5..=1.0))
    }

    /// The delay [`Backoff::next_delay`] will return (for a "retrying in" log line).
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// Back to the shortest delay, after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_maximum_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<u128> = (0..4).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 350, 350]);
        backoff.reset();
        let jittered = backoff.next_jittered();
        assert!((50..=100).contains(&jittered.as_millis()), "{jittered:?}");
        backoff.reset();
        assert_eq!(backoff.peek(), Duration::from_millis(100));
    }
}
