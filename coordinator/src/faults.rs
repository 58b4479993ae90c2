//! Test hooks for the end-to-end fault tests (tests/tests/secagg.rs, privacy.rs): a dump of each
//! secure-aggregation round's unmasked sum, so a test can check the aggregate out of band.
//! Compiled only with the `fault-injection` feature: a production build has none of this code,
//! so no setting can switch a hook on.
//!
//! The service receives a [`FaultOptions`] in its options from `main`; nothing here reads the
//! environment. `main` builds it with [`FaultOptions::from_lookup`] over the process environment,
//! so the tests keep setting the variables named in [`vars`], and the parser is tested over a map.

use std::path::{Path, PathBuf};

/// The environment variables [`FaultOptions::from_lookup`] reads.
pub mod vars {
    /// A directory: each secure-aggregation round's unmasked sum is written there as
    /// `sum-round-R.u32` (little-endian words).
    pub const SECAGG_DUMP: &str = "SANCTUM_TEST_SECAGG_DUMP";
}

/// The hooks switched on for this coordinator process; the default switches none on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultOptions {
    /// Where each secure-aggregation round's unmasked sum is also written.
    pub secagg_dump: Option<PathBuf>,
}

/// A hook variable that is set but unusable: the coordinator does not start with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FaultError {
    #[error("{var} is set but empty: name a directory, or unset it")]
    Empty { var: &'static str },
}

impl FaultOptions {
    /// The hooks `get` (a variable's value by name) switches on.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, FaultError> {
        let secagg_dump = match get(vars::SECAGG_DUMP) {
            Some(dir) if dir.is_empty() => return Err(FaultError::Empty { var: vars::SECAGG_DUMP }),
            Some(dir) => Some(PathBuf::from(dir)),
            None => None,
        };
        Ok(Self { secagg_dump })
    }

    /// Writes round `round`'s unmasked sum where [`FaultOptions::secagg_dump`] says, if set.
    pub fn dump_sum(&self, round: u32, words: &[u32]) {
        if let Some(dir) = &self.secagg_dump {
            let path = Path::new(dir).join(format!("sum-round-{round}.u32"));
            if let Err(e) = std::fs::write(&path, sanctum_protocol::secagg::wire::words_to_le(words)) {
                tracing::warn!("test dump {}: {e}", path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dump_is_switched_on_by_its_variable_only() {
        assert_eq!(FaultOptions::from_lookup(|_| None), Ok(FaultOptions::default()));
        let on = FaultOptions::from_lookup(|v| (v == vars::SECAGG_DUMP).then(|| "/tmp/dump".to_string()));
        assert_eq!(on.map(|f| f.secagg_dump), Ok(Some(PathBuf::from("/tmp/dump"))));
        let empty = FaultOptions::from_lookup(|v| (v == vars::SECAGG_DUMP).then(String::new));
        assert_eq!(empty, Err(FaultError::Empty { var: vars::SECAGG_DUMP }));
    }

    #[test]
    fn a_dump_writes_the_sum_as_little_endian_words() {
        let dir = tempfile::tempdir().unwrap();
        let faults = FaultOptions { secagg_dump: Some(dir.path().to_path_buf()) };
        faults.dump_sum(3, &[1, 0x0102_0304]);
        let bytes = std::fs::read(dir.path().join("sum-round-3.u32")).unwrap();
        assert_eq!(bytes, [1, 0, 0, 0, 4, 3, 2, 1]);
        FaultOptions::default().dump_sum(4, &[1]);
        assert!(!dir.path().join("sum-round-4.u32").exists());
    }
}
