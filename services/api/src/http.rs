//! The reports as JSON over HTTP (axum):
//!
//! - `GET /v1/messages/{queue_id or Message-ID}`
//! - `GET /v1/accounts/{namespace}/{name}/stats?since=<unix seconds>`
//! - `GET /v1/accounts/{namespace}/{name}/suppressions`
//! - `DELETE /v1/accounts/{namespace}/{name}/suppressions/{address}`
//! - `GET /v1/queue`
//!
//! Errors are `{"error": "<code>", "message": "..."}` with 400 (bad input), 401 (no or wrong
//! token; `WWW-Authenticate: Bearer`), 404 (unknown message, address not suppressed) or 503
//! (JetStream unavailable).

use std::sync::Arc;

use axum::{
    Router,
    extract::{Path, RawQuery, Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use herald_core::envelope::Event;
use serde::Serialize;

use crate::{
    AccountId, ApiError,
    auth::Auth,
    history::{Lookup, MessageHistory},
    reports::{Backend, now_unix, parse_address},
    stats,
};

/// A JSON answer.
fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(e) => error_response(&ApiError::Serve(format!("encoding the answer: {e}"))),
    }
}

fn status_of(e: &ApiError) -> StatusCode {
    match e {
        ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ApiError::NotFound(_) => StatusCode::NOT_FOUND,
        ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
        ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        ApiError::Setup(_) | ApiError::Bind { .. } | ApiError::Serve(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

fn error_response(e: &ApiError) -> Response {
    #[derive(Serialize)]
    struct Body<'a> {
        error: &'a str,
        message: String,
    }
    let status = status_of(e);
    if status.is_server_error() {
        tracing::warn!(error = %e, "API request failed");
    }
    let body = serde_json::to_vec(&Body {
        error: e.code(),
        message: e.to_string(),
    })
    .unwrap_or_default();
    let mut response = (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(&self)
    }
}

#[derive(Serialize)]
struct EventView<'a> {
    kind: &'static str,
    at: i64,
    queue_id: &'a str,
    account: &'a str,
    sender: &'a str,
    recipients: &'a [String],
    domain: &'a str,
    remote_host: &'a str,
    reply_code: u32,
    enhanced_code: &'a str,
    reply_text: &'a str,
    attempt: u32,
    message_id: &'a str,
    size: u64,
    source_ip: &'a str,
    tls: bool,
    bounce_class: &'a str,
    duration_ms: u64,
    site: &'a str,
}

impl<'a> From<&'a Event> for EventView<'a> {
    fn from(e: &'a Event) -> Self {
        EventView {
            kind: e.kind().word(),
            at: e.at,
            queue_id: &e.queue_id,
            account: &e.account,
            sender: &e.sender,
            recipients: &e.recipients,
            domain: &e.domain,
            remote_host: &e.remote_host,
            reply_code: e.reply_code,
            enhanced_code: &e.enhanced_code,
            reply_text: &e.reply_text,
            attempt: e.attempt,
            message_id: &e.message_id,
            size: e.size,
            source_ip: &e.source_ip,
            tls: e.tls,
            bounce_class: &e.bounce_class,
            duration_ms: e.duration_ms,
            site: &e.site,
        }
    }
}

#[derive(Serialize)]
struct RecipientView<'a> {
    address: &'a str,
    state: &'static str,
    at: i64,
    reply: &'a str,
    bounce_class: &'a str,
}

#[derive(Serialize)]
struct MessageView<'a> {
    queue_id: &'a str,
    complete: bool,
    recipients: Vec<RecipientView<'a>>,
    events: Vec<EventView<'a>>,
}

impl<'a> From<&'a MessageHistory> for MessageView<'a> {
    fn from(m: &'a MessageHistory) -> Self {
        MessageView {
            queue_id: &m.queue_id,
            complete: m.complete,
            recipients: m
                .recipients
                .iter()
                .map(|r| RecipientView {
                    address: &r.address,
                    state: r.state.word(),
                    at: r.at,
                    reply: &r.reply,
                    bounce_class: &r.bounce_class,
                })
                .collect(),
            events: m.events.iter().map(EventView::from).collect(),
        }
    }
}

async fn message<B: Backend>(
    State(backend): State<Arc<B>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let lookup = Lookup::parse(&id)?;
    let history = backend.message(&lookup).await?;
    Ok(json(StatusCode::OK, &MessageView::from(&history)))
}

/// `since` from a query string (`since=<unix seconds>`); other parameters are ignored.
fn since_param(query: Option<&str>) -> Result<Option<i64>, ApiError> {
    let Some(query) = query else {
        return Ok(None);
    };
    let mut since = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "since" {
            since = Some(value.parse::<i64>().map_err(|_| {
                ApiError::BadRequest(format!("since={value:?} is not a Unix time in seconds"))
            })?);
        }
    }
    Ok(since)
}

async fn account_stats<B: Backend>(
    State(backend): State<Arc<B>>,
    Path((namespace, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let account = AccountId::new(&namespace, &name)?;
    let since = stats::window_start(since_param(query.as_deref())?, now_unix())?;
    let stats = backend.account_stats(&account, since).await?;
    Ok(json(StatusCode::OK, &stats))
}

async fn suppressions<B: Backend>(
    State(backend): State<Arc<B>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let account = AccountId::new(&namespace, &name)?;
    let list = backend.suppressions(&account).await?;
    Ok(json(StatusCode::OK, &list))
}

async fn delete_suppression<B: Backend>(
    State(backend): State<Arc<B>>,
    Path((namespace, name, address)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    #[derive(Serialize)]
    struct Deleted {
        account: String,
        address: String,
        deleted: bool,
    }
    let account = AccountId::new(&namespace, &name)?;
    let address = parse_address(&address)?;
    backend.delete_suppression(&account, &address).await?;
    Ok(json(
        StatusCode::OK,
        &Deleted {
            account: account.to_string(),
            address: address.to_string(),
            deleted: true,
        },
    ))
}

async fn queue<B: Backend>(State(backend): State<Arc<B>>) -> Result<Response, ApiError> {
    let status = backend.queue_status().await?;
    Ok(json(StatusCode::OK, &status))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint: see /v1/messages, /v1/accounts, /v1/queue".into())
}

async fn authenticate(State(auth): State<Auth>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    match auth.check(presented) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

pub fn router<B: Backend>(backend: Arc<B>, auth: Auth) -> Router {
    Router::new()
        .route("/v1/messages/{id}", get(message::<B>))
        .route(
            "/v1/accounts/{namespace}/{name}/stats",
            get(account_stats::<B>),
        )
        .route(
            "/v1/accounts/{namespace}/{name}/suppressions",
            get(suppressions::<B>),
        )
        .route(
            "/v1/accounts/{namespace}/{name}/suppressions/{address}",
            axum::routing::delete(delete_suppression::<B>),
        )
        .route("/v1/queue", get(queue::<B>))
        .fallback(not_found)
        .with_state(backend)
        // Outermost: nothing, not even "no such endpoint", answers without the token.
        .layer(middleware::from_fn_with_state(auth, authenticate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_read_from_the_query() {
        assert_eq!(since_param(None).expect("ok"), None);
        assert_eq!(
            since_param(Some("since=1700000000")).expect("ok"),
            Some(1_700_000_000)
        );
        assert_eq!(since_param(Some("x=1&since=5")).expect("ok"), Some(5));
        assert_eq!(since_param(Some("x=1")).expect("ok"), None);
        assert!(matches!(
            since_param(Some("since=yesterday")),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn errors_have_their_http_status() {
        for (e, status) in [
            (ApiError::BadRequest("x".into()), 400),
            (ApiError::Unauthenticated, 401),
            (ApiError::NotFound("x".into()), 404),
            (ApiError::Unavailable("x".into()), 503),
        ] {
            assert_eq!(status_of(&e).as_u16(), status, "{e:?}");
        }
        let r = error_response(&ApiError::Unauthenticated);
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
