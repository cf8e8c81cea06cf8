//! Who may act: sign-in sessions, CSRF tokens and sign-in throttling.
//!
//! The admin token itself never leaves the sign-in form. Signing in sets a
//! session cookie `v1.<id>.<expiry>.<mac>`: a random id, when it expires
//! (unix seconds, [`SESSION_LIFETIME`] after sign-in) and an HMAC-SHA256,
//! keyed by the admin token, of both. So a session is derived from the
//! token — changing the token ends every session — and no session store is
//! needed for a dashboard served by several processes. Signing out revokes
//! its id in this process (remembered until it would have expired).
//!
//! Each session has its own CSRF token (an HMAC of its id), carried by the
//! pages it is shown and required on every POST from a cookie. The sign-in
//! form has one too, tied to a short-lived cookie of its own, so another
//! site cannot sign a visitor in. A request with `Authorization: Bearer`
//! and the token needs no CSRF token: a browser never sends that header on
//! its own.
//!
//! Comparisons are of MACs (fixed length, constant time): a wrong token
//! says nothing of the token's length. Failed sign-ins — by form or bearer
//! — are throttled for the whole dashboard: after [`MAX_FAILURES`] within
//! [`FAILURE_WINDOW`], sign-in is refused (429) until the window has
//! passed; sessions already signed in keep working.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, header};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The cookie of a signed-in session.
pub(super) const SESSION_COOKIE: &str = "syncq_session";
/// The cookie tying the sign-in form to the browser that loaded it.
pub(super) const LOGIN_COOKIE: &str = "syncq_login";
/// How long a session lasts after sign-in.
pub(super) const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// How long a sign-in form stays usable.
pub(super) const LOGIN_LIFETIME: Duration = Duration::from_secs(600);
/// The shortest admin token accepted (bytes): shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 16;
/// Failed sign-ins allowed within [`FAILURE_WINDOW`].
pub(super) const MAX_FAILURES: usize = 10;
/// See [`MAX_FAILURES`].
pub(super) const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// A request's standing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Caller {
    /// Not signed in.
    Anonymous,
    /// The bearer token: no CSRF token needed.
    Bearer,
    /// A session cookie, with its session's CSRF token.
    Session { id: String, csrf: String },
}

impl Caller {
    pub(super) fn is_admin(&self) -> bool {
        !matches!(self, Caller::Anonymous)
    }

    /// The CSRF token its pages carry ("" when none is needed or possible).
    pub(super) fn csrf(&self) -> &str {
        match self {
            Caller::Session { csrf, .. } => csrf,
            _ => "",
        }
    }
}

/// Sign-in state of one dashboard (one router).
pub(super) struct Sessions {
    /// The admin token (None: read-only).
    token: Option<Vec<u8>>,
    /// Signs sign-in forms; random per router.
    form_key: [u8; 32],
    /// Session ids signed out here, until they would have expired.
    revoked: Mutex<HashMap<String, u64>>,
    /// When recent sign-ins failed.
    failures: Mutex<VecDeque<Instant>>,
}

fn mac(key: &[u8], parts: &[&str]) -> String {
    // HMAC accepts a key of any length: this cannot fail.
    let Ok(mut m) = HmacSha256::new_from_slice(key) else {
        return String::new();
    };
    for p in parts {
        m.update(p.as_bytes());
        m.update(b"\x00");
    }
    hex(&m.finalize().into_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Constant-time equality of two MACs (hex strings of equal length when
/// both are MACs; a length mismatch says only that one is not a MAC).
fn same_mac(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_id() -> String {
    hex(&rand::random::<[u8; 16]>())
}

/// The values of cookie `name` in `headers`.
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |c| c.trim().strip_prefix(name)?.strip_prefix('='))
}

impl Sessions {
    pub(super) fn new(token: Option<String>) -> Self {
        Sessions {
            token: token.map(String::into_bytes),
            form_key: rand::random(),
            revoked: Mutex::new(HashMap::new()),
            failures: Mutex::new(VecDeque::new()),
        }
    }

    pub(super) fn is_read_only(&self) -> bool {
        self.token.is_none()
    }

    /// Whether `given` is the admin token (compared as MACs under a
    /// random key: constant time, whatever the lengths).
    fn is_token(&self, given: &str) -> bool {
        let Some(token) = &self.token else {
            return false;
        };
        let token = String::from_utf8_lossy(token);
        same_mac(
            &mac(&self.form_key, &["token", given]),
            &mac(&self.form_key, &["token", &token]),
        )
    }

    /// Who sent `headers`: a valid bearer token, a live session cookie, or
    /// nobody. A wrong bearer token counts as a failed sign-in.
    pub(super) fn caller(&self, headers: &HeaderMap) -> Caller {
        let Some(token) = &self.token else {
            return Caller::Anonymous;
        };
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // While sign-in is throttled, a bearer token is not even checked:
        // otherwise guessing would go on through this header.
        if let Some(given) = bearer
            && !self.throttled()
        {
            if self.is_token(given) {
                return Caller::Bearer;
            }
            self.failed();
        }
        for cookie in cookies(headers, SESSION_COOKIE) {
            let mut parts = cookie.split('.');
            let (Some("v1"), Some(id), Some(expires), Some(given), None) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) else {
                continue;
            };
            let Ok(until) = expires.parse::<u64>() else {
                continue;
            };
            if until <= now_unix()
                || !same_mac(given, &mac(token, &["session", id, expires]))
                || self.is_revoked(id)
            {
                continue;
            }
            return Caller::Session {
                id: id.to_string(),
                csrf: mac(token, &["csrf", id]),
            };
        }
        Caller::Anonymous
    }

    /// Whether a POST from `caller` carries what it must: nothing more for
    /// the bearer token, its session's CSRF token for a cookie.
    pub(super) fn csrf_ok(&self, caller: &Caller, csrf: Option<&str>) -> bool {
        match caller {
            Caller::Anonymous => false,
            Caller::Bearer => true,
            Caller::Session { csrf: expected, .. } => {
                csrf.is_some_and(|given| same_mac(given, expected))
            }
        }
    }

    /// A sign-in form: its cookie (`LOGIN_COOKIE` value) and the CSRF
    /// token the form carries.
    pub(super) fn login_form(&self) -> (String, String) {
        let nonce = random_id();
        let expires = (now_unix() + LOGIN_LIFETIME.as_secs()).to_string();
        let cookie = format!("{nonce}.{expires}");
        let csrf = mac(&self.form_key, &["login", &nonce, &expires]);
        (cookie, csrf)
    }

    /// Whether a sign-in POST comes from a form this dashboard gave this
    /// browser, not yet expired.
    pub(super) fn login_form_ok(&self, headers: &HeaderMap, csrf: Option<&str>) -> bool {
        let Some(csrf) = csrf else {
            return false;
        };
        cookies(headers, LOGIN_COOKIE).any(|c| {
            let Some((nonce, expires)) = c.split_once('.') else {
                return false;
            };
            expires.parse::<u64>().is_ok_and(|until| until > now_unix())
                && same_mac(csrf, &mac(&self.form_key, &["login", nonce, expires]))
        })
    }

    /// Whether sign-in is refused for now: too many recent failures.
    pub(super) fn throttled(&self) -> bool {
        let Ok(mut failures) = self.failures.lock() else {
            return true;
        };
        while failures
            .front()
            .is_some_and(|at| at.elapsed() >= FAILURE_WINDOW)
        {
            failures.pop_front();
        }
        failures.len() >= MAX_FAILURES
    }

    /// Records a failed sign-in.
    pub(super) fn failed(&self) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.push_back(Instant::now());
            while failures.len() > MAX_FAILURES {
                failures.pop_front();
            }
        }
        tracing::warn!("dashboard: a sign-in with a wrong admin token");
    }

    /// Signs in with `given`: the session cookie's value, or None (a
    /// wrong token, recorded as a failure).
    pub(super) fn sign_in(&self, given: &str) -> Option<String> {
        let token = self.token.as_ref()?;
        if !self.is_token(given) {
            self.failed();
            return None;
        }
        let id = random_id();
        let expires = (now_unix() + SESSION_LIFETIME.as_secs()).to_string();
        let mac = mac(token, &["session", &id, &expires]);
        Some(format!("v1.{id}.{expires}.{mac}"))
    }

    /// Ends session `id` here.
    pub(super) fn sign_out(&self, id: &str) {
        let now = now_unix();
        if let Ok(mut revoked) = self.revoked.lock() {
            revoked.retain(|_, until| *until > now);
            revoked.insert(id.to_string(), now + SESSION_LIFETIME.as_secs());
        }
    }

    fn is_revoked(&self, id: &str) -> bool {
        self.revoked.lock().map_or(true, |r| r.contains_key(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_cookie(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&format!("{name}={value}")) {
            h.insert(header::COOKIE, v);
        }
        h
    }

    #[test]
    fn a_session_is_signed_by_the_token_and_revocable() {
        let sessions = Sessions::new(Some("a-long-enough-admin-token".into()));
        assert!(sessions.sign_in("wrong").is_none());
        let cookie = sessions
            .sign_in("a-long-enough-admin-token")
            .unwrap_or_default();
        assert!(
            !cookie.contains("admin-token"),
            "the token is not in the cookie"
        );
        let caller = sessions.caller(&with_cookie(SESSION_COOKIE, &cookie));
        let Caller::Session { id, csrf } = caller.clone() else {
            panic!("not signed in: {caller:?}");
        };
        assert!(sessions.csrf_ok(&caller, Some(&csrf)));
        assert!(!sessions.csrf_ok(&caller, Some("0123")));
        // Another token's dashboard does not accept it.
        let other = Sessions::new(Some("another-long-admin-token".into()));
        assert_eq!(
            other.caller(&with_cookie(SESSION_COOKIE, &cookie)),
            Caller::Anonymous
        );
        // A forged expiry breaks the MAC.
        let parts: Vec<&str> = cookie.split('.').collect();
        let forged = format!("v1.{}.99999999999.{}", parts[1], parts[3]);
        assert_eq!(
            sessions.caller(&with_cookie(SESSION_COOKIE, &forged)),
            Caller::Anonymous
        );
        sessions.sign_out(&id);
        assert_eq!(
            sessions.caller(&with_cookie(SESSION_COOKIE, &cookie)),
            Caller::Anonymous
        );
    }

    #[test]
    fn sign_in_is_throttled_after_repeated_failures() {
        let sessions = Sessions::new(Some("a-long-enough-admin-token".into()));
        for _ in 0..MAX_FAILURES {
            assert!(!sessions.throttled());
            assert!(sessions.sign_in("guess").is_none());
        }
        assert!(sessions.throttled());
    }
}
