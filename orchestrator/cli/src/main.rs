//! `jetsaga`: the orchestrator (`serve`) and its command-line tools (`validate`, `bench`,
//! and the operator commands `sagas`, `dead-letters`, `definitions` in [`ops`]).

mod ops;

/// A faster allocator for the many short-lived buffers of message handling.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use jetsaga_orchestrator::config::Config;
use jetsaga_orchestrator::definitions;

/// Exit code for bad configuration or usage (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

/// jetsaga: a saga orchestrator on NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "jetsaga", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the orchestrator.
    ///
    /// Configuration: the defaults, then the TOML file (--config or JETSAGA_CONFIG), then
    /// environment variables JETSAGA_<SECTION>__<KEY> (e.g. JETSAGA_NATS__URL).
    Serve {
        /// The configuration file.
        #[arg(short, long, value_name = "FILE", env = "JETSAGA_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Check saga definition files; prints OK or every problem, exits 1 if any file is invalid.
    Validate {
        /// The definition files (TOML).
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
    },
    /// Run order sagas against a running system and report throughput and latency.
    ///
    /// Exits 1 if any saga failed or did not finish, or the outcomes do not match the decline
    /// rule.
    Bench(jetsaga_bench::Args),
    /// Look at, list, retry and abort sagas (over the HTTP API).
    Sagas {
        #[command(flatten)]
        connection: ops::Connection,
        #[command(subcommand)]
        command: ops::Sagas,
    },
    /// List, redrive and discard dead letters (over the HTTP API).
    DeadLetters {
        #[command(flatten)]
        connection: ops::Connection,
        #[command(subcommand)]
        command: ops::DeadLetters,
    },
    /// The saga definitions the orchestrator has loaded.
    Definitions {
        #[command(flatten)]
        connection: ops::Connection,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::Validate { files } => validate(&files),
        Command::Bench(args) => bench(args),
        Command::Sagas {
            connection,
            command,
        } => ops::run(connection, ops::Request::Sagas(command)),
        Command::DeadLetters {
            connection,
            command,
        } => ops::run(connection, ops::Request::DeadLetters(command)),
        Command::Definitions { connection } => ops::run(connection, ops::Request::Definitions),
    }
}

/// `--help` and `--version` succeed; any other parse error is a usage error (64, not clap's 2).
fn usage_error(error: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    // Printing to a closed stdout/stderr is not worth failing over.
    let _ = error.print();
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
        _ => ExitCode::from(EX_USAGE),
    }
}

fn validate(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for file in files {
        match definitions::load_file(file) {
            Ok(def) => println!(
                "{}: OK ({} v{}, {} steps)",
                file.display(),
                def.name,
                def.version,
                def.steps.len()
            ),
            Err(errors) => {
                failed = true;
                for error in errors {
                    println!("{error}");
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn bench(args: jetsaga_bench::Args) -> ExitCode {
    let options = args.options();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("jetsaga bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = options.json;
    match runtime.block_on(jetsaga_bench::run(options)) {
        Ok(report) => {
            println!("{}", report.table());
            let problems = report.problems();
            for problem in &problems {
                println!("PROBLEM: {problem}");
            }
            if json {
                match serde_json::to_string(&report) {
                    Ok(line) => println!("{line}"),
                    Err(e) => {
                        eprintln!("jetsaga bench: cannot encode the report: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("jetsaga bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(file: Option<PathBuf>) -> ExitCode {
    let mut config = match Config::load(file.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("jetsaga serve: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    // The log filter used to come from JETSAGA_LOG; it still wins when set.
    if let Some(filter) = std::env::var("JETSAGA_LOG").ok().filter(|f| !f.is_empty()) {
        config.telemetry.log_filter = filter;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("jetsaga serve: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _telemetry = {
        let _entered = runtime.enter();
        match jetsaga_runtime::telemetry::init("jetsaga", &config.telemetry) {
            Ok(guard) => guard,
            Err(e) => {
                eprintln!("jetsaga serve: {e}");
                return ExitCode::from(EX_USAGE);
            }
        }
    };
    match runtime.block_on(jetsaga_orchestrator::run(
        config,
        jetsaga_runtime::shutdown::signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jetsaga serve: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
