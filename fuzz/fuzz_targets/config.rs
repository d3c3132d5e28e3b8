//! Config files and environment values through the config loader. The input is the file's
//! text, then optionally a NUL and `NAME=value` lines for the environment: every input is a
//! config or a list of problems, never a panic.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use audiolib::config::{Config, read_file};
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("audiolib-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    })
}

fuzz_target!(|text: &str| {
    let (file_text, env_text) = text.split_once('\0').unwrap_or((text, ""));
    let env: BTreeMap<&str, &str> = env_text
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    let path = scratch().join("audiolib.toml");
    std::fs::write(&path, file_text).expect("write scratch config");
    match read_file(&path) {
        Ok(file) => {
            if let Err(problems) = Config::build(file, &env) {
                assert!(!problems.is_empty());
            }
        }
        Err(message) => assert!(message.contains("audiolib.toml"), "{message}"),
    }
});
