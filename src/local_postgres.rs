//! A private, throwaway PostgreSQL cluster, for `syncq demo` and the test
//! suite on a machine where no server answers.
//!
//! It uses the server programs already installed (`initdb` and `pg_ctl` on
//! `PATH`, or in the usual install folders such as
//! `/usr/lib/postgresql/<version>/bin`): nothing is downloaded. The cluster
//! lives in a temporary directory, listens on 127.0.0.1 at a free port, trusts
//! local connections, and is stopped and deleted when the value is dropped.
//! PostgreSQL refuses to run as root, so when invoked as root the cluster
//! belongs to the `postgres` system user (or `nobody`).
//!
//! ```no_run
//! # fn main() -> syncq::Result<()> {
//! let pg = syncq::local_postgres::LocalPostgres::start()?;
//! println!("use {}", pg.url("syncq"));
//! // … connect, run, and the cluster is removed when `pg` is dropped.
//! # Ok(()) }
//! ```

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// What to tell a user who has no PostgreSQL at all.
pub const HOW_TO_GET_POSTGRES: &str = "no PostgreSQL server answers and no PostgreSQL server programs \
     (initdb, pg_ctl) are installed: start one with `docker compose up -d db` (then \
     DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/syncq), or install your \
     distribution's package (Debian/Ubuntu: apt install postgresql; macOS: brew install postgresql)";

/// A running private cluster; stopped and deleted on drop.
#[derive(Debug)]
pub struct LocalPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    owner: Option<(u32, u32)>,
}

impl LocalPostgres {
    /// Creates and starts a cluster. Takes a few seconds (initdb).
    pub fn start() -> Result<LocalPostgres> {
        Self::start_with(&[])
    }

    /// Creates and starts a cluster with extra server settings
    /// (`name=value`, as `postgres -c` takes them), e.g.
    /// `shared_preload_libraries=pg_stat_statements`.
    pub fn start_with(settings: &[&str]) -> Result<LocalPostgres> {
        let bin =
            find_server_bin().ok_or_else(|| Error::LocalPostgres(HOW_TO_GET_POSTGRES.into()))?;
        let owner = unprivileged_owner()?;
        let dir = std::env::temp_dir().join(format!(
            "syncq-postgres-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::LocalPostgres(format!("cannot create {}: {e}", dir.display())))?;
        let port = free_port()?;
        let pg = LocalPostgres {
            dir,
            bin,
            port,
            owner,
        };
        pg.chown_dir()?;
        let data = pg.dir.join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )?;
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=200",
            pg.port,
            path_str(&pg.dir)?
        );
        for setting in settings {
            if setting.contains(char::is_whitespace) || !setting.contains('=') {
                return Err(Error::LocalPostgres(format!(
                    "server setting {setting:?} must be name=value without spaces"
                )));
            }
            options.push_str(" -c ");
            options.push_str(setting);
        }
        let log = pg.dir.join("server.log");
        pg.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data)?,
                "-o",
                &options,
                "-l",
                path_str(&log)?,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        tracing::info!(port = pg.port, dir = %pg.dir.display(), "private PostgreSQL cluster started");
        Ok(pg)
    }

    /// The URL of database `database` on this cluster (user `postgres`).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The port the cluster listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Restarts the server the way an upgrade or a failover does to its
    /// clients: `pg_ctl restart -m fast` terminates every session, then
    /// starts again on the same port. Returns once it accepts connections.
    pub fn restart(&self) -> Result<()> {
        let data = self.dir.join("data");
        let log = self.dir.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data)?,
                "-l",
                path_str(&log)?,
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "restart",
            ],
        )
    }

    /// The cluster's directory (data, socket and log), deleted on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        #[cfg(unix)]
        if let Some((uid, gid)) = self.owner {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        let out = cmd
            .output()
            .map_err(|e| Error::LocalPostgres(format!("cannot run {program}: {e}")))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        Err(Error::LocalPostgres(format!(
            "{program} failed ({}): {}",
            out.status,
            last.unwrap_or("no output")
        )))
    }

    fn chown_dir(&self) -> Result<()> {
        #[cfg(unix)]
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&self.dir, Some(uid), Some(gid)).map_err(|e| {
                Error::LocalPostgres(format!(
                    "cannot hand {} to uid {uid}: {e}",
                    self.dir.display()
                ))
            })?;
        }
        Ok(())
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        if let Some(data) = data.to_str()
            && let Err(e) = self.run("pg_ctl", &["-D", data, "-m", "immediate", "-w", "stop"])
        {
            tracing::warn!(error = %e, "stopping the private PostgreSQL cluster failed");
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(error = %e, dir = %self.dir.display(), "removing the private PostgreSQL cluster failed");
        }
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::LocalPostgres(format!("path is not UTF-8: {}", p.display())))
}

/// A port nothing listens on right now.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::LocalPostgres(format!("cannot find a free port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::LocalPostgres(format!("cannot find a free port: {e}")))
}

/// The folder holding `initdb` and `pg_ctl`: `PATH` first, then the usual
/// install folders, newest version first.
pub fn find_server_bin() -> Option<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_both(&dir) {
                return Some(dir);
            }
        }
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    for root in [
        "/usr/lib/postgresql",
        "/usr/local/lib/postgresql",
        "/opt/homebrew/opt",
    ] {
        if let Ok(entries) = std::fs::read_dir(root) {
            for entry in entries.flatten() {
                candidates.push(entry.path().join("bin"));
            }
        }
    }
    // Highest version first (numeric where the folder name is a number).
    candidates.sort_by_key(|p| {
        let version = p
            .parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.trim_start_matches("postgresql@").parse::<u32>().ok())
            .unwrap_or(0);
        std::cmp::Reverse(version)
    });
    candidates.extend(
        ["/usr/local/pgsql/bin", "/usr/pgsql/bin"]
            .iter()
            .map(PathBuf::from),
    );
    candidates.into_iter().find(|d| has_both(d))
}

/// `(uid, gid)` to run the server as when we are root: `postgres`, else
/// `nobody`. None when not root.
fn unprivileged_owner() -> Result<Option<(u32, u32)>> {
    #[cfg(unix)]
    {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let euid = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|u| u.parse::<u32>().ok());
        let root = match euid {
            Some(uid) => uid == 0,
            // No /proc (macOS): ask the environment.
            None => std::env::var("USER").is_ok_and(|u| u == "root"),
        };
        if !root {
            return Ok(None);
        }
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        for name in ["postgres", "nobody"] {
            let entry = passwd.lines().find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                if fields.len() > 3 && fields[0] == name {
                    Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
                } else {
                    None
                }
            });
            if let Some(ids) = entry {
                return Ok(Some(ids));
            }
        }
        Err(Error::LocalPostgres(
            "running as root and no `postgres` or `nobody` user to run a private PostgreSQL as"
                .into(),
        ))
    }
    #[cfg(not(unix))]
    {
        Ok(None)
    }
}
