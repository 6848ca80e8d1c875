//! Node keys and identifiers.
//!
//! A node's identity is one ed25519 key. The same 32 secret bytes serve ed25519-dalek (capability
//! signatures) and libp2p (`Keypair::ed25519_from_bytes`), and [`NodeId`] prints exactly like the
//! libp2p `PeerId` of that key, so a node has one name everywhere.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::limits::MAX_NAME_BYTES;

/// Why a key or identifier could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Not valid base58.
    #[error("not base58: {0}")]
    Base58(String),
    /// Not the libp2p identity-multihash encoding of an ed25519 public key.
    #[error("not an ed25519 peer id (expected the 38-byte identity multihash)")]
    NotEd25519PeerId,
    /// The bytes are not a valid ed25519 point.
    #[error("invalid ed25519 public key")]
    InvalidKey,
    /// The secret key text is not 64 hex characters.
    #[error("secret key must be 64 hex characters")]
    BadSecret,
    /// An agent name breaks the naming rule.
    #[error("invalid agent name {0:?}: use 1-{MAX_NAME_BYTES} characters from [A-Za-z0-9_.-]")]
    BadName(String),
    /// An agent id is not `name@nodeid`.
    #[error("agent id must look like name@nodeid")]
    BadAgentId,
}

/// A node's secret signing key. Its `Debug` never prints the secret.
#[derive(Clone)]
pub struct NodeKey(SigningKey);

impl NodeKey {
    /// Generates a new key from a cryptographic RNG (passed in: the core never owns randomness).
    pub fn generate<R: rand_core::CryptoRng + ?Sized>(rng: &mut R) -> Self {
        Self(SigningKey::generate(rng))
    }

    /// Builds the key from its 32 secret bytes.
    pub fn from_secret_bytes(bytes: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&bytes))
    }

    /// The 32 secret bytes; also the input of libp2p's `Keypair::ed25519_from_bytes`.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The key as 64 lowercase hex characters (the key-file format).
    pub fn to_secret_hex(&self) -> String {
        hex(&self.secret_bytes())
    }

    /// Parses [`NodeKey::to_secret_hex`] output; surrounding whitespace is ignored.
    pub fn from_secret_hex(text: &str) -> Result<Self, IdError> {
        let text = text.trim();
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(IdError::BadSecret);
        }
        let mut out = [0u8; 32];
        for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
            let s = std::str::from_utf8(chunk).map_err(|_| IdError::BadSecret)?;
            out[i] = u8::from_str_radix(s, 16).map_err(|_| IdError::BadSecret)?;
        }
        Ok(Self::from_secret_bytes(out))
    }

    /// This key's public node id.
    pub fn node_id(&self) -> NodeId {
        NodeId(self.0.verifying_key().to_bytes())
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.0
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({:?})", self.node_id())
    }
}

/// A node's public identity: its ed25519 public key.
///
/// `Display`/`FromStr` use the libp2p `PeerId` text form (base58 of the identity multihash of the
/// protobuf-encoded key), e.g. `12D3KooW...`. `Debug` is short.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub [u8; 32]);

/// identity multihash (0x00), length 36, protobuf: field 1 varint KeyType=Ed25519(1), field 2 bytes(32).
const PEER_ID_PREFIX: [u8; 6] = [0x00, 0x24, 0x08, 0x01, 0x12, 0x20];

impl NodeId {
    /// The raw public key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The libp2p `PeerId` bytes (identity multihash) of this key.
    pub fn to_peer_id_bytes(&self) -> [u8; 38] {
        let mut out = [0u8; 38];
        out[..6].copy_from_slice(&PEER_ID_PREFIX);
        out[6..].copy_from_slice(&self.0);
        out
    }

    /// Parses libp2p `PeerId` bytes of an ed25519 key.
    pub fn from_peer_id_bytes(bytes: &[u8]) -> Result<Self, IdError> {
        if bytes.len() != 38 || bytes[..6] != PEER_ID_PREFIX {
            return Err(IdError::NotEd25519PeerId);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes[6..]);
        VerifyingKey::from_bytes(&key).map_err(|_| IdError::InvalidKey)?;
        Ok(Self(key))
    }

    pub(crate) fn verifying_key(&self) -> Option<VerifyingKey> {
        VerifyingKey::from_bytes(&self.0).ok()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.to_peer_id_bytes()).into_string())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.to_string();
        // Skip the constant "12D3KooW" prefix that every ed25519 peer id shares.
        write!(f, "NodeId({})", s.get(8..18).unwrap_or(&s))
    }
}

impl FromStr for NodeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = bs58::decode(s.trim())
            .into_vec()
            .map_err(|e| IdError::Base58(e.to_string()))?;
        Self::from_peer_id_bytes(&bytes)
    }
}

/// An agent's name, unique on its host node: 1–64 characters from `[A-Za-z0-9_.-]`.
///
/// The same rule as the MQTT client ids the broker accepts, so an agent's MQTT identity and its
/// federation identity are the same string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgentName(String);

impl AgentName {
    /// Validates and wraps a name.
    pub fn new(name: impl Into<String>) -> Result<Self, IdError> {
        let name = name.into();
        if is_valid_name(&name) {
            Ok(Self(name))
        } else {
            Err(IdError::BadName(name))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The naming rule of agents (and of MQTT principals).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl TryFrom<String> for AgentName {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<AgentName> for String {
    fn from(value: AgentName) -> Self {
        value.0
    }
}

impl fmt::Display for AgentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AgentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl FromStr for AgentName {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// An agent's federation-wide id: its name, scoped to the node that hosts it. Text form `name@nodeid`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AgentId {
    /// The hosting node; only that node may sign this agent's capability vectors.
    pub node: NodeId,
    /// The agent's name on that node.
    pub name: AgentName,
}

impl AgentId {
    /// Builds an agent id.
    pub fn new(node: NodeId, name: AgentName) -> Self {
        Self { node, name }
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.node)
    }
}

impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentId({}@{:?})", self.name, self.node)
    }
}

impl FromStr for AgentId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, node) = s.rsplit_once('@').ok_or(IdError::BadAgentId)?;
        Ok(Self {
            node: node.parse()?,
            name: name.parse()?,
        })
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> NodeKey {
        NodeKey::from_secret_bytes([7u8; 32])
    }

    #[test]
    fn node_id_round_trips_as_peer_id_text() {
        let id = key().node_id();
        let text = id.to_string();
        assert!(text.starts_with("12D3KooW"), "{text}");
        assert_eq!(text.parse::<NodeId>(), Ok(id));
        assert!(format!("{id:?}").len() < 24);
    }

    #[test]
    fn node_id_rejects_garbage() {
        assert!("not-base58-0OIl".parse::<NodeId>().is_err());
        assert_eq!(
            "3mJr7AoUXx2Wqd".parse::<NodeId>(),
            Err(IdError::NotEd25519PeerId)
        );
    }

    #[test]
    fn secret_hex_round_trips_and_debug_hides_secret() {
        let k = key();
        let k2 = NodeKey::from_secret_hex(&format!("{}\n", k.to_secret_hex())).expect("parse");
        assert_eq!(k.node_id(), k2.node_id());
        assert!(!format!("{k:?}").contains(&k.to_secret_hex()));
        assert_eq!(
            NodeKey::from_secret_hex("zz").map(|k| k.node_id()),
            Err(IdError::BadSecret)
        );
    }

    #[test]
    fn agent_names_and_ids() {
        assert!(AgentName::new("ocr-1.v2_x").is_ok());
        for bad in ["", "a/b", "a+b", "a#", "$sys", "a b", &"x".repeat(65)] {
            assert!(AgentName::new(bad).is_err(), "{bad:?} accepted");
        }
        let id = AgentId::new(key().node_id(), AgentName::new("ocr").expect("name"));
        assert_eq!(id.to_string().parse::<AgentId>(), Ok(id));
        assert_eq!("ocr".parse::<AgentId>(), Err(IdError::BadAgentId));
    }
}
