//! The centre's login check (`dom0-broker fleet login-check`), for RabbitMQ's HTTP auth backend
//! as its authentication (`auth_backends.1.authn = http`; permissions stay RabbitMQ's own,
//! `auth_backends.1.authz = internal`). A login is allowed only with the user's password *and* a
//! client id of that user's (`topics::fleet::client_id_belongs_to`): on RabbitMQ 3.10 a host with
//! valid credentials of its own could otherwise connect with another host's client id and
//! disconnect it. The decision is pure ([`decide`]); the HTTP side is a thin, bounded driver.
//!
//! Users file (read at every login, so adding a host needs no restart): one line per user, `USER SALT SHA256HEX` where the hash is of `SALT:PASSWORD`
//! (`dom0-broker fleet hash-password USER` prints such a line). `#` starts a comment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::throttle::Reports;

/// Largest request read (RabbitMQ's requests are a line of query string).
pub const MAX_REQUEST: usize = 8192;
/// Lines a second about refused logins (the rest counted in the next line).
const REPORTS_PER_SEC: f64 = 5.0;
/// A connection that has not sent its request within this is closed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests served at once.
pub const MAX_CLIENTS: usize = 64;

/// The users and their salted password hashes.
#[derive(Debug, Default, Clone)]
pub struct Users(HashMap<String, (String, String)>);

/// A users file's defect, with its line.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: expected `USER SALT SHA256HEX`")]
    Line { path: String, line: usize },
}

fn hash(salt: &str, password: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A users file line for `user` with `password` and a fresh `salt`.
pub fn users_line(user: &str, salt: &str, password: &str) -> String {
    format!("{user} {salt} {}", hash(salt, password))
}

impl Users {
    pub fn parse(text: &str, path: &str) -> Result<Users, UsersError> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts[..] {
                [user, salt, hex] if hex.len() == 64 => {
                    users.insert(user.to_owned(), (salt.to_owned(), hex.to_ascii_lowercase()));
                }
                _ => {
                    return Err(UsersError::Line {
                        path: path.to_owned(),
                        line: n + 1,
                    });
                }
            }
        }
        Ok(Users(users))
    }

    pub fn load(path: &Path) -> Result<Users, UsersError> {
        let text = std::fs::read_to_string(path).map_err(|source| UsersError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Users::parse(&text, &path.display().to_string())
    }
}

/// `%XX` and `+` decoded; None when malformed.
fn url_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The fields of a query string (`a=1&b=2`), or of a form body.
pub fn query_fields(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((url_decode(k)?, url_decode(v)?))
        })
        .collect()
}

/// The answer to one request of RabbitMQ's HTTP backend: `allow` or `deny`. Only the user path
/// (authentication) is served; anything else is denied.
pub fn decide(path: &str, fields: &HashMap<String, String>, users: &Users) -> &'static str {
    if path != "/auth/user" {
        return "deny";
    }
    let (Some(user), Some(password), Some(client_id)) = (
        fields.get("username"),
        fields.get("password"),
        fields.get("client_id"),
    ) else {
        return "deny";
    };
    let Some((salt, want)) = users.0.get(user) else {
        return "deny";
    };
    if hash(salt, password) != *want {
        return "deny";
    }
    if !topics::fleet::client_id_belongs_to(client_id, user) {
        return "deny";
    }
    "allow"
}

/// Reads one HTTP request (GET with a query, or POST with a form body) and answers it.
async fn serve_one(
    mut conn: tokio::net::TcpStream,
    users: Arc<Path>,
    reports: Arc<Mutex<Reports>>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let request = loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&buf);
        if let Some(end) = text.find("\r\n\r\n") {
            let head = &text[..end];
            let length = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())
                        .flatten()
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                break text.into_owned();
            }
        }
    };
    let (head, body) = request.split_once("\r\n\r\n").unwrap_or((&request, ""));
    let target = head.split_whitespace().nth(1).unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut fields = query_fields(query);
    fields.extend(query_fields(body.trim()));
    // Read at every login: a host added (add-host.sh appends its line) logs in without a restart.
    // A flood of logins must not flood the log: a few lines a second, the rest counted.
    let may_report = || {
        reports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .may_report(std::time::Instant::now())
    };
    let verdict = match Users::load(&users) {
        Ok(users) => decide(path, &fields, &users),
        Err(e) => {
            if let Some(unreported) = may_report() {
                tracing::error!(error = %e, "centre login check: no users file; every login refused{unreported}");
            }
            "deny"
        }
    };
    if verdict == "deny"
        && path == "/auth/user"
        && let Some(unreported) = may_report()
    {
        tracing::warn!(
            user = fields.get("username").map(String::as_str).unwrap_or("-"),
            client_id = fields.get("client_id").map(String::as_str).unwrap_or("-"),
            "centre login refused{unreported}"
        );
    }
    let reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{verdict}",
        verdict.len()
    );
    conn.write_all(reply.as_bytes()).await?;
    conn.shutdown().await
}

/// Serves RabbitMQ's HTTP backend on `listen` until `stop`.
pub async fn run(
    listen: SocketAddr,
    users: &Path,
    tasks: tokio_util::task::TaskTracker,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "centre login check listening");
    let users: Arc<Path> = Arc::from(users);
    let reports = Arc::new(Mutex::new(Reports::new(
        REPORTS_PER_SEC,
        "refused logins",
        std::time::Instant::now(),
    )));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let (conn, _) = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = listener.accept() => r?,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (users, reports) = (users.clone(), reports.clone());
        tasks.spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, serve_one(conn, users, reports)).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_needs_the_password_and_a_client_id_of_its_own() {
        let text = format!(
            "# users\n{}\n{}\n",
            users_line("host-a", "s1", "pa"),
            users_line("ops", "s2", "po")
        );
        let users = Users::parse(&text, "t").unwrap();
        let ask = |user: &str, pw: &str, cid: Option<&str>| {
            let mut q = format!("username={user}&password={pw}");
            if let Some(c) = cid {
                q.push_str(&format!("&client_id={c}"));
            }
            decide("/auth/user", &query_fields(&q), &users)
        };
        assert_eq!(ask("host-a", "pa", Some("fleet-host-a")), "allow");
        assert_eq!(ask("ops", "po", Some("fleet-ops.ab12")), "allow");
        // The takeover: valid credentials, another host's client id.
        assert_eq!(ask("ops", "po", Some("fleet-host-a")), "deny");
        assert_eq!(ask("host-a", "wrong", Some("fleet-host-a")), "deny");
        assert_eq!(ask("host-a", "pa", None), "deny");
        assert_eq!(ask("nobody", "pa", Some("fleet-nobody")), "deny");
        assert_eq!(
            decide("/auth/vhost", &query_fields("username=host-a"), &users),
            "deny"
        );
    }

    #[test]
    fn query_strings_are_decoded() {
        let f = query_fields("username=a%20b&password=p%2Bq+r&bad=%zz&client_id=fleet-a");
        assert_eq!(f["username"], "a b");
        assert_eq!(f["password"], "p+q r");
        assert!(!f.contains_key("bad"));
        assert!(Users::parse("a b\n", "t").is_err());
    }
}
