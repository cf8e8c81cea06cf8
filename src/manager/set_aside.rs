//! Datasets one worker sets aside because claiming from them fails.
//!
//! A claim serves many datasets in one statement, so one dataset whose
//! rows make it fail (a trigger an operator added, a row no constraint
//! foresaw) would fail every claim and starve everyone else. When a claim
//! fails with an error that can come from the data, the worker finds the
//! datasets responsible by halving the candidates with dry runs (claims
//! rolled back), logs each by name, and leaves them out of its claims for
//! [`PoolConfig::set_aside`](crate::PoolConfig::set_aside); then it tries
//! them again. Every other dataset keeps being served meanwhile.

use std::collections::HashMap;
use std::time::Duration;

use crate::db::Db;
use tokio::time::Instant;

use super::Claimer;
use crate::store;

/// Most datasets looked at when searching for the ones that fail: the
/// search costs at most twice as many dry-run claims.
const MAX_CANDIDATES: i64 = 64;

/// The datasets set aside, each until when.
#[derive(Debug)]
pub(crate) struct SetAside {
    until: HashMap<String, Instant>,
    period: Duration,
}

impl SetAside {
    pub(crate) fn new(period: Duration) -> Self {
        SetAside {
            until: HashMap::new(),
            period,
        }
    }

    /// The datasets still set aside (forgetting those whose time is up).
    pub(crate) fn current(&mut self) -> Vec<String> {
        let now = Instant::now();
        self.until.retain(|_, until| *until > now);
        self.until.keys().cloned().collect()
    }

    pub(crate) fn add(&mut self, dataset: String) {
        self.until.insert(dataset, Instant::now() + self.period);
    }
}

/// Whether a failed claim may be the fault of some dataset's rows: the
/// server refused the statement for a data, integrity, trigger or routine
/// error. Connection loss, deadlocks, cancellations, resource limits and
/// privilege errors concern every dataset alike.
pub(crate) fn may_be_one_dataset(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    let Some(code) = db.code() else {
        return false;
    };
    ["09", "21", "22", "23", "27", "2F", "38", "39", "54", "P0"]
        .iter()
        .any(|class| code.starts_with(class))
}

/// Which datasets make a claim fail, with the error each gives. Empty when
/// no single dataset does (the failure is then the caller's to report).
pub(crate) async fn find_failing(
    db: &Db,
    who: &Claimer,
    skip: &[String],
    limit: usize,
) -> sqlx::Result<Vec<(String, String)>> {
    // The claims that failed also rolled back their step 0: absorb the
    // readiness producers appended on its own, so every dataset with work
    // has its row and can be a candidate.
    store::tasks::absorb_signals(db).await?;
    let candidates = store::tasks::claim_candidates(
        db,
        &who.kinds,
        who.datasets(),
        skip,
        i64::try_from(limit).unwrap_or(i64::MAX).min(MAX_CANDIDATES),
    )
    .await?;
    let mut failing = Vec::new();
    let mut groups = vec![candidates];
    while let Some(group) = groups.pop() {
        if group.is_empty() {
            continue;
        }
        match dry_run(db, who, limit, &group).await {
            Ok(()) => {}
            Err(e) if may_be_one_dataset(&e) => {
                if group.len() == 1 {
                    let error = match &e {
                        sqlx::Error::Database(d) => d.message().to_string(),
                        other => other.to_string(),
                    };
                    failing.extend(group.into_iter().map(|d| (d, error.clone())));
                } else {
                    let mut first = group;
                    let second = first.split_off(first.len() / 2);
                    groups.push(second);
                    groups.push(first);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(failing)
}

/// A claim restricted to `group`, rolled back: whether it would fail.
async fn dry_run(db: &Db, who: &Claimer, limit: usize, group: &[String]) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    let result = store::tasks::claim(
        tx.ex(),
        &who.worker_id,
        &who.kinds,
        Some(group),
        &[],
        i64::try_from(limit).unwrap_or(i64::MAX),
        who.lease,
    )
    .await;
    // Whatever happened, nothing of the dry run stays.
    let _ = tx.rollback().await;
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_dataset_comes_back_after_its_period() {
        let mut set_aside = SetAside::new(Duration::from_secs(60));
        set_aside.add("bad".into());
        assert_eq!(set_aside.current(), vec!["bad".to_string()]);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(set_aside.current().is_empty());
    }
}
