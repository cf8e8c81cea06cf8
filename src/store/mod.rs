//! The only place with SQL. One file per entity; every statement is
//! compile-checked by sqlx against the schema (offline data in `.sqlx/`).
//!
//! Every state change is one statement. Statements that act on a running
//! task are fenced by `(id, runs, locked_by, status = 'running')`: `runs` is
//! incremented by every claim, so a worker that lost its lease — even to
//! another slot of the same process — matches nothing and writes nothing.

pub mod datasets;
#[cfg(feature = "cli")]
pub mod demo;
pub(crate) mod ledger;
pub mod limits;
pub mod objects;
pub mod rate_log;
pub mod reports;
pub mod roles;
pub mod schedules;
pub(crate) mod server;
pub mod tasks;
pub mod vacuum;
pub mod workers;

/// Task ids as the `int8[]` a statement binds.
pub(crate) fn ids_of(ids: &[crate::task::TaskId]) -> Vec<i64> {
    ids.iter().map(|id| id.0).collect()
}

/// Seconds as the `float8` that `make_interval(secs => …)` takes.
pub(crate) fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

/// Longest error message stored (`last_error`, `syncq.task_errors`), in
/// bytes (`TaskError::MAX_MESSAGE_BYTES`).
pub(crate) const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// `message` as it is stored: PostgreSQL's `text` cannot hold a NUL
/// character, so each is written as the two characters `\0`, and the
/// whole is at most [`MAX_MESSAGE_BYTES`] long. Whatever a
/// handler or a panic says, its attempt's error can be recorded.
pub(crate) fn storable_message(message: &str) -> std::borrow::Cow<'_, str> {
    let max = MAX_MESSAGE_BYTES;
    if message.len() <= max && !message.contains('\0') {
        return std::borrow::Cow::Borrowed(message);
    }
    let escaped = message.replace('\0', "\\0");
    if escaped.len() <= max {
        return std::borrow::Cow::Owned(escaped);
    }
    let marker = format!("… [truncated from {} bytes]", escaped.len());
    let mut cut = max.saturating_sub(marker.len());
    while !escaped.is_char_boundary(cut) {
        cut -= 1;
    }
    std::borrow::Cow::Owned(format!("{}{marker}", &escaped[..cut]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_message_becomes_storable(message in ".*", pad in 0usize..20_000) {
            let message = format!("{message}{}", "\0é".repeat(pad % 7_000));
            let stored = storable_message(&message);
            prop_assert!(!stored.contains('\0'));
            prop_assert!(stored.len() <= MAX_MESSAGE_BYTES);
            if message.len() <= MAX_MESSAGE_BYTES && !message.contains('\0') {
                prop_assert_eq!(stored.as_ref(), message.as_str());
            }
        }

        #[test]
        fn short_messages_keep_everything_but_nul(message in "[a-z\\x00]{0,200}") {
            let stored = storable_message(&message);
            prop_assert_eq!(stored.as_ref(), message.replace('\0', "\\0"));
        }
    }

    #[test]
    fn long_messages_say_they_were_cut() {
        let long = "x".repeat(100_000);
        let stored = storable_message(&long);
        assert!(
            stored.ends_with("… [truncated from 100000 bytes]"),
            "{stored}"
        );
        assert_eq!(stored.len(), MAX_MESSAGE_BYTES);
    }
}
