//! Reading JSON request bodies: unknown fields are ignored (the SDK may add
//! some), known fields are type- and range-checked, and every error names
//! the field.

use serde_json::{Map, Value};

use super::error::ApiError;

/// A request body that is a JSON object (an empty body counts as `{}`).
#[derive(Debug)]
pub struct Body(Map<String, Value>);

impl Body {
    /// Parses `bytes` as a JSON object.
    pub fn parse(bytes: &[u8]) -> Result<Body, ApiError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Body(Map::new()));
        }
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(m)) => Ok(Body(m)),
            Ok(_) => Err(ApiError::BadRequest("request body must be a JSON object".into())),
            Err(e) => Err(ApiError::BadRequest(format!("request body is not valid JSON: {e}"))),
        }
    }

    /// The field, with `null` treated as absent (the SDK omits unset fields).
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    /// An optional integer in `lo..=hi`.
    pub fn int_in(&self, k: &str, lo: u64, hi: u64) -> Result<Option<u64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
                _ => Err(ApiError::field(k, format!("must be an integer from {lo} to {hi}, got {v}"))),
            },
        }
    }

    /// An optional integer >= 1. Values above any server maximum are
    /// accepted here and clamped later.
    pub fn positive(&self, k: &str) -> Result<Option<u64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => Ok(Some(n)),
                _ => Err(ApiError::field(k, format!("must be a positive integer, got {v}"))),
            },
        }
    }

    /// An optional boolean.
    pub fn boolean(&self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(ApiError::field(k, format!("must be true or false, got {v}"))),
        }
    }

    /// An optional string.
    pub fn string(&self, k: &str) -> Result<Option<&str>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ApiError::field(k, format!("must be a string, got {}", type_name(v)))),
        }
    }

    /// A required string.
    pub fn required_string(&self, k: &str) -> Result<&str, ApiError> {
        self.string(k)?.ok_or_else(|| ApiError::field(k, "is required (a string)"))
    }

    /// An optional list of strings.
    pub fn strings(&self, k: &str) -> Result<Option<Vec<String>>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| ApiError::field(k, "must be a list of strings")),
            Some(v) => Err(ApiError::field(k, format!("must be a list of strings, got {}", type_name(v)))),
        }
    }

    /// An optional environment: a list of `[key, value]` pairs, or an object
    /// of strings.
    pub fn env(&self, k: &str) -> Result<Vec<(String, String)>, ApiError> {
        let bad = || ApiError::field(k, "must be a list of [key, value] string pairs or an object of strings");
        match self.get(k) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|p| match p.as_array().map(Vec::as_slice) {
                    Some([Value::String(a), Value::String(b)]) => Ok((a.clone(), b.clone())),
                    _ => Err(bad()),
                })
                .collect(),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(a, b)| b.as_str().map(|b| (a.clone(), b.to_string())).ok_or_else(bad))
                .collect(),
            Some(_) => Err(bad()),
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields() {
        let b = Body::parse(br#"{"a": 3, "b": -1, "c": 1.5, "d": "x", "e": null, "f": true, "env": {"K": "V"}}"#).unwrap();
        assert_eq!(b.positive("a").unwrap(), Some(3));
        assert!(b.positive("b").unwrap_err().to_string().starts_with("b:"));
        assert!(b.positive("c").is_err());
        assert!(b.positive("d").is_err());
        assert_eq!(b.positive("e").unwrap(), None);
        assert_eq!(b.boolean("f").unwrap(), Some(true));
        assert!(b.boolean("a").is_err());
        assert_eq!(b.env("env").unwrap(), vec![("K".into(), "V".into())]);
        assert!(b.required_string("zz").unwrap_err().to_string().contains("zz"));
        assert!(Body::parse(b"  ").is_ok());
        assert!(Body::parse(b"[1]").is_err());
        assert!(Body::parse(b"{").is_err());
    }
}
