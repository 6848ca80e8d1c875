//! The header of every generated payload.
//!
//! Layout (little endian): `magic u32 | publisher u32 | seq u64 | sent_ns u64 |
//! written_ns u64`, then padding up to the requested payload size. Times are nanoseconds
//! since an `Instant` shared by the publishers and subscribers of one process.
//! `sent_ns` is when the message was due: for fixed-rate runs the *scheduled* send time,
//! so that latency measured from it includes any lateness of the sender and coordinated
//! omission does not hide stalls. `written_ns` is when the frame was actually encoded,
//! just before its `write`.

/// Bytes of the header; the smallest payload the generator can send.
pub const LEN: usize = 32;
/// "FMB1".
const MAGIC: u32 = 0x3142_4d46;

/// What a payload says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Index of the publishing connection.
    pub publisher: u32,
    /// Per-publisher sequence number, from 0.
    pub seq: u64,
    /// Scheduled send time (as fast as possible: the write time), ns since the shared start.
    pub sent_ns: u64,
    /// Actual encode time, just before the write, ns since the shared start.
    pub written_ns: u64,
}

impl Stamp {
    /// Appends a payload of `size` bytes (at least [`LEN`]) carrying this stamp.
    pub fn write(&self, out: &mut Vec<u8>, size: usize) {
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&self.publisher.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.sent_ns.to_le_bytes());
        out.extend_from_slice(&self.written_ns.to_le_bytes());
        // Non-zero, varying padding (so nothing on the path can compress it away).
        out.extend((LEN..size).map(|i| (i as u8).wrapping_mul(31) | 1));
    }

    /// Reads the stamp of a payload; `None` if it was not written by [`Stamp::write`].
    pub fn read(payload: &[u8]) -> Option<Self> {
        let h = payload.get(..LEN)?;
        let u32_at = |i: usize| h[i..i + 4].try_into().ok().map(u32::from_le_bytes);
        let u64_at = |i: usize| h[i..i + 8].try_into().ok().map(u64::from_le_bytes);
        if u32_at(0)? != MAGIC {
            return None;
        }
        Some(Self {
            publisher: u32_at(4)?,
            seq: u64_at(8)?,
            sent_ns: u64_at(16)?,
            written_ns: u64_at(24)?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_size() {
        let s = Stamp {
            publisher: 3,
            seq: 1 << 40,
            sent_ns: 123_456_789,
            written_ns: 123_457_000,
        };
        for size in [LEN, 64, 1024] {
            let mut buf = vec![0xAA];
            s.write(&mut buf, size);
            assert_eq!(buf.len(), 1 + size);
            assert_eq!(Stamp::read(&buf[1..]), Some(s));
        }
    }

    #[test]
    fn foreign_payloads_are_rejected() {
        assert_eq!(Stamp::read(b"hello"), None);
        assert_eq!(Stamp::read(&[0u8; 64]), None);
    }
}
