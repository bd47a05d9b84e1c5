//! The signature check never panics, accepts its own signatures, and
//! refuses any other header value.
#![no_main]

use grs_github::signature::{sign, verify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // secret | body | header, split by the first two bytes as lengths.
    let [a, b, rest @ ..] = data else { return };
    let (a, b) = (*a as usize % (rest.len() + 1), *b as usize);
    let (secret, rest) = rest.split_at(a);
    let (header, body) = rest.split_at(b.min(rest.len()));
    let good = sign(secret, body);
    assert!(verify(secret, body, Some(good.as_bytes())).is_ok());
    let r = verify(secret, body, Some(header));
    if r.is_ok() {
        // Only the right MAC (in either hex case) may pass.
        assert!(header.eq_ignore_ascii_case(good.as_bytes()));
    }
    let _ = verify(secret, body, None);
});
