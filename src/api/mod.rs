//! The HTTP API: the Podflare wire contract over tiny_http.
//!
//! Request path: [`server`] (size limits, one log line per request) ->
//! [`auth::Gate`] (every route but `GET /v1/healthz`) -> [`router::parse`]
//! (one `match`, body validated into an [`Action`](crate::sandbox::Action))
//! -> [`Controller`](crate::sandbox::Controller) -> reply framing.
//! Errors are [`ApiError`]s; [`ApiError::status`] is the only place that
//! chooses an HTTP status.

pub mod auth;
pub mod error;

pub mod params;
pub mod router;
pub mod server;

pub use auth::Gate;
pub use error::ApiError;

pub use server::{serve, ServerError, ServerHandle};
