//! What an upstream MCP server's call ends in, on either transport: its answer (plain JSON or a
//! stream of messages) or why there is none. Its own room, so that the transports (`upstream`,
//! `legacy`) and the token source (`oauth`) share it without importing each other.

use std::pin::Pin;

use futures::Stream;
use serde_json::Value;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum UpstreamError {
    #[error("the MCP server did not answer in time")]
    Timeout,
    #[error("the MCP server cannot be reached")]
    Unreachable,
    #[error("the MCP server refused the gateway's credential (HTTP {0})")]
    Unauthorized(u16),
    #[error("the MCP server answered HTTP {0}")]
    Status(u16),
    #[error("the MCP server's answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the MCP server's answer is not valid MCP: {0}")]
    Malformed(&'static str),
    #[error("the MCP server closed the stream before answering")]
    Closed,
    #[error("the MCP server answered initialize with an error: {0}")]
    Initialize(String),
    #[error("the OAuth token endpoint refused the client credentials (HTTP {0})")]
    TokenRefused(u16),
    #[error("the OAuth token endpoint cannot be reached or answered badly")]
    TokenUnavailable,
}

impl UpstreamError {
    /// The metric and audit word.
    pub fn outcome(&self) -> &'static str {
        match self {
            UpstreamError::Timeout => "timeout",
            UpstreamError::Unauthorized(_) | UpstreamError::TokenRefused(_) => {
                "upstream_unauthorized"
            }
            _ => "upstream_error",
        }
    }
}

/// JSON-RPC messages from an SSE answer, one by one.
pub type MessageStream = Pin<Box<dyn Stream<Item = Result<Value, UpstreamError>> + Send>>;

/// An upstream's answer to a request.
pub enum Reply {
    /// A plain JSON answer: the response (or error) message.
    Json(Value),
    /// An SSE answer: notifications (progress) and then the response.
    Stream(MessageStream),
}
