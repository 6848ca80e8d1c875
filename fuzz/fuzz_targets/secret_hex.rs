//! `NodeKey::from_secret_hex` (the key-file format).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fedmesh_protocol_fuzz::check_secret_hex(data));
