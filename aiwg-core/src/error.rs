//! [`BackendError`]: the failure of a storage backend, kept with its cause.

use std::borrow::Cow;
use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// A storage backend failed (a database query, a lost connection, a row that does not decode):
/// what was being done, and the underlying error, which [`Error::source`] returns. Cheap to
/// clone. Its text never contains a secret: backends' errors here do not carry connection
/// strings (a database URL that does not parse is reported without it).
///
/// ```
/// use std::error::Error as _;
/// use aiwg_core::BackendError;
///
/// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
/// let err = BackendError::with_source("postgres: connect", io);
/// assert_eq!(err.context(), "postgres: connect");
/// assert_eq!(err.to_string(), "postgres: connect: refused");
/// assert!(err.source().is_some());
/// ```
#[derive(Clone)]
pub struct BackendError {
    context: Cow<'static, str>,
    source: Option<Arc<dyn Error + Send + Sync + 'static>>,
}

impl BackendError {
    /// A failure without an underlying error (e.g. a row with an unknown state).
    #[must_use]
    pub fn new(context: impl Into<Cow<'static, str>>) -> Self {
        Self {
            context: context.into(),
            source: None,
        }
    }

    /// A failure caused by `source`.
    #[must_use]
    pub fn with_source(
        context: impl Into<Cow<'static, str>>,
        source: impl Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            context: context.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// The failure `source`, said by itself (no context of its own).
    #[must_use]
    pub fn from_source(source: impl Error + Send + Sync + 'static) -> Self {
        Self {
            context: Cow::Borrowed(""),
            source: Some(Arc::new(source)),
        }
    }

    /// What was being done.
    #[must_use]
    pub fn context(&self) -> &str {
        &self.context
    }
}

impl From<String> for BackendError {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

impl From<&'static str> for BackendError {
    fn from(message: &'static str) -> Self {
        Self::new(message)
    }
}

/// Two backend errors are equal when they say the same: the same context and causes with the
/// same text (an error's cause has no equality of its own).
impl PartialEq for BackendError {
    fn eq(&self, other: &Self) -> bool {
        self.context == other.context
            && self.source.as_ref().map(ToString::to_string)
                == other.source.as_ref().map(ToString::to_string)
    }
}

impl fmt::Display for BackendError {
    /// The context, then the cause's own text (so a log line that prints only this error still
    /// says what went wrong underneath).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)?;
        if let Some(source) = &self.source {
            if !self.context.is_empty() {
                f.write_str(": ")?;
            }
            // The whole chain, so a log line that prints only this error says what happened.
            write!(f, "{source}")?;
            let mut cause = source.source();
            while let Some(c) = cause {
                write!(f, ": {c}")?;
                cause = c.source();
            }
        }
        Ok(())
    }
}

impl fmt::Debug for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendError")
            .field("context", &self.context)
            .field("source", &self.source)
            .finish()
    }
}

impl Error for BackendError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}
