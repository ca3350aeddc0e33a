//! `jetsaga-inventory`: the reference inventory participant. Configuration: `--config FILE`,
//! `JETSAGA_CONFIG`, `JETSAGA_<SECTION>__<KEY>`; `--help` prints the defaults.

/// A faster allocator for the many short-lived buffers of message handling.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use jetsaga_participants::config::{self, Cli};
use jetsaga_participants::{inventory, shutdown_signal, telemetry};

const BINARY: &str = "jetsaga-inventory";

#[tokio::main]
async fn main() -> ExitCode {
    let config: inventory::Config = match config::from_args(BINARY, std::env::args()) {
        Ok(Cli::Run(config)) => config,
        Ok(Cli::Help(text)) => {
            println!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{BINARY}: {e}");
            return ExitCode::from(64);
        }
    };
    let _telemetry = match telemetry::init(BINARY, &config.telemetry) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("{BINARY}: {e}");
            return ExitCode::from(64);
        }
    };
    match inventory::run(config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{BINARY} stopped");
            ExitCode::FAILURE
        }
    }
}
