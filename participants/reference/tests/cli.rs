//! The participant binaries' command line: help with the defaults, config file from the flag
//! or JETSAGA_CONFIG, usage errors exit 64.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use jetsaga_testkit::cargo_bin;

fn run(binary: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(cargo_bin(binary))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn help_config_file_and_usage_errors() {
    for binary in [
        "jetsaga-inventory",
        "jetsaga-payment",
        "jetsaga-notification",
    ] {
        let (code, out) = run(binary, &["--help"], &[]);
        assert_eq!(code, 0, "{binary}: {out}");
        assert!(out.contains(&format!("Usage: {binary} [OPTIONS]")), "{out}");
        assert!(out.contains("--config <FILE>"), "{out}");
        assert!(out.contains("JETSAGA_CONFIG"), "{out}");
        assert!(out.contains("Defaults:") && out.contains("[nats]"), "{out}");

        let (code, out) = run(binary, &["--frobnicate"], &[]);
        assert_eq!(code, 64, "{binary}: {out}");
        let (code, out) = run(binary, &["--config", "/no/such-flag.toml"], &[]);
        assert_eq!(code, 64, "{binary}: {out}");
        assert!(out.contains("/no/such-flag.toml"), "{out}");
        let (code, out) = run(binary, &[], &[("JETSAGA_CONFIG", "/no/such-env.toml")]);
        assert_eq!(code, 64, "{binary}: {out}");
        assert!(out.contains("/no/such-env.toml"), "{out}");
        // The flag wins over the environment.
        let (code, out) = run(
            binary,
            &["-c", "/no/such-flag.toml"],
            &[("JETSAGA_CONFIG", "/no/such-env.toml")],
        );
        assert_eq!(code, 64, "{binary}: {out}");
        assert!(out.contains("/no/such-flag.toml"), "{out}");
        // An invalid value exits 64 naming the field.
        let (code, out) = run(binary, &[], &[("JETSAGA_NATS__REPLICAS", "0")]);
        assert_eq!(code, 64, "{binary}: {out}");
        assert!(out.contains("nats.replicas"), "{out}");
        // So does a bad worker-thread count, before anything connects.
        for bad in ["0", "many"] {
            let (code, out) = run(binary, &[], &[("TOKIO_WORKER_THREADS", bad)]);
            assert_eq!(code, 64, "{binary} {bad}: {out}");
            assert!(
                out.contains(&format!(
                    "TOKIO_WORKER_THREADS=\"{bad}\" is not a number of worker threads"
                )),
                "{out}"
            );
        }
    }
}
