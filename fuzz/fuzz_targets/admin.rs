//! Admin API bodies (`POST /admin/keys`, `PATCH /admin/keys/{id}`) through the handler's
//! parsers: every input is a request or a 400 with a documented code, never a panic.
#![no_main]

use audiolib::admin::{Refusal, parse_change_body, parse_create_body};
use libfuzzer_sys::fuzz_target;

fn check(refusal: Refusal) {
    assert_eq!(refusal.status, 400, "{refusal:?}");
    assert!(
        refusal.code == "INVALID_JSON" || refusal.code == "INVALID_REQUEST",
        "{refusal:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    match parse_create_body(data) {
        Ok(create) => {
            let value: serde_json::Value = serde_json::from_slice(data).expect("accepted non-JSON");
            assert_eq!(value["name"].as_str(), Some(create.name.as_str()));
        }
        Err(refusal) => check(refusal),
    }
    if let Err(refusal) = parse_change_body(data) {
        check(refusal);
    }
});
