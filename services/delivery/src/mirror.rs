//! A local copy of the shaping keys that every message consults but that rarely change
//! (suspensions, rate cuts), kept current by a KV watch.
//!
//! Reading them from the bucket cost three KV round trips per message (two suspension keys
//! and the rate state of an unlimited site); the watch brings another pod's suspension here
//! within milliseconds instead, for one delivered message per change. Until the watch has
//! caught up with the bucket, and whenever it breaks, [`Mirror::get`] says so and callers
//! read the bucket as before: a stale mirror never stands in for the shared state.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use tracing::{debug, warn};

/// Pause before a broken watch is started again.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

#[derive(Default)]
struct State {
    values: RwLock<HashMap<String, Bytes>>,
    /// The watch has delivered everything the bucket held when it started.
    live: AtomicBool,
}

/// Mirror of the keys under some prefixes of one bucket; cheap to clone.
#[derive(Clone)]
pub struct Mirror {
    state: Arc<State>,
    _watch: Arc<StopOnDrop>,
}

/// Stops the watch when the last handle of its mirror goes.
struct StopOnDrop(tokio::task::JoinHandle<()>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Mirror {
    /// Starts mirroring the keys matching `filters` (KV wildcards such as `susp.>`).
    /// `marker` is a key of this process's own, under none of the filters' prefixes: it is
    /// written before each watch starts, and seeing it come back marks the end of the
    /// bucket's history (JetStream delivers in sequence order), even for an empty bucket.
    pub fn start(store: kv::Store, filters: Vec<String>, marker: String) -> Mirror {
        let state = Arc::new(State::default());
        let task = tokio::spawn(watch(store, filters, marker, state.clone()));
        Mirror {
            state,
            _watch: Arc::new(StopOnDrop(task)),
        }
    }

    /// The value of `key`: `None` when the mirror is not current (read the bucket),
    /// `Some(None)` when the key is absent or deleted.
    pub fn get(&self, key: &str) -> Option<Option<Bytes>> {
        if !self.state.live.load(Ordering::Acquire) {
            return None;
        }
        let values = self.state.values.read().ok()?;
        Some(values.get(key).cloned())
    }

    /// Whether reads are served from the mirror.
    pub fn is_live(&self) -> bool {
        self.state.live.load(Ordering::Acquire)
    }
}

async fn watch(store: kv::Store, filters: Vec<String>, marker: String, state: Arc<State>) {
    loop {
        if let Err(e) = follow(&store, &filters, &marker, &state).await {
            warn!(error = %e, "shaping mirror stopped; reading the bucket until it resumes");
        }
        state.live.store(false, Ordering::Release);
        if let Ok(mut values) = state.values.write() {
            values.clear();
        }
        tokio::time::sleep(RESTART_PAUSE).await;
    }
}

async fn follow(
    store: &kv::Store,
    filters: &[String],
    marker: &str,
    state: &State,
) -> Result<(), String> {
    store
        .put(marker, Bytes::from_static(b"1"))
        .await
        .map_err(|e| format!("marker {marker}: {e}"))?;
    let mut keys: Vec<&str> = filters.iter().map(String::as_str).collect();
    keys.push(marker);
    let mut entries = store
        .watch_many_with_history(keys)
        .await
        .map_err(|e| format!("watch: {e}"))?;
    while let Some(entry) = entries.next().await {
        let entry = entry.map_err(|e| format!("watch: {e}"))?;
        if entry.key == marker {
            if !state.live.swap(true, Ordering::AcqRel) {
                debug!("shaping mirror current");
            }
            continue;
        }
        let Ok(mut values) = state.values.write() else {
            return Err("mirror lock poisoned".into());
        };
        match entry.operation {
            kv::Operation::Put => {
                values.insert(entry.key, entry.value);
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                values.remove(&entry.key);
            }
        }
    }
    Err("watch ended".into())
}
