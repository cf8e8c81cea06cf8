//! The `syncq` binary: parse, run, map errors to exit codes (usage 2,
//! runtime 1), one line each, never a panic.

use std::process::ExitCode;

use clap::Parser;
use std::io::Write;

use syncq::cli::{Cli, CliError, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let default_level = match cli.command {
        Command::Worker(_) => "syncq=info",
        // Retries and throttles are the show; the progress display tells it.
        Command::Demo(_) => "syncq=error",
        _ => "syncq=warn",
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    match cli.log_format {
        // log_internal_errors(false): a failed write to a closed stderr is
        // otherwise reported with eprintln!, which panics, and the panic
        // hook's own log line then aborts the process mid-shutdown.
        LogFormat::Text => tracing_subscriber::fmt()
            .log_internal_errors(false)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_env_filter(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .log_internal_errors(false)
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init(),
    }
    // A handler's panic is caught and retried by the pool; log it as one line.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "a handler panicked");
    }));

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "syncq: error: cannot start the async runtime: {e}"
            );
            return ExitCode::from(1);
        }
    };
    let mut stdout = std::io::stdout();
    match runtime.block_on(syncq::cli::run(cli, &mut stdout)) {
        Ok(()) | Err(CliError::PipeClosed) => ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!: it panics when stderr is closed.
            let _ = writeln!(std::io::stderr(), "syncq: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
