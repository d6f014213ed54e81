//! DKIM key rotation (`spec.dkim.rotateAfter`), as changes to the DKIM Secret's data.
//!
//! The Secret holds, per algorithm, the active key (`rsa-sha256.pem`, the one the data plane
//! signs with) and the selector it is published under (`rsa-sha256.selector`; absent: the
//! spec's). A rotation goes through three states, each a reconcile's decision:
//!
//! 1. **start**: the active keys are older than `rotateAfter`: a new key per algorithm is
//!    stored as `next.<alg>.pem` under a new selector `<spec selector>-<YYYYMMDDHHMM>`.
//!    Status lists it (role `Next`) beside the active one; signing does not change.
//! 2. **promote**: every `Next` record is verified in DNS: the next keys become the active
//!    ones and the old ones move to `previous.*` until `previous-until` (now + grace).
//!    Nothing ever signs with a key whose record has not been seen in DNS.
//! 3. **retire**: `previous-until` has passed: the previous keys are deleted, and status no
//!    longer lists their records (they may be removed from DNS).
//!
//! Only a Secret the operator made is rotated.

use std::{collections::BTreeMap, time::Duration};

use herald_core::resources::{DnsRecordStatus, KeyRole, MailDomain, RecordState, SelectorStatus};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::{dkim, domain::Transition};

/// Prefix of the pending keys' entries.
pub const NEXT: &str = "next.";
/// Prefix of the rotated-out keys' entries.
pub const PREVIOUS: &str = "previous.";
/// RFC 3339 time the active keys were made (else the Secret's creation time).
pub const KEYS_CREATED_AT: &str = "keys-created-at";
/// RFC 3339 time after which the previous keys are deleted.
pub const PREVIOUS_UNTIL: &str = "previous-until";
/// Default `rotationGrace`.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Entries to set and entries to delete in the Secret's data, and the Event saying why.
#[derive(Debug, Clone)]
pub struct Change {
    pub set: BTreeMap<String, String>,
    pub remove: Vec<String>,
    pub event: Transition,
}

impl Change {
    fn new(reason: &'static str, note: String) -> Change {
        Change {
            set: BTreeMap::new(),
            remove: Vec::new(),
            event: Transition {
                warning: false,
                reason,
                action: "RotateKey".into(),
                note,
            },
        }
    }

    /// Applies the change to an in-memory copy of the data.
    pub fn apply(&self, data: &mut BTreeMap<String, String>) {
        for k in &self.remove {
            data.remove(k);
        }
        data.extend(self.set.clone());
    }
}

fn duration(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn has_prefixed(data: &BTreeMap<String, String>, prefix: &str) -> bool {
    data.keys().any(|k| k.starts_with(prefix))
}

/// Step 3: deletes the previous keys once their grace period is over.
pub fn retire(data: &BTreeMap<String, String>, now: Timestamp) -> Option<Change> {
    let until: Timestamp = data.get(PREVIOUS_UNTIL)?.trim().parse().ok()?;
    if now < until {
        return None;
    }
    let mut change = Change::new(
        "PreviousKeyRemoved",
        "the rotated-out DKIM keys are deleted; their TXT records may be removed from DNS".into(),
    );
    change.remove = data
        .keys()
        .filter(|k| k.starts_with(PREVIOUS) || *k == PREVIOUS_UNTIL)
        .cloned()
        .collect();
    Some(change)
}

/// Step 1: generates the next keys when the active ones are older than `rotateAfter` and
/// no rotation is under way. `created` is when the active keys were made.
pub fn start(
    md: &MailDomain,
    data: &BTreeMap<String, String>,
    created: Timestamp,
    now: Timestamp,
) -> Result<Option<Change>, dkim::KeyError> {
    let Some(after) = md.spec.dkim.rotate_after else {
        return Ok(None);
    };
    if has_prefixed(data, NEXT) || has_prefixed(data, PREVIOUS) || created + duration(after) > now {
        return Ok(None);
    }
    let stamp = now.strftime("%Y%m%d%H%M").to_string();
    let mut change = Change::new("KeyRotationStarted", String::new());
    let mut selectors = Vec::new();
    for (base, alg) in md.spec.dkim.keys() {
        let selector = format!("{base}-{stamp}");
        change
            .set
            .insert(format!("{NEXT}{}", alg.secret_key()), dkim::generate(alg)?);
        change
            .set
            .insert(format!("{NEXT}{}", alg.selector_key()), selector.clone());
        selectors.push(selector);
    }
    change.event.note = format!(
        "new DKIM key(s) under selector(s) {}: publish the Next records in status.selectors; \
         signing switches once they are verified",
        selectors.join(", ")
    );
    Ok(Some(change))
}

/// Step 2: makes the next keys active once every one of their records is verified.
pub fn promote(
    md: &MailDomain,
    data: &BTreeMap<String, String>,
    selectors: &[SelectorStatus],
    rows: &[DnsRecordStatus],
    now: Timestamp,
) -> Option<Change> {
    let next: Vec<&SelectorStatus> = selectors
        .iter()
        .filter(|s| s.role == KeyRole::Next)
        .collect();
    let verified = |name: &str| {
        rows.iter()
            .any(|r| r.name == name && r.state == RecordState::Verified)
    };
    if next.is_empty() || !next.iter().all(|s| verified(&s.name)) {
        return None;
    }
    let grace = md.spec.dkim.rotation_grace.unwrap_or(DEFAULT_GRACE);
    let mut change = Change::new(
        "KeyRotated",
        format!(
            "signing with {}; the previous key(s) stay listed until {}",
            next.iter()
                .map(|s| s.selector.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            rfc3339(now + duration(grace))
        ),
    );
    for (base, alg) in md.spec.dkim.keys() {
        let (key, sel) = (alg.secret_key(), alg.selector_key());
        if let (Some(pem), Some(selector)) = (
            data.get(&format!("{NEXT}{key}")),
            data.get(&format!("{NEXT}{sel}")),
        ) {
            if let Some(old) = data.get(key) {
                change.set.insert(format!("{PREVIOUS}{key}"), old.clone());
                let old_selector = data.get(sel).cloned().unwrap_or(base);
                change.set.insert(format!("{PREVIOUS}{sel}"), old_selector);
            }
            change.set.insert(key.to_string(), pem.clone());
            change.set.insert(sel.to_string(), selector.clone());
        }
    }
    change.remove = data
        .keys()
        .filter(|k| k.starts_with(NEXT))
        .cloned()
        .collect();
    change.set.insert(KEYS_CREATED_AT.into(), rfc3339(now));
    change
        .set
        .insert(PREVIOUS_UNTIL.into(), rfc3339(now + duration(grace)));
    Some(change)
}
