//! The operations both front-ends serve, behind one trait: [`Reports`] answers them from
//! JetStream; the handlers' tests answer them from memory.

use std::{future::Future, time::Duration};

use async_nats::jetstream::{self, stream::Stream};
use herald_core::{
    config::Config,
    queue::{EVENTS_STREAM, Queue},
    suppression::{Suppressed, Suppression},
    types::Mailbox,
};
use serde::Serialize;

use crate::{
    AccountId, ApiError,
    history::{self, Lookup, MessageHistory},
    stats::{self, AccountStats},
    status::{self, QueueStatus},
};

/// An account's suppression list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SuppressionList {
    pub account: String,
    pub suppressions: Vec<Suppressed>,
    /// False when the list was longer than `api.max_scan`.
    pub complete: bool,
}

/// What the API can be asked. Inputs arrive parsed: both front-ends validate them with the
/// same functions ([`Lookup::parse`], [`AccountId::parse`], [`parse_address`]).
pub trait Backend: Send + Sync + 'static {
    fn message(
        &self,
        lookup: &Lookup,
    ) -> impl Future<Output = Result<MessageHistory, ApiError>> + Send;

    /// `since`: Unix seconds, already defaulted ([`stats::window_start`]).
    fn account_stats(
        &self,
        account: &AccountId,
        since: i64,
    ) -> impl Future<Output = Result<AccountStats, ApiError>> + Send;

    fn suppressions(
        &self,
        account: &AccountId,
    ) -> impl Future<Output = Result<SuppressionList, ApiError>> + Send;

    /// `NotFound` when the address was not suppressed.
    fn delete_suppression(
        &self,
        account: &AccountId,
        address: &Mailbox,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;

    fn queue_status(&self) -> impl Future<Output = Result<QueueStatus, ApiError>> + Send;
}

/// An address as a recipient would be written (`local@domain`).
pub fn parse_address(s: &str) -> Result<Mailbox, ApiError> {
    Mailbox::parse(s.trim().trim_start_matches('<').trim_end_matches('>'))
        .ok_or_else(|| ApiError::BadRequest(format!("{s:?} is not an email address")))
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// The API's view of Herald's state in NATS.
#[derive(Clone)]
pub struct Reports {
    js: jetstream::Context,
    events: Stream,
    suppression: Suppression,
    queue_lifetime: Duration,
    max_scan: usize,
    message_id_lookback: Duration,
}

impl Reports {
    /// Opens the events stream and the suppression bucket (created, like every stream, by
    /// whichever role starts first).
    pub async fn new(queue: &Queue, config: &Config) -> Result<Reports, ApiError> {
        let js = queue.jetstream().clone();
        let events = js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(|e| ApiError::Unavailable(format!("stream {EVENTS_STREAM}: {e}")))?;
        let suppression =
            Suppression::setup(&js, config.nats.replicas, config.delivery.suppression_ttl).await?;
        Ok(Reports {
            js,
            events,
            suppression,
            queue_lifetime: config.nats.queue_lifetime,
            max_scan: config.api.max_scan.max(1),
            message_id_lookback: config.api.message_id_lookback,
        })
    }
}

impl Backend for Reports {
    #[tracing::instrument(name = "api.message", skip_all, fields(herald.lookup = ?lookup))]
    async fn message(&self, lookup: &Lookup) -> Result<MessageHistory, ApiError> {
        let (id, at_ms) = match lookup {
            Lookup::Queue { id, at_ms } => (id.clone(), *at_ms),
            Lookup::MessageId(message_id) => {
                let since = now_unix()
                    - i64::try_from(self.message_id_lookback.as_secs()).unwrap_or(i64::MAX);
                let id = history::find_by_message_id(
                    &self.events,
                    message_id,
                    since,
                    self.max_scan,
                )
                .await?
                .ok_or_else(|| {
                    ApiError::NotFound(format!(
                        "no message with Message-ID <{message_id}> accepted in the last {}s \
                         (api.message_id_lookback)",
                        self.message_id_lookback.as_secs()
                    ))
                })?;
                match Lookup::parse(&id)? {
                    Lookup::Queue { id, at_ms } => (id, at_ms),
                    Lookup::MessageId(_) => {
                        return Err(ApiError::Unavailable(format!(
                            "event with queue id {id:?}, which is not a queue id"
                        )));
                    }
                }
            }
        };
        history::read(&self.events, &id, at_ms, self.queue_lifetime, self.max_scan).await
    }

    #[tracing::instrument(name = "api.account_stats", skip_all, fields(herald.account = %account, herald.since = since))]
    async fn account_stats(
        &self,
        account: &AccountId,
        since: i64,
    ) -> Result<AccountStats, ApiError> {
        stats::read(&self.events, account, since, self.max_scan).await
    }

    #[tracing::instrument(name = "api.suppressions", skip_all, fields(herald.account = %account))]
    async fn suppressions(&self, account: &AccountId) -> Result<SuppressionList, ApiError> {
        let id = account.to_string();
        let (suppressions, complete) = self.suppression.list(&id, self.max_scan).await?;
        Ok(SuppressionList {
            account: id,
            suppressions,
            complete,
        })
    }

    #[tracing::instrument(name = "api.delete_suppression", skip_all, fields(herald.account = %account))]
    async fn delete_suppression(
        &self,
        account: &AccountId,
        address: &Mailbox,
    ) -> Result<(), ApiError> {
        let id = account.to_string();
        if self.suppression.remove(&id, &address.to_string()).await? {
            tracing::info!(account = %id, "address taken off the suppression list");
            Ok(())
        } else {
            Err(ApiError::NotFound(format!(
                "{address} is not on the suppression list of {id}"
            )))
        }
    }

    #[tracing::instrument(name = "api.queue_status", skip_all)]
    async fn queue_status(&self) -> Result<QueueStatus, ApiError> {
        status::queue_status(&self.js)
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_parsed_like_recipients() {
        assert_eq!(
            parse_address("<Reject@Example.TEST>")
                .expect("ok")
                .to_string(),
            "Reject@example.test"
        );
        for bad in ["", "nobody", "@example.test", "a@", "a@bad..domain"] {
            assert!(
                matches!(parse_address(bad), Err(ApiError::BadRequest(_))),
                "{bad:?} accepted"
            );
        }
    }
}
