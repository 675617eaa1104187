//! One error type for the whole host. Each front maps the kind to its own
//! status (HTTP status, gRPC code) in one place.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or does not match the model (400).
    InvalidArgument,
    /// The route or resource does not exist (404).
    NotFound,
    /// The repository has no such model or version. Triton's clients expect its answer:
    /// "Request for unknown model: ..." with HTTP 400, gRPC NOT_FOUND.
    UnknownModel,
    /// The model exists but cannot serve now, or a queue is full (503).
    Unavailable,
    /// The caller may not use this endpoint (403).
    Forbidden,
    /// The body is larger than the configured cap (413).
    PayloadTooLarge,
    /// The client took too long to send its request (408).
    RequestTimeout,
    /// The method is not allowed on this route (405).
    MethodNotAllowed,
    /// Something failed inside the server or a plugin (500).
    Internal,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    /// Triton's error for a model (`version` None) or version the repository does not have.
    pub fn unknown_model(name: &str, version: Option<u64>) -> Self {
        let message = match version {
            None => format!("Request for unknown model: '{name}' is not found"),
            Some(v) => format!("Request for unknown model: '{name}' version {v} is not found"),
        };
        Self::new(ErrorKind::UnknownModel, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// A short label for metrics (`reason` of failed requests).
    pub fn reason(&self) -> &'static str {
        match self.kind {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::NotFound => "not_found",
            ErrorKind::UnknownModel => "unknown_model",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::Internal => "internal",
        }
    }

    /// Prefixes the message with context, keeping the kind.
    pub fn context(mut self, context: impl std::fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}
