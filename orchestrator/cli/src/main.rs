//! `jetsaga`: the orchestrator (`serve`) and its command-line tools (`validate`, `bench`,
//! `chaos`, and the operator commands `sagas`, `dead-letters`, `definitions` in [`ops`]).

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
    /// Run a whole system on loopback under faults and check that no saga is lost and no
    /// effect applied twice.
    ///
    /// Starts nats-server (free port, temporary store), two orchestrators and the reference
    /// participants (the binaries next to this one), drives order sagas with the load
    /// generator while killing orchestrators and participants (kill -9 every 1-3 s), stopping
    /// an orchestrator past its ack wait and restarting nats-server, then checks the journal,
    /// the saga listing and the participants' state. Exits 1 if any check fails.
    Chaos(jetsaga_chaos::Args),
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
        Command::Chaos(args) => chaos(args),
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
    let json = options.json;
    run_tool("bench", json, jetsaga_bench::run(options), |report| {
        let mut text = report.table();
        let problems = report.problems();
        for problem in &problems {
            text.push_str(&format!("\nPROBLEM: {problem}"));
        }
        (text, problems.is_empty())
    })
}

fn chaos(args: jetsaga_chaos::Args) -> ExitCode {
    // The other binaries are built beside this one.
    let bin_dir = match std::env::current_exe() {
        Ok(exe) => exe.parent().map(PathBuf::from).unwrap_or_default(),
        Err(e) => {
            eprintln!("jetsaga chaos: cannot locate this binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = args.json;
    let plan = args.plan(bin_dir);
    run_tool("chaos", json, jetsaga_chaos::run(plan), |summary| {
        (summary.render(), summary.passed())
    })
}

/// Runs a tool's future on a fresh runtime, prints its report (`render` gives the text and
/// whether the run passed) and, with `json`, the report as one JSON line; exits 1 if the run
/// failed or did not pass.
fn run_tool<T: serde::Serialize, E: std::fmt::Display>(
    name: &str,
    json: bool,
    work: impl std::future::Future<Output = Result<T, E>>,
    render: impl FnOnce(&T) -> (String, bool),
) -> ExitCode {
    let runtime = match jetsaga_runtime::workers::from_env() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("jetsaga {name}: {e}");
            return e.exit_code();
        }
    };
    let report = match runtime.block_on(work) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("jetsaga {name}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (text, passed) = render(&report);
    println!("{text}");
    if json {
        match serde_json::to_string(&report) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("jetsaga {name}: cannot encode the report: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
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
    let runtime = match jetsaga_runtime::workers::from_env() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("jetsaga serve: {e}");
            return e.exit_code();
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
