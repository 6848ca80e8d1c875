//! A small, focused MQTT 3.1.1 / 5.0 codec: exactly what the front proxy needs.
//!
//! * the fixed header and its remaining-length varint (every frame, both directions);
//! * CONNECT: full parse and re-encode (properties are kept as raw values, so what we do
//!   not touch is re-encoded byte for byte);
//! * CONNACK: parse and re-encode (the proxy edits a few v5 properties);
//! * PUBLISH: the variable header only (topic, packet id, v5 topic alias);
//! * SUBSCRIBE: the filters;
//! * the packets the proxy writes itself: CONNACK, SUBACK, PUBACK/PUBREC and DISCONNECT.
//!
//! rumqttc's `mqttbytes` modules are public, but they decode whole packets into owned
//! structs (payload included), drop unknown details on re-encode and would make the
//! proxy depend on the client crate; rumqttd's `protocol` module has the same shape.
//! Parsing just the headers keeps the proxy streaming: payloads are never buffered.

use bytes::{BufMut, Bytes, BytesMut};

/// Largest remaining length MQTT can express.
pub(crate) const MAX_REMAINING: usize = 268_435_455;

pub(crate) const CONNECT: u8 = 1;
pub(crate) const CONNACK: u8 = 2;
pub(crate) const PUBLISH: u8 = 3;
pub(crate) const PUBACK: u8 = 4;
pub(crate) const PUBREC: u8 = 5;
pub(crate) const PUBREL: u8 = 6;
pub(crate) const PUBCOMP: u8 = 7;
pub(crate) const SUBSCRIBE: u8 = 8;
pub(crate) const SUBACK: u8 = 9;
pub(crate) const UNSUBSCRIBE: u8 = 10;
pub(crate) const UNSUBACK: u8 = 11;
pub(crate) const PINGREQ: u8 = 12;
pub(crate) const PINGRESP: u8 = 13;
pub(crate) const DISCONNECT: u8 = 14;
pub(crate) const AUTH: u8 = 15;

/// MQTT 5 property identifiers used by the proxy.
pub(crate) mod prop {
    pub(crate) const RESPONSE_TOPIC: u8 = 0x08;
    pub(crate) const CORRELATION_DATA: u8 = 0x09;
    pub(crate) const SUBSCRIPTION_ID: u8 = 0x0b;
    pub(crate) const SESSION_EXPIRY: u8 = 0x11;
    pub(crate) const RECEIVE_MAX: u8 = 0x21;
    pub(crate) const ASSIGNED_CLIENT_ID: u8 = 0x12;
    pub(crate) const AUTH_METHOD: u8 = 0x15;
    pub(crate) const TOPIC_ALIAS_MAX: u8 = 0x22;
    pub(crate) const TOPIC_ALIAS: u8 = 0x23;
    pub(crate) const MAX_PACKET_SIZE: u8 = 0x27;
}

/// Why a byte sequence is not an acceptable MQTT packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CodecError {
    /// The remaining-length varint uses more than 4 bytes.
    #[error("malformed remaining length")]
    BadLength,
    /// The packet needs more bytes than the frame (or the inspected prefix) holds.
    #[error("packet truncated")]
    Truncated,
    /// Structurally invalid.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// A CONNECT for a protocol level other than 4 (3.1.1) or 5.
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocol(u8),
}

/// MQTT protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

/// A parsed fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FixedHeader {
    /// First byte: packet type (high nibble) and flags (low nibble).
    pub(crate) byte0: u8,
    /// Length of the fixed header itself (2 to 5 bytes).
    pub(crate) header_len: usize,
    /// The remaining length: bytes after the fixed header.
    pub(crate) remaining: usize,
}

impl FixedHeader {
    pub(crate) fn kind(&self) -> u8 {
        self.byte0 >> 4
    }

    pub(crate) fn flags(&self) -> u8 {
        self.byte0 & 0x0f
    }

    pub(crate) fn frame_len(&self) -> usize {
        self.header_len + self.remaining
    }
}

/// Parses a fixed header at the start of `buf`; `Ok(None)` when more bytes are needed.
pub(crate) fn parse_fixed_header(buf: &[u8]) -> Result<Option<FixedHeader>, CodecError> {
    let Some(&byte0) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some(FixedHeader {
                byte0,
                header_len: 2 + i,
                remaining,
            }));
        }
    }
    Err(CodecError::BadLength)
}

/// Checks the fixed-header flags a client may send for each packet type
/// (MQTT 3.1.1 §2.2.2, MQTT 5 §2.1.3).
pub(crate) fn check_client_flags(h: &FixedHeader, version: Version) -> Result<(), CodecError> {
    let ok = match h.kind() {
        PUBLISH => (h.flags() >> 1) & 0x03 != 3,
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => h.flags() == 0b0010,
        PUBACK | PUBREC | PUBCOMP | PINGREQ | DISCONNECT | CONNECT => h.flags() == 0,
        AUTH => version == Version::V5 && h.flags() == 0,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(CodecError::Malformed(
            "packet type or flags not allowed from a client",
        ))
    }
}

/// Checks the fixed-header flags the broker may send.
pub(crate) fn check_server_flags(h: &FixedHeader) -> Result<(), CodecError> {
    let ok = match h.kind() {
        PUBLISH => (h.flags() >> 1) & 0x03 != 3,
        PUBREL => h.flags() == 0b0010,
        CONNACK | PUBACK | PUBREC | PUBCOMP | SUBACK | UNSUBACK | PINGRESP | DISCONNECT | AUTH => {
            h.flags() == 0
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(CodecError::Malformed(
            "packet type or flags not allowed from the broker",
        ))
    }
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.pos.checked_add(n).ok_or(CodecError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(CodecError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }

    fn varint(&mut self) -> Result<usize, CodecError> {
        let mut v = 0usize;
        for i in 0..4 {
            let b = self.u8()?;
            v |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(CodecError::Malformed("varint longer than 4 bytes"))
    }

    fn binary(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn string(&mut self) -> Result<&'a str, CodecError> {
        let raw = self.binary()?;
        let s = std::str::from_utf8(raw).map_err(|_| CodecError::Malformed("invalid UTF-8"))?;
        if s.contains('\0') {
            return Err(CodecError::Malformed("U+0000 in a string"));
        }
        Ok(s)
    }
}

fn put_varint(out: &mut BytesMut, mut v: usize) {
    loop {
        let mut b = (v & 0x7f) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if v == 0 {
            break;
        }
    }
}

fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_binary(out: &mut BytesMut, b: &[u8]) {
    // Callers only pass values that were parsed from (or bounded like) 16-bit fields.
    let n = u16::try_from(b.len()).unwrap_or(u16::MAX);
    out.put_u16(n);
    out.put_slice(&b[..usize::from(n)]);
}

/// The wire shape of an MQTT 5 property value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PropKind {
    Byte,
    TwoByte,
    FourByte,
    Varint,
    Binary,
    StringPair,
}

fn prop_kind(id: u8) -> Option<PropKind> {
    Some(match id {
        0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => PropKind::Byte,
        0x13 | 0x21 | 0x22 | 0x23 => PropKind::TwoByte,
        0x02 | 0x11 | 0x18 | 0x27 => PropKind::FourByte,
        0x0b => PropKind::Varint,
        // UTF-8 strings and binary data share the 2-byte-length shape.
        0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1a | 0x1c | 0x1f => PropKind::Binary,
        0x26 => PropKind::StringPair,
        _ => return None,
    })
}

/// MQTT 5 properties, each kept as its raw encoded value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Properties {
    items: Vec<(u8, Bytes)>,
}

impl Properties {
    fn parse(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let len = r.varint()?;
        let mut inner = Reader::new(r.take(len)?);
        let mut items = Vec::new();
        while !inner.is_empty() {
            let id = inner.varint()?;
            let id = u8::try_from(id).map_err(|_| CodecError::Malformed("unknown property"))?;
            let kind = prop_kind(id).ok_or(CodecError::Malformed("unknown property"))?;
            let start = inner.pos;
            match kind {
                PropKind::Byte => {
                    inner.take(1)?;
                }
                PropKind::TwoByte => {
                    inner.take(2)?;
                }
                PropKind::FourByte => {
                    inner.take(4)?;
                }
                PropKind::Varint => {
                    inner.varint()?;
                }
                PropKind::Binary => {
                    inner.binary()?;
                }
                PropKind::StringPair => {
                    inner.string()?;
                    inner.string()?;
                }
            }
            let raw = Bytes::copy_from_slice(&inner.buf[start..inner.pos]);
            items.push((id, raw));
        }
        Ok(Self { items })
    }

    /// The raw value of the first property `id`.
    pub(crate) fn get(&self, id: u8) -> Option<&Bytes> {
        self.items.iter().find(|(i, _)| *i == id).map(|(_, v)| v)
    }

    /// The value of two-byte-integer property `id`.
    pub(crate) fn get_u16(&self, id: u8) -> Option<u16> {
        self.get(id)
            .filter(|v| v.len() == 2)
            .map(|v| u16::from_be_bytes([v[0], v[1]]))
    }

    /// The value of four-byte-integer property `id`.
    pub(crate) fn get_u32(&self, id: u8) -> Option<u32> {
        self.get(id)
            .filter(|v| v.len() == 4)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }

    /// The payload of a string or binary property `id` (without its length prefix).
    pub(crate) fn get_binary(&self, id: u8) -> Option<&[u8]> {
        self.get(id).and_then(|v| v.get(2..))
    }

    /// Removes every property `id`; returns whether one was present.
    pub(crate) fn remove(&mut self, id: u8) -> bool {
        let before = self.items.len();
        self.items.retain(|(i, _)| *i != id);
        before != self.items.len()
    }

    /// Replaces property `id` with a two-byte integer.
    pub(crate) fn set_u16(&mut self, id: u8, v: u16) {
        self.remove(id);
        self.items
            .push((id, Bytes::copy_from_slice(&v.to_be_bytes())));
    }

    /// Replaces property `id` with a four-byte integer.
    pub(crate) fn set_u32(&mut self, id: u8, v: u32) {
        self.remove(id);
        self.items
            .push((id, Bytes::copy_from_slice(&v.to_be_bytes())));
    }

    /// Replaces property `id` with a UTF-8 string (at most 65535 bytes).
    pub(crate) fn set_str(&mut self, id: u8, v: &str) {
        self.remove(id);
        let mut b = BytesMut::with_capacity(2 + v.len());
        put_binary(&mut b, v.as_bytes());
        self.items.push((id, b.freeze()));
    }

    fn body_len(&self) -> usize {
        self.items.iter().map(|(_, v)| 1 + v.len()).sum()
    }

    fn encoded_len(&self) -> usize {
        let n = self.body_len();
        varint_len(n) + n
    }

    fn encode(&self, out: &mut BytesMut) {
        put_varint(out, self.body_len());
        for (id, v) in &self.items {
            out.put_u8(*id);
            out.put_slice(v);
        }
    }
}

/// A CONNECT's will message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Will {
    pub(crate) qos: u8,
    pub(crate) retain: bool,
    pub(crate) properties: Properties,
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
}

/// A parsed CONNECT packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Connect {
    pub(crate) version: Version,
    pub(crate) clean: bool,
    pub(crate) keep_alive: u16,
    pub(crate) properties: Properties,
    pub(crate) client_id: String,
    pub(crate) will: Option<Will>,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<Bytes>,
}

/// Parses a CONNECT body (the bytes after the fixed header).
pub(crate) fn parse_connect(body: &[u8]) -> Result<Connect, CodecError> {
    let mut r = Reader::new(body);
    let name = r.binary()?;
    let level = r.u8()?;
    let version = match (name, level) {
        (b"MQTT", 4) => Version::V4,
        (b"MQTT", 5) => Version::V5,
        (b"MQTT", l) | (b"MQIsdp", l) => return Err(CodecError::UnsupportedProtocol(l)),
        _ => return Err(CodecError::Malformed("protocol name")),
    };
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(CodecError::Malformed("reserved connect flag set"));
    }
    let clean = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if will_qos == 3 || (!will_flag && (will_qos != 0 || will_retain)) {
        return Err(CodecError::Malformed("will flags"));
    }
    if version == Version::V4 && has_password && !has_username {
        return Err(CodecError::Malformed("password without user name"));
    }
    let keep_alive = r.u16()?;
    let properties = match version {
        Version::V5 => Properties::parse(&mut r)?,
        Version::V4 => Properties::default(),
    };
    let client_id = r.string()?.to_owned();
    let will = if will_flag {
        let properties = match version {
            Version::V5 => Properties::parse(&mut r)?,
            Version::V4 => Properties::default(),
        };
        let topic = r.string()?.to_owned();
        let payload = Bytes::copy_from_slice(r.binary()?);
        Some(Will {
            qos: will_qos,
            retain: will_retain,
            properties,
            topic,
            payload,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string()?.to_owned())
    } else {
        None
    };
    let password = if has_password {
        Some(Bytes::copy_from_slice(r.binary()?))
    } else {
        None
    };
    if !r.is_empty() {
        return Err(CodecError::Malformed("trailing bytes after CONNECT"));
    }
    Ok(Connect {
        version,
        clean,
        keep_alive,
        properties,
        client_id,
        will,
        username,
        password,
    })
}

impl Connect {
    /// Encodes the whole packet, fixed header included.
    pub(crate) fn encode(&self) -> BytesMut {
        let mut body = BytesMut::with_capacity(64);
        put_binary(&mut body, b"MQTT");
        body.put_u8(match self.version {
            Version::V4 => 4,
            Version::V5 => 5,
        });
        let mut flags = 0u8;
        if self.clean {
            flags |= 0x02;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | (w.qos << 3);
            if w.retain {
                flags |= 0x20;
            }
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        body.put_u8(flags);
        body.put_u16(self.keep_alive);
        if self.version == Version::V5 {
            self.properties.encode(&mut body);
        }
        put_binary(&mut body, self.client_id.as_bytes());
        if let Some(w) = &self.will {
            if self.version == Version::V5 {
                w.properties.encode(&mut body);
            }
            put_binary(&mut body, w.topic.as_bytes());
            put_binary(&mut body, &w.payload);
        }
        if let Some(u) = &self.username {
            put_binary(&mut body, u.as_bytes());
        }
        if let Some(p) = &self.password {
            put_binary(&mut body, p);
        }
        frame(CONNECT << 4, &body)
    }
}

fn frame(byte0: u8, body: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.put_u8(byte0);
    put_varint(&mut out, body.len());
    out.put_slice(body);
    out
}

/// A parsed CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnAck {
    pub(crate) session_present: bool,
    pub(crate) code: u8,
    pub(crate) properties: Properties,
}

/// Parses a CONNACK body.
pub(crate) fn parse_connack(body: &[u8], version: Version) -> Result<ConnAck, CodecError> {
    let mut r = Reader::new(body);
    let flags = r.u8()?;
    let code = r.u8()?;
    let properties = if version == Version::V5 && !r.is_empty() {
        Properties::parse(&mut r)?
    } else {
        Properties::default()
    };
    if !r.is_empty() {
        return Err(CodecError::Malformed("trailing bytes after CONNACK"));
    }
    Ok(ConnAck {
        session_present: flags & 0x01 != 0,
        code,
        properties,
    })
}

impl ConnAck {
    /// A refusal (or plain success) without properties.
    pub(crate) fn code(code: u8) -> Self {
        Self {
            session_present: false,
            code,
            properties: Properties::default(),
        }
    }

    /// Encodes the whole packet.
    pub(crate) fn encode(&self, version: Version) -> BytesMut {
        let mut body = BytesMut::with_capacity(8 + self.properties.encoded_len());
        body.put_u8(u8::from(self.session_present));
        body.put_u8(self.code);
        if version == Version::V5 {
            self.properties.encode(&mut body);
        }
        frame(CONNACK << 4, &body)
    }
}

/// The variable header of a PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PublishHeader {
    pub(crate) qos: u8,
    /// The topic name as sent; empty when a v5 topic alias stands for it.
    pub(crate) topic: String,
    pub(crate) pkid: Option<u16>,
    pub(crate) topic_alias: Option<u16>,
    /// No properties but (v5) a topic alias.
    pub(crate) plain: bool,
    /// Bytes of the variable header (the payload starts here).
    pub(crate) header_len: usize,
}

/// Checks a topic name a client publishes to: non-empty is the caller's business,
/// wildcards are not allowed (MQTT 3.1.1 §4.7.1, MQTT 5 §4.7.1).
pub(crate) fn valid_topic_name(t: &str) -> bool {
    !t.contains(['+', '#'])
}

/// Parses the variable header of a PUBLISH from a prefix of its body.
pub(crate) fn parse_publish(
    flags: u8,
    body_prefix: &[u8],
    version: Version,
) -> Result<PublishHeader, CodecError> {
    let qos = (flags >> 1) & 0x03;
    if qos == 3 {
        return Err(CodecError::Malformed("PUBLISH with QoS 3"));
    }
    let mut r = Reader::new(body_prefix);
    let topic = r.string()?.to_owned();
    if !valid_topic_name(&topic) {
        return Err(CodecError::Malformed("wildcard in a topic name"));
    }
    let pkid = if qos > 0 {
        let id = r.u16()?;
        if id == 0 {
            return Err(CodecError::Malformed("packet id 0"));
        }
        Some(id)
    } else {
        None
    };
    let mut plain = true;
    let topic_alias = if version == Version::V5 {
        let props = Properties::parse(&mut r)?;
        plain = props.items.iter().all(|(id, _)| *id == prop::TOPIC_ALIAS);
        if props.get(prop::SUBSCRIPTION_ID).is_some() {
            // MQTT 5 §3.3.4; rumqttd would disconnect the client itself.
            return Err(CodecError::Malformed(
                "subscription identifier in a client PUBLISH",
            ));
        }
        match props.get(prop::TOPIC_ALIAS) {
            Some(_) => Some(
                props
                    .get_u16(prop::TOPIC_ALIAS)
                    .filter(|a| *a != 0)
                    .ok_or(CodecError::Malformed("topic alias 0"))?,
            ),
            None => None,
        }
    } else {
        None
    };
    if topic.is_empty() && topic_alias.is_none() {
        return Err(CodecError::Malformed("empty topic name"));
    }
    Ok(PublishHeader {
        qos,
        topic,
        pkid,
        topic_alias,
        plain,
        header_len: r.pos,
    })
}

/// The properties of a PUBLISH the broker sends (used to detect server topic aliases).
pub(crate) fn publish_properties(
    flags: u8,
    body_prefix: &[u8],
) -> Result<(String, Properties), CodecError> {
    let qos = (flags >> 1) & 0x03;
    let mut r = Reader::new(body_prefix);
    let topic = r.string()?.to_owned();
    if qos > 0 {
        r.u16()?;
    }
    Ok((topic, Properties::parse(&mut r)?))
}

/// The topic length and variable-header length of a PUBLISH, without allocating or
/// validating its properties (for frames from the broker, which may carry properties a
/// client may not send).
pub(crate) fn publish_layout(
    flags: u8,
    body_prefix: &[u8],
    version: Version,
) -> Result<(usize, usize), CodecError> {
    let mut r = Reader::new(body_prefix);
    let topic_len = r.binary()?.len();
    if (flags >> 1) & 0x03 > 0 {
        r.u16()?;
    }
    if version == Version::V5 {
        let len = r.varint()?;
        r.take(len)?;
    }
    Ok((topic_len, r.pos))
}

/// A parsed SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Subscribe {
    pub(crate) pkid: u16,
    pub(crate) filters: Vec<String>,
    /// The maximum QoS requested for each filter, in the same order.
    pub(crate) qos: Vec<u8>,
    /// v5: the SUBSCRIBE carries a Subscription Identifier (every message it matches must
    /// carry it too).
    pub(crate) sub_id: bool,
}

/// Parses a SUBSCRIBE body.
pub(crate) fn parse_subscribe(body: &[u8], version: Version) -> Result<Subscribe, CodecError> {
    let mut r = Reader::new(body);
    let pkid = r.u16()?;
    if pkid == 0 {
        return Err(CodecError::Malformed("packet id 0"));
    }
    let sub_id = if version == Version::V5 {
        Properties::parse(&mut r)?
            .get(prop::SUBSCRIPTION_ID)
            .is_some()
    } else {
        false
    };
    let mut filters = Vec::new();
    let mut qos = Vec::new();
    while !r.is_empty() {
        let f = r.string()?.to_owned();
        let options = r.u8()?;
        let bad = match version {
            Version::V4 => options & 0xfc != 0 || options & 0x03 == 3,
            Version::V5 => options & 0xc0 != 0 || options & 0x03 == 3 || (options >> 4) & 0x03 == 3,
        };
        if bad {
            return Err(CodecError::Malformed("subscription options"));
        }
        filters.push(f);
        qos.push(options & 0x03);
    }
    if filters.is_empty() {
        return Err(CodecError::Malformed("SUBSCRIBE without filters"));
    }
    Ok(Subscribe {
        pkid,
        filters,
        qos,
        sub_id,
    })
}

/// Parses an UNSUBSCRIBE body into its topic filters.
pub(crate) fn parse_unsubscribe(body: &[u8], version: Version) -> Result<Vec<String>, CodecError> {
    let mut r = Reader::new(body);
    if r.u16()? == 0 {
        return Err(CodecError::Malformed("packet id 0"));
    }
    if version == Version::V5 {
        Properties::parse(&mut r)?;
    }
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string()?.to_owned());
    }
    if filters.is_empty() {
        return Err(CodecError::Malformed("UNSUBSCRIBE without filters"));
    }
    Ok(filters)
}

/// Parses a SUBACK body into its packet id and return/reason codes.
pub(crate) fn parse_suback(body: &[u8], version: Version) -> Result<(u16, Vec<u8>), CodecError> {
    let mut r = Reader::new(body);
    let pkid = r.u16()?;
    if version == Version::V5 {
        Properties::parse(&mut r)?;
    }
    let mut codes = Vec::new();
    while !r.is_empty() {
        codes.push(r.u8()?);
    }
    Ok((pkid, codes))
}

/// The packet id at the start of an acknowledgement's body (PUBACK, PUBREC, ...).
pub(crate) fn ack_pkid(body: &[u8]) -> Result<u16, CodecError> {
    Reader::new(body).u16()
}

/// A whole PUBLISH packet (no DUP, no retain; QoS 0 without a packet id). v5: at most one
/// property, Correlation Data.
pub(crate) fn encode_publish(
    topic: &str,
    pkid: Option<u16>,
    correlation: Option<&[u8]>,
    payload: &[u8],
    version: Version,
) -> BytesMut {
    let mut body = BytesMut::with_capacity(2 + topic.len() + 2 + 8 + payload.len());
    put_binary(&mut body, topic.as_bytes());
    if let Some(id) = pkid {
        body.put_u16(id);
    }
    if version == Version::V5 {
        let mut props = Properties::default();
        if let Some(c) = correlation {
            let mut b = BytesMut::with_capacity(2 + c.len());
            put_binary(&mut b, c);
            props.items.push((prop::CORRELATION_DATA, b.freeze()));
        }
        props.encode(&mut body);
    }
    body.put_slice(payload);
    let qos = if pkid.is_some() { 1 } else { 0 };
    frame((PUBLISH << 4) | (qos << 1), &body)
}

/// A SUBACK with one return/reason code per filter.
pub(crate) fn encode_suback(pkid: u16, codes: &[u8], version: Version) -> BytesMut {
    let mut body = BytesMut::with_capacity(3 + codes.len());
    body.put_u16(pkid);
    if version == Version::V5 {
        body.put_u8(0);
    }
    body.put_slice(codes);
    frame(SUBACK << 4, &body)
}

/// A v3.1.1 acknowledgement (`kind`: PUBACK, PUBREC, ...) of packet id `pkid`.
pub(crate) fn encode_ack_v4(kind: u8, pkid: u16) -> BytesMut {
    frame(kind << 4, &pkid.to_be_bytes())
}

/// A v5 PUBACK or PUBREC (`kind`) with a reason code.
pub(crate) fn encode_ack_v5(kind: u8, pkid: u16, reason: u8) -> BytesMut {
    let mut body = BytesMut::with_capacity(4);
    body.put_u16(pkid);
    body.put_u8(reason);
    body.put_u8(0);
    frame(kind << 4, &body)
}

/// A v5 DISCONNECT with a reason code.
pub(crate) fn encode_disconnect_v5(reason: u8) -> BytesMut {
    frame(DISCONNECT << 4, &[reason, 0])
}

/// A DISCONNECT without reason (valid in both versions).
pub(crate) fn encode_disconnect() -> BytesMut {
    frame(DISCONNECT << 4, &[])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample_connect(version: Version) -> Connect {
        let mut properties = Properties::default();
        if version == Version::V5 {
            properties.set_u16(prop::TOPIC_ALIAS_MAX, 10);
            properties.set_u32(0x11, 30);
        }
        Connect {
            version,
            clean: true,
            keep_alive: 30,
            properties,
            client_id: "alice".into(),
            will: Some(Will {
                qos: 1,
                retain: true,
                properties: Properties::default(),
                topic: "w/t".into(),
                payload: Bytes::from_static(b"bye"),
            }),
            username: Some("alice".into()),
            password: Some(Bytes::from_static(b"pw")),
        }
    }

    #[test]
    fn fixed_header_varint() {
        assert_eq!(parse_fixed_header(&[0x30]), Ok(None));
        assert_eq!(
            parse_fixed_header(&[0x30, 0x7f]),
            Ok(Some(FixedHeader {
                byte0: 0x30,
                header_len: 2,
                remaining: 127
            }))
        );
        assert_eq!(
            parse_fixed_header(&[0x30, 0x80, 0x01]).map(|h| h.map(|h| h.remaining)),
            Ok(Some(128))
        );
        assert_eq!(
            parse_fixed_header(&[0x30, 0xff, 0xff, 0xff, 0x7f]).map(|h| h.map(|h| h.remaining)),
            Ok(Some(MAX_REMAINING))
        );
        assert_eq!(
            parse_fixed_header(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(CodecError::BadLength)
        );
        let mut b = BytesMut::new();
        for v in [
            0,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            MAX_REMAINING,
        ] {
            b.clear();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v));
            let mut r = Reader::new(&b);
            assert_eq!(r.varint(), Ok(v));
        }
    }

    #[test]
    fn connect_roundtrip_both_versions() {
        for v in [Version::V4, Version::V5] {
            let c = sample_connect(v);
            let bytes = c.encode();
            let h = parse_fixed_header(&bytes).unwrap().unwrap();
            assert_eq!(h.kind(), CONNECT);
            let parsed = parse_connect(&bytes[h.header_len..]).unwrap();
            assert_eq!(parsed, c);
        }
    }

    #[test]
    fn connect_rejects_bad_input() {
        let c = sample_connect(Version::V4);
        let bytes = c.encode();
        let h = parse_fixed_header(&bytes).unwrap().unwrap();
        let body = &bytes[h.header_len..];
        // Truncations at every length are errors, never panics.
        for n in 0..body.len() {
            assert!(parse_connect(&body[..n]).is_err(), "prefix {n}");
        }
        let mut bad = body.to_vec();
        bad[6] = 3; // protocol level 3
        assert_eq!(parse_connect(&bad), Err(CodecError::UnsupportedProtocol(3)));
        let mut bad = body.to_vec();
        bad[7] |= 0x01; // reserved flag
        assert!(parse_connect(&bad).is_err());
        let mut bad = body.to_vec();
        bad.push(0);
        assert!(parse_connect(&bad).is_err());
    }

    #[test]
    fn publish_header() {
        // v4 QoS1 "a/b" pkid 7 payload "x"
        let body = [0, 3, b'a', b'/', b'b', 0, 7, b'x'];
        let p = parse_publish(0b0010, &body, Version::V4).unwrap();
        assert_eq!(p.topic, "a/b");
        assert_eq!(p.pkid, Some(7));
        assert_eq!(p.header_len, 7);
        // v5 QoS0 with alias 3 and empty topic
        let body = [0, 0, 3, prop::TOPIC_ALIAS, 0, 3, b'x'];
        let p = parse_publish(0, &body, Version::V5).unwrap();
        assert_eq!(p.topic, "");
        assert_eq!(p.topic_alias, Some(3));
        assert_eq!(p.header_len, 6);
        // wildcard topic
        let body = [0, 3, b'a', b'/', b'#'];
        assert!(parse_publish(0, &body, Version::V4).is_err());
        // empty topic without alias
        assert!(parse_publish(0, &[0, 0, 0], Version::V5).is_err());
        // truncated
        assert_eq!(
            parse_publish(0, &[0, 9, b'a'], Version::V4),
            Err(CodecError::Truncated)
        );
    }

    #[test]
    fn publish_layout_sizes() {
        // v4 QoS1 "a/b" pkid 7 payload "x"
        let body = [0, 3, b'a', b'/', b'b', 0, 7, b'x'];
        assert_eq!(publish_layout(0b0010, &body, Version::V4), Ok((3, 7)));
        // v5 QoS0 "t" with a subscription identifier property (2 bytes), payload "x"
        let body = [0, 1, b't', 2, prop::SUBSCRIPTION_ID, 5, b'x'];
        assert_eq!(publish_layout(0, &body, Version::V5), Ok((1, 6)));
        assert_eq!(
            publish_layout(0, &[0, 9, b'a'], Version::V4),
            Err(CodecError::Truncated)
        );
    }

    #[test]
    fn unsubscribe_parse() {
        let body = [0, 5, 0, 3, b'a', b'/', b'#', 0, 1, b'b'];
        assert_eq!(
            parse_unsubscribe(&body, Version::V4),
            Ok(vec!["a/#".to_string(), "b".to_string()])
        );
        let body = [0, 5, 0, 0, 1, b'b'];
        assert_eq!(
            parse_unsubscribe(&body, Version::V5),
            Ok(vec!["b".to_string()])
        );
        assert!(parse_unsubscribe(&[0, 5], Version::V4).is_err());
        assert!(parse_unsubscribe(&[0, 0, 0, 1, b'b'], Version::V4).is_err());
    }

    #[test]
    fn subscribe_parse() {
        let body = [0, 1, 0, 3, b'a', b'/', b'#', 1, 0, 1, b'b', 0];
        let s = parse_subscribe(&body, Version::V4).unwrap();
        assert_eq!(s.pkid, 1);
        assert_eq!(s.filters, vec!["a/#".to_string(), "b".to_string()]);
        assert_eq!(s.qos.len(), 2);
        let body = [0, 1, 0, 0, 1, b'b', 0];
        let s = parse_subscribe(&body, Version::V5).unwrap();
        assert_eq!(s.filters, vec!["b".to_string()]);
        assert!(parse_subscribe(&[0, 1], Version::V4).is_err());
        assert!(parse_subscribe(&[0, 1, 0, 1, b'b', 3], Version::V4).is_err());
    }

    #[test]
    fn connack_roundtrip_and_property_edit() {
        let mut props = Properties::default();
        props.set_u16(prop::TOPIC_ALIAS_MAX, 4096);
        let ack = ConnAck {
            session_present: true,
            code: 0,
            properties: props,
        };
        let bytes = ack.encode(Version::V5);
        let h = parse_fixed_header(&bytes).unwrap().unwrap();
        let mut parsed = parse_connack(&bytes[h.header_len..], Version::V5).unwrap();
        assert_eq!(parsed, ack);
        parsed.properties.set_u16(prop::TOPIC_ALIAS_MAX, 16);
        parsed
            .properties
            .set_str(prop::ASSIGNED_CLIENT_ID, "anon-1");
        let bytes = parsed.encode(Version::V5);
        let h = parse_fixed_header(&bytes).unwrap().unwrap();
        let again = parse_connack(&bytes[h.header_len..], Version::V5).unwrap();
        assert_eq!(again.properties.get_u16(prop::TOPIC_ALIAS_MAX), Some(16));
        assert_eq!(
            again.properties.get_binary(prop::ASSIGNED_CLIENT_ID),
            Some(&b"anon-1"[..])
        );
        assert_eq!(&ConnAck::code(5).encode(Version::V4)[..], &[0x20, 2, 0, 5]);
    }

    #[test]
    fn flag_checks() {
        let h = |b0| FixedHeader {
            byte0: b0,
            header_len: 2,
            remaining: 0,
        };
        assert!(check_client_flags(&h(0x82), Version::V4).is_ok());
        assert!(check_client_flags(&h(0x80), Version::V4).is_err());
        assert!(check_client_flags(&h(0x36), Version::V4).is_err()); // QoS 3
        assert!(check_client_flags(&h(0x00), Version::V4).is_err());
        assert!(check_client_flags(&h(0xf0), Version::V4).is_err());
        assert!(check_client_flags(&h(0xf0), Version::V5).is_ok());
        assert!(check_server_flags(&h(0x90)).is_ok());
        assert!(check_server_flags(&h(0x10)).is_err());
    }
}
