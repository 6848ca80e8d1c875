//! A minimal MQTT 3.1.1 encoder and frame parser for the load generator.
//!
//! Encoders append to a `Vec<u8>` so that many frames go out in one `write`. The parser
//! borrows from the read buffer and never allocates.

use std::fmt;

/// Largest remaining length MQTT can express.
pub const MAX_REMAINING: usize = 268_435_455;

/// Packet types (upper nibble of the first byte).
pub mod kind {
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const SUBACK: u8 = 9;
    pub const PINGRESP: u8 = 13;
}

/// A frame the parser could not make sense of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub &'static str);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed MQTT frame: {}", self.0)
    }
}

impl std::error::Error for ParseError {}

fn remaining_len(out: &mut Vec<u8>, mut len: usize) {
    debug_assert!(len <= MAX_REMAINING);
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// Options of a CONNECT.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions<'a> {
    pub client_id: &'a str,
    pub keep_alive: u16,
    pub clean_session: bool,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
}

/// Appends a CONNECT (protocol level 4).
pub fn connect(out: &mut Vec<u8>, o: &ConnectOptions<'_>) {
    let mut flags = 0u8;
    if o.clean_session {
        flags |= 0x02;
    }
    let mut len = 10 + 2 + o.client_id.len();
    if let Some(u) = o.username {
        flags |= 0x80;
        len += 2 + u.len();
    }
    if let Some(p) = o.password {
        flags |= 0x40;
        len += 2 + p.len();
    }
    out.push(0x10);
    remaining_len(out, len);
    string(out, b"MQTT");
    out.push(4);
    out.push(flags);
    out.extend_from_slice(&o.keep_alive.to_be_bytes());
    string(out, o.client_id.as_bytes());
    if let Some(u) = o.username {
        string(out, u.as_bytes());
    }
    if let Some(p) = o.password {
        string(out, p.as_bytes());
    }
}

/// Appends a SUBSCRIBE of one filter.
pub fn subscribe(out: &mut Vec<u8>, packet_id: u16, filter: &str, qos: u8) {
    out.push(0x82);
    remaining_len(out, 2 + 2 + filter.len() + 1);
    out.extend_from_slice(&packet_id.to_be_bytes());
    string(out, filter.as_bytes());
    out.push(qos);
}

/// Appends the fixed and variable header of a PUBLISH whose payload (`payload_len`
/// bytes) the caller appends next. `packet_id` is used for QoS > 0 only.
pub fn publish_header(out: &mut Vec<u8>, topic: &str, qos: u8, packet_id: u16, payload_len: usize) {
    out.push(0x30 | (qos << 1));
    let pid_len = if qos > 0 { 2 } else { 0 };
    remaining_len(out, 2 + topic.len() + pid_len + payload_len);
    string(out, topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&packet_id.to_be_bytes());
    }
}

/// Appends a PUBACK.
pub fn puback(out: &mut Vec<u8>, packet_id: u16) {
    out.extend_from_slice(&[0x40, 0x02]);
    out.extend_from_slice(&packet_id.to_be_bytes());
}

/// Appends a DISCONNECT.
pub fn disconnect(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0xE0, 0x00]);
}

/// A parsed frame, borrowing from the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    ConnAck {
        code: u8,
    },
    Publish {
        qos: u8,
        topic: &'a [u8],
        packet_id: u16,
        payload: &'a [u8],
    },
    PubAck {
        packet_id: u16,
    },
    SubAck {
        packet_id: u16,
        codes: &'a [u8],
    },
    /// Any other packet type (PINGRESP, ...), by type.
    Other(u8),
}

/// Parses the frame at the start of `buf`: `Ok(None)` if it is not complete yet,
/// otherwise the packet and the frame's length.
pub fn parse(buf: &[u8]) -> Result<Option<(Packet<'_>, usize)>, ParseError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    let mut mult = 1usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len += usize::from(b & 0x7F) * mult;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err(ParseError("remaining length longer than 4 bytes"));
        }
        mult *= 128;
    }
    let total = i + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[i..total];
    let u16_at = |j: usize| -> Result<u16, ParseError> {
        body.get(j..j + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or(ParseError("truncated"))
    };
    let packet = match first >> 4 {
        kind::CONNACK => Packet::ConnAck {
            code: *body.get(1).ok_or(ParseError("short CONNACK"))?,
        },
        kind::PUBLISH => {
            let qos = (first >> 1) & 0x03;
            if qos == 3 {
                return Err(ParseError("PUBLISH with QoS 3"));
            }
            let tlen = usize::from(u16_at(0)?);
            let topic = body.get(2..2 + tlen).ok_or(ParseError("PUBLISH topic"))?;
            let mut j = 2 + tlen;
            let mut packet_id = 0;
            if qos > 0 {
                packet_id = u16_at(j)?;
                j += 2;
            }
            Packet::Publish {
                qos,
                topic,
                packet_id,
                payload: &body[j.min(body.len())..],
            }
        }
        kind::PUBACK => Packet::PubAck {
            packet_id: u16_at(0)?,
        },
        kind::SUBACK => Packet::SubAck {
            packet_id: u16_at(0)?,
            codes: body.get(2..).unwrap_or_default(),
        },
        other => Packet::Other(other),
    };
    Ok(Some((packet, total)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn connect_bytes() {
        let mut b = Vec::new();
        connect(
            &mut b,
            &ConnectOptions {
                client_id: "c1",
                keep_alive: 60,
                clean_session: true,
                username: Some("u"),
                password: Some("pw"),
            },
        );
        let want: &[u8] = &[
            0x10, 21, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60, 0, 2, b'c', b'1', 0, 1, b'u',
            0, 2, b'p', b'w',
        ];
        assert_eq!(b, want);
    }

    #[test]
    fn publish_round_trip() {
        for (qos, size) in [(0u8, 10usize), (1, 200), (1, 70_000)] {
            let mut b = Vec::new();
            let payload = vec![7u8; size];
            publish_header(&mut b, "bench/t", qos, 513, payload.len());
            b.extend_from_slice(&payload);
            puback(&mut b, 9);
            let (p, n) = parse(&b).unwrap().unwrap();
            assert_eq!(
                p,
                Packet::Publish {
                    qos,
                    topic: b"bench/t",
                    packet_id: if qos > 0 { 513 } else { 0 },
                    payload: &payload,
                }
            );
            // Incomplete frames are not parsed.
            assert_eq!(parse(&b[..n - 1]).unwrap(), None);
            assert_eq!(
                parse(&b[n..]).unwrap().unwrap(),
                (Packet::PubAck { packet_id: 9 }, 4)
            );
        }
    }

    #[test]
    fn acks_and_errors() {
        assert_eq!(
            parse(&[0x20, 2, 0, 5]).unwrap().unwrap().0,
            Packet::ConnAck { code: 5 }
        );
        assert_eq!(
            parse(&[0x90, 3, 0, 1, 1]).unwrap().unwrap().0,
            Packet::SubAck {
                packet_id: 1,
                codes: &[1]
            }
        );
        assert_eq!(parse(&[0xD0, 0]).unwrap().unwrap().0, Packet::Other(13));
        assert!(parse(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).is_err());
        assert!(parse(&[0x36, 0]).is_err());
        assert_eq!(parse(&[]).unwrap(), None);
        let mut s = Vec::new();
        subscribe(&mut s, 1, "a/#", 1);
        assert_eq!(s, [0x82, 8, 0, 1, 0, 3, b'a', b'/', b'#', 1]);
        let mut d = Vec::new();
        disconnect(&mut d);
        assert_eq!(d, [0xE0, 0]);
    }
}
