//! `TaskId`: a leaf, so errors and rows can name a task without the rest
//! of [`crate::task`].

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// A task's id (`syncq.tasks.id`): its own type, so an id cannot be
/// mixed up with a count or an attempt number. `TaskId::from(42)` and
/// `i64::from(id)` convert; it prints and parses as the number.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    serde::Deserialize,
    sqlx::Type,
)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct TaskId(pub i64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TaskId {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(TaskId)
    }
}

impl From<i64> for TaskId {
    fn from(id: i64) -> Self {
        TaskId(id)
    }
}

impl From<TaskId> for i64 {
    fn from(id: TaskId) -> Self {
        id.0
    }
}

impl PartialEq<i64> for TaskId {
    fn eq(&self, other: &i64) -> bool {
        self.0 == *other
    }
}

impl PartialEq<TaskId> for i64 {
    fn eq(&self, other: &TaskId) -> bool {
        *self == other.0
    }
}
