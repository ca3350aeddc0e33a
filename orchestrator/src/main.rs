//! `jetsaga`: the orchestrator (`serve`) and its command-line tools.

/// A faster allocator for the many short-lived buffers of message handling.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use jetsaga_orchestrator::config::Config;
use jetsaga_orchestrator::definitions;

const USAGE: &str = "usage:
  jetsaga serve [--config FILE]     run the orchestrator (config also from JETSAGA_CONFIG and JETSAGA_<SECTION>__<KEY>)
  jetsaga validate FILE...          check saga definition files
  jetsaga bench [OPTIONS]           run order sagas against a running system and report throughput and latency
      --nats URL                    NATS server (default nats://127.0.0.1:4222)
      --via subject|http            start through the start subject (default) or the HTTP API
      --http ADDR                   orchestrator HTTP address for --via http (default 127.0.0.1:8080)
      --sagas N --concurrency C     closed loop (default 10000 sagas, 256 in flight)
      --rate R --duration D         open loop: R starts per second for D (e.g. 30s), on a fixed schedule
      --decline-share F             share of orders the payment declines (default 0.1)
      --items K                     items per order (default 1)
      --timeout D                   wait this long for unfinished sagas (default 60s)
      --json                        print one JSON object on the last line
  jetsaga help                      this text";

/// Exit code for bad configuration or usage (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("validate") => validate(&args[1..]),
        Some("bench") => bench(&args[1..]),
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

fn bench(args: &[String]) -> ExitCode {
    let options = match jetsaga_orchestrator::bench::parse_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("jetsaga bench: {e}\n{USAGE}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("jetsaga bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = options.json;
    match runtime.block_on(jetsaga_orchestrator::bench::run(options)) {
        Ok(report) => {
            println!("{}", report.table());
            let problems = report.problems();
            for problem in &problems {
                println!("PROBLEM: {problem}");
            }
            if json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
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
    let config = config_file(args).and_then(|file| {
        Config::load(file.as_deref(), std::env::vars()).map_err(|e| e.to_string())
    });
    let mut config = match config {
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
