//! Arbitrary bytes as a pgoutput message, outside and inside a stream block:
//! the decoder must return, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = bytes::Bytes::copy_from_slice(data);
    let _ = heliosdb_tenant_replication::capture::pgoutput::decode(&bytes);
    let _ = heliosdb_tenant_replication::capture::pgoutput::decode_streamed(&bytes);
});
