//! Idle connections kept for the next message to the same site from the same source: a new
//! connection costs a TCP and TLS handshake and EHLO, and mailbox providers count
//! connections as well as messages.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tracing::debug;

use crate::{
    client::Connection,
    shaping::{SharedState, Slot},
};

/// An open session between transactions, with the slot it holds.
pub struct Session {
    pub conn: Connection,
    pub slot: Option<Slot>,
    /// Messages sent over it so far.
    pub sent: u32,
    pub host: String,
    pub addr: SocketAddr,
    idle_since: Instant,
}

impl Session {
    pub fn new(conn: Connection, slot: Option<Slot>, host: String, addr: SocketAddr) -> Session {
        Session {
            conn,
            slot,
            sent: 0,
            host,
            addr,
            idle_since: Instant::now(),
        }
    }

    /// QUIT and give the slot back.
    pub async fn close(self, state: &SharedState) {
        self.conn.quit().await;
        if let Some(slot) = self.slot {
            state.release_slot(slot).await;
        }
    }
}

type Key = (String, String);

/// Idle sessions per (source, site).
#[derive(Clone)]
pub struct IdlePool {
    idle: Arc<Mutex<HashMap<Key, Vec<Session>>>>,
    timeout: Duration,
}

impl IdlePool {
    pub fn new(timeout: Duration) -> IdlePool {
        IdlePool {
            idle: Arc::default(),
            timeout,
        }
    }

    /// The most recently used idle session to `site` from `source`, if one is fresh.
    pub fn take(&self, source: &str, site: &str) -> Option<Session> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.get_mut(&(source.to_string(), site.to_string()))?;
        // Most recent last: when it is stale, so are the others, and the reaper closes them
        // (giving their slots back).
        if list.last()?.idle_since.elapsed() >= self.timeout {
            return None;
        }
        list.pop()
    }

    /// Keeps a session for reuse.
    pub fn put(&self, source: &str, site: &str, mut session: Session) {
        session.idle_since = Instant::now();
        if let Ok(mut idle) = self.idle.lock() {
            idle.entry((source.to_string(), site.to_string()))
                .or_default()
                .push(session);
        }
    }

    /// Removes every session idle longer than the timeout (all of them with `all`).
    fn expired(&self, all: bool) -> Vec<Session> {
        let Ok(mut idle) = self.idle.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for list in idle.values_mut() {
            let (old, fresh): (Vec<Session>, Vec<Session>) = std::mem::take(list)
                .into_iter()
                .partition(|s| all || s.idle_since.elapsed() >= self.timeout);
            *list = fresh;
            out.extend(old);
        }
        idle.retain(|_, l| !l.is_empty());
        out
    }

    /// Closes expired sessions every second, for as long as the pool lives.
    pub fn spawn_reaper(&self, state: SharedState) {
        let weak = Arc::downgrade(&self.idle);
        let timeout = self.timeout;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(idle) = weak.upgrade() else { return };
                let pool = IdlePool { idle, timeout };
                for s in pool.expired(false) {
                    debug!(host = %s.host, sent = s.sent, "closing idle connection");
                    s.close(&state).await;
                }
            }
        });
    }

    /// Closes every idle session (shutdown).
    pub async fn close_all(&self, state: &SharedState) {
        for s in self.expired(true) {
            s.close(state).await;
        }
    }
}
