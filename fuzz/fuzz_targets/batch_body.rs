//! Arbitrary bytes as an opened batch body: decoded or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut decoder = heliosdb_tenant_replication::transport::codec::Decoder::new();
    // Twice: the second pass sees the relations the first one described.
    let _ = decoder.decode(bytes::Bytes::copy_from_slice(data));
    let _ = decoder.decode(bytes::Bytes::copy_from_slice(data));
});
