//! `jetsaga-inventory`: the reference inventory participant. Configuration: `--config FILE`,
//! `JETSAGA_CONFIG`, `JETSAGA_<SECTION>__<KEY>`; `--help` prints the defaults.

/// A faster allocator for the many short-lived buffers of message handling.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use jetsaga_reference::inventory;

fn main() -> ExitCode {
    jetsaga_reference::main(
        "jetsaga-inventory",
        |config: inventory::Config, shutdown| inventory::run(config, shutdown),
    )
}
