//! The HTTP API: the Podflare wire contract over our own bounded HTTP/1.1
//! layer ([`http`]).
//!
//! Request path: [`http`] (framing, size limits and timeouts, one log line
//! per request) ->
//! [`auth::Gate`] (every route but `GET /v1/healthz`) -> [`router::parse`]
//! (one `match`, body validated into an [`Action`](crate::sandbox::Action))
//! -> [`Controller`](crate::sandbox::Controller) -> reply framing.
//! Errors are [`ApiError`]s; [`ApiError::status`] is the only place that
//! chooses an HTTP status.

pub mod auth;
pub mod error;
pub mod http;
pub mod params;
pub mod router;

pub use auth::Gate;
pub use error::ApiError;
pub use http::{raise_nofile_limit, serve, ServerError, ServerHandle, Stopper};
