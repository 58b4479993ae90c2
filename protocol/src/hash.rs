//! SHA-256 content addresses: models, plans and updates are named by the hash of their bytes.

use std::fmt;

use ring::digest;

/// Why a text is not a [`ContentHash`]; the text is quoted as given, so a log shows what was sent.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ParseHashError {
    #[error("'{text}' is not a hex SHA-256: {source}; a content address is 64 hex characters")]
    NotHex { text: String, source: hex::FromHexError },
    #[error("'{text}' is not a SHA-256: expected 64 hex characters (32 bytes), got {bytes} bytes")]
    WrongLength { text: String, bytes: usize },
}

/// A SHA-256 digest, shown and sent as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash([u8; 32]);

impl ContentHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let d = digest::digest(&digest::SHA256, bytes);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }

    /// Parses 64 hex characters; anything else is refused with the reason.
    pub fn parse(text: &str) -> Result<Self, ParseHashError> {
        let bytes = hex::decode(text).map_err(|source| ParseHashError::NotHex { text: text.to_string(), source })?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| ParseHashError::WrongLength { text: text.to_string(), bytes: b.len() })?;
        Ok(Self(arr))
    }

    /// The hex form, as used in file names and on the wire.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex characters, for log lines and tables.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({})", self.short())
    }
}

/// Incremental SHA-256 for data that arrives in chunks.
pub struct Hasher(digest::Context);

impl Default for Hasher {
    fn default() -> Self {
        Self(digest::Context::new(&digest::SHA256))
    }
}

impl Hasher {
    /// Feeds the next chunk.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The hash of everything fed so far.
    pub fn finish(self) -> ContentHash {
        let d = self.0.finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        ContentHash(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_and_incremental_agree() {
        // FIPS 180-2 test vector for "abc".
        let h = ContentHash::of(b"abc");
        assert_eq!(h.to_hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let mut inc = Hasher::default();
        inc.update(b"a");
        inc.update(b"bc");
        assert_eq!(inc.finish(), h);
        assert_eq!(ContentHash::parse(&h.to_hex()), Ok(h));
        assert!(matches!(ContentHash::parse("abc"), Err(ParseHashError::NotHex { .. })));
        assert!(matches!(ContentHash::parse(&"zz".repeat(32)), Err(ParseHashError::NotHex { .. })));
        let short = ContentHash::parse("abcd").err().map(|e| e.to_string());
        assert_eq!(
            short.as_deref(),
            Some("'abcd' is not a SHA-256: expected 64 hex characters (32 bytes), got 2 bytes")
        );
    }
}
