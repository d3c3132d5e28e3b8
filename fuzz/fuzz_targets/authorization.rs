//! `Authorization` header values, one or several (split at NUL), through the bearer parser
//! and the key format check: any bytes give a verdict, never a panic.
#![no_main]

use audiolib::auth::{bearer_token, check_format};
use audiolib::error::ApiError;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let values: Vec<&[u8]> = data.split(|&b| b == 0).collect();
    match bearer_token(values.iter().copied()) {
        Ok(token) => {
            assert!(values.len() == 1, "several headers must be refused");
            assert!(!token.is_empty());
            if check_format(token).is_ok() {
                assert_eq!(token.len(), 36);
                assert!(token.starts_with("alp_"));
            }
        }
        Err(e) => assert!(matches!(e, ApiError::MissingAuth), "{e:?}"),
    }
});
