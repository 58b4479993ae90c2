//! Test hooks for the end-to-end fault tests (tests/tests/{stragglers, resume_transfer, secagg,
//! privacy}.rs): a stall before a round's training, an exit at a chosen point of a
//! secure-aggregation round, after a charge or part-way through an upload, and a dump of each
//! secure-aggregation input. Compiled only with the `fault-injection` feature: a production
//! build has none of this code, so no setting can switch a hook on.
//!
//! The daemon receives a [`FaultOptions`] from `main` ([`crate::daemon::Node::with_faults`]);
//! nothing here reads the environment. `main` builds it with [`FaultOptions::from_lookup`] over
//! the process environment, so the tests keep setting the `SANCTUM_FAULT_*` variables named in
//! [`vars`], and the parser is tested over a map.

use std::path::PathBuf;
use std::time::Duration;

/// The environment variables [`FaultOptions::from_lookup`] reads.
pub mod vars {
    /// With [`STALL_SECS`]: the round before whose training the node stalls.
    pub const STALL_ROUND: &str = "SANCTUM_FAULT_STALL_ROUND";
    /// With [`STALL_ROUND`]: how long it stalls, in seconds.
    pub const STALL_SECS: &str = "SANCTUM_FAULT_STALL_SECS";
    /// `before_input` or `after_input`: where in a secure-aggregation round the node exits.
    pub const SECAGG_EXIT: &str = "SANCTUM_FAULT_SECAGG_EXIT";
    /// With [`SECAGG_EXIT`]: only in this round (else the first round that gets there).
    pub const SECAGG_ROUND: &str = "SANCTUM_FAULT_SECAGG_ROUND";
    /// A directory: each quantised secure-aggregation input is written there too.
    pub const SECAGG_DUMP: &str = "SANCTUM_TEST_SECAGG_DUMP";
    /// Set (to anything): exit after a release is charged and before it is sent.
    pub const CRASH_AFTER_CHARGE: &str = "SANCTUM_FAULT_CRASH_AFTER_CHARGE";
    /// 1 to 100: exit once the coordinator acknowledged this share of an upload's bytes.
    pub const UPLOAD_EXIT_AT_PERCENT: &str = "SANCTUM_FAULT_UPLOAD_EXIT_AT_PERCENT";
}

/// The exit status of the secure-aggregation and upload hooks (tests/tests/secagg.rs and
/// resume_transfer.rs expect it).
pub const EXIT_FAULT: i32 = 71;
/// The exit status of the crash-after-charge hook (tests/tests/privacy.rs expects it).
pub const EXIT_AFTER_CHARGE: i32 = 70;

/// Where in a secure-aggregation round the node exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecAggPoint {
    /// Before the masked input is sent: the others go on without it (its mask is recovered).
    BeforeInput,
    /// After the masked input is sent: its input is in the sum and its shares must unmask it.
    AfterInput,
}

impl SecAggPoint {
    /// The variable's value that names this point.
    pub fn name(self) -> &'static str {
        match self {
            SecAggPoint::BeforeInput => "before_input",
            SecAggPoint::AfterInput => "after_input",
        }
    }
}

/// A stall before training a round, sending no heartbeat meanwhile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stall {
    pub round: u32,
    pub duration: Duration,
}

/// An exit at `at`, in `round` only when set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SecAggExit {
    pub at: SecAggPoint,
    pub round: Option<u32>,
}

/// The hooks switched on for this node process; the default switches none on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultOptions {
    /// The straggler tests: the node goes silent before one round's training.
    pub stall: Option<Stall>,
    /// The secure-aggregation dropout tests: the process exits with [`EXIT_FAULT`].
    pub secagg_exit: Option<SecAggExit>,
    /// Where each quantised secure-aggregation input is also written, as `NAME-round-R.u32`, so
    /// a test can check the aggregate out of band.
    pub secagg_dump: Option<PathBuf>,
    /// The crash-between-charge-and-send test: exit with [`EXIT_AFTER_CHARGE`] after a charge.
    pub crash_after_charge: bool,
    /// The resumable-upload test: exit with [`EXIT_FAULT`] once this share (1 to 100 %) of an
    /// upload is acknowledged.
    pub upload_exit_at_percent: Option<u8>,
}

/// A hook variable whose value cannot be used: a typo fails the node at start rather than
/// silently switching the hook off.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    #[error("{var}={value:?} is not {expected}; fix the test's environment")]
    Value { var: &'static str, value: String, expected: &'static str },
    #[error("{set} is set without {missing}; set both or neither")]
    Half { set: &'static str, missing: &'static str },
}

fn parse<T: std::str::FromStr>(
    var: &'static str,
    value: Option<String>,
    expected: &'static str,
    valid: impl Fn(&T) -> bool,
) -> Result<Option<T>, FaultError> {
    value
        .map(|v| match v.parse::<T>() {
            Ok(t) if valid(&t) => Ok(t),
            _ => Err(FaultError::Value { var, value: v, expected }),
        })
        .transpose()
}

impl FaultOptions {
    /// Reads the hook variables ([`vars`]) through `get` (`main` passes the process
    /// environment; tests a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<FaultOptions, FaultError> {
        let round = parse::<u32>(vars::STALL_ROUND, get(vars::STALL_ROUND), "a round number", |_| true)?;
        let secs = parse::<u64>(vars::STALL_SECS, get(vars::STALL_SECS), "a number of seconds", |_| true)?;
        let stall = match (round, secs) {
            (Some(round), Some(secs)) => Some(Stall { round, duration: Duration::from_secs(secs) }),
            (None, None) => None,
            (Some(_), None) => return Err(FaultError::Half { set: vars::STALL_ROUND, missing: vars::STALL_SECS }),
            (None, Some(_)) => return Err(FaultError::Half { set: vars::STALL_SECS, missing: vars::STALL_ROUND }),
        };
        let at = match get(vars::SECAGG_EXIT) {
            None => None,
            Some(v) => Some(match v.as_str() {
                "before_input" => SecAggPoint::BeforeInput,
                "after_input" => SecAggPoint::AfterInput,
                _ => {
                    return Err(FaultError::Value {
                        var: vars::SECAGG_EXIT,
                        value: v,
                        expected: "before_input or after_input",
                    });
                }
            }),
        };
        let secagg_round = parse::<u32>(vars::SECAGG_ROUND, get(vars::SECAGG_ROUND), "a round number", |_| true)?;
        let secagg_exit = match (at, secagg_round) {
            (Some(at), round) => Some(SecAggExit { at, round }),
            (None, None) => None,
            (None, Some(_)) => {
                return Err(FaultError::Half { set: vars::SECAGG_ROUND, missing: vars::SECAGG_EXIT });
            }
        };
        let upload_exit_at_percent = parse::<u8>(
            vars::UPLOAD_EXIT_AT_PERCENT,
            get(vars::UPLOAD_EXIT_AT_PERCENT),
            "a percentage from 1 to 100",
            |p| (1..=100).contains(p),
        )?;
        Ok(FaultOptions {
            stall,
            secagg_exit,
            secagg_dump: get(vars::SECAGG_DUMP).map(PathBuf::from),
            crash_after_charge: get(vars::CRASH_AFTER_CHARGE).is_some(),
            upload_exit_at_percent,
        })
    }

    /// How long to stall before training `round`, if at all.
    pub fn stall_before(&self, round: u32) -> Option<Duration> {
        self.stall.filter(|s| s.round == round).map(|s| s.duration)
    }

    /// Whether the node exits at `at` in `round`.
    pub fn exits_in_secagg(&self, at: SecAggPoint, round: u32) -> bool {
        self.secagg_exit.is_some_and(|e| e.at == at && e.round.is_none_or(|r| r == round))
    }

    /// The stall hook: sleeps before training `round` when asked to.
    pub async fn stall_before_training(&self, round: u32) {
        if let Some(d) = self.stall_before(round) {
            let secs = d.as_secs();
            tracing::warn!(round, secs, "{} is set: stalling before training", vars::STALL_ROUND);
            tokio::time::sleep(d).await;
        }
    }

    /// The secure-aggregation dropout hook: exits the process at `at` in `round` when asked to.
    pub fn secagg_exit(&self, at: SecAggPoint, round: u32) {
        if self.exits_in_secagg(at, round) {
            tracing::error!("{}={} in round {round}: exiting", vars::SECAGG_EXIT, at.name());
            std::process::exit(EXIT_FAULT);
        }
    }

    /// The crash-between-charge-and-send hook: exits right after a charge when asked to.
    pub fn crash_after_charge(&self) {
        if self.crash_after_charge {
            tracing::error!("{} is set: exiting before the update is sent", vars::CRASH_AFTER_CHARGE);
            std::process::exit(EXIT_AFTER_CHARGE);
        }
    }

    /// The dump hook: writes node `name`'s quantised input of `round` into the dump directory.
    pub fn dump_secagg_input(&self, name: &str, round: u32, words: &[u32]) {
        if let Some(dir) = &self.secagg_dump {
            let path = dir.join(format!("{name}-round-{round}.u32"));
            if let Err(e) = std::fs::write(&path, sanctum_protocol::secagg::wire::words_to_le(words)) {
                tracing::warn!("test dump {}: {e}", path.display());
            }
        }
    }

    /// The upload hook, as the link applies it ([`crate::link::Link::cut_uploads`]).
    pub fn upload_cut(&self) -> Option<crate::link::UploadCut> {
        self.upload_exit_at_percent.map(|percent| crate::link::UploadCut { percent, then: exit_at_cut })
    }
}

fn exit_at_cut(acknowledged: u64, total: u64) {
    tracing::error!(
        "{} is set: exiting with {acknowledged} of {total} upload bytes acknowledged",
        vars::UPLOAD_EXIT_AT_PERCENT
    );
    std::process::exit(EXIT_FAULT);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn read(vars: &[(&str, &str)]) -> Result<FaultOptions, FaultError> {
        let map: BTreeMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        FaultOptions::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn no_variable_switches_no_hook_on() {
        let f = read(&[]).unwrap();
        assert_eq!(f, FaultOptions::default());
        assert_eq!(f.stall_before(1), None);
        assert!(!f.exits_in_secagg(SecAggPoint::BeforeInput, 1));
        assert!(f.upload_cut().is_none() && !f.crash_after_charge && f.secagg_dump.is_none());
    }

    #[test]
    fn each_variable_switches_its_hook_on_as_the_tests_set_it() {
        let f = read(&[
            ("SANCTUM_FAULT_STALL_ROUND", "2"),
            ("SANCTUM_FAULT_STALL_SECS", "11"),
            ("SANCTUM_FAULT_CRASH_AFTER_CHARGE", "1"),
            ("SANCTUM_FAULT_UPLOAD_EXIT_AT_PERCENT", "60"),
            ("SANCTUM_TEST_SECAGG_DUMP", "/tmp/dump"),
        ])
        .unwrap();
        assert_eq!(f.stall_before(2), Some(Duration::from_secs(11)));
        assert_eq!(f.stall_before(1), None);
        assert!(f.crash_after_charge);
        assert_eq!(f.upload_cut().map(|c| c.percent), Some(60));
        assert_eq!(f.secagg_dump, Some(PathBuf::from("/tmp/dump")));
        // An empty value is still set (the old `var_os(..).is_some()`).
        assert!(read(&[("SANCTUM_FAULT_CRASH_AFTER_CHARGE", "")]).unwrap().crash_after_charge);
    }

    #[test]
    fn a_secagg_exit_fires_in_its_round_or_in_every_round() {
        use SecAggPoint::*;
        let any = read(&[("SANCTUM_FAULT_SECAGG_EXIT", "after_input")]).unwrap();
        assert!(any.exits_in_secagg(AfterInput, 1) && any.exits_in_secagg(AfterInput, 7));
        assert!(!any.exits_in_secagg(BeforeInput, 1));
        let third =
            read(&[("SANCTUM_FAULT_SECAGG_EXIT", "before_input"), ("SANCTUM_FAULT_SECAGG_ROUND", "3")]).unwrap();
        assert!(third.exits_in_secagg(BeforeInput, 3));
        assert!(!third.exits_in_secagg(BeforeInput, 2) && !third.exits_in_secagg(AfterInput, 3));
    }

    #[test]
    fn a_malformed_or_half_set_hook_is_an_error_naming_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("SANCTUM_FAULT_STALL_ROUND", "two"), ("SANCTUM_FAULT_STALL_SECS", "1")],
                "SANCTUM_FAULT_STALL_ROUND=\"two\"",
            ),
            (&[("SANCTUM_FAULT_STALL_ROUND", "2")], "without SANCTUM_FAULT_STALL_SECS"),
            (&[("SANCTUM_FAULT_SECAGG_EXIT", "during")], "before_input or after_input"),
            (&[("SANCTUM_FAULT_SECAGG_ROUND", "2")], "without SANCTUM_FAULT_SECAGG_EXIT"),
            (&[("SANCTUM_FAULT_UPLOAD_EXIT_AT_PERCENT", "0")], "from 1 to 100"),
            (&[("SANCTUM_FAULT_UPLOAD_EXIT_AT_PERCENT", "101")], "from 1 to 100"),
        ];
        for (vars, want) in cases {
            let e = read(vars).unwrap_err().to_string();
            assert!(e.contains(want), "{vars:?}: {e}");
        }
    }
}
