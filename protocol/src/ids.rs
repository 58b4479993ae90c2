//! Typed ids: a plan id ([`PlanId`]), a run id ([`RunId`]) and a node's name ([`NodeName`]), each a
//! string of one checked form. A value of these types was parsed at the trust boundary (a wire
//! field, a certificate, a stored row), so code past the boundary never re-checks it, and a map
//! keyed by one kind of id cannot be handed another.
//!
//! Their serialised form is the bare string (serde), so every stored format (checkpoints,
//! database rows, `runs.json`, audit lines) is what it was when these were `String`s; reading one
//! back checks the form too. [`IdError`] says what was wrong and never echoes the value, which
//! may be hostile (2 MiB long, control characters, a path).

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Which kind of id an [`IdError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdKind {
    Plan,
    Run,
    Node,
}

impl IdKind {
    /// The form an id of this kind must have, as the error messages state it.
    pub fn rule(self) -> &'static str {
        match self {
            Self::Plan => "a plan id is 64 lowercase hex characters (the SHA-256 of the plan)",
            Self::Run => "a run id is 32 lowercase hex characters (128 random bits)",
            Self::Node => {
                "a node name is 1 to 63 lowercase letters, digits, '-' or '_', starting with a letter or digit (its certificate's name)"
            }
        }
    }
}

impl fmt::Display for IdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Plan => "plan id",
            Self::Run => "run id",
            Self::Node => "node name",
        })
    }
}

/// What kind of character broke an id's form, so a message can say why without echoing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadChar {
    /// An upper-case letter (ids are lowercase so that one id has one spelling).
    UpperCase,
    /// `/`, `\` or `.`: an id never becomes a path.
    PathSeparator,
    /// A control character, NUL included: an id never forges a log line.
    Control,
    /// Anything outside ASCII.
    NonAscii,
    /// Any other character the form does not allow.
    Other,
}

impl BadChar {
    fn of(c: char) -> Self {
        match c {
            'A'..='Z' => Self::UpperCase,
            '/' | '\\' | '.' => Self::PathSeparator,
            c if c.is_control() => Self::Control,
            c if !c.is_ascii() => Self::NonAscii,
            _ => Self::Other,
        }
    }
}

impl fmt::Display for BadChar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::UpperCase => "an upper-case letter",
            Self::PathSeparator => "a path character ('/', '\\' or '.')",
            Self::Control => "a control character",
            Self::NonAscii => "a non-ASCII character",
            Self::Other => "a character the form does not allow",
        })
    }
}

/// Why a string is not an id of its kind. The value itself is never part of the message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty: {}", kind.rule())]
    Empty { kind: IdKind },
    #[error("{kind} has {got} bytes: {}", kind.rule())]
    Length { kind: IdKind, got: usize },
    #[error("{kind} has {what} at byte {at}: {}", kind.rule())]
    Character { kind: IdKind, what: BadChar, at: usize },
}

impl IdError {
    /// The kind of id that was refused.
    pub fn kind(&self) -> IdKind {
        match self {
            Self::Empty { kind } | Self::Length { kind, .. } | Self::Character { kind, .. } => *kind,
        }
    }
}

fn is_lower_hex(c: char) -> bool {
    c.is_ascii_digit() || ('a'..='f').contains(&c)
}

/// Checks `s` against a fixed-length lowercase-hex form.
fn check_hex(kind: IdKind, s: &str, len: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    // The first bad character is reported before the length, so "../../etc" says what it is.
    if let Some((at, c)) = s.char_indices().find(|&(_, c)| !is_lower_hex(c)) {
        return Err(IdError::Character { kind, what: BadChar::of(c), at });
    }
    if s.len() != len {
        return Err(IdError::Length { kind, got: s.len() });
    }
    Ok(())
}

/// The longest node name: certificates, file names and log lines carry it.
pub const NODE_NAME_MAX: usize = 63;

/// Checks `s` against the certificate-name rule (`pki::validate_name` uses this one).
fn check_node_name(s: &str) -> Result<(), IdError> {
    let kind = IdKind::Node;
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
    if let Some((at, c)) = s.char_indices().find(|&(i, c)| !allowed(c) || (i == 0 && (c == '-' || c == '_'))) {
        return Err(IdError::Character { kind, what: BadChar::of(c), at });
    }
    if s.len() > NODE_NAME_MAX {
        return Err(IdError::Length { kind, got: s.len() });
    }
    Ok(())
}

/// Declares one id type: a `String` of a checked form, read-only, serialised as the bare string.
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Parses `s` at a trust boundary; the error says what was wrong, never what `s` was.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                let check: fn(&str) -> Result<(), IdError> = $check;
                check(s).map(|()| Self(s.to_string()))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id as an owned `String`.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                let check: fn(&str) -> Result<(), IdError> = $check;
                check(&s).map(|()| Self(s))
            }
        }

        // Read-only access to the text: comparisons, `short(&id)`, `json!(id)` and map lookups by
        // `&str` stay as they were. There is no way back from `str` without `parse`.
        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        // Consistent with `Eq`, `Ord` and `Hash` (all the derived ones of the inner `String`), so a
        // map keyed by the id can be looked up by `&str`.
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = String::deserialize(deserializer)?;
                Self::try_from(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A plan's id: the lowercase hex SHA-256 of its wire TOML (`Plan::id_of`).
    PlanId,
    |s| check_hex(IdKind::Plan, s, 64)
);

id_type!(
    /// A run's id: 128 random bits the coordinator drew, in 32 lowercase hex characters.
    RunId,
    |s| check_hex(IdKind::Run, s, 32)
);

id_type!(
    /// A member's name as its certificate states it (`urn:sanctum:<role>:<name>`): 1 to 63 of
    /// `[a-z0-9_-]`, starting with a letter or digit.
    NodeName,
    check_node_name
);

impl PlanId {
    /// The id of a plan whose content address is `hash`.
    pub fn of_hash(hash: &crate::hash::ContentHash) -> Self {
        Self(hash.to_hex())
    }
}

impl RunId {
    /// The run id of these 128 bits (the caller draws them from a CSPRNG).
    pub fn from_bits(bits: u128) -> Self {
        Self(format!("{bits:032x}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX64: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn well_formed_ids_parse_and_print_as_they_came() {
        let plan = PlanId::parse(HEX64).unwrap();
        assert_eq!(plan.as_str(), HEX64);
        assert_eq!(plan.to_string(), HEX64);
        assert_eq!(format!("{plan:?}"), format!("{HEX64:?}"));
        let run = RunId::parse(&HEX64[..32]).unwrap();
        assert_eq!(run, &HEX64[..32]);
        assert_eq!(RunId::from_bits(0xab).as_str(), "000000000000000000000000000000ab");
        for name in ["cleveland", "a", "0", "st-marys_2", &"a".repeat(63)] {
            assert_eq!(NodeName::parse(name).unwrap().as_str(), name);
        }
        let hash = crate::hash::ContentHash::of(b"plan");
        assert_eq!(PlanId::parse(&hash.to_hex()).unwrap(), PlanId::of_hash(&hash));
    }

    /// Each input and the error it must give.
    #[test]
    fn hostile_ids_are_refused_naming_what_was_wrong() {
        use BadChar::*;
        use IdError::*;
        use IdKind::*;
        let long = "a".repeat(2 << 20);
        let table: Vec<(IdKind, String, IdError)> = vec![
            (Plan, String::new(), Empty { kind: Plan }),
            (Plan, "../../etc".into(), Character { kind: Plan, what: PathSeparator, at: 0 }),
            (Plan, format!("{HEX64}a"), Length { kind: Plan, got: 65 }),
            (Plan, HEX64[..63].into(), Length { kind: Plan, got: 63 }),
            (Plan, HEX64.to_uppercase(), Character { kind: Plan, what: UpperCase, at: 10 }),
            (Plan, format!("{}\0", &HEX64[..63]), Character { kind: Plan, what: Control, at: 63 }),
            (Plan, format!("{}/", &HEX64[..63]), Character { kind: Plan, what: PathSeparator, at: 63 }),
            (Plan, format!("{}g", &HEX64[..63]), Character { kind: Plan, what: Other, at: 63 }),
            (Plan, format!("{}é", &HEX64[..62]), Character { kind: Plan, what: NonAscii, at: 62 }),
            (Plan, long.clone(), Length { kind: Plan, got: 2 << 20 }),
            (Run, String::new(), Empty { kind: Run }),
            (Run, HEX64.into(), Length { kind: Run, got: 64 }),
            (Run, "r".into(), Character { kind: Run, what: Other, at: 0 }),
            (Run, "run_2-a".into(), Character { kind: Run, what: Other, at: 0 }),
            (Run, "ABCDEF0123456789abcdef0123456789".into(), Character { kind: Run, what: UpperCase, at: 0 }),
            (Run, format!("{}\n", &HEX64[..31]), Character { kind: Run, what: Control, at: 31 }),
            (Run, format!("..\\{}", &HEX64[..29]), Character { kind: Run, what: PathSeparator, at: 0 }),
            (Node, String::new(), Empty { kind: Node }),
            (Node, "Cleveland".into(), Character { kind: Node, what: UpperCase, at: 0 }),
            (Node, "a b".into(), Character { kind: Node, what: Other, at: 1 }),
            (Node, "-x".into(), Character { kind: Node, what: Other, at: 0 }),
            (Node, "_x".into(), Character { kind: Node, what: Other, at: 0 }),
            (Node, "x/y".into(), Character { kind: Node, what: PathSeparator, at: 1 }),
            (Node, "../etc".into(), Character { kind: Node, what: PathSeparator, at: 0 }),
            (Node, "a\0b".into(), Character { kind: Node, what: Control, at: 1 }),
            (Node, "zürich".into(), Character { kind: Node, what: NonAscii, at: 1 }),
            (Node, "a".repeat(64), Length { kind: Node, got: 64 }),
            (Node, long, Length { kind: Node, got: 2 << 20 }),
        ];
        for (kind, input, want) in table {
            let got = match kind {
                Plan => PlanId::parse(&input).map(drop),
                Run => RunId::parse(&input).map(drop),
                Node => NodeName::parse(&input).map(drop),
            };
            let shown: String = input.chars().take(20).collect();
            assert_eq!(got, Err(want.clone()), "{kind} {shown:?}");
            assert_eq!(want.kind(), kind);
            let message = want.to_string();
            assert!(message.starts_with(&kind.to_string()) && message.contains(kind.rule()), "{message}");
            assert!(message.len() < 260, "the value is never echoed: {message}");
        }
    }

    #[test]
    fn serialised_form_is_the_bare_string_and_reading_it_back_checks_it() {
        let plan = PlanId::parse(HEX64).unwrap();
        let node = NodeName::parse("cleveland").unwrap();
        let run = RunId::from_bits(7);
        let json = serde_json::to_string(&(&plan, &run, &node)).unwrap();
        assert_eq!(json, format!("[\"{HEX64}\",\"{run}\",\"cleveland\"]"));
        let back: (PlanId, RunId, NodeName) = serde_json::from_str(&json).unwrap();
        assert_eq!(back, (plan, run, node.clone()));
        // A map keyed by names stays the same JSON object, and is looked up by `&str`.
        let map: std::collections::BTreeMap<NodeName, u32> = [(node, 1)].into();
        assert_eq!(serde_json::to_string(&map).unwrap(), r#"{"cleveland":1}"#);
        assert_eq!(map.get("cleveland"), Some(&1));
        for bad in [r#""../../etc""#, r#""""#, r#""ABC""#] {
            let e = serde_json::from_str::<PlanId>(bad).unwrap_err().to_string();
            assert!(e.contains("plan id"), "{e}");
            assert!(serde_json::from_str::<NodeName>(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<std::collections::BTreeMap<NodeName, u32>>(r#"{"Bad Name":1}"#).is_err());
    }
}
