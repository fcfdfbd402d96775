//! Arbitrary bytes as a pgoutput message: the decoder must return, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = heliosdb_tenant_replication::capture::pgoutput::decode(&bytes::Bytes::copy_from_slice(data));
});
