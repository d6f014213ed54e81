//! Limits shared by every ingress pod, kept in NATS KV with compare-and-set so that they hold
//! for the cluster, not per pod: failed AUTH attempts per client IP, and hourly message
//! counts per account.

use std::{net::IpAddr, time::Duration};

use async_nats::jetstream::{self, kv, stream::StorageType};
use bytes::Bytes;

use crate::Error;

pub const AUTH_FAILURES_BUCKET: &str = "HERALD_AUTH_FAILURES";
pub const RATES_BUCKET: &str = "HERALD_RATES";

/// CAS retries before giving up on a contended counter.
const CAS_ATTEMPTS: usize = 32;

/// A KV key for an IP address (KV keys allow no `:`).
pub fn ip_key(ip: IpAddr) -> String {
    ip.to_string().replace([':', '.'], "_")
}

/// A state bucket as Herald keeps them: latest value only, file storage, entries gone
/// `max_age` after their last write.
pub fn bucket(name: &str, description: &str, max_age: Duration, replicas: usize) -> kv::Config {
    kv::Config {
        bucket: name.to_string(),
        description: description.to_string(),
        history: 1,
        max_age,
        storage: StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// Handles on the limit buckets.
#[derive(Clone)]
pub struct Limits {
    auth_failures: kv::Store,
    rates: kv::Store,
}

fn parse_count(v: &[u8]) -> u64 {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

impl Limits {
    /// Creates (or updates) the buckets. Failures expire `auth_failure_window` after the last
    /// one; hourly counters after two hours.
    pub async fn setup(
        js: &jetstream::Context,
        replicas: usize,
        auth_failure_window: Duration,
    ) -> Result<Limits, Error> {
        let bucket = |name, description, max_age| bucket(name, description, max_age, replicas);
        let auth_failures = js
            .create_or_update_key_value(bucket(
                AUTH_FAILURES_BUCKET,
                "Failed SMTP AUTH attempts per client IP",
                auth_failure_window,
            ))
            .await
            .map_err(|e| Error::Nats(format!("bucket {AUTH_FAILURES_BUCKET}: {e}")))?;
        let rates = js
            .create_or_update_key_value(bucket(
                RATES_BUCKET,
                "Messages per account and hour",
                Duration::from_secs(2 * 3600),
            ))
            .await
            .map_err(|e| Error::Nats(format!("bucket {RATES_BUCKET}: {e}")))?;
        Ok(Limits {
            auth_failures,
            rates,
        })
    }

    /// Failed AUTH attempts recorded for `ip` (within the window).
    pub async fn auth_failures(&self, ip: IpAddr) -> Result<u64, Error> {
        Ok(self
            .auth_failures
            .get(ip_key(ip))
            .await
            .map_err(Error::nats)?
            .map(|v| parse_count(&v))
            .unwrap_or(0))
    }

    /// Records one failed AUTH attempt from `ip`; returns the count after it.
    pub async fn record_auth_failure(&self, ip: IpAddr) -> Result<u64, Error> {
        add(&self.auth_failures, &ip_key(ip), 1, u64::MAX)
            .await
            .map(|r| r.unwrap_or(u64::MAX))
    }

    /// Messages counted for `account` in the hour `hour` (Unix hours).
    pub async fn hourly_count(&self, account: &str, hour: i64) -> Result<u64, Error> {
        Ok(self
            .rates
            .get(rate_key(account, hour))
            .await
            .map_err(Error::nats)?
            .map(|v| parse_count(&v))
            .unwrap_or(0))
    }

    /// Adds `n` to the account's count for `hour` unless that would exceed `ceiling`;
    /// returns the new count, or `None` when refused.
    pub async fn add_hourly(
        &self,
        account: &str,
        hour: i64,
        n: u64,
        ceiling: u64,
    ) -> Result<Option<u64>, Error> {
        add(&self.rates, &rate_key(account, hour), n, ceiling).await
    }
}

impl Limits {
    /// Gives back `n` counted by [`Limits::add_hourly`] for a message that was not queued
    /// after all. Best effort: a failure only leaves the count high until the hour ends.
    pub async fn release_hourly(&self, account: &str, hour: i64, n: u64) {
        let key = rate_key(account, hour);
        for _ in 0..CAS_ATTEMPTS {
            let Ok(Some(e)) = self.rates.entry(key.as_str()).await else {
                return;
            };
            let next = parse_count(&e.value).saturating_sub(n);
            if self
                .rates
                .update(key.as_str(), Bytes::from(next.to_string()), e.revision)
                .await
                .is_ok()
            {
                return;
            }
        }
    }
}

fn rate_key(account: &str, hour: i64) -> String {
    format!(
        "{}.{hour}",
        account.replace(['/', '.', ' ', '*', '>', ':'], "_")
    )
}

/// Compare-and-set increment: the value only moves from what every pod saw.
async fn add(store: &kv::Store, key: &str, n: u64, ceiling: u64) -> Result<Option<u64>, Error> {
    for _ in 0..CAS_ATTEMPTS {
        match store.entry(key).await.map_err(Error::nats)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let next = parse_count(&e.value).saturating_add(n);
                if next > ceiling {
                    return Ok(None);
                }
                if store
                    .update(key, Bytes::from(next.to_string()), e.revision)
                    .await
                    .is_ok()
                {
                    return Ok(Some(next));
                }
            }
            other => {
                if n > ceiling {
                    return Ok(None);
                }
                // Absent (or deleted/purged): create, or CAS over the tombstone.
                let put = match other {
                    Some(e) => store
                        .update(key, Bytes::from(n.to_string()), e.revision)
                        .await
                        .is_ok(),
                    None => store.create(key, Bytes::from(n.to_string())).await.is_ok(),
                };
                if put {
                    return Ok(Some(n));
                }
            }
        }
    }
    Err(Error::Nats(format!("counter {key} kept changing")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hold_only_kv_safe_characters() {
        assert_eq!(ip_key("127.0.0.1".parse().expect("ip")), "127_0_0_1");
        assert_eq!(ip_key("2001:db8::1".parse().expect("ip")), "2001_db8__1");
        assert_eq!(rate_key("ns/app.v1", 7), "ns_app_v1.7");
    }
}
