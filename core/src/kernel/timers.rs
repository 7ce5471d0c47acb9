//! One table of deadlines per machine.
//!
//! Every deadline a machine has lives in its [`TimerTable`], keyed by the machine's own timer
//! kind `K` (an enum naming what expires: a command's reply, a retry, a negotiation). Setting a
//! timer replaces the earlier deadline of that kind; the machine's `next_deadline` is
//! [`TimerTable::next`]; on a tick [`TimerTable::take_expired`] hands back, in key order, every
//! kind whose deadline has passed and forgets them. Keys are ordered so that outputs stay
//! deterministic.

use std::collections::BTreeMap;

use crate::link::Timestamp;

/// Deadlines keyed by timer kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TimerTable<K: Ord> {
    due: BTreeMap<K, Timestamp>,
}

impl<K: Ord> Default for TimerTable<K> {
    fn default() -> Self {
        Self {
            due: BTreeMap::new(),
        }
    }
}

#[allow(dead_code)]
impl<K: Ord + Clone> TimerTable<K> {
    /// Arms (or re-arms) the timer `kind` to expire at `at`.
    pub fn set(&mut self, kind: K, at: Timestamp) {
        self.due.insert(kind, at);
    }

    /// Disarms the timer `kind`; returns whether it was armed.
    pub fn clear(&mut self, kind: &K) -> bool {
        self.due.remove(kind).is_some()
    }

    /// Disarms every timer `keep` rejects.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.due.retain(|k, _| keep(k));
    }

    /// When `kind` expires, if armed.
    pub fn get(&self, kind: &K) -> Option<Timestamp> {
        self.due.get(kind).copied()
    }

    /// Whether `kind` is armed.
    pub fn is_set(&self, kind: &K) -> bool {
        self.due.contains_key(kind)
    }

    /// The earliest deadline of all armed timers.
    pub fn next(&self) -> Option<Timestamp> {
        self.due.values().copied().min()
    }

    /// Disarms and returns, in key order, every timer due at or before `now`.
    pub fn take_expired(&mut self, now: Timestamp) -> Vec<K> {
        let expired: Vec<K> = self
            .due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &expired {
            self.due.remove(k);
        }
        expired
    }

    /// Disarms and returns, in key order, every timer `pick` selects that is due at or
    /// before `now`; the others stay armed.
    pub fn take_expired_where(
        &mut self,
        now: Timestamp,
        mut pick: impl FnMut(&K) -> bool,
    ) -> Vec<K> {
        let expired: Vec<K> = self
            .due
            .iter()
            .filter(|(k, at)| **at <= now && pick(k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &expired {
            self.due.remove(k);
        }
        expired
    }

    /// Whether a timer `pick` selects is due at or before `now`.
    pub fn any_expired(&self, now: Timestamp, mut pick: impl FnMut(&K) -> bool) -> bool {
        self.due.iter().any(|(k, at)| *at <= now && pick(k))
    }

    /// The armed timers and their deadlines, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, Timestamp)> {
        self.due.iter().map(|(k, at)| (k, *at))
    }

    /// Whether no timer is armed.
    pub fn is_empty(&self) -> bool {
        self.due.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum Kind {
        Reply(u64),
        Retry,
    }

    #[test]
    fn earliest_deadline_is_next_and_expired_timers_leave_in_key_order() {
        let mut t = TimerTable::default();
        t.set(Kind::Retry, Timestamp::from_ms(50));
        t.set(Kind::Reply(2), Timestamp::from_ms(30));
        t.set(Kind::Reply(1), Timestamp::from_ms(40));
        assert_eq!(t.next(), Some(Timestamp::from_ms(30)));
        assert_eq!(
            t.take_expired(Timestamp::from_ms(45)),
            vec![Kind::Reply(1), Kind::Reply(2)]
        );
        assert_eq!(t.next(), Some(Timestamp::from_ms(50)));
        assert!(t.take_expired(Timestamp::from_ms(49)).is_empty());
    }

    #[test]
    fn taking_some_expired_timers_leaves_the_others_armed() {
        let mut t = TimerTable::default();
        t.set(Kind::Retry, Timestamp::from_ms(10));
        t.set(Kind::Reply(1), Timestamp::from_ms(10));
        t.set(Kind::Reply(2), Timestamp::from_ms(99));
        let now = Timestamp::from_ms(20);
        assert!(t.any_expired(now, |k| matches!(k, Kind::Reply(_))));
        assert_eq!(
            t.take_expired_where(now, |k| matches!(k, Kind::Reply(_))),
            vec![Kind::Reply(1)]
        );
        assert!(!t.any_expired(now, |k| matches!(k, Kind::Reply(_))));
        assert_eq!(t.get(&Kind::Retry), Some(Timestamp::from_ms(10)));
        assert_eq!(t.iter().count(), 2);
    }

    #[test]
    fn setting_a_timer_again_replaces_its_deadline_and_clear_disarms_it() {
        let mut t = TimerTable::default();
        t.set(Kind::Retry, Timestamp::from_ms(10));
        t.set(Kind::Retry, Timestamp::from_ms(90));
        assert_eq!(t.get(&Kind::Retry), Some(Timestamp::from_ms(90)));
        assert!(t.clear(&Kind::Retry));
        assert!(!t.clear(&Kind::Retry));
        assert_eq!(t.next(), None);
        assert!(t.is_empty());
    }
}
