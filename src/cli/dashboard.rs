//! `syncq dashboard`: the web dashboard ([`crate::dashboard`]) on its own.

use std::io::Write;
use std::net::SocketAddr;

use clap::Args;

use super::{CliError, io_error, note};
use crate::dashboard::{DashboardOptions, serve};
use crate::db::Db;

/// `syncq dashboard`.
#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// Where to listen. Loopback by default: anyone who can reach the
    /// dashboard can read every task's payload.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
}

pub(super) async fn run(
    db: Db,
    args: DashboardArgs,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let mut options = DashboardOptions::from_env();
    options
        .check()
        .map_err(|e| CliError::Usage(format!("SYNCQ_DASHBOARD_TOKEN: {e}")))?;
    // Only its own names: a page whose DNS name is rebound to this address
    // cannot read it (SYNCQ_DASHBOARD_HOSTS adds names, e.g. behind a proxy).
    let mut hosts: Vec<String> = std::env::var("SYNCQ_DASHBOARD_HOSTS")
        .unwrap_or_default()
        .split(',')
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    if args.addr.ip().is_loopback() || !hosts.is_empty() {
        hosts.extend(["localhost", "127.0.0.1", "[::1]"].map(String::from));
        if !args.addr.ip().is_unspecified() {
            hosts.push(match args.addr.ip() {
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                ip => ip.to_string(),
            });
        }
        options = options.hosts(hosts);
    }
    if !args.addr.ip().is_loopback() {
        if options.is_read_only() {
            note(&format!(
                "listening on {} beyond loopback without SYNCQ_DASHBOARD_TOKEN: the dashboard is read-only, \
                 but anyone who can reach it reads every dataset and task payload",
                args.addr
            ));
        } else {
            note(&format!(
                "listening on {} beyond loopback over plain HTTP: put TLS in front of it, the sign-in token and session cookie travel in the clear",
                args.addr
            ));
        }
    }
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| CliError::Runtime(format!("cannot listen on {}: {e}", args.addr)))?;
    let local = listener.local_addr().map_err(io_error)?;
    writeln!(
        out,
        "syncq dashboard on http://{local}/ ({})",
        if options.is_read_only() {
            "read-only: set SYNCQ_DASHBOARD_TOKEN to allow actions"
        } else {
            "actions allowed to operators signed in with SYNCQ_DASHBOARD_TOKEN"
        }
    )
    .map_err(io_error)?;
    out.flush().map_err(io_error)?;
    serve(listener, db, options, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
    .map_err(|e| CliError::Runtime(format!("the dashboard stopped: {e}")))
}
