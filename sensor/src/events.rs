//! The event hub: discrete events (OOM kills, later pressure events and connect failures)
//! fan out to live subscribers and a bounded history for `/api/v1/events`.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::{memcg::PressureEvent, oom::OomKill, tcp::TcpFailure};

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    OomKill(Box<OomKill>),
    MemoryPressure(PressureEvent),
    TcpConnectFailure(TcpFailure),
}

/// An event with its position in the stream, so pollers can ask for what is newer.
#[derive(Debug, Clone, Serialize)]
pub struct Sequenced {
    pub seq: u64,
    #[serde(flatten)]
    pub event: Event,
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

    pub fn publish(&self, event: Event) {
        let Ok(mut h) = self.history.lock() else { return };
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
        let Ok(h) = self.history.lock() else { return Vec::new() };
        h.1.iter().filter(|e| e.seq > since).cloned().collect()
    }
}
