//! Arbitrary text as a config file: it is accepted or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = heliosdb_tenant_replication::config::Config::from_toml(text, "fuzz.toml", |_| None);
    }
});
