//! `jetsaga`: the orchestrator (`serve`) and its command-line tools.

use std::path::PathBuf;
use std::process::ExitCode;

use jetsaga_orchestrator::config::Config;
use jetsaga_orchestrator::definitions;

const USAGE: &str = "usage:
  jetsaga serve [--config FILE]     run the orchestrator (config also from JETSAGA_CONFIG and JETSAGA_<SECTION>__<KEY>)
  jetsaga validate FILE...          check saga definition files
  jetsaga help                      this text";

/// Exit code for bad configuration or usage (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("validate") => validate(&args[1..]),
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("jetsaga: unknown command \"{other}\"\n{USAGE}");
            ExitCode::from(EX_USAGE)
        }
        None => {
            eprintln!("{USAGE}");
            ExitCode::from(EX_USAGE)
        }
    }
}

fn validate(files: &[String]) -> ExitCode {
    if files.is_empty() {
        eprintln!("jetsaga validate: name at least one definition file\n{USAGE}");
        return ExitCode::from(EX_USAGE);
    }
    let mut failed = false;
    for file in files {
        match definitions::load_file(&PathBuf::from(file)) {
            Ok(def) => println!(
                "{file}: OK ({} v{}, {} steps)",
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

fn config_file(args: &[String]) -> Result<Option<PathBuf>, String> {
    let mut file = std::env::var_os("JETSAGA_CONFIG").map(PathBuf::from);
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                file = Some(PathBuf::from(args.next().ok_or("--config needs a file")?));
            }
            other => return Err(format!("unknown argument \"{other}\"")),
        }
    }
    Ok(file)
}

fn serve(args: &[String]) -> ExitCode {
    init_logging();
    let config = config_file(args).and_then(|file| {
        Config::load(file.as_deref(), std::env::vars()).map_err(|e| e.to_string())
    });
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("jetsaga serve: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("jetsaga serve: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(jetsaga_orchestrator::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jetsaga serve: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("JETSAGA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
