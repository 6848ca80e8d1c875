//! `TaskId::from_hex`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fedmesh_protocol_fuzz::check_task_id(data));
