//! The controller's end of the agent link: every frame an agent (or anyone with the join
//! token) sends is decoded and checked against the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = bramble_api::wire::decode_agent(text);
    }
});
