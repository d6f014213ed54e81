//! The reports over gRPC: service `herald.v1.Reports` (proto/herald/v1/api.proto).

use std::sync::Arc;

use tonic::{Request, Response, Status, service::interceptor::InterceptedService};

use crate::{
    AccountId, ApiError,
    auth::Auth,
    history::Lookup,
    proto::{
        self,
        reports_server::{Reports as ReportsService, ReportsServer},
    },
    reports::{Backend, now_unix, parse_address},
    stats,
    status::{ConsumerStatus, StreamStatus},
};

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let message = e.to_string();
        match e {
            ApiError::BadRequest(_) => Status::invalid_argument(message),
            ApiError::NotFound(_) => Status::not_found(message),
            ApiError::Unauthenticated => Status::unauthenticated(message),
            ApiError::Unavailable(_) => {
                tracing::warn!(error = %message, "API request failed");
                Status::unavailable(message)
            }
            ApiError::Setup(_) | ApiError::Bind { .. } | ApiError::Serve(_) => {
                Status::internal(message)
            }
        }
    }
}

fn stream(s: StreamStatus) -> proto::StreamStatus {
    proto::StreamStatus {
        name: s.name,
        messages: s.messages,
        bytes: s.bytes,
        consumers: s.consumers as u64,
    }
}

fn consumer(c: ConsumerStatus) -> proto::ConsumerStatus {
    proto::ConsumerStatus {
        name: c.name,
        pending: c.pending,
        ack_pending: c.ack_pending,
        redelivered: c.redelivered,
    }
}

pub struct Grpc<B> {
    backend: Arc<B>,
}

#[tonic::async_trait]
impl<B: Backend> ReportsService for Grpc<B> {
    async fn get_message(
        &self,
        request: Request<proto::GetMessageRequest>,
    ) -> Result<Response<proto::GetMessageResponse>, Status> {
        let lookup = Lookup::parse(&request.get_ref().queue_id)?;
        let m = self.backend.message(&lookup).await?;
        Ok(Response::new(proto::GetMessageResponse {
            queue_id: m.queue_id,
            events: m.events,
            recipients: m
                .recipients
                .into_iter()
                .map(|r| proto::RecipientState {
                    address: r.address,
                    state: r.state as i32,
                    at: r.at,
                    reply: r.reply,
                    bounce_class: r.bounce_class,
                })
                .collect(),
            complete: m.complete,
        }))
    }

    async fn account_stats(
        &self,
        request: Request<proto::AccountStatsRequest>,
    ) -> Result<Response<proto::AccountStatsResponse>, Status> {
        let r = request.get_ref();
        let account = AccountId::parse(&r.account)?;
        let since = stats::window_start(Some(r.since_unix), now_unix())?;
        let s = self.backend.account_stats(&account, since).await?;
        Ok(Response::new(proto::AccountStatsResponse {
            account: s.account,
            since_unix: s.since,
            received: s.received,
            delivered: s.delivered,
            deferred: s.deferred,
            bounced: s.bounced,
            failed: s.failed,
            suppressed: s.suppressed,
            expired: s.expired,
            delayed: s.delayed,
            bounced_by_class: s.bounced_by_class.into_iter().collect(),
            complete: s.complete,
        }))
    }

    async fn list_suppressions(
        &self,
        request: Request<proto::ListSuppressionsRequest>,
    ) -> Result<Response<proto::ListSuppressionsResponse>, Status> {
        let account = AccountId::parse(&request.get_ref().account)?;
        let list = self.backend.suppressions(&account).await?;
        Ok(Response::new(proto::ListSuppressionsResponse {
            account: list.account,
            suppressions: list
                .suppressions
                .into_iter()
                .map(|s| proto::Suppression {
                    address: s.address,
                    reason: s.reason,
                    at: s.at,
                })
                .collect(),
            complete: list.complete,
        }))
    }

    async fn delete_suppression(
        &self,
        request: Request<proto::DeleteSuppressionRequest>,
    ) -> Result<Response<proto::DeleteSuppressionResponse>, Status> {
        let r = request.get_ref();
        let account = AccountId::parse(&r.account)?;
        let address = parse_address(&r.address)?;
        self.backend.delete_suppression(&account, &address).await?;
        Ok(Response::new(proto::DeleteSuppressionResponse {
            account: account.to_string(),
            address: address.to_string(),
        }))
    }

    async fn queue_status(
        &self,
        _request: Request<proto::QueueStatusRequest>,
    ) -> Result<Response<proto::QueueStatusResponse>, Status> {
        let s = self.backend.queue_status().await?;
        Ok(Response::new(proto::QueueStatusResponse {
            queue: Some(stream(s.queue)),
            bodies: Some(stream(s.bodies)),
            events: Some(stream(s.events)),
            delivery: s.delivery.map(consumer),
        }))
    }
}

/// The token check in front of every call.
#[derive(Clone)]
pub struct Authenticate(Auth);

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        self.0.check(presented)?;
        Ok(request)
    }
}

pub fn service<B: Backend>(
    backend: Arc<B>,
    auth: Auth,
) -> InterceptedService<ReportsServer<Grpc<B>>, Authenticate> {
    ReportsServer::with_interceptor(Grpc { backend }, Authenticate(auth))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_their_grpc_code() {
        for (e, code) in [
            (
                ApiError::BadRequest("x".into()),
                tonic::Code::InvalidArgument,
            ),
            (ApiError::Unauthenticated, tonic::Code::Unauthenticated),
            (ApiError::NotFound("x".into()), tonic::Code::NotFound),
            (ApiError::Unavailable("x".into()), tonic::Code::Unavailable),
        ] {
            assert_eq!(Status::from(e).code(), code);
        }
    }
}
