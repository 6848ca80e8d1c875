//! Per-agent MQTT credentials, stored hashed in a TOML file.
//!
//! ```toml
//! [agents.alice]
//! salt = "5f0c…"   # 16 random bytes, hex
//! hash = "9a1e…"   # blake3 derive_key("fedmesh credentials v1", salt || password), hex
//! ```
//!
//! Passwords are generated, never chosen: 32 random bytes, hex-encoded (256 bits of
//! entropy). Against such tokens a slow password hash (argon2, scrypt) buys nothing: it
//! exists to slow down dictionary guessing of *human-chosen* passwords, and no
//! dictionary covers 2^256 tokens; a single fast keyed hash already makes a leaked file
//! useless for logging in. The salt keeps equal tokens (there are none in practice)
//! from having equal hashes, and the hash is compared in constant time.
//!
//! The file is written atomically (temporary file in the same directory, then rename)
//! with mode 0600. The broker re-reads it when its modification time or size changes,
//! checked at most once per second, on CONNECT.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::acl::valid_name;
use crate::error::BrokerError;

/// blake3 `derive_key` context of the credential hash.
const CONTEXT: &str = "fedmesh credentials v1";
/// How often the broker looks at the file's modification time.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Default, Serialize, Deserialize)]
struct CredentialFile {
    #[serde(default)]
    agents: BTreeMap<String, FileEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileEntry {
    salt: String,
    hash: String,
}

#[derive(Debug, Clone)]
struct Entry {
    salt: Vec<u8>,
    hash: blake3::Hash,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// (modification time, length) of the file last loaded; `None` when it was missing.
    stamp: Option<(SystemTime, u64)>,
    last_check: Option<Instant>,
}

/// The credential file, as the running broker sees it.
#[derive(Debug)]
pub struct CredentialStore {
    path: PathBuf,
    state: Mutex<State>,
}

fn hash(salt: &[u8], password: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_derive_key(CONTEXT);
    h.update(salt);
    h.update(password);
    h.finalize()
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    rand::fill(&mut buf[..]);
    hex(&buf)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BrokerError + '_ {
    move |source| BrokerError::CredentialsIo {
        path: path.to_path_buf(),
        source,
    }
}

fn read_file(path: &Path) -> Result<CredentialFile, BrokerError> {
    match fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|source| BrokerError::CredentialsParse {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CredentialFile::default()),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn decode_entries(
    path: &Path,
    file: &CredentialFile,
) -> Result<HashMap<String, Entry>, BrokerError> {
    let mut out = HashMap::with_capacity(file.agents.len());
    for (name, e) in &file.agents {
        let bad = |reason| BrokerError::CredentialsEntry {
            path: path.to_path_buf(),
            name: name.clone(),
            reason,
        };
        if !valid_name(name) {
            return Err(bad("invalid agent name"));
        }
        let salt = data_encoding::HEXLOWER_PERMISSIVE
            .decode(e.salt.as_bytes())
            .map_err(|_| bad("salt is not hex"))?;
        let hash = blake3::Hash::from_hex(e.hash.as_bytes())
            .map_err(|_| bad("hash is not 32 bytes of hex"))?;
        out.insert(name.clone(), Entry { salt, hash });
    }
    Ok(out)
}

/// Writes `file` to `path` atomically with mode 0600.
fn write_file(path: &Path, file: &CredentialFile) -> Result<(), BrokerError> {
    let text = toml::to_string(file)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "credentials.toml".into());
    let tmp = dir.join(format!(".{file_name}.tmp-{}", random_hex(8)));
    let result = (|| {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(b"# fedmesh agent credentials: managed by `fedmesh agent add/remove`.\n")?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(&dir) {
            // Make the rename durable; not all platforms support syncing a directory.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

impl CredentialStore {
    /// Creates a password for `name`, stores its salted hash in the file at `path`
    /// (created if missing) and returns the password, which is not stored anywhere.
    ///
    /// Refuses an existing name unless `force`.
    pub fn add(path: &Path, name: &str, force: bool) -> Result<String, BrokerError> {
        if !valid_name(name) {
            return Err(BrokerError::InvalidName(name.to_owned()));
        }
        let mut file = read_file(path)?;
        if file.agents.contains_key(name) && !force {
            return Err(BrokerError::NameExists(name.to_owned()));
        }
        let password = random_hex(32);
        let mut salt = vec![0u8; 16];
        rand::fill(&mut salt[..]);
        let entry = FileEntry {
            salt: hex(&salt),
            hash: hash(&salt, password.as_bytes()).to_hex().to_string(),
        };
        file.agents.insert(name.to_owned(), entry);
        write_file(path, &file)?;
        Ok(password)
    }

    /// Removes `name` from the file at `path`.
    pub fn remove(path: &Path, name: &str) -> Result<(), BrokerError> {
        let mut file = read_file(path)?;
        if file.agents.remove(name).is_none() {
            return Err(BrokerError::NameNotFound(name.to_owned()));
        }
        write_file(path, &file)
    }

    /// The names in the file at `path`, sorted (an absent file has none).
    pub fn list(path: &Path) -> Result<Vec<String>, BrokerError> {
        Ok(read_file(path)?.agents.into_keys().collect())
    }

    /// Opens the file at `path` for the running broker (an absent file has no entries
    /// and is picked up when it appears).
    pub fn open(path: &Path) -> Result<Self, BrokerError> {
        let store = Self {
            path: path.to_path_buf(),
            state: Mutex::new(State::default()),
        };
        {
            let mut st = store.lock();
            store.reload(&mut st, true)?;
        }
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Re-reads the file when due and changed. Errors keep the previous entries.
    fn reload(&self, st: &mut State, force: bool) -> Result<(), BrokerError> {
        let now = Instant::now();
        if !force
            && st
                .last_check
                .is_some_and(|t| now.duration_since(t) < RELOAD_INTERVAL)
        {
            return Ok(());
        }
        st.last_check = Some(now);
        let stamp = match fs::metadata(&self.path) {
            Ok(m) => Some((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&self.path)(e)),
        };
        if !force && stamp == st.stamp {
            return Ok(());
        }
        let file = read_file(&self.path)?;
        let entries = decode_entries(&self.path, &file)?;
        if !force {
            info!(path = %self.path.display(), agents = entries.len(), "credentials reloaded");
        }
        st.entries = entries;
        st.stamp = stamp;
        Ok(())
    }

    fn fresh(&self) -> std::sync::MutexGuard<'_, State> {
        let mut st = self.lock();
        if let Err(e) = self.reload(&mut st, false) {
            warn!(error = %e, "credentials file not reloaded; keeping the previous entries");
        }
        st
    }

    /// Whether `password` is valid for `name` (constant-time hash comparison).
    pub fn verify(&self, name: &str, password: &[u8]) -> bool {
        let st = self.fresh();
        match st.entries.get(name) {
            // blake3::Hash's PartialEq is constant-time.
            Some(e) => hash(&e.salt, password) == e.hash,
            None => false,
        }
    }

    /// Whether `name` has credentials (such names are refused to anonymous clients).
    pub fn contains(&self, name: &str) -> bool {
        self.fresh().entries.contains_key(name)
    }

    /// The file this store reads.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn add_verify_remove_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/credentials.toml");
        let pw = CredentialStore::add(&path, "alice", false).unwrap();
        assert_eq!(pw.len(), 64);
        assert!(pw.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(matches!(
            CredentialStore::add(&path, "alice", false),
            Err(BrokerError::NameExists(_))
        ));
        assert!(matches!(
            CredentialStore::add(&path, "a/b", false),
            Err(BrokerError::InvalidName(_))
        ));
        let pw_bob = CredentialStore::add(&path, "bob", false).unwrap();
        assert_eq!(CredentialStore::list(&path).unwrap(), vec!["alice", "bob"]);

        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&pw), "password must not be stored");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }

        let store = CredentialStore::open(&path).unwrap();
        assert!(store.verify("alice", pw.as_bytes()));
        assert!(store.verify("bob", pw_bob.as_bytes()));
        assert!(!store.verify("alice", pw_bob.as_bytes()));
        assert!(!store.verify("carol", pw.as_bytes()));
        assert!(store.contains("alice"));

        // Replacing with force invalidates the old password (after the reload interval).
        let pw2 = CredentialStore::add(&path, "alice", true).unwrap();
        CredentialStore::remove(&path, "bob").unwrap();
        assert!(matches!(
            CredentialStore::remove(&path, "bob"),
            Err(BrokerError::NameNotFound(_))
        ));
        std::thread::sleep(RELOAD_INTERVAL + Duration::from_millis(50));
        assert!(store.verify("alice", pw2.as_bytes()));
        assert!(!store.verify("alice", pw.as_bytes()));
        assert!(!store.verify("bob", pw_bob.as_bytes()));
        assert_eq!(CredentialStore::list(&path).unwrap(), vec!["alice"]);
    }

    #[test]
    fn missing_and_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.toml");
        assert!(CredentialStore::list(&path).unwrap().is_empty());
        let store = CredentialStore::open(&path).unwrap();
        assert!(!store.verify("alice", b"x"));
        fs::write(&path, "[agents.alice]\nsalt = \"zz\"\nhash = \"00\"\n").unwrap();
        assert!(matches!(
            CredentialStore::open(&path),
            Err(BrokerError::CredentialsEntry { .. })
        ));
        fs::write(&path, "not toml [").unwrap();
        assert!(matches!(
            CredentialStore::open(&path),
            Err(BrokerError::CredentialsParse { .. })
        ));
    }
}
