//! Infrastructure errors: what can go wrong around a handler, never inside it.
//!
//! Handler outcomes are [`crate::TaskError`]; this type is for the database,
//! configuration and the pool itself. Messages carry their context so a caller
//! can print them on one line.

/// An infrastructure error of syncq.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database refused a statement or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// Applying the migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// The database's schema cannot be brought to this version.
    #[error("cannot migrate: {0}")]
    Schema(String),

    /// A configuration value is out of range; `field` names it.
    #[error("invalid configuration: {field}: {message}")]
    Config {
        /// The configuration field at fault.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },

    /// A task to enqueue is malformed; the message names the field.
    #[error("invalid task: {0}")]
    InvalidTask(String),

    /// A value could not be encoded as JSON.
    #[error("JSON error: {0}")]
    Json(#[from] serde_json::Error),

    /// A private PostgreSQL cluster could not be found, started or stopped.
    #[error("private PostgreSQL: {0}")]
    LocalPostgres(String),

    /// A handler reported an unrecoverable error; the pool checkpointed its
    /// running work and stopped.
    #[error("task {task_id} reported a fatal error: {message}")]
    Fatal {
        /// The task whose handler returned `TaskError::Fatal`.
        task_id: crate::task_id::TaskId,
        /// The handler's message.
        message: String,
    },
}

impl Error {
    pub(crate) fn config(field: &'static str, message: impl Into<String>) -> Self {
        Error::Config {
            field,
            message: message.into(),
        }
    }

    /// The database's message when it refused a name that refers to
    /// nothing, or a removal of something still referred to (SQLSTATE
    /// 23503: an unknown shared limit, a limit in use): the caller's
    /// mistake, not a failure.
    pub(crate) fn refused_reference(&self) -> Option<&str> {
        match self {
            Error::Database(sqlx::Error::Database(d)) if d.code().as_deref() == Some("23503") => {
                Some(d.message())
            }
            _ => None,
        }
    }
}

/// Shorthand for results of syncq's infrastructure calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;
