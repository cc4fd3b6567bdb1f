//! The event hub: discrete events (OOM kills, pressure episodes, connect failures, ...) fan out
//! to live subscribers and a bounded history for `/api/v1/events`. An event is its type name
//! and its fields; the slices that raise them own their shapes.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use serde::{ser::SerializeMap, Serialize, Serializer};
use tokio::sync::broadcast;

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

pub struct EventHub {
    tx: broadcast::Sender<Arc<Sequenced>>,
    history: Mutex<(u64, VecDeque<Arc<Sequenced>>)>,
    capacity: usize,
}

impl EventHub {
    pub fn new(capacity: usize) -> EventHub {
        let (tx, _) = broadcast::channel(1024);
        EventHub {
            tx,
            history: Mutex::new((0, VecDeque::new())),
            capacity: capacity.max(1),
        }
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
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.0 += 1;
        let ev = Arc::new(Sequenced { seq: h.0, event });
        if h.1.len() == self.capacity {
            h.1.pop_front();
        }
        h.1.push_back(Arc::clone(&ev));
        // No subscribers is fine: history still has it.
        let _ = self.tx.send(ev);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Sequenced>> {
        self.tx.subscribe()
    }

    /// Events with `seq > since`, oldest first.
    pub fn since(&self, since: u64) -> Vec<Arc<Sequenced>> {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.1.iter().filter(|e| e.seq > since).cloned().collect()
    }
}
