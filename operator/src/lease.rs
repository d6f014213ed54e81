//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator
//! replicas exactly one reconciles at a time.
//!
//! The holder renews the Lease every third of its duration. Another replica takes it over
//! only once `renewTime + leaseDurationSeconds` has passed. Every write carries the Lease's
//! `resourceVersion`, so when two replicas race for an expired Lease the API server accepts
//! one write and answers 409 Conflict to the other. A holder that cannot renew before its
//! own Lease expires stops reconciling (the process exits and restarts as a candidate):
//! by then another replica may already hold it.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{Api, api::PostParams};
use tokio::sync::watch;

use crate::Error;

/// Which Lease, and who we are.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// Unique per replica: the pod name.
    pub identity: String,
    pub duration: Duration,
}

/// The outcome of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the Lease until `renewTime + duration`.
    Held,
    /// Someone else holds it (their identity, when known).
    HeldBy(String),
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

fn spec(cfg: &LeaseConfig, now: Timestamp, acquired: Timestamp, transitions: i32) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(i32::try_from(cfg.duration.as_secs()).unwrap_or(i32::MAX)),
        acquire_time: Some(MicroTime(acquired)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

/// One attempt to take or renew the Lease at time `now`.
pub async fn try_acquire(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    now: Timestamp,
) -> Result<Attempt, Error> {
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(spec(cfg, now, now, 0)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Attempt::Held),
            // Another replica created it first.
            Err(e) if is_status(&e, 409) => Ok(Attempt::HeldBy(String::new())),
            Err(e) => Err(e.into()),
        };
    };
    let current = lease.spec.clone().unwrap_or_default();
    let holder = current.holder_identity.clone().unwrap_or_default();
    let transitions = current.lease_transitions.unwrap_or(0);
    let new_spec = if holder == cfg.identity {
        let acquired = current.acquire_time.map(|t| t.0).unwrap_or(now);
        spec(cfg, now, acquired, transitions)
    } else {
        let renewed = current.renew_time.map(|t| t.0);
        let duration = SignedDuration::from_secs(i64::from(
            current.lease_duration_seconds.unwrap_or_default(),
        ));
        // Free when released (no holder) or not renewed within its duration.
        let free = holder.is_empty() || renewed.is_none_or(|r| r + duration <= now);
        if !free {
            return Ok(Attempt::HeldBy(holder));
        }
        spec(cfg, now, now, transitions + 1)
    };
    lease.spec = Some(new_spec);
    // `lease` still carries the resourceVersion we read: a concurrent writer makes this 409.
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(Attempt::Held),
        Err(e) if is_status(&e, 409) => Ok(Attempt::HeldBy(holder)),
        Err(e) => Err(e.into()),
    }
}

/// Waits until this replica holds the Lease (or `shutdown` turns true: `Ok(false)`), then
/// keeps renewing it in the background. The returned receiver turns true when leadership
/// is lost; the caller must then stop reconciling.
pub async fn acquire(
    api: Api<Lease>,
    cfg: LeaseConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Option<watch::Receiver<bool>>, Error> {
    let retry = cfg.duration / 3;
    loop {
        match try_acquire(&api, &cfg, Timestamp::now()).await {
            Ok(Attempt::Held) => break,
            Ok(Attempt::HeldBy(holder)) => {
                tracing::info!(lease = %cfg.name, holder, "another replica leads; waiting");
            }
            Err(e) => tracing::warn!(lease = %cfg.name, error = %e, "lease attempt failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return Ok(None) },
        }
    }
    tracing::info!(lease = %cfg.name, identity = %cfg.identity, "leading");
    let (lost_tx, lost_rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(retry).await;
            if lost_tx.is_closed() {
                return;
            }
            match try_acquire(&api, &cfg, Timestamp::now()).await {
                Ok(Attempt::Held) => last_renewal = tokio::time::Instant::now(),
                Ok(Attempt::HeldBy(holder)) => {
                    tracing::error!(lease = %cfg.name, holder, "lease taken over: stepping down");
                    let _ = lost_tx.send(true);
                    return;
                }
                // Step down a third of the duration before the Lease can expire, so that
                // no other replica can be leading while this one still reconciles.
                Err(e) if last_renewal.elapsed() >= cfg.duration.saturating_sub(retry) => {
                    tracing::error!(lease = %cfg.name, error = %e, "lease expired before it could be renewed: stepping down");
                    let _ = lost_tx.send(true);
                    return;
                }
                Err(e) => {
                    tracing::warn!(lease = %cfg.name, error = %e, "lease renewal failed; retrying")
                }
            }
        }
    });
    Ok(Some(lost_rx))
}
