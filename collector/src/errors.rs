//! The errors of a request the caller must change, which any domain module may return and the
//! HTTP API answers with 400 or 409 (see `http::error`); any other error is the store's.

/// A request the caller must change: answered 400 (or 409 for `conflict`), not 503.
#[derive(Debug)]
pub struct Invalid {
    pub message: String,
    pub conflict: bool,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Invalid {}

pub(crate) fn invalid(message: impl Into<String>) -> anyhow::Error {
    Invalid {
        message: message.into(),
        conflict: false,
    }
    .into()
}

pub(crate) fn conflict(message: impl Into<String>) -> anyhow::Error {
    Invalid {
        message: message.into(),
        conflict: true,
    }
    .into()
}
