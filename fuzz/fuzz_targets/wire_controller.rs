//! The agent's end of the link: every frame the controller sends.
#![no_main]

use bramble_api::wire::{self, ControllerMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = wire::decode::<ControllerMessage>(text);
    }
});
