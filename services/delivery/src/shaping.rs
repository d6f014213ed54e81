//! Traffic-shaping state that every delivery pod shares, in NATS KV with compare-and-set:
//! connection slots and message rate per (source, site), suspensions, rule hit counts,
//! warm-up counters and reputation per (source, provider).
//!
//! Every decision is a CAS on one key, so limits hold for the cluster rather than per pod.
//! Suspensions and rate cuts, read for every message, come from a watched local mirror
//! ([`crate::mirror`]): a suspension written by one pod reaches the others within
//! milliseconds.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use rand::Rng;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tracing::warn;

use crate::mirror::Mirror;

pub const SHAPING_BUCKET: &str = "HERALD_SHAPING";
pub const REPUTATION_BUCKET: &str = "HERALD_REPUTATION";

/// CAS retries before a contended key is reported as an error.
const CAS_ATTEMPTS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ShapingError {
    #[error("shaping state bucket {0}: {1}")]
    Bucket(&'static str, String),
    #[error("shaping state {key}: {reason}")]
    Key { key: String, reason: String },
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A KV-safe key token: KV keys allow `[-/_=.a-zA-Z0-9]`, and `.` separates tokens.
pub fn token(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if t.len() <= 100 {
        return t;
    }
    // Long MX sets still need a stable, bounded key.
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    format!("{}_{:016x}", &t[..60], h.finish())
}

/// What a CAS step decided.
enum Change<T, R> {
    Keep(R),
    Put(T, R),
}

/// A claimed connection slot; give it back with [`SharedState::release_slot`].
#[derive(Debug, Clone)]
pub struct Slot {
    key: String,
    holder: String,
    pub claimed: Instant,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Slots {
    /// Holder → expiry (Unix ms): a pod that dies frees its slots when they expire.
    holders: BTreeMap<String, i64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RateState {
    /// Theoretical arrival time of the next message (GCRA), Unix ms.
    tat_ms: i64,
    /// Share of the full rate allowed after `cut_rate` rules (1 = full).
    factor: f64,
}

/// A (source, site) or (source, provider) that takes no new mail until `until_ms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Suspension {
    pub until_ms: i64,
    pub rule: String,
    pub reply: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Hits {
    at_ms: Vec<i64>,
}

/// Outcome counts of a source at a provider, decayed over time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub delivered: f64,
    pub deferred: f64,
    pub bounced: f64,
    pub blocked: f64,
    pub at_ms: i64,
}

impl Record {
    /// 0 (only failures) to 1 (only deliveries); blocks weigh most, deferrals least.
    pub fn score(&self) -> f64 {
        let bad = 0.5 * self.deferred + self.bounced + 3.0 * self.blocked;
        (self.delivered + 1.0) / (self.delivered + bad + 1.0)
    }

    pub fn samples(&self) -> f64 {
        self.delivered + self.deferred + self.bounced + self.blocked
    }

    fn decayed(mut self, now: i64, half_life: Duration) -> Record {
        let age = (now - self.at_ms).max(0) as f64 / 1000.0;
        let f = 0.5f64.powf(age / half_life.as_secs_f64().max(1.0));
        self.delivered *= f;
        self.deferred *= f;
        self.bounced *= f;
        self.blocked *= f;
        self.at_ms = now;
        self
    }

    fn add(&mut self, other: &Record) {
        self.delivered += other.delivered;
        self.deferred += other.deferred;
        self.bounced += other.bounced;
        self.blocked += other.blocked;
    }
}

/// A record and when it was read.
type Scored = (Instant, Record);

/// Kind of outcome fed into a source's reputation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    Deferred,
    Bounced,
    Blocked,
}

/// Handles on the shared buckets, plus per-process caches.
#[derive(Clone)]
pub struct SharedState {
    shaping: kv::Store,
    reputation: kv::Store,
    /// Distinguishes this process's slots from other pods'.
    process: String,
    next_slot: Arc<AtomicU64>,
    lease_ttl: Duration,
    half_life: Duration,
    /// Reputation outcomes not yet written, per (source, provider).
    pending: Arc<Mutex<HashMap<(String, String), Record>>>,
    /// Scores read recently, per (source, provider).
    scores: Arc<Mutex<HashMap<(String, String), Scored>>>,
    /// First day (Unix days) each warming source was used; it never changes once set.
    first_days: Arc<Mutex<HashMap<String, i64>>>,
    /// Rate keys last seen cut (factor below 1): only those need recovery writes.
    cut: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Suspensions and rate states as the bucket holds them, for the per-message reads.
    mirror: Mirror,
}

impl SharedState {
    /// Creates (or updates) the buckets.
    pub async fn setup(
        js: &jetstream::Context,
        replicas: usize,
        lease_ttl: Duration,
        half_life: Duration,
    ) -> Result<SharedState, ShapingError> {
        let bucket = |name, description, max_age| {
            herald_core::limits::bucket(name, description, max_age, replicas)
        };
        let shaping = js
            .create_or_update_key_value(bucket(
                SHAPING_BUCKET,
                "Connection slots, rates, suspensions per (source IP, site)",
                Duration::from_secs(2 * 24 * 3600),
            ))
            .await
            .map_err(|e| ShapingError::Bucket(SHAPING_BUCKET, e.to_string()))?;
        let reputation = js
            .create_or_update_key_value(bucket(
                REPUTATION_BUCKET,
                "Reputation and warm-up progress per (source IP, provider)",
                Duration::from_secs(60 * 24 * 3600),
            ))
            .await
            .map_err(|e| ShapingError::Bucket(REPUTATION_BUCKET, e.to_string()))?;
        let process = ulid::Ulid::new().to_string();
        let mirror = Mirror::start(
            shaping.clone(),
            vec!["susp.>".into(), "rate.>".into()],
            format!("sync.{process}"),
        );
        Ok(SharedState {
            shaping,
            reputation,
            process,
            next_slot: Arc::new(AtomicU64::new(0)),
            lease_ttl,
            half_life,
            pending: Arc::default(),
            scores: Arc::default(),
            first_days: Arc::default(),
            cut: Arc::default(),
            mirror,
        })
    }

    /// Read-modify-write of one JSON value; `f` sees the current value (`None` when absent)
    /// and decides. Conflicting writers retry with a short random pause.
    async fn cas<T, R>(
        store: &kv::Store,
        key: &str,
        mut f: impl FnMut(Option<T>) -> Change<T, R>,
    ) -> Result<R, ShapingError>
    where
        T: Serialize + DeserializeOwned,
    {
        let err = |reason: String| ShapingError::Key {
            key: key.to_string(),
            reason,
        };
        for _ in 0..CAS_ATTEMPTS {
            let entry = store.entry(key).await.map_err(|e| err(e.to_string()))?;
            let (current, revision) = match entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    (serde_json::from_slice(&e.value).ok(), Some(e.revision))
                }
                Some(e) => (None, Some(e.revision)),
                None => (None, None),
            };
            let (value, result) = match f(current) {
                Change::Keep(r) => return Ok(r),
                Change::Put(v, r) => (v, r),
            };
            let bytes = Bytes::from(serde_json::to_vec(&value).map_err(|e| err(e.to_string()))?);
            let written = match revision {
                Some(rev) => store.update(key, bytes, rev).await.is_ok(),
                None => store.create(key, bytes).await.is_ok(),
            };
            if written {
                return Ok(result);
            }
            let pause = rand::rng().random_range(1..8);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        Err(err("kept changing under contention".into()))
    }

    /// A suspension or rate key: from the mirror when it is current, else from the bucket.
    async fn mirrored<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ShapingError> {
        match self.mirror.get(key) {
            Some(value) => Ok(value.and_then(|v| serde_json::from_slice(&v).ok())),
            None => Self::get(&self.shaping, key).await,
        }
    }

    /// Whether suspension and rate reads are served by the local mirror.
    pub fn mirror_is_live(&self) -> bool {
        self.mirror.is_live()
    }

    async fn get<T: DeserializeOwned>(
        store: &kv::Store,
        key: &str,
    ) -> Result<Option<T>, ShapingError> {
        let value = store.get(key).await.map_err(|e| ShapingError::Key {
            key: key.to_string(),
            reason: e.to_string(),
        })?;
        Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Claims one of `max` connection slots of (source, site); `None` when all are taken.
    pub async fn claim_slot(
        &self,
        source: &str,
        site: &str,
        max: u32,
    ) -> Result<Option<Slot>, ShapingError> {
        let key = format!("conn.{source}.{site}");
        let holder = format!(
            "{}-{}",
            self.process,
            self.next_slot.fetch_add(1, Ordering::Relaxed)
        );
        let ttl = self.lease_ttl.as_millis() as i64;
        let claimed = Self::cas(&self.shaping, &key, |cur: Option<Slots>| {
            let now = now_ms();
            let mut slots = cur.unwrap_or_default();
            slots.holders.retain(|_, expiry| *expiry > now);
            if slots.holders.len() >= max as usize {
                return Change::Keep(false);
            }
            slots.holders.insert(holder.clone(), now + ttl);
            Change::Put(slots, true)
        })
        .await?;
        Ok(claimed.then(|| Slot {
            key,
            holder,
            claimed: Instant::now(),
        }))
    }

    /// Extends a slot held by a long-lived connection.
    pub async fn refresh_slot(&self, slot: &mut Slot) {
        let ttl = self.lease_ttl.as_millis() as i64;
        let r = Self::cas(&self.shaping, &slot.key, |cur: Option<Slots>| {
            let mut slots = cur.unwrap_or_default();
            slots.holders.insert(slot.holder.clone(), now_ms() + ttl);
            Change::Put(slots, ())
        })
        .await;
        match r {
            Ok(()) => slot.claimed = Instant::now(),
            Err(e) => warn!(error = %e, "connection slot not refreshed"),
        }
    }

    /// Needs refreshing: more than half its life has passed.
    pub fn slot_is_old(&self, slot: &Slot) -> bool {
        slot.claimed.elapsed() > self.lease_ttl / 2
    }

    /// Gives a slot back. Best effort: a slot not given back expires with its lease.
    pub async fn release_slot(&self, slot: Slot) {
        let r = Self::cas(&self.shaping, &slot.key, |cur: Option<Slots>| match cur {
            Some(mut slots) => {
                if slots.holders.remove(&slot.holder).is_some() {
                    Change::Put(slots, ())
                } else {
                    Change::Keep(())
                }
            }
            None => Change::Keep(()),
        })
        .await;
        if let Err(e) = r {
            warn!(error = %e, "connection slot not released; it expires with its lease");
        }
    }

    /// Takes the next message slot of (source, site) under GCRA at `rate` × the site's
    /// current factor. `rate` is `None` for a site without a limit: then only a cut (a
    /// factor below 1) limits it, relative to `cut_base`. Returns the wait when the slot
    /// is not free yet, and the factor seen.
    pub async fn take_rate(
        &self,
        source: &str,
        site: &str,
        rate: Option<f64>,
        cut_base: f64,
    ) -> Result<(Option<Duration>, f64), ShapingError> {
        let key = format!("rate.{source}.{site}");
        let result = self.take_rate_at(&key, rate, cut_base).await;
        if let (Ok((_, factor)), Ok(mut cut)) = (&result, self.cut.lock()) {
            if *factor < 1.0 {
                cut.insert(key);
            } else {
                cut.remove(&key);
            }
        }
        result
    }

    async fn take_rate_at(
        &self,
        key: &str,
        rate: Option<f64>,
        cut_base: f64,
    ) -> Result<(Option<Duration>, f64), ShapingError> {
        if rate.is_none() {
            // Unlimited unless a rule cut it: no write, and no read either while the
            // mirror is current, on the common path.
            match self.mirrored::<RateState>(key).await? {
                Some(s) if s.factor < 1.0 => {}
                _ => return Ok((None, 1.0)),
            }
        }
        Self::cas(&self.shaping, key, |cur: Option<RateState>| {
            let now = now_ms();
            let mut s = cur.unwrap_or(RateState {
                tat_ms: 0,
                factor: 1.0,
            });
            let full = match rate {
                Some(r) => r,
                None if s.factor < 1.0 => cut_base,
                None => return Change::Keep((None, 1.0)),
            };
            if s.tat_ms > now {
                let wait = Duration::from_millis((s.tat_ms - now) as u64);
                return Change::Keep((Some(wait), s.factor));
            }
            let per_second = (full * s.factor).max(0.001);
            // Counted from the grant, not the theoretical time: grants are never closer
            // than one interval, so no window of a second ever sees more than the rate.
            // Five percent more keeps it so at the remote end too, where scheduling and
            // network jitter move arrivals by some milliseconds (tens on a busy host).
            s.tat_ms = now + (1050.0 / per_second).ceil() as i64;
            let factor = s.factor;
            Change::Put(s, (None, factor))
        })
        .await
    }

    /// Halves the rate of (source, site) (multiplicative decrease), to at least 1/32.
    pub async fn cut_rate(&self, source: &str, site: &str) -> Result<f64, ShapingError> {
        let key = format!("rate.{source}.{site}");
        Self::cas(&self.shaping, &key, |cur: Option<RateState>| {
            let mut s = cur.unwrap_or(RateState {
                tat_ms: 0,
                factor: 1.0,
            });
            s.factor = (s.factor / 2.0).max(1.0 / 32.0);
            let f = s.factor;
            Change::Put(s, f)
        })
        .await
        .inspect(|_| {
            if let Ok(mut cut) = self.cut.lock() {
                cut.insert(key.clone());
            }
        })
    }

    /// Gives back `step` of the full rate after a delivery (additive increase). Only rates
    /// this pod last saw cut are written: the common, uncut path costs nothing.
    pub async fn recover_rate(&self, source: &str, site: &str, step: f64) {
        let key = format!("rate.{source}.{site}");
        if !self.cut.lock().is_ok_and(|c| c.contains(&key)) {
            return;
        }
        let r = Self::cas(&self.shaping, &key, |cur: Option<RateState>| match cur {
            Some(mut s) if s.factor < 1.0 => {
                s.factor = (s.factor + step).min(1.0);
                Change::Put(s, ())
            }
            _ => Change::Keep(()),
        })
        .await;
        if let Err(e) = r {
            warn!(error = %e, "rate recovery not recorded");
        }
    }

    fn suspension_keys(source: &str, site: &str, provider: &str) -> [String; 2] {
        [
            format!("susp.{source}.s.{site}"),
            format!("susp.{source}.p.{provider}"),
        ]
    }

    /// The suspension in force for (source, site) or (source, provider), the longer one.
    pub async fn suspension(
        &self,
        source: &str,
        site: &str,
        provider: &str,
    ) -> Result<Option<Suspension>, ShapingError> {
        let now = now_ms();
        let mut found: Option<Suspension> = None;
        for key in Self::suspension_keys(source, site, provider) {
            if let Some(s) = self.mirrored::<Suspension>(&key).await?
                && s.until_ms > now
                && found.as_ref().is_none_or(|f| f.until_ms < s.until_ms)
            {
                found = Some(s);
            }
        }
        Ok(found)
    }

    /// Suspends (source, site), or (source, provider) with `whole_provider`, until
    /// `until_ms`; a longer suspension already in force is kept.
    pub async fn suspend(
        &self,
        source: &str,
        site: &str,
        provider: &str,
        whole_provider: bool,
        suspension: Suspension,
    ) -> Result<(), ShapingError> {
        let [site_key, provider_key] = Self::suspension_keys(source, site, provider);
        let key = if whole_provider {
            provider_key
        } else {
            site_key
        };
        Self::cas(&self.shaping, &key, |cur: Option<Suspension>| match cur {
            Some(c) if c.until_ms >= suspension.until_ms => Change::Keep(()),
            _ => Change::Put(suspension.clone(), ()),
        })
        .await
    }

    /// Counts one match of `rule` for (source, site); true when `threshold` matches fall
    /// within `window` (the count then starts again).
    pub async fn hit(
        &self,
        source: &str,
        site: &str,
        rule: &str,
        threshold: u32,
        window: Duration,
    ) -> Result<bool, ShapingError> {
        if threshold <= 1 {
            return Ok(true);
        }
        let key = format!("hits.{source}.{site}.{}", token(rule));
        let window = window.as_millis() as i64;
        Self::cas(&self.shaping, &key, |cur: Option<Hits>| {
            let now = now_ms();
            let mut h = cur.unwrap_or_default();
            h.at_ms.retain(|t| now - t < window);
            h.at_ms.push(now);
            if h.at_ms.len() >= threshold as usize {
                h.at_ms.clear();
                Change::Put(h, true)
            } else {
                Change::Put(h, false)
            }
        })
        .await
    }

    /// Today's warm-up cap of a warming source for a provider: `None` once the schedule is
    /// over. The first call for a source records today as its first day.
    pub async fn warmup_cap(
        &self,
        source: &str,
        schedule: &[u64],
    ) -> Result<Option<u64>, ShapingError> {
        let today = now_ms().div_euclid(86_400_000);
        let cached = self
            .first_days
            .lock()
            .ok()
            .and_then(|m| m.get(source).copied());
        let first = match cached {
            Some(d) => d,
            None => {
                let key = format!("warm.{source}");
                let d = Self::cas(&self.reputation, &key, |cur: Option<i64>| match cur {
                    Some(d) => Change::Keep(d),
                    None => Change::Put(today, today),
                })
                .await?;
                if let Ok(mut m) = self.first_days.lock() {
                    m.insert(source.to_string(), d);
                }
                d
            }
        };
        let day = (today - first).max(0) as usize;
        Ok(schedule.get(day).copied())
    }

    /// Messages a warming source sent to a provider today.
    pub async fn warmup_sent(&self, source: &str, provider: &str) -> Result<u64, ShapingError> {
        let key = Self::day_key(source, provider);
        Ok(Self::get::<u64>(&self.reputation, &key).await?.unwrap_or(0))
    }

    /// Counts one message of a warming source to a provider unless today's `cap` is
    /// reached; false when it is.
    pub async fn warmup_take(
        &self,
        source: &str,
        provider: &str,
        cap: u64,
    ) -> Result<bool, ShapingError> {
        let key = Self::day_key(source, provider);
        Self::cas(&self.reputation, &key, |cur: Option<u64>| {
            let n = cur.unwrap_or(0);
            if n >= cap {
                Change::Keep(false)
            } else {
                Change::Put(n + 1, true)
            }
        })
        .await
    }

    fn day_key(source: &str, provider: &str) -> String {
        let today = now_ms().div_euclid(86_400_000);
        format!("day.{source}.{provider}.{today}")
    }

    /// Notes an outcome for a source's reputation at a provider; written in batches by
    /// [`SharedState::flush_reputation`].
    pub fn record(&self, source: &str, provider: &str, verdict: Verdict) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        let r = pending
            .entry((source.to_string(), provider.to_string()))
            .or_default();
        match verdict {
            Verdict::Delivered => r.delivered += 1.0,
            Verdict::Deferred => r.deferred += 1.0,
            Verdict::Bounced => r.bounced += 1.0,
            Verdict::Blocked => r.blocked += 1.0,
        }
    }

    /// Adds the outcomes noted since the last flush to the shared records.
    pub async fn flush_reputation(&self) {
        let batch: Vec<_> = match self.pending.lock() {
            Ok(mut p) => p.drain().collect(),
            Err(_) => return,
        };
        for ((source, provider), delta) in batch {
            let key = format!("rep.{source}.{provider}");
            let half_life = self.half_life;
            let r = Self::cas(&self.reputation, &key, |cur: Option<Record>| {
                let now = now_ms();
                let mut rec = cur
                    .unwrap_or(Record {
                        at_ms: now,
                        ..Default::default()
                    })
                    .decayed(now, half_life);
                rec.add(&delta);
                Change::Put(rec, rec)
            })
            .await;
            match r {
                Ok(rec) => {
                    if let Ok(mut s) = self.scores.lock() {
                        s.insert((source, provider), (Instant::now(), rec));
                    }
                }
                Err(e) => warn!(error = %e, "reputation not recorded"),
            }
        }
    }

    /// (source, provider, score) of every record this pod has read or written.
    pub fn scores_snapshot(&self) -> Vec<(String, String, f64)> {
        self.scores
            .lock()
            .map(|s| {
                s.iter()
                    .map(|((src, prov), (_, rec))| (src.clone(), prov.clone(), rec.score()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// (source, today's cap) of every warming source this pod has used.
    pub fn warmup_snapshot(&self, schedule: &[u64]) -> Vec<(String, Option<u64>)> {
        let today = now_ms().div_euclid(86_400_000);
        self.first_days
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(src, first)| {
                        let day = (today - first).max(0) as usize;
                        (src.clone(), schedule.get(day).copied())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The reputation of a source at a provider, read at most every 30 s.
    pub async fn reputation(&self, source: &str, provider: &str) -> Record {
        let k = (source.to_string(), provider.to_string());
        if let Some((at, rec)) = self.scores.lock().ok().and_then(|s| s.get(&k).copied())
            && at.elapsed() < Duration::from_secs(30)
        {
            return rec;
        }
        let key = format!("rep.{source}.{provider}");
        let rec = match Self::get::<Record>(&self.reputation, &key).await {
            Ok(Some(r)) => r.decayed(now_ms(), self.half_life),
            Ok(None) => Record::default(),
            Err(e) => {
                warn!(error = %e, "reputation unavailable; assuming a clean record");
                Record::default()
            }
        };
        if let Ok(mut s) = self.scores.lock() {
            s.insert(k, (Instant::now(), rec));
        }
        rec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_kv_safe_and_bounded() {
        assert_eq!(token("127.0.0.2"), "127_0_0_2");
        assert_eq!(token("MX1.Example.test"), "mx1_example_test");
        let long = "a.".repeat(200);
        let t = token(&long);
        assert!(t.len() < 100, "{t}");
        assert_ne!(t, token(&"b.".repeat(200)));
    }

    #[test]
    fn scores_fall_with_blocks_more_than_with_deferrals() {
        let clean = Record {
            delivered: 100.0,
            ..Default::default()
        };
        let deferring = Record {
            deferred: 100.0,
            ..clean
        };
        let blocked = Record {
            blocked: 100.0,
            ..clean
        };
        assert!(clean.score() > 0.99);
        assert!(deferring.score() > blocked.score());
        assert!(blocked.score() < 0.3);
    }

    #[test]
    fn records_decay_by_half_life() {
        let r = Record {
            delivered: 8.0,
            at_ms: 0,
            ..Default::default()
        };
        let d = r.decayed(3 * 3600 * 1000, Duration::from_secs(3600));
        assert!((d.delivered - 1.0).abs() < 1e-9);
    }
}
