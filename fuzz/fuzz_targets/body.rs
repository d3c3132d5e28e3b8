//! `/v1/audio` bodies through the request parser, checked against serde_json's own verdict:
//! what serde_json cannot parse is INVALID_JSON, and a library it reads is the one we read.
#![no_main]

use audiolib::api::parse_request;
use audiolib::error::ApiError;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let reference = serde_json::from_slice::<serde_json::Value>(data);
    match parse_request(data) {
        Ok(library) => {
            let value = reference.expect("accepted a body serde_json refuses");
            assert_eq!(value["library"].as_str(), Some(&*library));
            assert!(!library.is_empty());
        }
        Err(ApiError::InvalidJson) => {}
        Err(ApiError::MissingLibrary) => {
            let value = reference.expect("MISSING_LIBRARY for a body serde_json refuses");
            let object = value.as_object().expect("MISSING_LIBRARY for a non-object");
            assert!(
                !matches!(object.get("library"), Some(serde_json::Value::String(s)) if !s.is_empty())
            );
        }
        Err(e) => panic!("unexpected {e:?}"),
    }
});
