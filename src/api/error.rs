//! API errors and the one place they become HTTP statuses.

use super::http::request::{HttpError, MAX_HEADERS, MAX_HEAD_BYTES};
use crate::sandbox::SandboxError;

/// Everything a request can fail with, as the client sees it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, wrong type, out-of-range or unknown value. The message
    /// names the field.
    #[error("{0}")]
    BadRequest(String),
    /// No `Authorization: Bearer` header.
    #[error("missing Authorization: Bearer <key>")]
    MissingAuth,
    /// A bearer token that matches no configured key.
    #[error("invalid api key")]
    InvalidKey,
    /// Unknown sandbox, space, PTY session, or route.
    #[error("{0}")]
    NotFound(String),
    /// The resource exists but cannot serve this now, or any more (a space
    /// another request is resuming, one whose files are damaged).
    #[error("{0}")]
    Conflict(String),
    /// Known path, wrong method.
    #[error("method {method} not allowed on {path}; allowed: {allow}")]
    MethodNotAllowed {
        /// Method used.
        method: String,
        /// Path pattern.
        path: &'static str,
        /// Methods the path accepts.
        allow: &'static str,
    },
    /// Body over `PODFLARE_MAX_BODY_MIB`.
    #[error("request body too large: the limit is {limit_mib} MiB (PODFLARE_MAX_BODY_MIB)")]
    PayloadTooLarge {
        /// The limit in MiB.
        limit_mib: usize,
    },
    /// Request headers over the fixed limit.
    #[error("request headers too large: at most {max_count} headers and {max_bytes} bytes")]
    HeadersTooLarge {
        /// Most headers accepted.
        max_count: usize,
        /// Most header bytes accepted.
        max_bytes: usize,
    },
    /// The request's head or body did not arrive within its timeout
    /// (`PODFLARE_HTTP_HEADER_TIMEOUT_SECS`, `PODFLARE_HTTP_BODY_TIMEOUT_SECS`).
    #[error("timed out waiting for the request (PODFLARE_HTTP_HEADER_TIMEOUT_SECS / PODFLARE_HTTP_BODY_TIMEOUT_SECS)")]
    RequestTimeout,
    /// A request line naming another HTTP version (the HTTP/2 preface).
    #[error("HTTP version not supported: this server speaks HTTP/1.1 and HTTP/1.0")]
    HttpVersion,
    /// Too many open connections (`PODFLARE_MAX_CONNECTIONS`).
    #[error("{0}")]
    Unavailable(String),
    /// Host at capacity (streams, memory, sandbox count).
    #[error("{0}")]
    Capacity(String),
    /// In the contract, not served here yet.
    #[error("{0}")]
    NotImplemented(String),
    /// Our own fault; the cause is logged, not sent.
    #[error("internal error (the cause is in the host's log)")]
    Internal(String),
}

impl ApiError {
    /// THE mapping from error to HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::MissingAuth | ApiError::InvalidKey => 401,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::Conflict(_) => 409,
            ApiError::PayloadTooLarge { .. } => 413,
            ApiError::HeadersTooLarge { .. } => 431,
            ApiError::RequestTimeout => 408,
            ApiError::Capacity(_) => 429,
            ApiError::Internal(_) => 500,
            ApiError::NotImplemented(_) => 501,
            ApiError::Unavailable(_) => 503,
            ApiError::HttpVersion => 505,
        }
    }

    /// `{"error": "<message>"}`, formatted exactly like the contract's
    /// examples (a space after the colon).
    pub fn body(&self) -> String {
        let msg = serde_json::Value::String(self.to_string());
        format!("{{\"error\": {msg}}}")
    }

    /// A 400 naming `field`.
    pub fn field(field: &str, why: impl std::fmt::Display) -> Self {
        ApiError::BadRequest(format!("{field}: {why}"))
    }
}

impl ApiError {
    /// The error for a request that could not be read off the wire, given
    /// the body limit (for the 413 message).
    pub fn from_http(e: HttpError, max_body: usize) -> Self {
        match e {
            HttpError::Malformed(why) => ApiError::BadRequest(why),
            HttpError::Version => ApiError::HttpVersion,
            HttpError::HeadTooLarge => ApiError::HeadersTooLarge { max_count: MAX_HEADERS, max_bytes: MAX_HEAD_BYTES },
            HttpError::BodyTooLarge => ApiError::PayloadTooLarge { limit_mib: max_body >> 20 },
            HttpError::Timeout => ApiError::RequestTimeout,
        }
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        match e {
            SandboxError::UnknownSandbox(_) | SandboxError::UnknownSpace(_) | SandboxError::UnknownPty(_) => {
                ApiError::NotFound(e.to_string())
            }
            SandboxError::SpaceConflict(why) => ApiError::Conflict(why),
            SandboxError::Unavailable(why) => ApiError::Unavailable(why),
            SandboxError::UnknownTemplate { .. } => ApiError::field("template", &e),
            SandboxError::CodeTooLarge { .. } => ApiError::field("code", &e),
            SandboxError::MergeAcrossTemplates { .. } => ApiError::field("winner", &e),
            SandboxError::TooManyStreams { .. }
            | SandboxError::TooManySandboxStreams { .. }
            | SandboxError::TooManyPtySessions { .. }
            | SandboxError::Capacity(..) => ApiError::Capacity(e.to_string()),
            SandboxError::NotImplemented(_) => ApiError::NotImplemented(e.to_string()),
            SandboxError::Guest(ref g) => ApiError::Internal(format!("{e}: {g}")),
            SandboxError::Internal(why) => ApiError::Internal(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_401_bodies() {
        assert_eq!(ApiError::MissingAuth.body(), r#"{"error": "missing Authorization: Bearer <key>"}"#);
        assert_eq!(ApiError::InvalidKey.body(), r#"{"error": "invalid api key"}"#);
        assert_eq!(ApiError::field("code", "\"x\"").body(), r#"{"error": "code: \"x\""}"#);
    }
}
