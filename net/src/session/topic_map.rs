//! A session's channels by topic: a small vector searched linearly, one entry inline.
//!
//! Why not a hash map: almost every connection has one to a few channels (the limit is the
//! tenant's `max_channels_per_client`, 100 by default), and a hash map cost an idle connection
//! its table allocation (≈ 120 bytes) plus 48 bytes inline. Searching a few topics is as fast
//! as hashing one. Entries keep their join order.

use smallvec::SmallVec;

#[derive(Debug)]
pub(crate) struct TopicMap<V> {
    entries: SmallVec<[(Box<str>, V); 1]>,
}

impl<V> Default for TopicMap<V> {
    fn default() -> Self {
        TopicMap { entries: SmallVec::new() }
    }
}

impl<V> TopicMap<V> {
    fn position(&self, topic: &str) -> Option<usize> {
        self.entries.iter().position(|(t, _)| **t == *topic)
    }

    pub(crate) fn get(&self, topic: &str) -> Option<&V> {
        self.entries.iter().find(|(t, _)| **t == *topic).map(|(_, v)| v)
    }

    pub(crate) fn get_mut(&mut self, topic: &str) -> Option<&mut V> {
        self.entries.iter_mut().find(|(t, _)| **t == *topic).map(|(_, v)| v)
    }

    pub(crate) fn contains_key(&self, topic: &str) -> bool {
        self.position(topic).is_some()
    }

    /// Inserts or replaces; returns the replaced value.
    pub(crate) fn insert(&mut self, topic: Box<str>, value: V) -> Option<V> {
        match self.position(&topic) {
            Some(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            None => {
                // Grow by one: sessions with many channels are rare, and a doubled vector
                // would keep spare room on every connection that joined a second channel.
                self.entries.reserve_exact(1);
                self.entries.push((topic, value));
                None
            }
        }
    }

    pub(crate) fn remove(&mut self, topic: &str) -> Option<V> {
        let i = self.position(topic)?;
        let (_, value) = self.entries.remove(i);
        if self.entries.is_empty() {
            self.entries = SmallVec::new();
        }
        Some(value)
    }

    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (Box<str>, V)> {
        std::mem::take(&mut self.entries).into_iter()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Box<str>, &V)> {
        self.entries.iter().map(|(t, v)| (t, v))
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&Box<str>, &mut V)> {
        self.entries.iter_mut().map(|(t, v)| (&*t, v))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<V> std::ops::Index<&str> for TopicMap<V> {
    type Output = V;

    /// Panics when absent: for callers that looked the topic up (or inserted it) just before.
    fn index(&self, topic: &str) -> &V {
        self.get(topic).expect("the caller checked the topic is present")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_map_and_keeps_join_order() {
        let mut map: TopicMap<u32> = TopicMap::default();
        assert!(map.is_empty());
        assert_eq!(map.insert("a".into(), 1), None);
        assert_eq!(map.insert("b".into(), 2), None);
        assert_eq!(map.insert("c".into(), 3), None);
        assert_eq!(map.insert("b".into(), 20), Some(2));
        assert_eq!(map.len(), 3);
        assert_eq!(map.get("b"), Some(&20));
        assert!(map.contains_key("c") && !map.contains_key("d"));
        *map.get_mut("a").unwrap() += 10;
        assert_eq!(map["a"], 11);
        assert_eq!(map.iter().map(|(t, v)| (t.to_string(), *v)).collect::<Vec<_>>(), vec![("a".into(), 11), ("b".into(), 20), ("c".into(), 3)]);
        assert_eq!(map.remove("b"), Some(20));
        assert_eq!(map.remove("b"), None);
        assert_eq!(map.values().copied().collect::<Vec<_>>(), vec![11, 3]);
        assert_eq!(map.drain().count(), 2);
        assert!(map.is_empty());
    }
}
