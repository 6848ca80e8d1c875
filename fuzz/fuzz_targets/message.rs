//! The envelope body decoder, `postcard::take_from_bytes::<Message>`, with canonical re-encoding.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fedmesh_protocol_fuzz::check_message(data));
