//! Request heads and bodies off the wire: httparse reads the head, this
//! module applies our bounds and framing rules, and decodes chunked bodies
//! incrementally (the bytes arrive in pieces, over several worker turns).

use httparse::Status;

/// Most request headers accepted (more: 431).
pub const MAX_HEADERS: usize = 100;
/// Most bytes of a request head, request line included (more: 431). A head
/// is never buffered past this, however long one line is.
pub const MAX_HEAD_BYTES: usize = 64 << 10;
/// Longest chunk-size line (size plus extensions) of a chunked body.
const MAX_CHUNK_LINE: usize = 4 << 10;
/// Most bytes of trailers after a chunked body.
const MAX_TRAILER_BYTES: usize = 8 << 10;

/// Why a request could not be read off the wire.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Not HTTP/1.x as we accept it (the message says what was wrong).
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    /// A well-formed request line of another HTTP version (HTTP/2 preface).
    #[error("HTTP version not supported: this server speaks HTTP/1.1 and HTTP/1.0 (no HTTP/2)")]
    Version,
    /// Head over [`MAX_HEAD_BYTES`] or over [`MAX_HEADERS`] headers.
    #[error("request head too large")]
    HeadTooLarge,
    /// A chunked body grew past the body limit.
    #[error("request body too large")]
    BodyTooLarge,
    /// The head or body did not arrive in time.
    #[error("timed out reading the request")]
    Timeout,
}

/// How the body of a request is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body (no Content-Length, or 0).
    Empty,
    /// Exactly this many bytes follow the head.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
pub struct Head {
    /// Method as sent (case-sensitive, like HTTP).
    pub method: String,
    /// Request target as sent (path and query).
    pub target: String,
    /// HTTP/1.0: no chunked replies, the connection closes after the reply.
    pub http10: bool,
    /// Headers, names as sent, values lossily decoded.
    pub headers: Vec<(String, String)>,
    /// Body framing.
    pub body: BodyKind,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
    /// The connection closes after this request (client asked, or HTTP/1.0).
    pub close: bool,
}

impl Head {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The path without the query, for logs.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// True when httparse refused the version of a request line that names an
/// HTTP version other than 1.x (the HTTP/2 preface `PRI * HTTP/2.0`,
/// `HTTP/3`): that is a 505, not a 400. `target` is what httparse parsed
/// before the version; only `HTTP/` and the major digit after it are
/// looked at, which httparse has read whenever it refuses a version, so
/// the answer does not depend on how much of the line has arrived.
fn other_http_version(buf: &[u8], target: Option<&str>) -> bool {
    let Some(target) = target else { return false };
    // One space after the target (httparse's default request-line rule).
    let start = (target.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize) + target.len() + 1;
    match buf.get(start..).and_then(|v| v.get(..6)) {
        Some([b'H', b'T', b'T', b'P', b'/', major]) => major.is_ascii_digit() && *major != b'1',
        _ => false,
    }
}

/// Parses the head at the start of `buf`: `Ok(None)` while incomplete,
/// else the head and its length in bytes.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(Status::Partial) if buf.len() > MAX_HEAD_BYTES => return Err(HttpError::HeadTooLarge),
        Ok(Status::Partial) => return Ok(None),
        Ok(Status::Complete(n)) if n > MAX_HEAD_BYTES => return Err(HttpError::HeadTooLarge),
        Ok(Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(httparse::Error::Version) if other_http_version(buf, req.path) => return Err(HttpError::Version),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    // A complete parse always fills these three.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HttpError::Malformed("incomplete request line".into()));
    };
    let headers: Vec<(String, String)> =
        req.headers.iter().map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).trim().to_string())).collect();
    let head = frame(method.to_string(), target.to_string(), version == 0, headers)?;
    Ok(Some((head, len)))
}

/// Applies the framing rules. Ambiguous framing (both Content-Length and
/// Transfer-Encoding, two different lengths) is refused: an intermediary
/// might read it differently, which is how requests get smuggled.
fn frame(method: String, target: String, http10: bool, headers: Vec<(String, String)>) -> Result<Head, HttpError> {
    let bad = |m: &str| HttpError::Malformed(m.to_string());
    let (mut length, mut chunked, mut expect_continue, mut close) = (None::<u64>, false, false, http10);
    for (name, value) in &headers {
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("Content-Length is not a decimal number"));
            }
            let n: u64 = value.parse().map_err(|_| bad("Content-Length is not a decimal number"))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("two different Content-Length headers"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !value.eq_ignore_ascii_case("chunked") {
                return Err(bad("only Transfer-Encoding: chunked is supported"));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            close |= value.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"));
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue |= value.eq_ignore_ascii_case("100-continue");
        }
    }
    let body = match (length, chunked) {
        (Some(_), true) => return Err(bad("both Content-Length and Transfer-Encoding")),
        (_, true) if http10 => return Err(bad("Transfer-Encoding: chunked in an HTTP/1.0 request")),
        (_, true) => BodyKind::Chunked,
        (Some(0) | None, false) => BodyKind::Empty,
        (Some(n), false) => BodyKind::Length(n),
    };
    // 100-continue only means something to an HTTP/1.1 client with a body.
    expect_continue &= !http10 && body != BodyKind::Empty;
    Ok(Head { method, target, http10, headers, body, expect_continue, close })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailer,
    Done,
}

/// An incremental decoder of a chunked body, bounded by the body limit.
#[derive(Debug)]
pub struct Chunked {
    state: ChunkState,
    body: Vec<u8>,
    trailer_bytes: usize,
    max: usize,
}

impl Chunked {
    /// A decoder that refuses bodies over `max` bytes.
    pub fn new(max: usize) -> Self {
        Chunked { state: ChunkState::Size, body: Vec::new(), trailer_bytes: 0, max }
    }

    /// True after the last chunk and the trailers.
    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// The decoded body.
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    /// Consumes what it can of `input`; returns how many bytes. Bytes past
    /// the end of the body are left for the next request.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, HttpError> {
        let bad = |m: &str| HttpError::Malformed(format!("chunked body: {m}"));
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match self.state {
                ChunkState::Done => return Ok(pos),
                ChunkState::Size => {
                    if rest.is_empty() {
                        return Ok(pos);
                    }
                    if !rest[0].is_ascii_hexdigit() {
                        return Err(bad("a chunk size must start with a hex digit"));
                    }
                    match httparse::parse_chunk_size(rest) {
                        Ok(Status::Complete((n, size))) => {
                            pos += n;
                            if size == 0 {
                                self.state = ChunkState::Trailer;
                            } else if size > (self.max - self.body.len()) as u64 {
                                return Err(HttpError::BodyTooLarge);
                            } else {
                                self.state = ChunkState::Data(size);
                            }
                        }
                        Ok(Status::Partial) if rest.len() > MAX_CHUNK_LINE => return Err(bad("chunk-size line too long")),
                        Ok(Status::Partial) => return Ok(pos),
                        Err(_) => return Err(bad("invalid chunk size line")),
                    }
                }
                ChunkState::Data(left) => {
                    if rest.is_empty() {
                        return Ok(pos);
                    }
                    let take = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.body.extend_from_slice(&rest[..take]);
                    pos += take;
                    let left = left - take as u64;
                    self.state = if left == 0 { ChunkState::DataEnd } else { ChunkState::Data(left) };
                }
                ChunkState::DataEnd => {
                    if rest.starts_with(b"\r\n") {
                        pos += 2;
                    } else if rest.starts_with(b"\n") {
                        pos += 1;
                    } else if rest.is_empty() || rest == b"\r" {
                        return Ok(pos);
                    } else {
                        return Err(bad("chunk data longer than its size"));
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailer => {
                    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                        if self.trailer_bytes + rest.len() > MAX_TRAILER_BYTES {
                            return Err(HttpError::HeadTooLarge);
                        }
                        return Ok(pos);
                    };
                    pos += nl + 1;
                    self.trailer_bytes += nl + 1;
                    if self.trailer_bytes > MAX_TRAILER_BYTES {
                        return Err(HttpError::HeadTooLarge);
                    }
                    let line = &rest[..nl];
                    if line.is_empty() || line == b"\r" {
                        self.state = ChunkState::Done;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_framing() {
        let (h, n) = parse_head(b"POST /a?b HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello").unwrap().unwrap();
        assert_eq!((h.method.as_str(), h.path(), n, h.body, h.expect_continue, h.close), ("POST", "/a", 63, BodyKind::Length(5), true, false));
        let (h, _) = parse_head(b"GET / HTTP/1.0\n\n").unwrap().unwrap();
        assert!(h.close && h.http10);
        assert!(parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        assert!(matches!(parse_head(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Err(HttpError::Version)));
        assert!(matches!(parse_head(b"\x16\x03\x01\x02\x00\x01\x00"), Err(HttpError::Malformed(_))));
        assert!(matches!(parse_head(b"GET / HTTP/3\r\n\r\n"), Err(HttpError::Version)));
        assert!(matches!(parse_head(b"GET / HTTP/2"), Err(HttpError::Version)));
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        ] {
            assert!(matches!(parse_head(bad.as_bytes()), Err(HttpError::Malformed(_))), "{bad}");
        }
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert!(matches!(parse_head(long.as_bytes()), Err(HttpError::HeadTooLarge)));
    }

    #[test]
    fn version_refusal_does_not_depend_on_arrival() {
        // Found by the http_request fuzz target: a bad HTTP/1 version was a
        // 400 when the whole line had arrived (a later "HTTP/1." on it) and
        // a 505 when only its start had.
        let wire = b"POST /v1/sandboxes HTTP/1\x01\x00 x HTTP/1.0\r\n\r\n";
        for end in 26..=wire.len() {
            assert!(matches!(parse_head(&wire[..end]), Err(HttpError::Malformed(_))), "prefix of {end} bytes");
        }
        let wire = b"GET /HTTP/1.1 HTTP/2.0\r\n\r\n";
        for end in 20..=wire.len() {
            assert!(matches!(parse_head(&wire[..end]), Err(HttpError::Version)), "prefix of {end} bytes");
        }
    }

    #[test]
    fn chunked_in_pieces() {
        let wire = b"4;x=y\r\nWiki\r\n5\r\npedia\r\n0\r\nT: v\r\n\r\nNEXT";
        let mut d = Chunked::new(100);
        let mut pos = 0;
        // One byte at a time, as a slow sender would deliver it.
        for end in 1..=wire.len() {
            pos += d.feed(&wire[pos..end]).unwrap();
            if d.done() {
                break;
            }
        }
        assert!(d.done());
        assert_eq!(&wire[pos..], b"NEXT");
        assert_eq!(d.into_body(), b"Wikipedia");
        assert!(matches!(Chunked::new(3).feed(b"4\r\n"), Err(HttpError::BodyTooLarge)));
        assert!(matches!(Chunked::new(9).feed(b"2\r\nabc\r\n"), Err(HttpError::Malformed(_))));
        assert!(matches!(Chunked::new(9).feed(b"\r\n"), Err(HttpError::Malformed(_))));
    }
}
