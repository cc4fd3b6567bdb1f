//! The event hub: discrete events (OOM kills, pressure episodes, connect failures, ...) fan out
//! to live subscribers, a bounded history in memory and, when enabled, the on-disk journal
//! (history across restarts, `/api/v1/events?since=`). An event is its type name and its
//! fields; the slices that raise them own their shapes.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use serde::{ser::SerializeMap, Serialize, Serializer};
use tokio::sync::broadcast;

use crate::{
    journal::{Journal, State},
    sync::Lock as _,
};

/// One event: `{"type": kind, ...fields}` in JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: &'static str,
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl Event {
    /// An event of type `kind` whose fields are `body`'s (a struct serializing to an object).
    pub fn new(kind: &'static str, body: &impl Serialize) -> Result<Event, serde_json::Error> {
        match serde_json::to_value(body)? {
            serde_json::Value::Object(fields) => Ok(Event { kind, fields }),
            other => Err(serde::ser::Error::custom(format!(
                "event {kind} is not an object: {other}"
            ))),
        }
    }
}

/// An event with its position in the stream, so pollers can ask for what is newer.
#[derive(Debug, Clone)]
pub struct Sequenced {
    pub seq: u64,
    pub event: Event,
}

impl Serialize for Sequenced {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.event.fields.len() + 2))?;
        m.serialize_entry("seq", &self.seq)?;
        m.serialize_entry("type", self.event.kind)?;
        for (k, v) in &self.event.fields {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl crate::journal::Item for Sequenced {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        serde_json::to_writer(out, self)
    }
}

pub struct EventHub {
    tx: broadcast::Sender<Arc<Sequenced>>,
    /// The last id given and the newest events.
    history: Mutex<(u64, VecDeque<Arc<Sequenced>>)>,
    capacity: usize,
    journal: Option<Arc<Journal>>,
}

impl EventHub {
    pub fn new(capacity: usize) -> EventHub {
        let (tx, _) = broadcast::channel(1024);
        EventHub {
            tx,
            history: Mutex::new((0, VecDeque::new())),
            capacity: capacity.max(1),
            journal: None,
        }
    }

    /// A hub whose events also go to `journal`, with ids continuing where it left off.
    pub fn with_journal(capacity: usize, journal: Option<Arc<Journal>>) -> EventHub {
        let mut hub = EventHub::new(capacity);
        if let Some(j) = &journal {
            hub.history = Mutex::new((j.next_seq().saturating_sub(1), VecDeque::new()));
        }
        hub.journal = journal;
        hub
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, (u64, VecDeque<Arc<Sequenced>>)> {
        self.history.locked()
    }

    /// Publishes `body` as an event of type `kind` (a body that is not a JSON object is a bug:
    /// logged, not published).
    pub fn publish_as(&self, kind: &'static str, body: &impl Serialize) {
        match Event::new(kind, body) {
            Ok(e) => self.publish(e),
            Err(e) => tracing::error!(kind, error = %e, "event not serializable; not published"),
        }
    }

    pub fn publish(&self, event: Event) {
        let mut h = self.locked();
        h.0 += 1;
        let ev = Arc::new(Sequenced { seq: h.0, event });
        if h.1.len() == self.capacity {
            h.1.pop_front();
        }
        h.1.push_back(Arc::clone(&ev));
        // Under the lock: the journal gets events in id order. Only queues.
        if let Some(j) = &self.journal {
            j.append(Arc::clone(&ev) as _);
        }
        // No subscribers is fine: history still has it.
        let _ = self.tx.send(ev);
    }

    /// Saves `state` under `name` in the journal, positioned after every event published so
    /// far (a component finds it after a restart with [`EventHub::saved_state`]). A no-op
    /// without a journal.
    pub fn save_state(&self, name: &str, state: serde_json::Value) {
        let h = self.locked();
        if let Some(j) = &self.journal {
            j.save_state(State {
                name: name.to_string(),
                after_seq: h.0,
                state,
            });
        }
    }

    /// The state saved under `name` by an earlier run (from the journal).
    pub fn saved_state(&self, name: &str) -> Option<State> {
        self.journal.as_ref()?.recovered_state(name).cloned()
    }

    /// Whether history is kept on disk.
    pub fn journaled(&self) -> bool {
        self.journal.is_some()
    }

    /// Calls `f` with each journaled event of earlier runs with `seq > since`, oldest first,
    /// one at a time (blocking: reads the segment files). Nothing without a journal.
    pub fn each_journaled_before_start(&self, since: u64, f: impl FnMut(&serde_json::Map<String, serde_json::Value>)) {
        if let Some(j) = &self.journal {
            j.each_before_start(since, f);
        }
    }

    /// History for `/api/v1/events?since=`: events with `seq > since`, oldest first, at most
    /// `events.history` of them; from the journal where memory no longer holds them (blocking).
    pub fn history(&self, since: u64) -> Vec<serde_json::Value> {
        let (mem, oldest) = {
            let h = self.locked();
            let oldest = h.1.front().map_or(h.0 + 1, |e| e.seq);
            let mem: Vec<Arc<Sequenced>> = h.1.iter().filter(|e| e.seq > since).cloned().collect();
            (mem, oldest)
        };
        let mut out = Vec::new();
        if let (Some(j), true) = (&self.journal, since.saturating_add(1) < oldest) {
            out.extend(
                j.events(since, oldest, self.capacity)
                    .into_iter()
                    .map(serde_json::Value::Object),
            );
        }
        for ev in mem {
            if out.len() >= self.capacity {
                break;
            }
            match serde_json::to_value(&*ev) {
                Ok(v) => out.push(v),
                Err(e) => tracing::error!(seq = ev.seq, error = %e, "event not serializable; left out"),
            }
        }
        out
    }

    /// The newest `events.history` events, oldest first, reaching into the journal when this
    /// run has fewer (blocking).
    pub fn newest(&self) -> Vec<serde_json::Value> {
        let (mem, oldest) = {
            let h = self.locked();
            (
                h.1.iter().cloned().collect::<Vec<_>>(),
                h.1.front().map_or(h.0 + 1, |e| e.seq),
            )
        };
        let mut out = Vec::new();
        if let Some(j) = &self.journal {
            let want = self.capacity.saturating_sub(mem.len());
            if want > 0 {
                out.extend(j.newest(oldest, want).into_iter().map(serde_json::Value::Object));
            }
        }
        for ev in mem {
            match serde_json::to_value(&*ev) {
                Ok(v) => out.push(v),
                Err(e) => tracing::error!(seq = ev.seq, error = %e, "event not serializable; left out"),
            }
        }
        out
    }

    /// Writes what the journal has queued and marks a clean end (blocking).
    pub fn close(&self) {
        if let Some(j) = &self.journal {
            let next = self.locked().0 + 1;
            j.close(next);
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Sequenced>> {
        self.tx.subscribe()
    }

    /// Events with `seq > since`, oldest first.
    pub fn since(&self, since: u64) -> Vec<Arc<Sequenced>> {
        let h = self.history.locked();
        h.1.iter().filter(|e| e.seq > since).cloned().collect()
    }
}
