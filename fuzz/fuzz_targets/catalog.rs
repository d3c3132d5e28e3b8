//! Library files through the catalog parser: any text is a library or an error naming a line
//! inside the file, never a panic.
#![no_main]

use std::path::Path;

use audiolib::catalog::parse_library;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match parse_library(Path::new("audio.fuzz.toml"), text) {
        Ok(library) => {
            assert!(library.active_count() <= library.track_count());
            let mut rng = rand::rng();
            if library.active_count() > 0 {
                assert!(library.choose(&mut rng).is_some());
            }
        }
        Err(e) => {
            if let Some(line) = e.line {
                assert!(line >= 1 && line <= text.lines().count().max(1) + 1, "{e}");
            }
        }
    }
});
